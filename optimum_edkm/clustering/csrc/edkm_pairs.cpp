// DKM on the distinct (group, value) pairs of eDKM, and its exact reverse pass, in a few calls instead of a
// hundred small tensor ops per layer (CPU; float32 or float64, the compute dtype of the caller).
//
// Pairs m (value u_m, count n_m) are sorted by group; offsets[g]..offsets[g+1] are the pairs of group g.
// With c_0 = start and a_t(u)_j = softmax_j(-(u - c_t[j])^2 / tau):
//     mass_t[j] = sum_m n_m a_t(u_m)_j,  ws_t[j] = sum_m n_m a_t(u_m)_j u_m,
//     c_{t+1}[j] = ws_t[j] / mass_t[j] where mass_t[j] > 0, else c_t[j]      (t < T, early stop on tolerance)
//     table_m = sum_j a_{T-1}(u_m)_j c_T[j]
// pairs_forward returns the table, the centroids c_0..c_T and the masses mass_0..mass_{T-1} (O(T G k));
// pairs_backward takes them back with the output gradient summed per pair (G_m) and returns per pair
//     local_m  = d table_m / d u_m at fixed centroids, and
//     shift_m  = (d sum_l G_l table_l / d u_m through the centroids only) / n_m,
// the adjoint of the iterations written out (what autograd computes on clustering/edkm.py's torch path).
//
// Sums over pairs are taken in double over fixed chunks of one group each, then added in chunk order: the
// result does not depend on the number of threads.

#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace edkm {
namespace {

constexpr int64_t kChunkPairs = 2048;

struct Chunk {
  int64_t group, begin, end;
};

std::vector<Chunk> make_chunks(const int64_t* offsets, int64_t groups) {
  std::vector<Chunk> chunks;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = offsets[g]; b < offsets[g + 1]; b += kChunkPairs) {
      chunks.push_back({g, b, std::min(b + kChunkPairs, offsets[g + 1])});
    }
  }
  return chunks;
}

// Runs fn(chunk, partial sums of that chunk (width doubles)) over all chunks in parallel (small inputs on the
// calling thread), then adds the partial sums of each group in chunk order into out (groups x width).
template <typename Fn>
void chunked_sums(const std::vector<Chunk>& chunks, int64_t width, int64_t k, std::vector<double>& out, Fn fn) {
  std::vector<double> partial(chunks.size() * width, 0.0);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (kChunkPairs * k));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(chunks[c], partial.data() + c * width);
  });
  std::fill(out.begin(), out.end(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    double* dst = out.data() + chunks[c].group * width;
    const double* src = partial.data() + c * width;
    for (int64_t i = 0; i < width; ++i) dst[i] += src[i];
  }
}

// a_j = softmax_j(-(u - c_j)^2 / tau), as torch.softmax computes it (max subtracted)
template <typename T>
inline void attention(T u, const T* c, int64_t k, T tau, T* a) {
  T top = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    const T d = u - c[j];
    a[j] = -(d * d) / tau;
    top = std::max(top, a[j]);
  }
  T total = 0;
  for (int64_t j = 0; j < k; ++j) {
    a[j] = std::exp(a[j] - top);
    total += a[j];
  }
  for (int64_t j = 0; j < k; ++j) a[j] /= total;
}

