// eDKM for many LUT groups (grouped channels, one LUT per channel), fused per group (CPU).
//
// For each group (rows_per_group consecutive output channels): count its 16-bit patterns (in per-thread tables
// indexed by pattern, of which only the group's entries are touched and reset), run the DKM iterations on its
// distinct values, and write its rows from the per-pattern table. With many groups, each thread takes whole groups;
// with a few large ones (one LUT per tensor) all threads count and write the rows of one group at a time (see
// for_each_group). Nothing is of size groups x 65,536 and nothing per weight outlives the call, so a weight costs
// the same whether its tensor has one LUT, a few, or one per output channel.
//
// The values, counts and formulas are those of the torch reference (optimum_edkm/clustering/: TorchPatternOps and
// pairs.dkm): a weight's clustered value is to16(float(w) / scale[row]), a group's DKM runs on its distinct values
// u_m with counts n_m, and
//   groups_forward   - out = table[pair of w] * scale[row], the centroids c_0..c_T and masses of every group, how
//                      many weights fell on NaN/Inf patterns, and the range of each group's values;
//   groups_backward  - grad_w = (local[pair] * grad * scale + shift[pair]) / scale, the reverse pass of the
//                      iterations written out (edkm_group_dkm.h) from the saved centroids and masses.
// Every iteration runs for every group (the caller replays with fewer iterations when the tolerance stops them
// earlier: the early stop looks at all groups at once).
//
// The DKM (edkm_group_dkm.h) runs float32 on vectors of 16 values (edkm_lanes.h), float64 (tests, float64 weights)
// on scalars with std::exp; the distinct values are sorted first, so that the lanes of a vector sit near the same
// clusters and the clusters far from all of them are skipped. Sums over a group's values are taken per lane, added
// into float64 every kFlushVectors vectors, in a fixed order: results do not depend on the number of threads,
// except, with fewer groups than threads, the per-value gradient sums of backward (float64, added thread by thread).

#include "edkm_common.h"
#include "edkm_group_dkm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace edkm {
namespace {

using namespace lanes;

// --------------------------------------------------------------------------- distinct values of one group
// Per-thread tables indexed by 16-bit pattern: how many weights of the current group hold it (and in backward the
// sum of their grad * scale), then its soft-clustered value (forward) or its local derivative and centroid term
// (backward). Only the group's own patterns are touched, and reset after the group (never a 65,536-entry clear).
// Every thread keeps its tables from call to call (~1.4 MB, see thread_values): allocating and first touching them
// anew in each call cost more than a small tensor's whole clustering.
template <typename T>
struct GroupValues {
  std::vector<uint32_t> count = std::vector<uint32_t>(kPatterns, 0);
  std::vector<double> grad_sum;      // backward: sum of grad * scale per pattern
  std::vector<T> first, second;      // per pattern: table (forward); local derivative and centroid term (backward)
  std::vector<uint16_t> patterns = std::vector<uint16_t>(kPatterns + 1);  // the group's distinct patterns
  std::vector<uint16_t> row_patterns, sort_scratch;
  std::vector<T> u, n, out_a, out_b, pair_grad, scratch;  // per distinct value (padded)
  int64_t distinct = 0, padded = 0;
  T lowest = 0, highest = 0;  // range of the finite distinct values
  bool backward = false;         // counting gradient sums too (set per call)

