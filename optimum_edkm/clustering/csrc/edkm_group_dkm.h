// DKM on the distinct values of one LUT group, forward and reverse, on vectors (edkm_lanes.h), in one thread: the
// arithmetic of the torch reference (optimum_edkm/clustering/pairs.py: dkm, and dkm_backward's autograd replay) with
// the reverse pass written out.
#pragma once

#include "edkm_lanes.h"

namespace edkm {
namespace lanes {

// the attention of one iteration is kept (for the output table in forward, for the last reverse step in
// backward) when it takes at most this much per thread; otherwise it is recomputed
constexpr int64_t kKeptAttentionBytes = 8 << 20;

// The DKM arithmetic may fuse a * b + c.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// -------------------------------------------------------------------------------- DKM on one group's values
// The group's distinct values u (sorted, so that the lanes of a vector sit near the same clusters) and counts n
// (padded to whole vectors with count 0), its centroids c_t at history[t * stride .. + k] (stride: groups * k, the
// layout of the (T + 1, groups, k) tensor). One iteration's attention can be kept (k vectors and the active list
// per vector of values) for the output table in forward and the last reverse step in backward.
template <typename V>
struct GroupDKM {
  using T = typename Lanes<V>::T;
  static constexpr int64_t L = Lanes<V>::n;
  int64_t k = 0;
  T inv_tau = 1;
  std::vector<V> a, b;  // k lanes each: attention and a scratch row
  std::vector<uint16_t> active;
  std::vector<V> kept;
  std::vector<uint16_t> kept_active;  // per vector: the count, then the active clusters
  std::vector<double> grad_c;        // reverse pass: adjoint of every c_t
  std::vector<T> grad_ws, grad_mass;

  struct Attention {
    const V* a;
    const uint16_t* active;
    int64_t count;
  };

  void prepare(int64_t clusters, T inverse_temperature) {
    k = clusters;
    inv_tau = inverse_temperature;
    for (auto* row : {&a, &b}) row->resize(k);
    active.resize(k);
    grad_ws.resize(k);
    grad_mass.resize(k);
  }

  // the attention of the values at m (one vector) to centroids c: computed (and kept), or read back
  Attention attend(V uv, int64_t m, const T* c, bool keep, bool reuse) {
    const int64_t vector = m / L;
    if (reuse) {
      const uint16_t* list = kept_active.data() + vector * (k + 1);
      return {kept.data() + vector * k, list + 1, list[0]};
    }
    V* out = keep ? kept.data() + vector * k : a.data();
    uint16_t* list = keep ? kept_active.data() + vector * (k + 1) + 1 : active.data();
    const int64_t count = attention(uv, c, k, inv_tau, out, list);
    if (keep) list[-1] = static_cast<uint16_t>(count);
    return {out, list, count};
  }

  bool prepare_kept(int64_t padded) {
    if (padded / L * k * static_cast<int64_t>(sizeof(V)) > kKeptAttentionBytes) return false;
    kept.resize(padded / L * k);
    kept_active.resize(padded / L * (k + 1));
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
        const Attention att = attend(uv, m, c, keep && t == iterations - 1, false);
        for (int64_t i = 0; i < att.count; ++i) {
          const int64_t j = att.active[i];
          const V weighted = att.a[j] * nv;
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
      const Attention att = attend(load<V>(u + m), m, previous, false, keep);
      V value = splat<V>(0);
      for (int64_t i = 0; i < att.count; ++i) value += att.a[att.active[i]] * last[att.active[i]];
      store<V>(table + m, value);
    }
  }

  // The reverse pass, per value: the local derivative d table / d u at fixed centroids, and the centroid term (the
  // gradient of sum_m G_m table_m through the centroid updates, divided by the count). From the last update to the
  // first: c_{t+1} = ws_t / mass_t pulls on ws_t and mass_t, and through the attention of iteration t on every value
  // and on c_t. pair_grad: the output gradient summed per value (0 on padding); grad_u: scratch of `padded` entries.
  void reverse(const T* u, const T* n, const T* pair_grad, int64_t padded, const T* history, const T* masses,
               int64_t stride, int64_t ran, T* local, T* shift, T* grad_u, ClusterSums<V>& sums) {
    FlushDenormals flush;
    const bool keep = prepare_kept(padded);
    grad_c.assign((ran + 1) * k, 0.0);
    const T* previous = history + (ran - 1) * stride;
    const T* last = history + ran * stride;
    V* slope = b.data();
    sums.reset();
    for (int64_t m = 0; m < padded; m += L) {
      const V uv = load<V>(u + m), gv = load<V>(pair_grad + m);
      const Attention att = attend(uv, m, previous, keep, false);
      V table = splat<V>(0), mean_slope = splat<V>(0);
      for (int64_t i = 0; i < att.count; ++i) {
        const int64_t j = att.active[i];
        table += att.a[j] * last[j];
        slope[j] = (uv - previous[j]) * (-2 * inv_tau);
        mean_slope += att.a[j] * slope[j];
      }
      V derivative = splat<V>(0);
      for (int64_t i = 0; i < att.count; ++i) {
        const int64_t j = att.active[i];
        const V spread = last[j] - table;
        derivative += att.a[j] * (slope[j] - mean_slope) * spread;
        const V pulled = gv * att.a[j];
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
        const Attention att = attend(uv, m, c, false, keep && t == ran - 1);  // the output's attention, again
        V mean = splat<V>(0), direct = splat<V>(0);
        for (int64_t i = 0; i < att.count; ++i) {
          const int64_t j = att.active[i];
          grad_a[j] = nv * (grad_ws[j] * uv + grad_mass[j]);
          mean += att.a[j] * grad_a[j];
          direct += att.a[j] * grad_ws[j];
        }
        V through = splat<V>(0);
        for (int64_t i = 0; i < att.count; ++i) {
          const int64_t j = att.active[i];
          const V pull = (uv - c[j]) * (2 * inv_tau);  // d logit_j / d c_j = -d logit_j / d u
          const V term = att.a[j] * (grad_a[j] - mean) * pull;
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

}  // namespace lanes
}  // namespace edkm