void check_pairs(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1 && values.is_contiguous(),
              "edkm_pairs: values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "edkm_pairs: float32 or float64 values only");
  TORCH_CHECK(counts.scalar_type() == values.scalar_type() && counts.sizes() == values.sizes() &&
                  counts.is_contiguous(),
              "edkm_pairs: counts must match the values");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.is_contiguous() &&
                  offsets.numel() >= 2,
              "edkm_pairs: offsets must be a contiguous int64 tensor of groups + 1 entries");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t groups = offsets.numel() - 1;
  TORCH_CHECK(off[0] == 0 && off[groups] == values.numel(), "edkm_pairs: offsets must span the pairs");
  for (int64_t g = 0; g < groups; ++g) TORCH_CHECK(off[g] <= off[g + 1], "edkm_pairs: offsets must increase");
}

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets,
                                     const at::Tensor& start, T tau, int64_t iterations, double tolerance,
                                     bool replay) {
  const int64_t groups = start.size(0), k = start.size(1), pairs = values.numel();
  const T* u = values.data_ptr<T>();
  const T* n = counts.data_ptr<T>();
  const std::vector<Chunk> chunks = make_chunks(offsets.data_ptr<int64_t>(), groups);
  at::Tensor history = at::empty({iterations + 1, groups, k}, values.options());
  at::Tensor masses = at::empty({iterations, groups, k}, values.options());
  T* hist = history.data_ptr<T>();
  T* mass_out = masses.data_ptr<T>();
  std::copy(start.data_ptr<T>(), start.data_ptr<T>() + groups * k, hist);
  std::vector<double> sums(groups * 2 * k);
  int64_t ran = 0;
  for (int64_t t = 0; t < iterations; ++t) {
    const T* c = hist + t * groups * k;
    T* next = hist + (t + 1) * groups * k;
    chunked_sums(chunks, 2 * k, k, sums, [&](const Chunk& chunk, double* acc) {
      std::vector<T> a(k);
      const T* cg = c + chunk.group * k;
      for (int64_t m = chunk.begin; m < chunk.end; ++m) {
        attention(u[m], cg, k, tau, a.data());
        for (int64_t j = 0; j < k; ++j) {
          const T weighted = a[j] * n[m];
          acc[j] += weighted;
          acc[k + j] += weighted * u[m];
        }
      }
    });
    T moved = 0;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j < k; ++j) {
        const double mass = sums[g * 2 * k + j], ws = sums[g * 2 * k + k + j];
        const int64_t i = g * k + j;
        next[i] = mass > 0 ? static_cast<T>(ws / mass) : c[i];
        mass_out[t * groups * k + i] = static_cast<T>(mass);
        moved = std::max(moved, static_cast<T>(std::abs(next[i] - c[i])));
      }
    }
    ran = t + 1;
    if (!replay && moved <= tolerance) break;
  }
  const T* previous = hist + (ran - 1) * groups * k;
  const T* last = hist + ran * groups * k;
  at::Tensor table = at::empty({pairs}, values.options());
  T* tab = table.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (kChunkPairs * k));
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t c0, int64_t c1) {
    std::vector<T> a(k);
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& chunk = chunks[c];
      for (int64_t m = chunk.begin; m < chunk.end; ++m) {
        attention(u[m], previous + chunk.group * k, k, tau, a.data());
        T value = 0;
        for (int64_t j = 0; j < k; ++j) value += a[j] * last[chunk.group * k + j];
        tab[m] = value;
      }
    }
  });
  return {table, history.narrow(0, 0, ran + 1).clone(), masses.narrow(0, 0, ran).clone()};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets,
                                      const at::Tensor& history, const at::Tensor& masses, const at::Tensor& pair_grad,
                                      T tau) {
  const int64_t ran = masses.size(0), groups = history.size(1), k = history.size(2), pairs = values.numel();
  const T* u = values.data_ptr<T>();
  const T* n = counts.data_ptr<T>();
  const T* grad = pair_grad.data_ptr<T>();
  const T* hist = history.data_ptr<T>();
  const T* mass = masses.data_ptr<T>();
  const std::vector<Chunk> chunks = make_chunks(offsets.data_ptr<int64_t>(), groups);
  at::Tensor local = at::empty({pairs}, values.options());
  at::Tensor shift = at::empty({pairs}, values.options());
  T* local_out = local.data_ptr<T>();
  std::vector<double> grad_u(pairs, 0.0);
  // adjoint of every c_t
  std::vector<double> grad_c((ran + 1) * groups * k, 0.0);
  std::vector<double> sums(groups * 2 * k);

  // the output table: its local derivative, and its pull on c_T (directly) and on c_{T-1} (through the attention)
  const T* previous = hist + (ran - 1) * groups * k;
  const T* last = hist + ran * groups * k;
  chunked_sums(chunks, 2 * k, k, sums, [&](const Chunk& chunk, double* acc) {
    std::vector<T> a(k), slope(k);
    const T* cp = previous + chunk.group * k;
    const T* cl = last + chunk.group * k;
    for (int64_t m = chunk.begin; m < chunk.end; ++m) {
      attention(u[m], cp, k, tau, a.data());
      T table = 0, mean_slope = 0;
      for (int64_t j = 0; j < k; ++j) {
        table += a[j] * cl[j];
        slope[j] = -2 * (u[m] - cp[j]) / tau;
        mean_slope += a[j] * slope[j];
      }
      T derivative = 0;
      for (int64_t j = 0; j < k; ++j) {
        derivative += a[j] * (slope[j] - mean_slope) * (cl[j] - table);
        acc[j] += static_cast<double>(grad[m] * a[j]);
        acc[k + j] += static_cast<double>(grad[m] * a[j] * (cl[j] - table) * (-slope[j]));
      }
      local_out[m] = derivative;
    }
  });
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = 0; j < k; ++j) {
      grad_c[(ran * groups + g) * k + j] += sums[g * 2 * k + j];
      grad_c[((ran - 1) * groups + g) * k + j] += sums[g * 2 * k + k + j];
    }
  }

  // the centroid updates, last to first: c_{t+1} = ws_t / mass_t (or c_t where mass_t = 0)
  std::vector<double> grad_ws(groups * k), grad_mass(groups * k);
  for (int64_t t = ran - 1; t >= 0; --t) {
    const T* c = hist + t * groups * k;
    const T* next = hist + (t + 1) * groups * k;
    const double* grad_next = grad_c.data() + (t + 1) * groups * k;
    double* grad_here = grad_c.data() + t * groups * k;
    for (int64_t i = 0; i < groups * k; ++i) {
      const double m_t = mass[t * groups * k + i];
      if (m_t > 0) {
        grad_ws[i] = grad_next[i] / m_t;
        grad_mass[i] = -grad_next[i] * static_cast<double>(next[i]) / m_t;
      } else {
        grad_ws[i] = grad_mass[i] = 0;
        grad_here[i] += grad_next[i];
      }
    }
    chunked_sums(chunks, k, k, sums, [&](const Chunk& chunk, double* acc) {
      std::vector<T> a(k);
      std::vector<double> grad_a(k);
      const T* cg = c + chunk.group * k;
      const double* gws = grad_ws.data() + chunk.group * k;
      const double* gmass = grad_mass.data() + chunk.group * k;
      for (int64_t m = chunk.begin; m < chunk.end; ++m) {
        attention(u[m], cg, k, tau, a.data());
        double direct = 0, mean = 0;
        for (int64_t j = 0; j < k; ++j) {
          grad_a[j] = n[m] * (gws[j] * u[m] + gmass[j]);
          mean += a[j] * grad_a[j];
          direct += gws[j] * n[m] * a[j];
        }
        double through_attention = 0;
        for (int64_t j = 0; j < k; ++j) {
          const double grad_logit = a[j] * (grad_a[j] - mean);
          const double pull = 2 * static_cast<double>(u[m] - cg[j]) / tau;   // d logit_j / d c_j = -d / d u
          through_attention -= grad_logit * pull;
          acc[j] += grad_logit * pull;
        }
        grad_u[m] += direct + through_attention;
      }
    });
    for (int64_t i = 0; i < groups * k; ++i) grad_here[i] += sums[i];
  }
  T* shift_out = shift.data_ptr<T>();
  for (int64_t m = 0; m < pairs; ++m) shift_out[m] = static_cast<T>(grad_u[m] / n[m]);
  return {local, shift};
}

}  // namespace

