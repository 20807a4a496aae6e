// eDKM's per-weight passes over 16-bit bit patterns, fused (CPU).
//
// Every weight w of row r (output channel; group g = r / rows_per_group) has the key
//     key = g * 65536 + pattern(to16(float(w) / scale[r]))
// where to16 rounds to bfloat16 or float16 exactly as torch's .to() does (round to nearest even), and the
// division happens only with a per-channel scale. The Python side (optimum_edkm/clustering/patterns.py)
// holds the pure-torch reference of each function below; the results are the same element for element
// (the floating-point sums of `pattern_sums` are accumulated in double, in a different order).
//
// * count_patterns  - how many weights hold each key (one pass, no per-weight output);
// * gather_table    - out[i] = table[key_i] * scale[r]     (forward output, in the weight's dtype);
// * pattern_sums    - counts and sum of grad[i] * scale[r] per key (backward, one pass);
// * weight_grad     - out[i] = (local[key_i] * grad[i] * scale[r] + shift[key_i]) / scale[r].
//
// Built with -ffp-contract=off so that a*b+c is never fused: the arithmetic is that of the torch ops.

#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace edkm {
namespace {

constexpr int64_t kPatterns = 65536;
// below this many weights per group, one thread counts the group (zeroing and merging per-thread tables of
// 65,536 bins would cost more than the count itself)
constexpr int64_t kMinParallelPerThread = 2 * kPatterns;
constexpr int64_t kGrainElements = 1 << 15;

enum PatternKind : int64_t { kBFloat16 = 0, kFloat16 = 1 };

template <int64_t K>
inline uint16_t to_pattern(float value) {
  if constexpr (K == kBFloat16) {
    return c10::BFloat16(value).x;
  } else {
    return c10::Half(value).x;
  }
}

struct Layout {
  int64_t rows, cols, groups, rows_per_group;
};

Layout check_layout(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups) {
  TORCH_CHECK(weight.device().is_cpu(), "edkm_patterns: CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "edkm_patterns: the weight must be contiguous");
  TORCH_CHECK(weight.dim() >= 1 && weight.numel() > 0, "edkm_patterns: empty weight");
  Layout layout;
  layout.rows = weight.size(0);
  layout.cols = weight.numel() / layout.rows;
  TORCH_CHECK(groups >= 1 && layout.rows % groups == 0, "edkm_patterns: groups must divide the rows");
  layout.groups = groups;
  layout.rows_per_group = layout.rows / groups;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->numel() == layout.rows,
                "edkm_patterns: the scale must be a contiguous float32 tensor with one value per row");
  }
  return layout;
}

void check_same_shape(const at::Tensor& tensor, const at::Tensor& weight, const char* what) {
  TORCH_CHECK(tensor.sizes() == weight.sizes() && tensor.is_contiguous(), "edkm_patterns: ", what,
              " must be contiguous with the weight's shape");
}

void check_table(const at::Tensor& table, const Layout& layout, const char* what) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() &&
                  table.numel() == layout.groups * kPatterns,
              "edkm_patterns: ", what, " must be a contiguous float32 tensor of groups * 65536 values");
}

// Calls body(first_row, last_row, bins_of_the_group, thread_slot) so that every group's rows are accumulated
// into one table of bins: groups split between threads when there are enough of them, otherwise every thread
// accumulates into its own table (slot 1 + thread) and the tables are merged by `merge(group, slots)`.
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

template <typename In, int64_t K, bool Scaled>
void count_impl(const In* weight, const float* scale, const Layout& layout, int64_t* counts) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> local;
  auto body = [&](int64_t r0, int64_t r1, int64_t g, int64_t slot) {
    int64_t* bins = counts + g * kPatterns;
    if (slot >= 0) {
      bins = local.data() + slot * kPatterns;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const In* row = weight + r * layout.cols;
      const float s = Scaled ? scale[r] : 1.0f;
      for (int64_t j = 0; j < layout.cols; ++j) {
        const float v = Scaled ? static_cast<float>(row[j]) / s : static_cast<float>(row[j]);
        ++bins[to_pattern<K>(v)];
      }
    }
  };
  auto merge = [&](int64_t g, int64_t slots) {
    int64_t* out = counts + g * kPatterns;
    at::parallel_for(0, kPatterns, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t t = 0; t < slots; ++t) {
        const int64_t* bins = local.data() + t * kPatterns;
        for (int64_t b = b0; b < b1; ++b) out[b] += bins[b];
      }
    });
    std::fill(local.begin(), local.end(), 0);
  };
  if (threads > 1 && layout.groups < threads) local.assign(threads * kPatterns, 0);
  for_each_group_range(layout, body, merge);
}

struct SumBin {
  double sum;
  int64_t count;
};

