// eDKM for many LUT groups (grouped channels, one LUT per channel), fused per group (CPU).
//
// Every group (rows_per_group consecutive output channels) is handled by one thread from start to end, in its own
// small tables: count the group's distinct 16-bit patterns (a 65,536-entry slot table per thread, reset after the
// group), run the DKM iterations on those distinct values, and write the group's rows from the per-value table.
// Nothing is of size groups x 65,536 and nothing per weight outlives the call, so a weight costs the same whether
// its tensor has one group per channel or a few large ones; the groups are spread over the threads.
//
// The values, counts and formulas are those of the pair path (edkm_patterns.cpp + edkm_pairs.cpp, reference:
// TorchPatternOps and _pair_dkm in optimum_edkm/clustering/): a weight's clustered value is
// to16(float(w) / scale[row]), a group's DKM runs on its distinct values u_m with counts n_m, and
//   groups_forward   - out = table[pair of w] * scale[row], the centroids c_0..c_T and masses of every group, how
//                      many weights fell on NaN/Inf patterns, and the range of each group's values;
//   groups_backward  - grad_w = (local[pair] * grad * scale + shift[pair]) / scale, the reverse pass of the
//                      iterations written out (see edkm_pairs.cpp) from the saved centroids and masses.
// Every iteration runs for every group (the caller replays with fewer iterations when the tolerance stops them
// earlier: the early stop looks at all groups at once).
//
// float32 arithmetic runs on vectors of 16 values (one AVX-512 register, two AVX2 ones; GCC vector extensions, so
// any target compiles), with an exp written out below; float64 (tests, float64 weights) runs on scalars with
// std::exp. Sums over a group's values are taken per lane, added into float64 every kFlushVectors vectors, in a
// fixed order: results do not depend on the number of threads.

#include "edkm_common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace edkm {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kFlushVectors = 64;
// the attention of one iteration is kept (for the output table in forward, for the last reverse step in
// backward) when it takes at most this much per thread; otherwise it is recomputed
constexpr int64_t kKeptAttentionBytes = 8 << 20;
typedef float f32v __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i32v __attribute__((vector_size(kLanes * sizeof(int32_t))));

