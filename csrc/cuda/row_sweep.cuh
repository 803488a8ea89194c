// Block-strided sweeps over one row of V elements, 16 bytes per load (and per store where the
// output row allows) instead of one element: the row kernels (logprobs.cu, fused.cu) stream
// [N, V] logits and are bound by memory, where 2-byte scalar loads leave most of the
// bandwidth unused.
//
// A row is split into a scalar head up to its first 16-byte boundary, whole packs of
// kPack<T> = 16 / sizeof(T) elements, and a scalar tail, so any row start and row stride
// works (a strided view, an odd V): every element j in [0, V) is visited exactly once, by one
// thread of the block, with its index. Which thread gets which element differs from the
// plain `for (j = threadIdx.x; j < V; j += blockDim.x)` loop; every caller only sums or maps.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "reduce.cuh"
#include "softmax_row.cuh"

// The host emulation (tests/cuda_emu) checks every packed access's alignment, as the GPU
// does (a misaligned one is a launch error there); on the device it costs nothing.
#ifndef ALIGNFUSE_EXPECT_ALIGNED
#define ALIGNFUSE_EXPECT_ALIGNED(ptr, bytes) ((void)0)
#endif

namespace alignfuse {

template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

// Elements of the row before its first 16-byte boundary (all V when the row does not even
// start on an element boundary, which torch never gives).
template <typename T>
__device__ __forceinline__ int64_t pack_head(const T* x, int64_t V) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(x);
  if (a % sizeof(T) != 0) return V;
  const int64_t head = static_cast<int64_t>(((16 - (a & 15)) & 15) / sizeof(T));
  return head < V ? head : V;
}

// f(j, x[j] as float) for every j in [0, V).
template <typename T, typename F>
__device__ __forceinline__ void sweep_row(const T* x, int64_t V, F&& f) {
  constexpr int P = kPack<T>;
  const int64_t head = pack_head(x, V);
  const int64_t packs = (V - head) / P;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) f(j, to_float(x[j]));
  const Pack<T, P>* xp = reinterpret_cast<const Pack<T, P>*>(x + head);
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
    ALIGNFUSE_EXPECT_ALIGNED(xp + k, sizeof(Pack<T, P>));
    const Pack<T, P> p = xp[k];
#pragma unroll
    for (int i = 0; i < P; ++i) f(head + k * P + i, to_float(p.v[i]));
  }
  for (int64_t j = head + packs * P + threadIdx.x; j < V; j += blockDim.x) f(j, to_float(x[j]));
}

// g[j] = f(j, x[j] as float) for every j in [0, V): read as sweep_row does; the writes of a
// pack are one packed store when g's row is aligned for it at that element (same phase as
// x's), else element by element. g may be x itself (G == T): each thread reads a pack, then
// writes it.
template <typename T, typename G, typename F>
__device__ __forceinline__ void map_row(const T* x, G* g, int64_t V, F&& f) {
  constexpr int P = kPack<T>;
  const int64_t head = pack_head(x, V);
  const int64_t packs = (V - head) / P;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) g[j] = from_float<G>(f(j, to_float(x[j])));
  const Pack<T, P>* xp = reinterpret_cast<const Pack<T, P>*>(x + head);
  Pack<G, P>* gp = reinterpret_cast<Pack<G, P>*>(g + head);
  const bool packed_store = reinterpret_cast<std::uintptr_t>(gp) % sizeof(Pack<G, P>) == 0;
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
    ALIGNFUSE_EXPECT_ALIGNED(xp + k, sizeof(Pack<T, P>));
    const Pack<T, P> p = xp[k];
    const int64_t j0 = head + k * P;
    if (packed_store) {
      Pack<G, P> q;
#pragma unroll
      for (int i = 0; i < P; ++i) q.v[i] = from_float<G>(f(j0 + i, to_float(p.v[i])));
      ALIGNFUSE_EXPECT_ALIGNED(gp + k, sizeof(Pack<G, P>));
      gp[k] = q;
    } else {
#pragma unroll
      for (int i = 0; i < P; ++i) g[j0 + i] = from_float<G>(f(j0 + i, to_float(p.v[i])));
    }
  }
  for (int64_t j = head + packs * P + threadIdx.x; j < V; j += blockDim.x)
    g[j] = from_float<G>(f(j, to_float(x[j])));
}

}  // namespace alignfuse
