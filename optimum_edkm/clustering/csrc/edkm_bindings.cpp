// Python bindings of the eDKM engine's compiled kernel (loaded by optimum_edkm/clustering/patterns.py from this folder).
#include <torch/extension.h>

#include <tuple>

// Defined in edkm_groups.cpp (declared here, not in a header: the bindings need nothing else from it). The pure-torch
// reference of both functions is the rest of optimum_edkm/clustering/ (edkm.py's "patterns" and "direct" paths).
namespace edkm {

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> groups_forward(
    const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t kind, const at::Tensor& start,
    double temperature, int64_t iterations);
at::Tensor groups_backward(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t kind,
                           const at::Tensor& grad, const at::Tensor& history, const at::Tensor& masses,
                           double temperature);

}  // namespace edkm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("groups_forward", &edkm::groups_forward,
        "eDKM per LUT group: clustered weight, centroids c_0..c_T, masses, non-finite count, value range per group");
  m.def("groups_backward", &edkm::groups_backward, "eDKM per LUT group: the weight's gradient");
}