  GroupValues() : grad_sum(kPatterns, 0.0), first(kPatterns), second(kPatterns) {}
  void clear() {
    for (int64_t m = 0; m < distinct; ++m) {
      count[patterns[m]] = 0;
      if (backward) grad_sum[patterns[m]] = 0.0;
    }
    distinct = 0;
  }
  // adds another thread's counts (and sums) of the same group into these, and clears them there
  void absorb(GroupValues& other) {
    for (int64_t m = 0; m < other.distinct; ++m) {
      const uint16_t pattern = other.patterns[m];
      patterns[distinct] = pattern;
      distinct += count[pattern] == 0;
      count[pattern] += other.count[pattern];
      if (backward) grad_sum[pattern] += other.grad_sum[pattern];
    }
    other.clear();
  }
  // per distinct value -> per pattern
  void scatter(const T* per_value, std::vector<T>& table) const {
    for (int64_t m = 0; m < distinct; ++m) table[patterns[m]] = per_value[m];
  }
};

template <typename T>
GroupValues<T>& thread_values(bool backward) {
  static thread_local GroupValues<T> values;
  values.backward = backward;
  return values;
}

// Sorts a group's distinct 16-bit patterns by value (bfloat16 and float16 alike: sign and magnitude), two passes of
// a radix sort on the order-preserving key: the order does not depend on how the weights were counted, and the
// DKM finds the lanes of a vector near the same clusters.
inline void sort_patterns(uint16_t* patterns, int64_t count, std::vector<uint16_t>& scratch) {
  scratch.resize(2 * count);
  uint16_t* keys = scratch.data();
  uint16_t* sorted = keys + count;
  uint32_t low[256] = {0}, high[256] = {0};
  for (int64_t m = 0; m < count; ++m) {
    const uint16_t p = patterns[m];
    const uint16_t key = (p & 0x8000) ? static_cast<uint16_t>(~p) : static_cast<uint16_t>(p | 0x8000);
    keys[m] = key;
    ++low[key & 0xFF];
    ++high[key >> 8];
  }
  uint32_t low_start = 0, high_start = 0;
  for (int b = 0; b < 256; ++b) {
    const uint32_t l = low[b], h = high[b];
    low[b] = low_start;
    high[b] = high_start;
    low_start += l;
    high_start += h;
  }
  for (int64_t m = 0; m < count; ++m) sorted[low[keys[m] & 0xFF]++] = keys[m];
  for (int64_t m = 0; m < count; ++m) {
    const uint16_t key = sorted[m];
    patterns[high[key >> 8]++] = (key & 0x8000) ? static_cast<uint16_t>(key & 0x7FFF) : static_cast<uint16_t>(~key);
  }
}

template <typename In, typename T, bool Scaled>
inline T clustered(In w, const T* scale, int64_t row) {
  // as the torch path: the weight in the compute dtype, divided by its row's scale
  return Scaled ? static_cast<T>(w) / scale[row] : static_cast<T>(w);
}

// The per-weight loops, on pointers that do not alias (so that the compiler vectorises them, with gathers).
template <typename In, typename T, int64_t K, bool Scaled>
inline void row_patterns(const In* __restrict__ row, const T* __restrict__ scale, int64_t r, int64_t cols,
                         uint16_t* __restrict__ out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = to_pattern<K>(static_cast<float>(clustered<In, T, Scaled>(row[j], scale, r)));
}

// out = table[pattern] * scale
template <typename In, typename T, bool Scaled>
inline void write_row(const uint16_t* __restrict__ pattern, const T* __restrict__ table, T s, int64_t cols,
                      In* __restrict__ out) {
  for (int64_t j = 0; j < cols; ++j) {
    const T value = table[pattern[j]];
    out[j] = static_cast<In>(Scaled ? value * s : value);
  }
}

// out = (local[pattern] * grad * scale + shift[pattern]) / scale
template <typename In, typename T, bool Scaled>
inline void write_grad_row(const uint16_t* __restrict__ pattern, const T* __restrict__ local,
                           const T* __restrict__ shift, const In* __restrict__ grad, T s, int64_t cols,
                           In* __restrict__ out) {
  for (int64_t j = 0; j < cols; ++j) {
    const T gs = Scaled ? static_cast<T>(grad[j]) * s : static_cast<T>(grad[j]);
    const T value = local[pattern[j]] * gs + shift[pattern[j]];
    out[j] = static_cast<In>(Scaled ? value / s : value);
  }
}

// Counts the patterns of rows r0..r1 into `values` (appending the patterns not seen yet in this group); with a
// gradient also sums grad * scale per pattern (float64).
template <typename In, typename T, int64_t K, bool Scaled>
void count_rows(const In* weight, const T* scale, const In* grad, const Layout& layout, int64_t r0, int64_t r1,
                GroupValues<T>& values) {
  values.row_patterns.resize(layout.cols);
  uint16_t* pattern_of = values.row_patterns.data();
  uint32_t* count = values.count.data();
  uint16_t* patterns = values.patterns.data();
  int64_t distinct = values.distinct;
  for (int64_t r = r0; r < r1; ++r) {
    row_patterns<In, T, K, Scaled>(weight + r * layout.cols, scale, r, layout.cols, pattern_of);
    // branch-free: a new pattern is appended by always writing the next slot and advancing when it was new
    for (int64_t j = 0; j < layout.cols; ++j) {
      const uint16_t pattern = pattern_of[j];
      const uint32_t before = count[pattern];
      count[pattern] = before + 1;
      patterns[distinct] = pattern;
      distinct += before == 0;
    }
    if (grad != nullptr) {
      const In* grow = grad + r * layout.cols;
      double* grad_sum = values.grad_sum.data();
      for (int64_t j = 0; j < layout.cols; ++j) {
        const T g = static_cast<T>(grow[j]);
        grad_sum[pattern_of[j]] += static_cast<double>(Scaled ? g * scale[r] : g);
      }
    }
  }
  values.distinct = distinct;
}

// The counted group's distinct values, sorted, with their counts (and gradient sums), padded to whole vectors of L;
// returns how many weights fell on NaN/Inf patterns.
template <typename T, int64_t K, int64_t L>
int64_t finish_group(GroupValues<T>& values) {
  const int64_t distinct = values.distinct;
  values.padded = (distinct + L - 1) / L * L;
  sort_patterns(values.patterns.data(), distinct, values.sort_scratch);
  int64_t nonfinite = 0;
  values.u.resize(values.padded);
  values.n.resize(values.padded);
  if (values.backward) values.pair_grad.assign(values.padded, 0);
  values.lowest = std::numeric_limits<T>::infinity();
  values.highest = -values.lowest;
  for (int64_t m = 0; m < distinct; ++m) {
    const uint16_t pattern = values.patterns[m];
    values.u[m] = static_cast<T>(pattern_value<K>(pattern));
    values.n[m] = static_cast<T>(values.count[pattern]);  // as the pair path: counts in the compute dtype
    if (values.backward) values.pair_grad[m] = static_cast<T>(values.grad_sum[pattern]);
    if (nonfinite_pattern(K, pattern)) {
      nonfinite += values.count[pattern];
      values.u[m] = 0;  // keeps the arithmetic finite; the caller raises
    } else {
      values.lowest = std::min(values.lowest, values.u[m]);
      values.highest = std::max(values.highest, values.u[m]);
    }
  }
  for (int64_t m = distinct; m < values.padded; ++m) {
    values.u[m] = values.u[0];  // padding: a finite value with count 0
    values.n[m] = 0;
  }
  values.out_a.resize(values.padded);
  values.out_b.resize(values.padded);
  values.scratch.resize(values.padded);
  return nonfinite;
}

// --------------------------------------------------------------------------------------- groups over threads
// With at least kGroupsPerThread groups per thread, each thread takes whole groups (one pass over a group's rows
// in its own tables); with fewer, larger groups (one LUT per tensor), all threads count the rows of one group
// into their own tables, which are then added up, and all write its rows, while one thread runs its DKM (on at
// most 65,536 values).
constexpr int64_t kGroupsPerThread = 2;
constexpr int64_t kGrainWeights = 1 << 15;

// Runs one group's work: count(values, r0, r1) for its rows, then finish(values, g) with the group's merged
// counts; then write(values, r0, r1) for its rows, then values.clear().
template <typename T, typename Count, typename Finish, typename Write>
void for_each_group(const Layout& layout, bool backward, Count count, Finish finish, Write write) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || layout.groups >= kGroupsPerThread * threads) {
    at::parallel_for(0, layout.groups, 1, [&](int64_t g0, int64_t g1) {
      GroupValues<T>& values = thread_values<T>(backward);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t r0 = g * layout.rows_per_group, r1 = r0 + layout.rows_per_group;
        count(values, r0, r1);
        finish(values, g);
        write(values, r0, r1);
        values.clear();
      }
    });
    return;
  }
  GroupValues<T>& own = thread_values<T>(backward);  // this thread's, where the others' counts are added up
  std::vector<GroupValues<T>*> part(threads, nullptr);
  const int64_t grain = std::max<int64_t>(1, kGrainWeights / layout.cols);
  for (int64_t g = 0; g < layout.groups; ++g) {
    const int64_t r0 = g * layout.rows_per_group, r1 = r0 + layout.rows_per_group;
    at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) {
      GroupValues<T>& values = thread_values<T>(backward);
      part[at::get_thread_num()] = &values;
      count(values, a, b);
    });
    for (GroupValues<T>* other : part) {
      if (other != nullptr && other != &own) own.absorb(*other);
    }
    finish(own, g);
    at::parallel_for(r0, r1, grain, [&](int64_t a, int64_t b) { write(own, a, b); });
    own.clear();
  }
}

