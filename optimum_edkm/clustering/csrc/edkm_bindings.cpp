// Python bindings of the eDKM engine's compiled parts (loaded by optimum_edkm/clustering/patterns.py from this folder).
#include <torch/extension.h>

#include <tuple>
#include <vector>

// Defined in edkm_patterns.cpp, edkm_pairs.cpp and edkm_groups.cpp (declared here, not in a header: the build cache is keyed on
// the sources' contents). Every function has a pure-torch reference in optimum_edkm/clustering/.
namespace edkm {

// per-weight passes keyed by 16-bit patterns (edkm_patterns.cpp; reference: clustering/patterns.py)
std::tuple<at::Tensor, at::Tensor, int64_t> count_pairs(const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& scale, int64_t groups,
                                                        int64_t kind);
at::Tensor gather_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                        int64_t kind, const at::Tensor& keys, const at::Tensor& table);
std::vector<at::Tensor> sum_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                                  int64_t kind, const at::Tensor& grad);
at::Tensor weight_grad_pairs(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t groups,
                             int64_t kind, const at::Tensor& grad, const at::Tensor& keys, const at::Tensor& local,
                             const at::Tensor& shift);

// DKM on distinct (group, value) pairs and its reverse pass (edkm_pairs.cpp; reference: clustering/edkm.py)
std::vector<at::Tensor> pairs_forward(const at::Tensor& values, const at::Tensor& counts, const at::Tensor& offsets,
                                      const at::Tensor& start, double temperature, int64_t iterations,
                                      double tolerance, bool replay);
std::vector<at::Tensor> pairs_backward(const at::Tensor& values, const at::Tensor& counts,
                                       const at::Tensor& offsets, const at::Tensor& history,
                                       const at::Tensor& masses, const at::Tensor& pair_grad, double temperature);

// the whole of eDKM per group, one thread a group (edkm_groups.cpp; reference: clustering/edkm.py)
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, at::Tensor> groups_forward(const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& scale,
                                                                       int64_t kind, const at::Tensor& start,
                                                                       double temperature, int64_t iterations);
at::Tensor groups_backward(const at::Tensor& weight, const c10::optional<at::Tensor>& scale, int64_t kind,
                           const at::Tensor& grad, const at::Tensor& history, const at::Tensor& masses,
                           double temperature);

}  // namespace edkm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("count_pairs", &edkm::count_pairs, "distinct (group, 16-bit pattern) keys, their counts, non-finite count");
  m.def("gather_pairs", &edkm::gather_pairs, "table[pair of the key] (times the row's scale) per weight");
  m.def("sum_pairs", &edkm::sum_pairs, "keys, counts and float64 sums of grad * scale per key");
  m.def("weight_grad_pairs", &edkm::weight_grad_pairs, "(local * grad * scale + shift) / scale per weight");
  m.def("pairs_forward", &edkm::pairs_forward, "DKM iterations on distinct pairs: table, centroids, masses");
  m.def("pairs_backward", &edkm::pairs_backward, "local derivative and centroid term of each pair");
  m.def("groups_forward", &edkm::groups_forward, "eDKM per group: clustered weight, centroids, masses, non-finite count, value ranges");
  m.def("groups_backward", &edkm::groups_backward, "eDKM per group: the weight's gradient");
}
