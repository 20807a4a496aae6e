// Vector arithmetic of eDKM's per-group kernel (edkm_groups.cpp, edkm_group_dkm.h): 16 float lanes (one AVX-512
// register, two AVX2 ones; GCC vector extensions, so any target compiles) or one double lane, the same templates for
// both; an exp written out, the softmax attention over a group's clusters, and per-cluster sums.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace edkm {
namespace lanes {

constexpr int64_t kLanes = 16;
constexpr int64_t kFlushVectors = 64;
typedef float f32v __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i32v __attribute__((vector_size(kLanes * sizeof(int32_t))));

// While alive, float results below the normal range (2^-126) are flushed to zero on this thread (x86). Attention
// weights that small (a cluster ~90 temperatures farther than the nearest one; vexp below returns 0 for them) and
// their products are 30 orders of magnitude below the float rounding of the sums they enter, and computing with
// denormals costs a microcode assist per operation (7x slower here). Consequence: a cluster that only such tails
// reach has zero mass and keeps its centroid, as a cluster that no value reaches does.
struct FlushDenormals {
#if defined(__SSE__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | _MM_FLUSH_ZERO_ON); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// The DKM arithmetic may fuse a * b + c (the per-weight passes of edkm_groups.cpp are not fused: they write what the
// torch path writes).
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

typedef float f32x8 __attribute__((vector_size(8 * sizeof(float))));
typedef float f32x4 __attribute__((vector_size(4 * sizeof(float))));

// the lanes added as a tree, in a fixed order
inline double lane_sum(f32v v) {
  f32x8 low, high;
  __builtin_memcpy(&low, &v, sizeof(low));
  __builtin_memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
  const f32x8 eight = low + high;
  f32x4 low4, high4;
  __builtin_memcpy(&low4, &eight, sizeof(low4));
  __builtin_memcpy(&high4, reinterpret_cast<const char*>(&eight) + sizeof(low4), sizeof(high4));
  const f32x4 four = low4 + high4;
  return (static_cast<double>(four[0]) + four[2]) + (static_cast<double>(four[1]) + four[3]);
}
inline double lane_sum(double v) { return v; }

// exp(x) for x <= 0 (a softmax logit minus the largest one), within 2 ulp of std::exp; 0 below float32's normal
// range (x < ln 2^-126), as the flushed denormals of FlushDenormals.
constexpr float kLogSmallest = -87.33654475f;  // ln(2^-126)
inline f32v vexp(f32v x) {
  const i32v below = x < kLogSmallest;
  x = vmax(x, splat<f32v>(kLogSmallest));
  const f32v shifter = splat<f32v>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32v n = (x * 1.44269504088896341f + shifter) - shifter;  // round(x / ln 2), >= -126
  f32v r = x - n * 0.693359375f;  // Cody-Waite: ln 2 in two parts
  r = r - n * -2.12194440e-4f;
  f32v p = splat<f32v>(1.9875691500e-4f);  // Cephes' expf polynomial on [-ln2/2, ln2/2]
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32v scale_bits = (__builtin_convertvector(n, i32v) + 127) << 23;  // 2^n
  return below ? splat<f32v>(0.0f) : p * reinterpret_cast<const f32v&>(scale_bits);
}
inline double vexp(double x) { return std::exp(x); }

// A logit this far below the largest one has attention exactly 0 (vexp above; float64: exp underflows at -745.1).
// A cluster that far from every lane of a vector is skipped there: its exp, and its terms in every sum.
template <typename T>
constexpr T kNegligibleLogit = std::is_same_v<T, float> ? T(-88) : T(-746);

inline bool any_above(f32v x, float threshold) {
#if defined(__AVX512F__)
  __m512 packed;
  __builtin_memcpy(&packed, &x, sizeof(packed));
  return _mm512_cmp_ps_mask(packed, _mm512_set1_ps(threshold), _CMP_GT_OQ) != 0;
#else
  float top = x[0];
  for (int64_t i = 1; i < kLanes; ++i) top = std::max(top, x[i]);
  return top > threshold;
#endif
}
inline bool any_above(double x, double threshold) { return x > threshold; }

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

// a[j] = softmax_j(-(u - c_j)^2 / tau) for every lane's value u. The clusters with attention in some lane are
// listed in active[0 .. returned count); every other a[j] is 0 in every lane.
template <typename V>
inline int64_t attention(V u, const typename Lanes<V>::T* c, int64_t k, typename Lanes<V>::T inv_tau, V* a,
                         uint16_t* active) {
  using T = typename Lanes<V>::T;
  V top = splat<V>(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < k; ++j) {
    const V d = u - c[j];
    a[j] = -(d * d) * inv_tau;
    top = vmax(top, a[j]);
  }
  V total = splat<V>(0);
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) {
    const V x = a[j] - top;
    if (any_above(x, kNegligibleLogit<T>)) {
      a[j] = vexp(x);
      total += a[j];
      active[count++] = static_cast<uint16_t>(j);
    } else {
      a[j] = splat<V>(0);
    }
  }
  const V inv = 1 / total;
  for (int64_t i = 0; i < count; ++i) a[active[i]] *= inv;
  return count;
}

// Sums over a group's values per cluster: per-lane accumulators, flushed into float64 every kFlushVectors vectors.
template <typename V>
struct ClusterSums {
  using T = typename Lanes<V>::T;
  int64_t width = 0, pending = 0;
  std::vector<V> lanes;
  std::vector<double> totals;

  void prepare(int64_t w) {
    width = w;
    lanes.resize(w);
    totals.resize(w);
  }
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

#pragma GCC pop_options

}  // namespace lanes
}  // namespace edkm
