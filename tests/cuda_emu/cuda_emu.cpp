// The scheduler behind cuda_emu.h: blocks one after the other, the threads of a block as
// fibers on the calling thread (a stack each, and a switch of the callee-saved registers: a
// few nanoseconds on x86-64; elsewhere ucontext, whose switch is a system call). A fiber runs
// until it reaches a barrier (__syncthreads, or one of the two halves of a warp shuffle) or
// returns; when no fiber can run, the barriers whose every participant has arrived open. A
// barrier that can never open (some threads wait at it while others wait elsewhere or have
// returned) is a launch error. Blocks, and threads between barriers, run in the order tests
// choose (forward, reverse or a seeded shuffle).
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(ALIGNFUSE_EMU_UCONTEXT)
#include <ucontext.h>
#define ALIGNFUSE_EMU_UCONTEXT 1
#endif

#include <algorithm>
#include <cstdlib>
#include <cstdio>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "registry.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

#ifndef ALIGNFUSE_EMU_UCONTEXT
// void alignfuse_emu_switch(void** save_sp, void* load_sp): saves the callee-saved registers
// on the current stack and its pointer in *save_sp, then resumes the stack load_sp (saved the
// same way, or laid out by Context::start). The System V ABI leaves every other register to
// the caller, and the kernels change neither the rounding mode nor the x87 control word.
extern "C" void alignfuse_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl alignfuse_emu_switch
.hidden alignfuse_emu_switch
.type alignfuse_emu_switch, @function
alignfuse_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size alignfuse_emu_switch, .-alignfuse_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#endif

namespace alignfuse_emu {
namespace {

// One execution context: the scheduler's (`home`) or a fiber's.
struct Context {
#ifdef ALIGNFUSE_EMU_UCONTEXT
  ucontext_t uc;
  void start(char* stack, std::size_t bytes, void (*entry)(), Context* home) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = &home->uc;
    makecontext(&uc, entry, 0);
  }
  void switch_to(Context& next) { swapcontext(&uc, &next.uc); }
#else
  void* sp = nullptr;
  // A stack whose first switch "returns" into entry: six zero registers, entry's address,
  // then a slot for entry's own (never used) return address, so that entry starts with the
  // stack pointer 8 below a multiple of 16, as after a call.
  void start(char* stack, std::size_t bytes, void (*entry)(), Context*) {
    auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~static_cast<std::uintptr_t>(15);
    auto* words = reinterpret_cast<void**>(top);
    words[-1] = nullptr;
    words[-2] = reinterpret_cast<void*>(entry);
    for (int i = 3; i <= 8; ++i) words[-i] = nullptr;
    sp = words - 8;
  }
  void switch_to(Context& next) { alignfuse_emu_switch(&sp, next.sp); }
#endif
};

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  Context ctx;
  dim3 tid;
  int warp = 0, lane = 0;
  State state = State::kReady;
};

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned kWarp = 32;
// The largest grid emulated (at ~1 ms a block, hours).
constexpr unsigned long long kMaxBlocks = 1ull << 24;

struct Scheduler {
  Context home;
  std::vector<Fiber> fibers;
  std::vector<std::uint64_t> slots;  // [warps * 32] shuffle values
  std::vector<int> order;
  char* stacks = nullptr;
  std::size_t stack_count = 0, page = 4096;
  const std::function<void()>* body = nullptr;
  int current = -1;
  // schedule: 0 forward, 1 reverse, 2 a seeded shuffle per block
  int mode = 2;
  std::mt19937_64 rng{0};
  cudaError_t last_error = cudaSuccess;
  std::string message;
  long long launches = 0, blocks = 0;
  std::uintptr_t expected_stream = 0;
  long long foreign_stream_launches = 0;  // launches on another stream than expected_stream
};

Scheduler& sched() {
  static Scheduler s;
  return s;
}

// A fiber's entry: the kernel, then back to the scheduler for good (it never returns).
void trampoline() {
  Scheduler& s = sched();
  (*s.body)();
  Fiber& f = s.fibers[s.current];
  f.state = State::kDone;
  f.ctx.switch_to(s.home);
  std::abort();  // a finished fiber is never resumed
}

void wait_here(State state) {
  Scheduler& s = sched();
  if (s.current < 0) throw std::logic_error("cuda_emu: a barrier outside a kernel");
  Fiber& f = s.fibers[s.current];
  f.state = state;
  f.ctx.switch_to(s.home);
}

