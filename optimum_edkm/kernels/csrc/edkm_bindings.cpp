// Python bindings of the eDKM engine's compiled parts (loaded by optimum_edkm/clustering/patterns.py).
#include <torch/extension.h>

#include <vector>

// Defined in edkm_patterns.cpp and edkm_pairs.cpp (declared here, not in a header: the build cache is keyed on
// the sources' contents). Every function has a pure-torch reference in optimum_edkm/clustering/.
namespace edkm {

// per-weight passes keyed by 16-bit patterns (edkm_patterns.cpp; reference: clustering/patterns.py)
at::Tensor count_patterns(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                          int64_t kind);
at::Tensor gather_table(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                        int64_t kind, const at::Tensor& table);
std::vector<at::Tensor> pattern_sums(const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                                     int64_t groups, int64_t kind, const at::Tensor& grad);
at::Tensor weight_grad(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                       int64_t kind, const at::Tensor& grad, const at::Tensor& local, const at::Tensor& shift);

// DKM on distinct (group, value) pairs and its reverse pass (edkm_pairs.cpp; reference: clustering/edkm.py)
std::vector<at::Tensor> pairs_forward(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets,
                                      const at::Tensor& start, double temperature, int64_t iterations,
                                      double tolerance, bool replay);
std::vector<at::Tensor> pairs_backward(const at::Tensor& values, const at::Tensor& counts,
                                       const at::Tensor& offsets, const at::Tensor& history,
                                       const at::Tensor& masses, const at::Tensor& pair_grad, double temperature);

}  // namespace edkm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_patterns", &edkm::count_patterns, "weights per (group, 16-bit pattern) key");
  m.def("gather_table", &edkm::gather_table, "table[key] (times the row's scale) per weight");
  m.def("pattern_sums", &edkm::pattern_sums, "counts and double sums of grad * scale per key");
  m.def("weight_grad", &edkm::weight_grad, "(local[key] * grad * scale + shift[key]) / scale per weight");
  m.def("pairs_forward", &edkm::pairs_forward, "DKM iterations on distinct pairs: table, centroids, masses");
  m.def("pairs_backward", &edkm::pairs_backward, "local derivative and centroid term of each pair");
}