// What one thread reuses from group to group (and from call to call): the DKM's buffers and a row of patterns.
template <typename V>
struct ThreadScratch {
  GroupDKM<V> dkm;
  ClusterSums<V> sums;
  std::vector<uint16_t> row;
};

template <typename V>
ThreadScratch<V>& thread_scratch(int64_t k, double tau, int64_t cols) {
  static thread_local ThreadScratch<V> scratch;
  scratch.dkm.prepare(k, static_cast<typename Lanes<V>::T>(1.0 / tau));
  scratch.sums.prepare(2 * k);
  scratch.row.resize(cols);
  return scratch;
}

template <typename V, typename In, int64_t K, bool Scaled>
void forward_groups(const In* weight, const typename Lanes<V>::T* scale, const Layout& layout,
                    typename Lanes<V>::T* history, typename Lanes<V>::T* masses, int64_t k, double tau,
                    int64_t iterations, In* out, typename Lanes<V>::T* ranges, std::atomic<int64_t>& nonfinite) {
  using T = typename Lanes<V>::T;
  constexpr int64_t L = Lanes<V>::n;
  const int64_t stride = layout.groups * k;
  auto count = [&](GroupValues<T>& values, int64_t r0, int64_t r1) {
    count_rows<In, T, K, Scaled>(weight, scale, nullptr, layout, r0, r1, values);
  };
  auto finish = [&](GroupValues<T>& values, int64_t g) {
    const int64_t bad = finish_group<T, K, L>(values);
    if (bad) nonfinite += bad;
    ranges[2 * g] = values.lowest;
    ranges[2 * g + 1] = values.highest;
    ThreadScratch<V>& own = thread_scratch<V>(k, tau, layout.cols);
    own.dkm.forward(values.u.data(), values.n.data(), values.padded, history + g * k, masses + g * k, stride,
                    iterations, own.sums, values.out_a.data());
    values.scatter(values.out_a.data(), values.first);
  };
  auto write = [&](GroupValues<T>& values, int64_t r0, int64_t r1) {
    uint16_t* pattern_of = thread_scratch<V>(k, tau, layout.cols).row.data();
    for (int64_t r = r0; r < r1; ++r) {
      row_patterns<In, T, K, Scaled>(weight + r * layout.cols, scale, r, layout.cols, pattern_of);
      write_row<In, T, Scaled>(pattern_of, values.first.data(), Scaled ? scale[r] : T(1), layout.cols,
                               out + r * layout.cols);
    }
  };
  for_each_group<T>(layout, false, count, finish, write);
}