// Stacks for n fibers, each above a guard page that faults on overflow.
void ensure_stacks(std::size_t n) {
  Scheduler& s = sched();
  if (n <= s.stack_count) return;
  if (s.stacks != nullptr) munmap(s.stacks, s.stack_count * (kStackBytes + s.page));
  s.page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t each = kStackBytes + s.page;
  void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fiber stacks");
  s.stacks = static_cast<char*>(p);
  s.stack_count = n;
  for (std::size_t i = 0; i < n; ++i) mprotect(s.stacks + i * each, s.page, PROT_NONE);
}

std::string where(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) +
         ") of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ")";
}

// Opens the barriers that every participant has reached; false when none can open.
bool open_barriers(Scheduler& s, std::string& why) {
  const int n = static_cast<int>(s.fibers.size());
  const int warps = (n + kWarp - 1) / kWarp;
  bool opened = false;
  for (int w = 0; w < warps; ++w) {
    const int lo = w * kWarp, hi = std::min(n, lo + static_cast<int>(kWarp));
    int at = 0;
    for (int i = lo; i < hi; ++i) at += s.fibers[i].state == State::kAtWarpBarrier;
    if (at == hi - lo) {
      for (int i = lo; i < hi; ++i) s.fibers[i].state = State::kReady;
      opened = true;
    } else if (at > 0 && why.empty()) {
      for (int i = lo; i < hi; ++i) {
        if (s.fibers[i].state != State::kAtWarpBarrier) {
          why = "a warp shuffle that " + where(s.fibers[i]) +
                (s.fibers[i].state == State::kDone ? " never reaches (it returned)" : " does not reach (it waits at __syncthreads)");
          break;
        }
      }
    }
  }
  if (opened) return true;
  int at_block = 0, done = 0;
  for (const Fiber& f : s.fibers) {
    at_block += f.state == State::kAtBlockBarrier;
    done += f.state == State::kDone;
  }
  if (at_block == n) {
    for (Fiber& f : s.fibers) f.state = State::kReady;
    return true;
  }
  if (at_block > 0 && why.empty()) {
    for (const Fiber& f : s.fibers) {
      if (f.state == State::kDone) {
        why = "__syncthreads reached by " + std::to_string(at_block) + " of " + std::to_string(n) +
              " threads: " + where(f) + " returned before it";
        break;
      }
    }
  }
  (void)done;
  return false;
}

bool run_block(Scheduler& s, dim3 block) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  s.fibers.assign(n, Fiber{});
  s.slots.assign(((n + kWarp - 1) / kWarp) * kWarp, 0);
  const std::size_t each = kStackBytes + s.page;
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.warp = i / kWarp;
    f.lane = i % kWarp;
    f.ctx.start(s.stacks + i * each + s.page, kStackBytes, trampoline, &s.home);
  }
  s.order.resize(n);
  std::iota(s.order.begin(), s.order.end(), 0);
  if (s.mode == 1) std::reverse(s.order.begin(), s.order.end());
  if (s.mode == 2) std::shuffle(s.order.begin(), s.order.end(), s.rng);
  for (;;) {
    bool ran = false;
    for (int i : s.order) {
      if (s.fibers[i].state != State::kReady) continue;
      s.current = i;
      threadIdx = s.fibers[i].tid;
      s.home.switch_to(s.fibers[i].ctx);
      ran = true;
      if (!s.message.empty()) {  // a fault (expect_aligned) or a bad shuffle: the launch fails
        s.current = -1;
        return false;
      }
    }
    s.current = -1;
    bool all_done = true;
    for (const Fiber& f : s.fibers) all_done = all_done && f.state == State::kDone;
    if (all_done) return true;
    std::string why;
    if (!open_barriers(s, why) && !ran) {
      s.message = why.empty() ? std::string("threads wait at barriers that cannot open") : why;
      return false;
    }
  }
}

}  // namespace

void warp_exchange(unsigned mask, const void* in, void* out, std::size_t bytes, int lane_mask) {
  Scheduler& s = sched();
  if (s.current < 0) throw std::logic_error("cuda_emu: a warp shuffle outside a kernel");
  const Fiber& f = s.fibers[s.current];
  const int n = static_cast<int>(s.fibers.size());
  const int lanes = std::min<int>(kWarp, n - f.warp * static_cast<int>(kWarp));
  const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) {
    // not emulated: partial masks (no kernel here uses them)
    if (s.message.empty()) s.message = "a warp shuffle with mask " + std::to_string(mask) + " (only a full warp is emulated)";
  }
  std::memcpy(&s.slots[s.current], in, bytes);
  wait_here(State::kAtWarpBarrier);
  const int partner = f.lane ^ lane_mask;
  const int src = (partner < lanes) ? f.warp * static_cast<int>(kWarp) + partner : s.current;
  std::memcpy(out, &s.slots[src], bytes);
  wait_here(State::kAtWarpBarrier);  // nobody overwrites a slot before every lane has read
}