std::vector<at::Tensor> pairs_forward(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets,
                                      const at::Tensor& start, double temperature, int64_t iterations,
                                      double tolerance, bool replay) {
  check_pairs(values, counts, offsets);
  TORCH_CHECK(start.dim() == 2 && start.size(0) == offsets.numel() - 1 && start.is_contiguous() &&
                  start.scalar_type() == values.scalar_type(),
              "edkm_pairs: start must be contiguous (groups, k) centroids in the values' dtype");
  TORCH_CHECK(iterations >= 1 && temperature > 0, "edkm_pairs: iterations >= 1 and temperature > 0");
  if (values.scalar_type() == at::kDouble) {
    return forward_impl<double>(values, counts, offsets, start, temperature, iterations, tolerance, replay);
  }
  return forward_impl<float>(values, counts, offsets, start, static_cast<float>(temperature), iterations, tolerance,
                             replay);
}

std::vector<at::Tensor> pairs_backward(const at::Tensor& values, const at::Tensor& counts,
                                       const at::Tensor& offsets, const at::Tensor& history,
                                       const at::Tensor& masses, const at::Tensor& pair_grad, double temperature) {
  check_pairs(values, counts, offsets);
  TORCH_CHECK(history.dim() == 3 && masses.dim() == 3 && history.size(0) == masses.size(0) + 1 &&
                  masses.size(0) >= 1 && history.size(1) == offsets.numel() - 1 &&
                  history.sizes().slice(1) == masses.sizes().slice(1) && history.is_contiguous() &&
                  masses.is_contiguous(),
              "edkm_pairs: history (T + 1, groups, k) and masses (T, groups, k) from pairs_forward");
  TORCH_CHECK(history.scalar_type() == values.scalar_type() && masses.scalar_type() == values.scalar_type() &&
                  pair_grad.scalar_type() == values.scalar_type() && pair_grad.sizes() == values.sizes() &&
                  pair_grad.is_contiguous(),
              "edkm_pairs: history, masses and pair_grad must match the values");
  if (values.scalar_type() == at::kDouble) {
    return backward_impl<double>(values, counts, offsets, history, masses, pair_grad, temperature);
  }
  return backward_impl<float>(values, counts, offsets, history, masses, pair_grad, static_cast<float>(temperature));
}

}  // namespace edkm