// While alive, float results below the normal range (2^-126) are flushed to zero on this thread (x86). The
// attention of a value to a cluster ~90+ temperatures away is such a denormal; computing with denormals costs a
// microcode assist per operation (7x slower here), and they are 30 orders of magnitude below the float rounding
// of the sums they enter. Consequence: a cluster that only such tails reach has zero mass and keeps its centroid,
// as a cluster that no value reaches does.
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | _MM_FLUSH_ZERO_ON); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The DKM arithmetic below may fuse a * b + c (the per-weight passes further down are not fused: they write what
// the torch path writes).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// ------------------------------------------------------------------------------------------- lane arithmetic
// V is f32v (16 floats) or double (one lane): the DKM code below is written once for both.
template <typename V>
struct Lanes;
template <>
struct Lanes<f32v> {
  using T = float;
  static constexpr int64_t n = kLanes;
};
template <>
struct Lanes<double> {
  using T = double;
  static constexpr int64_t n = 1;
};

template <typename V>
inline V splat(typename Lanes<V>::T x) {
  if constexpr (std::is_same_v<V, double>) {
    return x;
  } else {
    return V{} + x;
  }
}

inline f32v vmax(f32v a, f32v b) { return a > b ? a : b; }
inline double vmax(double a, double b) { return a > b ? a : b; }

inline double lane_sum(f32v v) {
  double total = 0;
  for (int64_t i = 0; i < kLanes; ++i) total += v[i];
  return total;
}
inline double lane_sum(double v) { return v; }

// exp(x) for x <= 0 (a softmax logit minus the largest one), within 2 ulp of std::exp, with its denormals (unless
// flushed, see FlushDenormals) and exact zeros below the float range.
inline f32v vexp(f32v x) {
  x = vmax(x, splat<f32v>(-105.0f));  // exp(-105) rounds to 0; keeps the exponent arithmetic in range
  const f32v shifter = splat<f32v>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32v n = (x * 1.44269504088896341f + shifter) - shifter;  // round(x / ln 2)
  f32v r = x - n * 0.693359375f;  // Cody-Waite: ln 2 in two parts
  r = r - n * -2.12194440e-4f;
  f32v p = splat<f32v>(1.9875691500e-4f);  // Cephes' expf polynomial on [-ln2/2, ln2/2]
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n: below the normal range in two steps, so that the result rounds once to the denormal std::exp gives
  const i32v ni = __builtin_convertvector(n, i32v);
  const i32v low = ni < -125;
  const i32v first = (ni + (low & 64) + 127) << 23;
  f32v y = p * reinterpret_cast<const f32v&>(first);
  const f32v tiny = splat<f32v>(5.42101086e-20f);  // 2^-64
  return low ? y * tiny : y;
}
inline double vexp(double x) { return std::exp(x); }

template <typename V>
inline V load(const typename Lanes<V>::T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void store(typename Lanes<V>::T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// a[j] = softmax_j(-(u - c_j)^2 / tau) for every lane's value u
template <typename V>
inline void attention(V u, const typename Lanes<V>::T* c, int64_t k, typename Lanes<V>::T inv_tau, V* a) {
  using T = typename Lanes<V>::T;
  V top = splat<V>(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < k; ++j) {
    const V d = u - c[j];
    a[j] = -(d * d) * inv_tau;
    top = vmax(top, a[j]);
  }
  V total = splat<V>(0);
  for (int64_t j = 0; j < k; ++j) {
    a[j] = vexp(a[j] - top);
    total += a[j];
  }
  const V inv = 1 / total;
  for (int64_t j = 0; j < k; ++j) a[j] *= inv;
}

// Sums over a group's values per cluster: per-lane accumulators, flushed into float64 every kFlushVectors vectors.
template <typename V>
struct ClusterSums {
  using T = typename Lanes<V>::T;
  int64_t width, pending = 0;
  std::vector<V> lanes;
  std::vector<double> totals;

  explicit ClusterSums(int64_t width) : width(width), lanes(width), totals(width) {}
  void reset() {
    std::fill(lanes.begin(), lanes.end(), splat<V>(0));
    std::fill(totals.begin(), totals.end(), 0.0);
    pending = 0;
  }
  void flush() {
    for (int64_t j = 0; j < width; ++j) {
      totals[j] += lane_sum(lanes[j]);
      lanes[j] = splat<V>(0);
    }
    pending = 0;
  }
  void next_vector() {
    if (++pending == kFlushVectors) flush();
  }
};

// -------------------------------------------------------------------------------- DKM on one group's values
// The group's distinct values u and counts n (padded to whole vectors with count 0) and its centroids c_t at
// history[t * stride .. + k] (stride: groups * k, the layout of the (T + 1, groups, k) tensor). `kept`: room for
// one iteration's attention (k vectors per vector of values), or empty to recompute it.
template <typename V>
struct GroupDKM {
  using T = typename Lanes<V>::T;
  static constexpr int64_t L = Lanes<V>::n;
  int64_t k;
  T inv_tau;
  std::vector<V> a, b, c_;  // k lanes each: attention and two scratch rows
  std::vector<V> kept;

  GroupDKM(int64_t k, T inv_tau) : k(k), inv_tau(inv_tau), a(k), b(k), c_(k) {}

  // the attention of the values at m (one vector) to centroids c: computed, or read from / written to `kept`
  const V* attend(V uv, int64_t m, const T* c, bool keep, bool reuse) {
    if (reuse) return kept.data() + (m / L) * k;
    V* out = keep ? kept.data() + (m / L) * k : a.data();
    attention(uv, c, k, inv_tau, out);
    return out;
  }

  bool prepare_kept(int64_t padded) {
    if (padded / L * k * static_cast<int64_t>(sizeof(V)) > kKeptAttentionBytes) return false;
    kept.resize(padded / L * k);
    return true;
  }

  // T iterations: c_{t+1} = ws_t / mass_t (or c_t where mass_t = 0), recording centroids and masses; then the
  // table: table_m = sum_j a(u_m; c_{T-1})_j c_T[j] (the last iteration's attention, kept or recomputed)
  void forward(const T* u, const T* n, int64_t padded, T* history, T* masses, int64_t stride, int64_t iterations,
               ClusterSums<V>& sums, T* table) {
    FlushDenormals flush;
    const bool keep = prepare_kept(padded);
    for (int64_t t = 0; t < iterations; ++t) {
      const T* c = history + t * stride;
      T* next = history + (t + 1) * stride;
      sums.reset();
      for (int64_t m = 0; m < padded; m += L) {
        const V uv = load<V>(u + m), nv = load<V>(n + m);
        const V* att = attend(uv, m, c, keep && t == iterations - 1, false);
        for (int64_t j = 0; j < k; ++j) {
          const V weighted = att[j] * nv;
          sums.lanes[j] += weighted;
          sums.lanes[k + j] += weighted * uv;
        }
        sums.next_vector();
      }
      sums.flush();
      for (int64_t j = 0; j < k; ++j) {
        const double mass = sums.totals[j], ws = sums.totals[k + j];
        next[j] = mass > 0 ? static_cast<T>(ws / mass) : c[j];
        masses[t * stride + j] = static_cast<T>(mass);
      }
    }
    const T* previous = history + (iterations - 1) * stride;
    const T* last = history + iterations * stride;
    for (int64_t m = 0; m < padded; m += L) {
      const V* att = attend(load<V>(u + m), m, previous, false, keep);
      V value = splat<V>(0);
      for (int64_t j = 0; j < k; ++j) value += att[j] * last[j];
      store<V>(table + m, value);
    }
  }

  // The reverse pass (edkm_pairs.cpp's backward_impl on vectors): local derivative and centroid term per value.
  // pair_grad: the output gradient summed per value (0 on padding); grad_u: scratch of `padded` entries.
  void reverse(const T* u, const T* n, const T* pair_grad, int64_t padded, const T* history, const T* masses,
               int64_t stride, int64_t ran, T* local, T* shift, T* grad_u, ClusterSums<V>& sums) {
    FlushDenormals flush;
    const bool keep = prepare_kept(padded);
    std::vector<double> grad_c((ran + 1) * k, 0.0);
    const T* previous = history + (ran - 1) * stride;
    const T* last = history + ran * stride;
    V* slope = b.data();
    sums.reset();
    for (int64_t m = 0; m < padded; m += L) {
      const V uv = load<V>(u + m), gv = load<V>(pair_grad + m);
      const V* att = attend(uv, m, previous, keep, false);
      V table = splat<V>(0), mean_slope = splat<V>(0);
      for (int64_t j = 0; j < k; ++j) {
        table += att[j] * last[j];
        slope[j] = (uv - previous[j]) * (-2 * inv_tau);
        mean_slope += att[j] * slope[j];
      }
      V derivative = splat<V>(0);
      for (int64_t j = 0; j < k; ++j) {
        const V spread = last[j] - table;
        derivative += att[j] * (slope[j] - mean_slope) * spread;
        const V pulled = gv * att[j];
        sums.lanes[j] += pulled;
        sums.lanes[k + j] += pulled * spread * (-slope[j]);
      }
      store<V>(local + m, derivative);
      store<V>(grad_u + m, splat<V>(0));
      sums.next_vector();
    }
    sums.flush();
    for (int64_t j = 0; j < k; ++j) {
      grad_c[ran * k + j] += sums.totals[j];
      grad_c[(ran - 1) * k + j] += sums.totals[k + j];
    }
    std::vector<T> grad_ws(k), grad_mass(k);
    V* grad_a = b.data();
    for (int64_t t = ran - 1; t >= 0; --t) {
      const T* c = history + t * stride;
      const T* next = history + (t + 1) * stride;
      const double* grad_next = grad_c.data() + (t + 1) * k;
      double* grad_here = grad_c.data() + t * k;
      for (int64_t j = 0; j < k; ++j) {
        const double m_t = masses[t * stride + j];
        if (m_t > 0) {
          grad_ws[j] = static_cast<T>(grad_next[j] / m_t);
          grad_mass[j] = static_cast<T>(-grad_next[j] * static_cast<double>(next[j]) / m_t);
        } else {
          grad_ws[j] = grad_mass[j] = 0;
          grad_here[j] += grad_next[j];
        }
      }
      sums.reset();
      for (int64_t m = 0; m < padded; m += L) {
        const V uv = load<V>(u + m), nv = load<V>(n + m);
        const V* att = attend(uv, m, c, false, keep && t == ran - 1);  // the output's attention, again
        V mean = splat<V>(0), direct = splat<V>(0);
        for (int64_t j = 0; j < k; ++j) {
          grad_a[j] = nv * (grad_ws[j] * uv + grad_mass[j]);
          mean += att[j] * grad_a[j];
          direct += att[j] * grad_ws[j];
        }
        V through = splat<V>(0);
        for (int64_t j = 0; j < k; ++j) {
          const V pull = (uv - c[j]) * (2 * inv_tau);  // d logit_j / d c_j = -d logit_j / d u
          const V term = att[j] * (grad_a[j] - mean) * pull;
          through -= term;
          sums.lanes[j] += term;
        }
        store<V>(grad_u + m, load<V>(grad_u + m) + direct * nv + through);
        sums.next_vector();
      }
      sums.flush();
      for (int64_t j = 0; j < k; ++j) grad_here[j] += sums.totals[j];
    }
    for (int64_t m = 0; m < padded; m += L) {
      const V nv = load<V>(n + m);
      // padding has count 0: its (unused) entry is set to 0 instead of 0 / 0
      const V safe = nv > 0 ? nv : splat<V>(1);
      store<V>(shift + m, load<V>(grad_u + m) / safe);
    }
  }
};

#pragma GCC pop_options

// --------------------------------------------------------------------------- distinct values of one group
// Per-thread tables: slot_of[pattern] is the distinct value's slot in the current group (-1: not seen), reset
// after each group by walking the group's distinct patterns (never a 65,536-entry clear per group).
template <typename T>
struct GroupValues {
  std::vector<int32_t> slot_of = std::vector<int32_t>(kPatterns, -1);
  std::vector<uint16_t> patterns, slot;  // distinct patterns; slot of every weight of the group
  std::vector<uint32_t> tally;           // weights per distinct value (exact, then converted to T)
  std::vector<T> u, n, out_a, out_b, pair_grad, scratch;
  std::vector<double> grad_sums;
  int64_t distinct = 0, padded = 0;
  T lowest = 0, highest = 0;  // range of the finite distinct values

  void clear() {
    for (int64_t m = 0; m < distinct; ++m) slot_of[patterns[m]] = -1;
    distinct = 0;
  }
};

template <typename In, typename T, bool Scaled>
inline T clustered(In w, const T* scale, int64_t row) {
  // as the torch path: the weight in the compute dtype, divided by its row's scale
  return Scaled ? static_cast<T>(w) / scale[row] : static_cast<T>(w);
}

// Slots of the group's weights (rows r0..r1) and its distinct values and counts; with Grads also the sum of
// grad * scale per distinct value (float64). Returns how many weights fell on NaN/Inf patterns.
template <typename In, typename T, int64_t K, bool Scaled, bool Grads, int64_t L>
int64_t count_group(const In* weight, const T* scale, const In* grad, const Layout& layout, int64_t r0, int64_t r1,
                    GroupValues<T>& values) {
  const int64_t size = (r1 - r0) * layout.cols;
  values.slot.resize(size);
  if (values.patterns.size() < static_cast<size_t>(std::min<int64_t>(size, kPatterns))) {
    values.patterns.resize(std::min<int64_t>(size, kPatterns));
  }
  values.tally.assign(std::min<int64_t>(size, kPatterns), 0);
  uint32_t* tally = values.tally.data();
  if (Grads) values.grad_sums.assign(std::min<int64_t>(size, kPatterns), 0.0);
  int32_t* slot_of = values.slot_of.data();
  uint16_t* slot = values.slot.data();
  int64_t distinct = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const In* row = weight + r * layout.cols;
    uint16_t* row_slot = slot + (r - r0) * layout.cols;
    // patterns first (a loop the compiler vectorises), then their slots
    for (int64_t j = 0; j < layout.cols; ++j) {
      row_slot[j] = to_pattern<K>(static_cast<float>(clustered<In, T, Scaled>(row[j], scale, r)));
    }
    for (int64_t j = 0; j < layout.cols; ++j) {
      const uint16_t pattern = row_slot[j];
      int32_t s = slot_of[pattern];
      if (s < 0) {
        s = slot_of[pattern] = static_cast<int32_t>(distinct);
        values.patterns[distinct++] = pattern;
      }
      row_slot[j] = static_cast<uint16_t>(s);
      tally[s] += 1;
      if constexpr (Grads) {
        const T g = static_cast<T>(grad[r * layout.cols + j]);
        values.grad_sums[s] += static_cast<double>(Scaled ? g * scale[r] : g);
      }
    }
  }
  values.distinct = distinct;
  values.padded = (distinct + L - 1) / L * L;
  int64_t nonfinite = 0;
  values.u.resize(values.padded);
  values.n.resize(values.padded);
  values.lowest = std::numeric_limits<T>::infinity();
  values.highest = -values.lowest;
  for (int64_t m = 0; m < distinct; ++m) {
    values.u[m] = static_cast<T>(pattern_value<K>(values.patterns[m]));
    values.n[m] = static_cast<T>(tally[m]);  // as the pair path: counts in the compute dtype
    if (nonfinite_pattern(K, values.patterns[m])) {
      nonfinite += tally[m];
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
  return nonfinite;
}

template <typename In, typename T, bool Scaled>
inline In finish(T value, const T* scale, int64_t row) {
  return static_cast<In>(Scaled ? value * scale[row] : value);
}

template <typename V, typename In, int64_t K, bool Scaled>
void forward_groups(const In* weight, const typename Lanes<V>::T* scale, const Layout& layout,
                    typename Lanes<V>::T* history, typename Lanes<V>::T* masses, int64_t k, double tau,
                    int64_t iterations, In* out, typename Lanes<V>::T* ranges, std::atomic<int64_t>& nonfinite) {
  using T = typename Lanes<V>::T;
  constexpr int64_t L = Lanes<V>::n;
  const int64_t stride = layout.groups * k;
  at::parallel_for(0, layout.groups, 1, [&](int64_t g0, int64_t g1) {
    GroupValues<T> values;
    GroupDKM<V> dkm(k, static_cast<T>(1.0 / tau));
    ClusterSums<V> sums(2 * k);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * layout.rows_per_group, r1 = r0 + layout.rows_per_group;
      const int64_t bad = count_group<In, T, K, Scaled, false, L>(weight, scale, nullptr, layout, r0, r1, values);
      if (bad) nonfinite += bad;
      ranges[2 * g] = values.lowest;
      ranges[2 * g + 1] = values.highest;
      values.out_a.resize(values.padded);
      dkm.forward(values.u.data(), values.n.data(), values.padded, history + g * k, masses + g * k, stride,
                  iterations, sums, values.out_a.data());
      const T* table = values.out_a.data();
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* row_slot = values.slot.data() + (r - r0) * layout.cols;
        In* orow = out + r * layout.cols;
        for (int64_t j = 0; j < layout.cols; ++j) orow[j] = finish<In, T, Scaled>(table[row_slot[j]], scale, r);
      }
      values.clear();
    }
  });
}

template <typename V, typename In, int64_t K, bool Scaled>
void backward_groups(const In* weight, const typename Lanes<V>::T* scale, const In* grad, const Layout& layout,
                     const typename Lanes<V>::T* history, const typename Lanes<V>::T* masses, int64_t k, int64_t ran,
                     double tau, In* out) {
  using T = typename Lanes<V>::T;
  constexpr int64_t L = Lanes<V>::n;
  const int64_t stride = layout.groups * k;
  at::parallel_for(0, layout.groups, 1, [&](int64_t g0, int64_t g1) {
    GroupValues<T> values;
    GroupDKM<V> dkm(k, static_cast<T>(1.0 / tau));
    ClusterSums<V> sums(2 * k);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * layout.rows_per_group, r1 = r0 + layout.rows_per_group;
      count_group<In, T, K, Scaled, true, L>(weight, scale, grad, layout, r0, r1, values);
      const int64_t padded = values.padded;
      values.pair_grad.assign(padded, 0);
      for (int64_t m = 0; m < values.distinct; ++m) values.pair_grad[m] = static_cast<T>(values.grad_sums[m]);
      values.out_a.resize(padded);
      values.out_b.resize(padded);
      values.scratch.resize(padded);
      dkm.reverse(values.u.data(), values.n.data(), values.pair_grad.data(), padded, history + g * k, masses + g * k,
                  stride, ran, values.out_a.data(), values.out_b.data(), values.scratch.data(), sums);
      const T* local = values.out_a.data();
      const T* shift = values.out_b.data();
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* row_slot = values.slot.data() + (r - r0) * layout.cols;
        const In* grow = grad + r * layout.cols;
        In* orow = out + r * layout.cols;
        const T s = Scaled ? scale[r] : T(1);
        for (int64_t j = 0; j < layout.cols; ++j) {
          const T gs = Scaled ? static_cast<T>(grow[j]) * s : static_cast<T>(grow[j]);
          const T value = local[row_slot[j]] * gs + shift[row_slot[j]];
          orow[j] = static_cast<In>(Scaled ? value / s : value);
        }
      }
      values.clear();
    }
  });
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
  dispatch(weight, kind, scale.has_value(), true, [&](auto tag, auto kind_c, auto scaled_c) {
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
  dispatch(weight, kind, scale.has_value(), true, [&](auto tag, auto kind_c, auto scaled_c) {
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