template <typename V, typename In, int64_t K, bool Scaled>
void backward_groups(const In* weight, const typename Lanes<V>::T* scale, const In* grad, const Layout& layout,
                     const typename Lanes<V>::T* history, const typename Lanes<V>::T* masses, int64_t k, int64_t ran,
                     double tau, In* out) {
  using T = typename Lanes<V>::T;
  constexpr int64_t L = Lanes<V>::n;
  const int64_t stride = layout.groups * k;
  auto count = [&](GroupValues<T>& values, int64_t r0, int64_t r1) {
    count_rows<In, T, K, Scaled>(weight, scale, grad, layout, r0, r1, values);
  };
  auto finish = [&](GroupValues<T>& values, int64_t g) {
    finish_group<T, K, L>(values);
    ThreadScratch<V>& own = thread_scratch<V>(k, tau, layout.cols);
    own.dkm.reverse(values.u.data(), values.n.data(), values.pair_grad.data(), values.padded, history + g * k,
                    masses + g * k, stride, ran, values.out_a.data(), values.out_b.data(), values.scratch.data(),
                    own.sums);
    values.scatter(values.out_a.data(), values.first);
    values.scatter(values.out_b.data(), values.second);
  };
  auto write = [&](GroupValues<T>& values, int64_t r0, int64_t r1) {
    uint16_t* pattern_of = thread_scratch<V>(k, tau, layout.cols).row.data();
    for (int64_t r = r0; r < r1; ++r) {
      row_patterns<In, T, K, Scaled>(weight + r * layout.cols, scale, r, layout.cols, pattern_of);
      write_grad_row<In, T, Scaled>(pattern_of, values.first.data(), values.second.data(), grad + r * layout.cols,
                                    Scaled ? scale[r] : T(1), layout.cols, out + r * layout.cols);
    }
  };
  for_each_group<T>(layout, true, count, finish, write);
}

