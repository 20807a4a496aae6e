// The weight side of eDKM's kernel (edkm_groups.cpp): the 16-bit pattern of a clustered value, the row/group layout
// of a weight tensor, and the dispatch over weight dtypes, pattern kinds and per-channel scale.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace edkm {

constexpr int64_t kPatterns = 65536;

enum PatternKind : int64_t { kBFloat16 = 0, kFloat16 = 1 };

// the 16-bit pattern of a clustered value, rounded as torch's .to() rounds (to nearest even; a float64 value is
// rounded to float32 first, as torch converts float64 to bfloat16/float16)
template <int64_t K>
inline uint16_t to_pattern(float value) {
  if constexpr (K == kBFloat16) {
    return c10::BFloat16(value).x;
  } else {
    return c10::Half(value).x;
  }
}

template <int64_t K>
inline float pattern_value(uint16_t pattern) {
  if constexpr (K == kBFloat16) {
    return static_cast<float>(c10::BFloat16(pattern, c10::BFloat16::from_bits()));
  } else {
    return static_cast<float>(c10::Half(pattern, c10::Half::from_bits()));
  }
}

// NaN and +-Inf: all exponent bits set
inline bool nonfinite_pattern(int64_t kind, int64_t pattern) {
  const int64_t exponent = kind == kBFloat16 ? 0x7F80 : 0x7C00;
  return (pattern & exponent) == exponent;
}

struct Layout {
  int64_t rows, cols, groups, rows_per_group;
};

// weight: contiguous, output channels on dim 0; scale: none, or one contiguous value per row of scale_dtype
inline Layout check_layout(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                           at::ScalarType scale_dtype) {
  TORCH_CHECK(weight.device().is_cpu(), "edkm: CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "edkm: the weight must be contiguous");
  TORCH_CHECK(weight.dim() >= 1 && weight.numel() > 0, "edkm: empty weight");
  Layout layout;
  layout.rows = weight.size(0);
  layout.cols = weight.numel() / layout.rows;
  TORCH_CHECK(groups >= 1 && layout.rows % groups == 0, "edkm: groups must divide the rows");
  layout.groups = groups;
  layout.rows_per_group = layout.rows / groups;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == scale_dtype && scale->is_contiguous() && scale->numel() == layout.rows,
                "edkm: the scale must be a contiguous ", scale_dtype, " tensor with one value per row");
  }
  return layout;
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& weight) {
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.is_contiguous() && grad.scalar_type() == weight.scalar_type(),
              "edkm: the gradient must be contiguous with the weight's shape and dtype");
}

template <typename S>
const S* scale_ptr(const c10::optional<at::Tensor>& scale) {
  return scale.has_value() ? scale->data_ptr<S>() : nullptr;
}

// Dispatch over the weight dtype (float32, bfloat16, float16, float64), the pattern kind and the presence of a
// scale: fn(In* tag, kind constant, scaled constant), a generic lambda.
template <typename Fn>
void dispatch(const at::Tensor& weight, int64_t kind, bool scaled, Fn fn) {
  TORCH_CHECK(kind == kBFloat16 || kind == kFloat16, "edkm: kind must be 0 (bfloat16) or 1 (float16)");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "edkm: float32, bfloat16, float16 or float64 weights only; other dtypes use the torch path");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "edkm", [&] {
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

}  // namespace edkm
