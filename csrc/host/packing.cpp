// Sequence packing plan: best-fit decreasing bins (next-fit decreasing on width for a padded
// plan), split to a multiple of the rank count, equal-size Karmarkar-Karp partition across
// data-parallel ranks.
//
// This is the hot path of engine/packing.py::_plan_bins_python, which is the readable
// reference. The two must give IDENTICAL plans (tests/test_packing.py checks it), so every
// tie-break and every float addition below happens in the same order as there.
// Unit lists are singly linked lists over arrays (O(1) concatenation), so no step copies
// lists and 1M units plan in well under a second.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <queue>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "host_registry.h"

namespace py = pybind11;

namespace alignfuse {
namespace {

struct Plan {
  std::vector<int64_t> units_by_bin;  // [U] units grouped by bin, ascending within a bin
  std::vector<int64_t> bin_offsets;   // [B+1] bin b holds units_by_bin[offsets[b]:offsets[b+1]]
  std::vector<int64_t> schedule;      // [R * M] bin ids, rank-major
};

// A list of items (units or bins) threaded through a shared `next` array. `sum` is its cost;
// a padded bin also keeps its rows and its costliest row (`rows`, `row_cost`).
struct List {
  int64_t head = -1, tail = -1, count = 0;
  double sum = 0.0;
  int64_t rows = 0;
  double row_cost = 0.0;
};

void append(List& list, std::vector<int64_t>& next, int64_t item, double cost) {
  next[item] = -1;
  if (list.head < 0) list.head = item; else next[list.tail] = item;
  list.tail = item;
  list.count += 1;
  list.sum += cost;
}

// Finds the smallest set index >= i over [0, n): a bitmap with one summary level per 64x,
// so both `next` and updates touch O(log64 n) words.
class BitTree {
 public:
  explicit BitTree(int64_t n) {
    do {
      n = (n + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(n), 0);
    } while (n > 1);
  }
  void set(int64_t i) {
    for (auto& words : levels_) {
      words[i >> 6] |= uint64_t{1} << (i & 63);
      i >>= 6;
    }
  }
  void clear(int64_t i) {
    for (auto& words : levels_) {
      words[i >> 6] &= ~(uint64_t{1} << (i & 63));
      if (words[i >> 6] != 0) return;  // the parent's bit stays set
      i >>= 6;
    }
  }
  int64_t next(int64_t i) const {
    for (size_t level = 0; level < levels_.size(); ++level) {
      const int64_t w = i >> 6;
      if (w >= static_cast<int64_t>(levels_[level].size())) return -1;
      const uint64_t bits = levels_[level][w] & (~uint64_t{0} << (i & 63));
      if (bits != 0) {
        i = (w << 6) + __builtin_ctzll(bits);
        while (level-- > 0) i = (i << 6) + __builtin_ctzll(levels_[level][i]);
        return i;
      }
      i = w + 1;  // the next word, as an index one level up
    }
    return -1;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Whether structures indexed by token count (room left, length) pay off: they cost O(max_tokens)
// memory and set-up, so only when max_tokens is bounded and not large against the input. Both
// choices give the same plan; this only picks the faster one.
bool index_by_tokens(int64_t max_tokens, int64_t num_units) {
  return max_tokens <= (int64_t{1} << 20) && max_tokens <= 64 * num_units;
}

// Open bins by room left: `take(size)` removes and returns the bin with the least room >=
// size (lowest id among equal room) as (room, id), or (-1, -1).
// Two implementations of the same order: per-room min-heaps of ids under a BitTree when
// `indexed` (the common case, O(1)-ish per unit), else an ordered set of (room, id).
class OpenBins {
 public:
  OpenBins(int64_t max_tokens, bool indexed)
      : by_room_(indexed ? max_tokens + 1 : 0), nonempty_(indexed ? max_tokens + 1 : 1) {}

  std::pair<int64_t, int64_t> take(int64_t size) {
    if (by_room_.empty()) {
      auto it = set_.lower_bound({size, -1});
      if (it == set_.end()) return {-1, -1};
      auto found = *it;
      set_.erase(it);
      return found;
    }
    const int64_t room = nonempty_.next(size);
    if (room < 0) return {-1, -1};
    auto& ids = by_room_[room];
    std::pop_heap(ids.begin(), ids.end(), std::greater<int64_t>());
    const int64_t id = ids.back();
    ids.pop_back();
    if (ids.empty()) nonempty_.clear(room);
    return {room, id};
  }

  void put(int64_t room, int64_t id) {
    if (by_room_.empty()) {
      set_.emplace(room, id);
      return;
    }
    auto& ids = by_room_[room];
    if (ids.empty()) nonempty_.set(room);
    ids.push_back(id);
    std::push_heap(ids.begin(), ids.end(), std::greater<int64_t>());
  }

 private:
  std::vector<std::vector<int64_t>> by_room_;
  BitTree nonempty_;
  std::set<std::pair<int64_t, int64_t>> set_;
};

// Units by (tokens desc, index asc): a counting sort when `indexed`.
std::vector<int64_t> decreasing_order(const int64_t* tokens, int64_t num_units,
                                      int64_t max_tokens, bool indexed) {
  std::vector<int64_t> order(num_units);
  if (!indexed) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return tokens[a] > tokens[b]; });
    return order;
  }
  std::vector<int64_t> start(max_tokens + 2, 0);  // start[max_tokens - t]: first slot of t
  for (int64_t u = 0; u < num_units; ++u) start[max_tokens - tokens[u] + 1] += 1;
  for (int64_t k = 1; k <= max_tokens + 1; ++k) start[k] += start[k - 1];
  for (int64_t u = 0; u < num_units; ++u) order[start[max_tokens - tokens[u]]++] = u;
  return order;
}

// `tokens` (best-fit decreasing on tokens) or, for a padded plan, `widths` and `counts`
// (next-fit decreasing on width: a bin of n rows as wide as its first unit holds n * width
// <= max_tokens padded slots, and only units wider than half of it). `cost`: each unit's
// cost, or for a padded plan the cost of one of its rows padded to its width.
Plan plan_bins(const int64_t* tokens, const double* cost, int64_t num_units, int64_t max_tokens,
               int64_t num_ranks, const int64_t* widths = nullptr,
               const int64_t* counts = nullptr) {
  // Step 2: best-fit decreasing, or next-fit decreasing on width.
  const bool indexed = index_by_tokens(max_tokens, num_units);
  std::vector<List> bins;
  std::vector<int64_t> unit_next(num_units, -1);
  // A bin's cost: its units' costs summed, or its rows times its costliest row (every row
  // of a padded micro-batch is as wide as its widest).
  auto add = [&](List& bin, int64_t u) {
    if (widths == nullptr) {
      append(bin, unit_next, u, cost[u]);
      return;
    }
    append(bin, unit_next, u, 0.0);
    bin.rows += counts[u];
    bin.row_cost = std::max(bin.row_cost, cost[u]);
    bin.sum = static_cast<double>(bin.rows) * bin.row_cost;
  };
  if (widths != nullptr) {
    int64_t width = 0, rows = 0;
    for (int64_t u : decreasing_order(widths, num_units, max_tokens, indexed)) {
      // rows * width <= max_tokens, written so that nothing overflows
      if (bins.empty() || 2 * widths[u] <= width || rows + counts[u] > max_tokens / width) {
        bins.emplace_back();
        width = widths[u];
        rows = 0;
      }
      add(bins.back(), u);
      rows += counts[u];
    }
  } else {
    OpenBins open(max_tokens, indexed);
    for (int64_t u : decreasing_order(tokens, num_units, max_tokens, indexed)) {
      auto [room, b] = open.take(tokens[u]);
      if (b < 0) {
        room = max_tokens;
        b = static_cast<int64_t>(bins.size());
        bins.emplace_back();
      }
      add(bins[b], u);
      if (room - tokens[u] > 0) open.put(room - tokens[u], b);
    }
  }

  // Step 3: split the costliest multi-unit bin (lowest id on ties) until the bin count is a
  // multiple of num_ranks; its units go, in placement order, to the cheaper half.
  const int64_t initial = static_cast<int64_t>(bins.size());
  const int64_t target = num_ranks * ((initial + num_ranks - 1) / num_ranks);
  while (static_cast<int64_t>(bins.size()) < target) {
    int64_t best = -1;
    for (int64_t b = 0; b < static_cast<int64_t>(bins.size()); ++b)
      if (bins[b].count >= 2 && (best < 0 || bins[b].sum > bins[best].sum)) best = b;
    if (best < 0)
      throw std::invalid_argument(
          "cannot give num_ranks=" + std::to_string(num_ranks) +
          " ranks the same number of micro-batches: " + std::to_string(target) +
          " micro-batches are needed but there are only " + std::to_string(num_units) +
          " sequences/groups; pass more sequences per step or fewer ranks");
    List halves[2];
    for (int64_t u = bins[best].head; u >= 0;) {
      const int64_t following = unit_next[u];
      add(halves[halves[0].sum <= halves[1].sum ? 0 : 1], u);
      u = following;
    }
    bins[best] = halves[0];
    bins.push_back(halves[1]);
  }
  const int64_t num_bins = static_cast<int64_t>(bins.size());

  // Step 4: equal-size Karmarkar-Karp. A state is num_ranks subsets (lists of bins) sorted by
  // (sum desc, first bin asc); the state with the largest spread (then the oldest) merges
  // first, pairing its largest subsets with the other's smallest.
  std::vector<int64_t> by_cost(num_bins);
  std::iota(by_cost.begin(), by_cost.end(), 0);
  std::stable_sort(by_cost.begin(), by_cost.end(),
                   [&](int64_t a, int64_t b) { return bins[a].sum > bins[b].sum; });
  std::vector<int64_t> bin_next(num_bins, -1);
  std::vector<std::vector<List>> states;
  states.reserve(2 * (num_bins / num_ranks));
  auto spread = [&](int64_t s) { return states[s].front().sum - states[s].back().sum; };
  auto lower_priority = [&](int64_t a, int64_t b) {
    const double sa = spread(a), sb = spread(b);
    return sa < sb || (sa == sb && a > b);
  };
  std::priority_queue<int64_t, std::vector<int64_t>, decltype(lower_priority)> heap(
      lower_priority);
  for (int64_t k = 0; k < num_bins; k += num_ranks) {
    std::vector<List> state(num_ranks);
    for (int64_t r = 0; r < num_ranks; ++r) append(state[r], bin_next, by_cost[k + r], bins[by_cost[k + r]].sum);
    states.push_back(std::move(state));
    heap.push(static_cast<int64_t>(states.size()) - 1);
  }
  while (heap.size() > 1) {
    const int64_t a = heap.top(); heap.pop();
    const int64_t b = heap.top(); heap.pop();
    std::vector<List> merged(num_ranks);
    for (int64_t r = 0; r < num_ranks; ++r) {
      const List& x = states[a][r];
      const List& y = states[b][num_ranks - 1 - r];
      bin_next[x.tail] = y.head;
      merged[r] = {x.head, y.tail, x.count + y.count, x.sum + y.sum};
    }
    std::sort(merged.begin(), merged.end(), [](const List& x, const List& y) {
      return x.sum > y.sum || (x.sum == y.sum && x.head < y.head);
    });
    states[a].clear(); states[a].shrink_to_fit();
    states[b].clear(); states[b].shrink_to_fit();
    states.push_back(std::move(merged));
    heap.push(static_cast<int64_t>(states.size()) - 1);
  }

  // Step 5: each rank's bins by (cost desc, id asc).
  Plan plan;
  plan.schedule.reserve(num_bins);
  for (const List& rank : states[heap.top()]) {
    std::vector<int64_t> mine;
    for (int64_t b = rank.head; b >= 0; b = bin_next[b]) mine.push_back(b);
    std::sort(mine.begin(), mine.end(), [&](int64_t x, int64_t y) {
      return bins[x].sum > bins[y].sum || (bins[x].sum == bins[y].sum && x < y);
    });
    plan.schedule.insert(plan.schedule.end(), mine.begin(), mine.end());
  }
  // Units grouped by bin, ascending within a bin: a counting sort on the bin of each unit.
  std::vector<int64_t> bin_of_unit(num_units);
  plan.bin_offsets.assign(num_bins + 1, 0);
  for (int64_t b = 0; b < num_bins; ++b) {
    plan.bin_offsets[b + 1] = plan.bin_offsets[b] + bins[b].count;
    for (int64_t u = bins[b].head; u >= 0; u = unit_next[u]) bin_of_unit[u] = b;
  }
  std::vector<int64_t> fill(plan.bin_offsets.begin(), plan.bin_offsets.end() - 1);
  plan.units_by_bin.resize(num_units);
  for (int64_t u = 0; u < num_units; ++u) plan.units_by_bin[fill[bin_of_unit[u]]++] = u;
  return plan;
}

py::array_t<int64_t> to_numpy(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(int64_t));
  return out;
}