at::ScalarType compute_type(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_state(const at::Tensor& tensor, int64_t first, const Layout& layout, int64_t k, at::ScalarType dtype,
                 const char* what) {
  TORCH_CHECK(tensor.dim() == 3 && tensor.size(0) == first && tensor.size(1) == layout.groups &&
                  tensor.size(2) == k && tensor.is_contiguous() && tensor.scalar_type() == dtype,
              "edkm_groups: ", what, " must be a contiguous (", first, ", groups, k) tensor of ", dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> groups_forward(
    const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t kind, const at::Tensor& start,
    double temperature, int64_t iterations) {
  const at::ScalarType cdt = compute_type(weight);
  TORCH_CHECK(start.dim() == 2 && start.is_contiguous() && start.scalar_type() == cdt,
              "edkm_groups: start must be contiguous (groups, k) centroids in the compute dtype");
  const Layout layout = check_layout(weight, scale, start.size(0), cdt);
  TORCH_CHECK(iterations >= 1 && temperature > 0, "edkm_groups: iterations >= 1 and temperature > 0");
  const int64_t k = start.size(1);
  at::Tensor history = at::empty({iterations + 1, layout.groups, k}, start.options());
  at::Tensor masses = at::empty({iterations, layout.groups, k}, start.options());
  history[0].copy_(start);
  at::Tensor out = at::empty_like(weight);
  at::Tensor ranges = at::empty({layout.groups, 2}, start.options());
  std::atomic<int64_t> nonfinite{0};
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    if constexpr (std::is_same_v<In, double>) {
      forward_groups<double, In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<double>(scale), layout,
                                            history.data_ptr<double>(), masses.data_ptr<double>(), k, temperature,
                                            iterations, out.data_ptr<In>(), ranges.data_ptr<double>(), nonfinite);
    } else {
      forward_groups<f32v, In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<float>(scale), layout,
                                          history.data_ptr<float>(), masses.data_ptr<float>(), k, temperature,
                                          iterations, out.data_ptr<In>(), ranges.data_ptr<float>(), nonfinite);
    }
  });
  return {out, history, masses, nonfinite.load(), ranges};
}

at::Tensor groups_backward(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t kind,
                           const at::Tensor& grad, const at::Tensor& history, const at::Tensor& masses,
                           double temperature) {
  const at::ScalarType cdt = compute_type(weight);
  TORCH_CHECK(history.dim() == 3 && masses.dim() == 3 && masses.size(0) >= 1,
              "edkm_groups: history (T + 1, groups, k) and masses (T, groups, k) from groups_forward");
  const int64_t ran = masses.size(0), k = history.size(2);
  const Layout layout = check_layout(weight, scale, history.size(1), cdt);
  check_state(history, ran + 1, layout, k, cdt, "history");
  check_state(masses, ran, layout, k, cdt, "masses");
  check_grad(grad, weight);
  TORCH_CHECK(temperature > 0, "edkm_groups: temperature > 0");
  at::Tensor out = at::empty_like(weight);
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    if constexpr (std::is_same_v<In, double>) {
      backward_groups<double, In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<double>(scale), grad.data_ptr<In>(),
                                             layout, history.data_ptr<double>(), masses.data_ptr<double>(), k, ran,
                                             temperature, out.data_ptr<In>());
    } else {
      backward_groups<f32v, In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<float>(scale), grad.data_ptr<In>(),
                                           layout, history.data_ptr<float>(), masses.data_ptr<float>(), k, ran,
                                           temperature, out.data_ptr<In>());
    }
  });
  return out;
}

}  // namespace edkm