void run_grid(dim3 grid, dim3 block, cudaStream_t stream, const std::function<void()>& body) {
  Scheduler& s = sched();
  if (reinterpret_cast<std::uintptr_t>(stream) != s.expected_stream) ++s.foreign_stream_launches;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  const unsigned long long count = 1ull * grid.x * grid.y * grid.z;
  if (count > kMaxBlocks)  // hours of emulation, and a list of block indices to permute
    throw std::invalid_argument("cuda_emu: a grid of " + std::to_string(count) + " blocks (more than " +
                                std::to_string(kMaxBlocks) + "); emulate smaller inputs");
  ensure_stacks(threads);
  s.body = &body;
  s.message.clear();
  blockDim = block;
  gridDim = grid;
  ++s.launches;
  // Blocks run in the schedule's order too (forward, reverse, or a seeded permutation of the
  // grid): CUDA promises no order between blocks, so a block that reads what another writes
  // (or writes past its own rows into another's) gives a different answer across orders.
  std::vector<unsigned long long> blocks(count);
  std::iota(blocks.begin(), blocks.end(), 0ull);
  if (s.mode == 1) std::reverse(blocks.begin(), blocks.end());
  if (s.mode == 2) std::shuffle(blocks.begin(), blocks.end(), s.rng);
  for (const unsigned long long b : blocks) {
    blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (1ull * grid.x * grid.y)));
    ++s.blocks;
    if (!run_block(s, block) || !s.message.empty()) {
      s.last_error = cudaErrorLaunchFailure;
      std::fprintf(stderr, "cuda_emu: %s\n", s.message.c_str());
      s.body = nullptr;
      return;
    }
  }
  s.body = nullptr;
}

const char* last_message() { return sched().message.c_str(); }

void block_barrier() { wait_here(State::kAtBlockBarrier); }

void expect_aligned(const void* ptr, std::size_t bytes) {
  Scheduler& s = sched();
  const auto address = reinterpret_cast<std::uintptr_t>(ptr);
  if (address % bytes == 0) return;
  char hex[32];
  std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(address));
  // The GPU faults (and so might the host: the compiler may use an aligned instruction), so
  // the launch stops here: this fiber is never resumed, and run_block abandons the block.
  Fiber& f = s.fibers[s.current];
  s.message = "misaligned address: a " + std::to_string(bytes) + "-byte access at " + hex + " by " + where(f);
  f.state = State::kDone;
  f.ctx.switch_to(s.home);
  std::abort();  // never resumed
}

namespace {
alignfuse::CudaRegistrar reg([](pybind11::module_& m) {
  m.def(
      "emu_schedule",
      [](const std::string& mode, unsigned long long seed) {
        Scheduler& s = sched();
        if (mode == "forward") s.mode = 0;
        else if (mode == "reverse") s.mode = 1;
        else if (mode == "shuffle") s.mode = 2;
        else throw std::invalid_argument("emu_schedule: mode must be forward, reverse or shuffle, got " + mode);
        s.rng.seed(seed);
      },
      "the order in which a grid's blocks run, and a block's threads between barriers: forward, "
      "reverse, or shuffle (permutations drawn from seed)");
  m.def("emu_counts", []() {
    pybind11::dict d;
    d["launches"] = sched().launches;
    d["blocks"] = sched().blocks;
    d["foreign_stream_launches"] = sched().foreign_stream_launches;
    return d;
  }, "kernel launches, blocks run, and launches on another stream than emu_expect_stream's");
  m.def(
      "emu_expect_stream",
      [](std::uintptr_t stream) {
        sched().expected_stream = stream;
        sched().foreign_stream_launches = 0;
      },
      "the stream handle launches should name (torch's current stream, as the tests fake it)");
});
}  // namespace

}  // namespace alignfuse_emu

void __syncthreads() { alignfuse_emu::block_barrier(); }

cudaError_t cudaGetLastError() {
  auto& s = alignfuse_emu::sched();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorLaunchFailure: {
      static std::string text;
      text = std::string("unspecified launch failure (cuda_emu: ") + alignfuse_emu::last_message() + ")";
      return text.c_str();
    }
  }
  return "unknown error";
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;  // the emulated device
  return cudaSuccess;
}