HostRegistrar registrar([](py::module_& m) {
  m.def(
      "plan_bins",
      [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> tokens,
         py::array_t<double, py::array::c_style | py::array::forcecast> cost, int64_t max_tokens,
         int64_t num_ranks) {
        if (tokens.ndim() != 1 || cost.ndim() != 1 || tokens.size() != cost.size())
          throw std::invalid_argument("tokens and cost must be 1-D arrays of the same length");
        if (tokens.size() == 0) throw std::invalid_argument("tokens must not be empty");
        if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
        if (num_ranks < 1) throw std::invalid_argument("num_ranks must be >= 1");
        const int64_t* t = tokens.data();
        for (py::ssize_t i = 0; i < tokens.size(); ++i)
          if (t[i] < 1 || t[i] > max_tokens)
            throw std::invalid_argument("tokens[" + std::to_string(i) + "] = " +
                                        std::to_string(t[i]) + " is outside [1, max_tokens]");
        Plan plan;
        {
          py::gil_scoped_release release;
          plan = plan_bins(t, cost.data(), tokens.size(), max_tokens, num_ranks);
        }
        return py::make_tuple(to_numpy(plan.units_by_bin), to_numpy(plan.bin_offsets),
                              to_numpy(plan.schedule));
      },
      py::arg("tokens"), py::arg("cost"), py::arg("max_tokens"), py::arg("num_ranks"),
      "Packing plan (see engine/packing.py): returns (units_by_bin [U], bin_offsets [B+1], "
      "schedule [R*M]).");
  m.def(
      "plan_padded_bins",
      [](py::array_t<int64_t, py::array::c_style | py::array::forcecast> widths,
         py::array_t<int64_t, py::array::c_style | py::array::forcecast> counts,
         py::array_t<double, py::array::c_style | py::array::forcecast> row_cost,
         int64_t max_tokens, int64_t num_ranks) {
        if (widths.ndim() != 1 || counts.ndim() != 1 || row_cost.ndim() != 1 ||
            widths.size() != counts.size() || widths.size() != row_cost.size())
          throw std::invalid_argument(
              "widths, counts and row_cost must be 1-D arrays of the same length");
        if (widths.size() == 0) throw std::invalid_argument("widths must not be empty");
        if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
        if (num_ranks < 1) throw std::invalid_argument("num_ranks must be >= 1");
        const int64_t* w = widths.data();
        const int64_t* c = counts.data();
        for (py::ssize_t i = 0; i < widths.size(); ++i)
          if (w[i] < 1 || c[i] < 1 || c[i] > max_tokens / w[i])
            throw std::invalid_argument(
                "unit " + std::to_string(i) + ": " + std::to_string(c[i]) + " rows of width " +
                std::to_string(w[i]) + " are outside [1, max_tokens] padded slots");
        Plan plan;
        {
          py::gil_scoped_release release;
          plan = plan_bins(nullptr, row_cost.data(), widths.size(), max_tokens, num_ranks, w, c);
        }
        return py::make_tuple(to_numpy(plan.units_by_bin), to_numpy(plan.bin_offsets),
                              to_numpy(plan.schedule));
      },
      py::arg("widths"), py::arg("counts"), py::arg("row_cost"), py::arg("max_tokens"),
      py::arg("num_ranks"),
      "Padded packing plan (see engine/packing.py): units of counts[u] rows of widths[u] "
      "tokens, each row costing row_cost[u] at that width; returns (units_by_bin [U], bin_offsets [B+1], schedule [R*M]).");
});

}  // namespace
}  // namespace alignfuse