template <typename In, int64_t K, bool Scaled>
void sums_impl(const In* weight, const float* scale, const In* grad, const Layout& layout, int64_t* counts,
               double* sums) {
  const int64_t threads = at::get_num_threads();
  const int64_t bins_total = layout.groups * kPatterns;
  // interleaved (sum, count): one cache line per update
  std::vector<SumBin> direct(bins_total, SumBin{0.0, 0});
  std::vector<SumBin> local;
  auto body = [&](int64_t r0, int64_t r1, int64_t g, int64_t slot) {
    SumBin* bins = (slot >= 0 ? local.data() + slot * kPatterns : direct.data() + g * kPatterns);
    for (int64_t r = r0; r < r1; ++r) {
      const In* row = weight + r * layout.cols;
      const In* grow = grad + r * layout.cols;
      const float s = Scaled ? scale[r] : 1.0f;
      for (int64_t j = 0; j < layout.cols; ++j) {
        const float v = Scaled ? static_cast<float>(row[j]) / s : static_cast<float>(row[j]);
        const float gs = Scaled ? static_cast<float>(grow[j]) * s : static_cast<float>(grow[j]);
        SumBin& bin = bins[to_pattern<K>(v)];
        bin.sum += static_cast<double>(gs);
        bin.count += 1;
      }
    }
  };
  auto merge = [&](int64_t g, int64_t slots) {
    SumBin* out = direct.data() + g * kPatterns;
    at::parallel_for(0, kPatterns, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t t = 0; t < slots; ++t) {
        const SumBin* bins = local.data() + t * kPatterns;
        for (int64_t b = b0; b < b1; ++b) {
          out[b].sum += bins[b].sum;
          out[b].count += bins[b].count;
        }
      }
    });
    std::fill(local.begin(), local.end(), SumBin{0.0, 0});
  };
  if (threads > 1 && layout.groups < threads) local.assign(threads * kPatterns, SumBin{0.0, 0});
  for_each_group_range(layout, body, merge);
  at::parallel_for(0, bins_total, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      sums[b] = direct[b].sum;
      counts[b] = direct[b].count;
    }
  });
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

// Dispatch over the weight dtype (float32, bfloat16, float16), the pattern kind and the presence of a scale:
// fn(In* tag, kind constant, scaled constant), a generic lambda.
template <typename Fn>
void dispatch(const at::Tensor& weight, int64_t kind, bool scaled, Fn fn) {
  TORCH_CHECK(kind == kBFloat16 || kind == kFloat16, "edkm_patterns: kind must be 0 (bfloat16) or 1 (float16)");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                  weight.scalar_type() == at::kHalf,
              "edkm_patterns: float32, bfloat16 or float16 weights only (float64 uses the torch path)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "edkm_patterns", [&] {
    scalar_t* tag = nullptr;
    using BF = std::integral_constant<int64_t, kBFloat16>;
    using FP = std::integral_constant<int64_t, kFloat16>;
    if (kind == kBFloat16) {
      scaled ? fn(tag, BF{}, std::true_type{}) : fn(tag, BF{}, std::false_type{});
    } else {
      scaled ? fn(tag, FP{}, std::true_type{}) : fn(tag, FP{}, std::false_type{});
    }
  });
}

}  // namespace

namespace {
const float* scale_ptr(const c10::optional<at::Tensor>& scale) {
  return scale.has_value() ? scale->data_ptr<float>() : nullptr;
}
}  // namespace

at::Tensor count_patterns(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                          int64_t kind) {
  const Layout layout = check_layout(weight, scale, groups);
  at::Tensor counts = at::zeros({groups * kPatterns}, weight.options().dtype(at::kLong));
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    count_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr(scale), layout, counts.data_ptr<int64_t>());
  });
  return counts;
}

at::Tensor gather_table(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                        int64_t kind, const at::Tensor& table) {
  const Layout layout = check_layout(weight, scale, groups);
  check_table(table, layout, "the table");
  at::Tensor out = at::empty_like(weight);
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    gather_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr(scale), table.data_ptr<float>(), layout,
                               out.data_ptr<In>());
  });
  return out;
}

std::vector<at::Tensor> pattern_sums(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                     int64_t groups, int64_t kind, const at::Tensor& grad) {
  const Layout layout = check_layout(weight, scale, groups);
  check_same_shape(grad, weight, "the gradient");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "edkm_patterns: the gradient must have the weight's dtype");
  at::Tensor counts = at::empty({groups * kPatterns}, weight.options().dtype(at::kLong));
  at::Tensor sums = at::empty({groups * kPatterns}, weight.options().dtype(at::kDouble));
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    sums_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr(scale), grad.data_ptr<In>(), layout,
                             counts.data_ptr<int64_t>(), sums.data_ptr<double>());
  });
  return {counts, sums};
}

at::Tensor weight_grad(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                       int64_t kind, const at::Tensor& grad, const at::Tensor& local, const at::Tensor& shift) {
  const Layout layout = check_layout(weight, scale, groups);
  check_same_shape(grad, weight, "the gradient");
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "edkm_patterns: the gradient must have the weight's dtype");
  check_table(local, layout, "the local derivative");
  check_table(shift, layout, "the centroid term");
  at::Tensor out = at::empty_like(weight);
  dispatch(weight, kind, scale.has_value(), [&](auto tag, auto kind_c, auto scaled_c) {
    using In = std::remove_pointer_t<decltype(tag)>;
    constexpr int64_t K = decltype(kind_c)::value;
    constexpr bool Scaled = decltype(scaled_c)::value;
    weight_grad_impl<In, K, Scaled>(weight.data_ptr<In>(), scale_ptr(scale), grad.data_ptr<In>(),
                                    local.data_ptr<float>(), shift.data_ptr<float>(), layout, out.data_ptr<In>());
  });
  return out;
}

}  // namespace edkm
