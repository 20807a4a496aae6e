// eDKM's per-weight passes over 16-bit bit patterns, fused (CPU).
//
// Every weight w of row r (output channel; group g = r / rows_per_group) has the key
//     key = g * 65536 + pattern(to16(float(w) / scale[r]))
// where to16 rounds to bfloat16 or float16 exactly as torch's .to() does (round to nearest even), and the
// division happens only with a per-channel scale. The distinct keys ("pairs") are returned compacted, in
// increasing order; per-pair tables are expanded to groups x 65536 entries inside the kernel. The pure-torch
// reference of each function is TorchPatternOps in optimum_edkm/clustering/patterns.py; the results are the same
// element for element (the gradient sums of `sum_pairs` are accumulated in double, in another order).
//
// * count_pairs        - keys, counts, and how many weights fell on NaN/Inf patterns (one pass);
// * gather_pairs       - out[i] = table[pair of key_i] * scale[r], in the weight's dtype;
// * sum_pairs          - keys, counts and sums of grad[i] * scale[r] per key (one pass);
// * weight_grad_pairs  - out[i] = (local[pair] * grad[i] * scale[r] + shift[pair]) / scale[r].
//
// Built with -ffp-contract=off so that a*b+c is never fused: the arithmetic is that of the torch ops.

#include "edkm_common.h"

#include <ATen/Parallel.h>

#include <tuple>
#include <type_traits>
#include <vector>

namespace edkm {
namespace {

// below this many weights per group and thread, one thread counts the group (zeroing and merging per-thread
// tables of 65,536 bins would cost more than the count itself)
constexpr int64_t kMinParallelPerThread = 2 * kPatterns;
constexpr int64_t kGrainElements = 1 << 15;

// per-pair float32 values -> a groups x 65536 table (zero where no weight has the key)
std::vector<float> expand(const at::Tensor& keys, const at::Tensor& per_pair, const Layout& layout, const char* what) {
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.is_contiguous(),
              "edkm_patterns: keys must be a contiguous int64 vector");
  TORCH_CHECK(per_pair.scalar_type() == at::kFloat && per_pair.is_contiguous() && per_pair.numel() == keys.numel(),
              "edkm_patterns: ", what, " must be a contiguous float32 vector with one value per key");
  std::vector<float> table(layout.groups * kPatterns, 0.0f);
  const int64_t* key = keys.data_ptr<int64_t>();
  const float* value = per_pair.data_ptr<float>();
  for (int64_t m = 0; m < keys.numel(); ++m) {
    TORCH_CHECK(key[m] >= 0 && key[m] < layout.groups * kPatterns, "edkm_patterns: key out of range");
    table[key[m]] = value[m];
  }
  return table;
}

// Calls body(first_row, last_row, group, thread_slot) so that every group's rows are accumulated into one table
// of bins: whole groups per thread when there are enough groups (slot -1: the group's own bins), otherwise every
// thread accumulates into its own table (slot = thread) and `merge(group, threads)` adds them up.
template <typename Body, typename Merge>
void for_each_group_range(const Layout& layout, Body body, Merge merge) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_group = layout.rows_per_group * layout.cols;
  if (threads == 1 || layout.groups >= threads || per_group < kMinParallelPerThread * threads) {
    at::parallel_for(0, layout.groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        body(g * layout.rows_per_group, (g + 1) * layout.rows_per_group, g, -1);
      }
    });
    return;
  }
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / layout.cols);
  for (int64_t g = 0; g < layout.groups; ++g) {
    at::parallel_for(g * layout.rows_per_group, (g + 1) * layout.rows_per_group, grain_rows,
                     [&](int64_t r0, int64_t r1) { body(r0, r1, g, at::get_thread_num()); });
    merge(g, threads);
  }
}

bool uses_thread_tables(const Layout& layout) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && layout.groups < threads &&
         layout.rows_per_group * layout.cols >= kMinParallelPerThread * threads;
}

struct Bin {
  double sum;
  int64_t count;
};

// One pass: per key, the count of weights (and with Sums, the sum of grad * scale); interleaved (sum, count)
// so that an update touches one cache line.
template <typename In, int64_t K, bool Scaled, bool Sums>
std::vector<Bin> histogram(const In* weight, const float* scale, const In* grad, const Layout& layout) {
  std::vector<Bin> bins(layout.groups * kPatterns, Bin{0.0, 0});
  std::vector<Bin> local;
  if (uses_thread_tables(layout)) local.assign(at::get_num_threads() * kPatterns, Bin{0.0, 0});
  auto body = [&](int64_t r0, int64_t r1, int64_t g, int64_t slot) {
    Bin* out = slot >= 0 ? local.data() + slot * kPatterns : bins.data() + g * kPatterns;
    for (int64_t r = r0; r < r1; ++r) {
      const In* row = weight + r * layout.cols;
      const float s = Scaled ? scale[r] : 1.0f;
      for (int64_t j = 0; j < layout.cols; ++j) {
        const float v = Scaled ? static_cast<float>(row[j]) / s : static_cast<float>(row[j]);
        Bin& bin = out[to_pattern<K>(v)];
        bin.count += 1;
        if constexpr (Sums) {
          const float g = static_cast<float>(grad[r * layout.cols + j]);
          bin.sum += static_cast<double>(Scaled ? g * s : g);
        }
      }
    }
  };
  // serial: 65,536 additions per thread cost less than waking the threads again
  auto merge = [&](int64_t g, int64_t threads) {
    Bin* out = bins.data() + g * kPatterns;
    for (int64_t t = 0; t < threads; ++t) {
      Bin* part = local.data() + t * kPatterns;
      for (int64_t b = 0; b < kPatterns; ++b) {
        out[b].sum += part[b].sum;
        out[b].count += part[b].count;
        part[b] = Bin{0.0, 0};
      }
    }
  };
  for_each_group_range(layout, body, merge);
  return bins;
}

// keys with a non-zero count, in increasing order, with their counts (and sums)
std::vector<at::Tensor> compact(const std::vector<Bin>& bins, bool with_sums) {
  int64_t pairs = 0;
  for (const Bin& bin : bins) pairs += bin.count > 0;
  auto options = at::TensorOptions().device(at::kCPU);
  at::Tensor keys = at::empty({pairs}, options.dtype(at::kLong));
  at::Tensor counts = at::empty({pairs}, options.dtype(at::kLong));
  at::Tensor sums = at::empty({with_sums ? pairs : 0}, options.dtype(at::kDouble));
  int64_t* key = keys.data_ptr<int64_t>();
  int64_t* count = counts.data_ptr<int64_t>();
  double* sum = sums.data_ptr<double>();
  int64_t m = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(bins.size()); ++b) {
    if (bins[b].count == 0) continue;
    key[m] = b;
    count[m] = bins[b].count;
    if (with_sums) sum[m] = bins[b].sum;
    ++m;
  }
  return with_sums ? std::vector<at::Tensor>{keys, counts, sums} : std::vector<at::Tensor>{keys, counts};
}

template <typename In, int64_t K, bool Scaled>
void gather_impl(const In* weight, const float* scale, const float* table, const Layout& layout, In* out) {
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / layout.cols);
  at::parallel_for(0, layout.rows, grain_rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In* row = weight + r * layout.cols;
      In* orow = out + r * layout.cols;
      const float* bins = table + (r / layout.rows_per_group) * kPatterns;
      const float s = Scaled ? scale[r] : 1.0f;
      for (int64_t j = 0; j < layout.cols; ++j) {
        const float v = Scaled ? static_cast<float>(row[j]) / s : static_cast<float>(row[j]);
        const float clustered = bins[to_pattern<K>(v)];
        orow[j] = static_cast<In>(Scaled ? clustered * s : clustered);
      }
    }
  });
}

template <typename In, int64_t K, bool Scaled>
void weight_grad_impl(const In* weight, const float* scale, const In* grad, const float* local, const float* shift,
                      const Layout& layout, In* out) {
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / layout.cols);
  at::parallel_for(0, layout.rows, grain_rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const In* row = weight + r * layout.cols;
      const In* grow = grad + r * layout.cols;
      In* orow = out + r * layout.cols;
      const int64_t offset = (r / layout.rows_per_group) * kPatterns;
      const float* local_bins = local + offset;
      const float* shift_bins = shift + offset;
      const float s = Scaled ? scale[r] : 1.0f;
      for (int64_t j = 0; j < layout.cols; ++j) {
        const float v = Scaled ? static_cast<float>(row[j]) / s : static_cast<float>(row[j]);
        const uint16_t p = to_pattern<K>(v);
        const float gs = Scaled ? static_cast<float>(grow[j]) * s : static_cast<float>(grow[j]);
        const float value = local_bins[p] * gs + shift_bins[p];
        orow[j] = static_cast<In>(Scaled ? value / s : value);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t> count_pairs(const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& scale, int64_t groups,
                                                        int64_t kind) {
  const Layout layout = check_layout(weight, scale, groups);
  std::vector<Bin> bins;
  dispatch(weight, kind, scale.has_value(), false, [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    bins = histogram<In, K, Scaled, false>(weight.data_ptr<In>(), scale_ptr<float>(scale), nullptr, layout);
  });
  int64_t nonfinite = 0;
  for (int64_t b = 0; b < static_cast<int64_t>(bins.size()); ++b) {
    if (bins[b].count > 0 && nonfinite_pattern(kind, b % kPatterns)) nonfinite += bins[b].count;
  }
  std::vector<at::Tensor> pairs = compact(bins, false);
  return {pairs[0], pairs[1], nonfinite};
}

at::Tensor gather_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                        int64_t kind, const at::Tensor& keys, const at::Tensor& table) {
  const Layout layout = check_layout(weight, scale, groups);
  const std::vector<float> dense = expand(keys, table, layout, "the table");
  at::Tensor out = at::empty_like(weight);
  dispatch(weight, kind, scale.has_value(), false, [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    gather_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<float>(scale), dense.data(), layout, out.data_ptr<In>());
  });
  return out;
}

std::vector<at::Tensor> sum_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                                  int64_t kind, const at::Tensor& grad) {
  const Layout layout = check_layout(weight, scale, groups);
  check_grad(grad, weight);
  std::vector<Bin> bins;
  dispatch(weight, kind, scale.has_value(), false, [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    bins = histogram<In, K, Scaled, true>(weight.data_ptr<In>(), scale_ptr<float>(scale), grad.data_ptr<In>(), layout);
  });
  return compact(bins, true);
}

at::Tensor weight_grad_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                             int64_t kind, const at::Tensor& grad, const at::Tensor& keys, const at::Tensor& local,
                             const at::Tensor& shift) {
  const Layout layout = check_layout(weight, scale, groups);
  check_grad(grad, weight);
  const std::vector<float> local_table = expand(keys, local, layout, "the local derivative");
  const std::vector<float> shift_table = expand(keys, shift, layout, "the centroid term");
  at::Tensor out = at::empty_like(weight);
  dispatch(weight, kind, scale.has_value(), false, [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    weight_grad_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr<float>(scale), grad.data_ptr<In>(), local_table.data(),
                                    shift_table.data(), layout, out.data_ptr<In>());
  });
  return out;
}

}  // namespace edkm
