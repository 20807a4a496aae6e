// Fused linear layers on weights that are not stored as float32, on CPU:
// * lut_linear: y = x @ decode(indices, lut, scale)^T + bias on a palettized weight in the checkpoint's packed
//   format (n-bit indices, LSB-first, row-major over [out, in]; rows byte-aligned: in * bits % 8 == 0, else the
//   Python wrapper takes the pure-torch path). A LUT of 2**bits entries per group of consecutive output rows, an
//   optional per-row scale, an optional bias.
// * linear16: y = x @ W^T + bias with W stored in fp16 / bf16 (the float parts of a palettized model), in fp32.
//
// Few rows of x (decoding, small batches): the weight rows are expanded in registers chunk by chunk (lut_avx512.cpp,
// lut_avx2.cpp, lut_scalar.cpp) and multiplied into up to 8 rows of x at once; no dense weight is made. Many rows
// of x (prefill): the weight is decoded in tiles of rows (the same code, stored) and multiplied with torch's GEMM,
// O(|W|) of decoding against O(M |W|) of arithmetic.
//
// Instruction sets: AVX-512 (F/BW/VL/DQ) and AVX2+FMA+F16C loops compiled with function target attributes and
// chosen at run time from the CPU's features; the portable loops run everywhere else (ARM, old x86) and serve as
// the in-extension reference. `set_isa` forces a lower one (tests compare all of them).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "lut_kernels.h"

namespace edkm_lut {
namespace {

int detect_isa() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return kAvx512;
  }
  if (avx2) return kAvx2;
#endif
  return kScalar;
}

const int kBestIsa = detect_isa();
std::atomic<int> g_isa{kBestIsa};

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

Dtype dtype_of(at::ScalarType type) {
  return type == at::kHalf ? kF16 : type == at::kBFloat16 ? kBF16 : kF32;
}

// One row of x (decoding at batch 1) of 1-3-bit LUT or 16-bit rows runs faster on 8 lanes than on 16 where the CPU
// has both (Sapphire Rapids, benchmarks/inference.py --kernel-sweep: 256-bit operations have 3 vector ports, 512-bit
// ones 2, and the 8-lane loop keeps up with memory); wider LUTs and more rows of x use the 16-lane loops.
std::atomic<bool> g_narrow_one_row{true};

int loops_for(int isa, int64_t bits, int mt) {
  return isa == kAvx512 && mt == 1 && bits <= 3 && g_narrow_one_row.load() ? kAvx2 : isa;
}

GemvFn lut_gemv_for(int isa, int64_t bits, int mt) {
  isa = loops_for(isa, bits, mt);
  GemvFn fn = isa == kAvx512 ? avx512_lut_gemv(bits, mt) : isa == kAvx2 ? avx2_lut_gemv(bits, mt) : nullptr;
  return fn ? fn : scalar_lut_gemv(bits, mt);
}

DecodeFn lut_decode_for(int isa, int64_t bits) {
  DecodeFn fn = isa == kAvx512 ? avx512_lut_decode(bits) : isa == kAvx2 ? avx2_lut_decode(bits) : nullptr;
  return fn ? fn : scalar_lut_decode(bits);
}

GemvFn dense_gemv_for(int isa, Dtype type, int mt) {
  isa = loops_for(isa, 0, mt);
  GemvFn fn = isa == kAvx512 ? avx512_dense_gemv(type, mt) : isa == kAvx2 ? avx2_dense_gemv(type, mt) : nullptr;
  return fn ? fn : scalar_dense_gemv(type, mt);
}

// ------------------------------------------------------------------------------------------- checks
bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void set_bias(Problem& p, const c10::optional<at::Tensor>& bias, const char* op) {
  if (!(bias.has_value() && bias->defined())) return;
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->numel() == p.out && bias->is_contiguous() &&
                  is_float_type(bias->scalar_type()),
              op, ": the bias must be a contiguous float [", p.out, "] CPU tensor, got ", bias->scalar_type(),
              " of shape ", bias->sizes());
  p.bias = bias->data_ptr();
  p.bias_type = dtype_of(bias->scalar_type());
}

Problem make_lut_problem(const at::Tensor& packed, const at::Tensor& lut, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& bias, int64_t in, int64_t out, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "lut_linear: bits must lie in [1, 8], got ", bits);
  TORCH_CHECK(in > 0 && out > 0, "lut_linear: in_features and out_features must be positive, got ", in, " and ",
              out);
  TORCH_CHECK((in * bits) % 8 == 0, "lut_linear: rows of ", in, " indices of ", bits,
              " bits are not byte-aligned in the packed stream; use the pure-torch path (optimum_edkm.kernels."
              "reference_lut_linear) for this layer");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous(),
              "lut_linear: packed indices must be a contiguous 1-D uint8 CPU tensor, got ", packed.scalar_type(),
              " of shape ", packed.sizes(), " on ", packed.device());
  TORCH_CHECK(packed.numel() == out * in * bits / 8, "lut_linear: ", out, "x", in, " indices of ", bits,
              " bits need ", out * in * bits / 8, " packed bytes, got ", packed.numel(),
              " (truncated tensor or another bit width)");
  TORCH_CHECK(lut.device().is_cpu() && lut.dim() == 2 && lut.size(1) == (int64_t(1) << bits) &&
                  is_float_type(lut.scalar_type()),
              "lut_linear: the LUT must be a [groups, ", int64_t(1) << bits,
              "] float32/float16/bfloat16 CPU tensor, got ", lut.scalar_type(), " of shape ", lut.sizes());
  TORCH_CHECK(lut.size(0) >= 1 && out % lut.size(0) == 0, "lut_linear: a LUT with ", lut.size(0),
              " groups cannot describe ", out, " output rows");
  TORCH_CHECK(lut.is_contiguous(), "lut_linear: the LUT must be contiguous");
  Problem p;
  p.weight = packed.data_ptr<uint8_t>();
  p.weight_end = p.weight + packed.numel();
  p.in = in;
  p.out = out;
  p.bits = bits;
  p.row_bytes = in * bits / 8;
  p.rows_per_group = out / lut.size(0);
  p.lut = lut.data_ptr();
  p.lut_type = dtype_of(lut.scalar_type());
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->device().is_cpu() && scale->dim() == 1 && scale->numel() == out &&
                    scale->is_contiguous() && is_float_type(scale->scalar_type()),
                "lut_linear: the scale must be a contiguous float [", out, "] CPU tensor, got ",
                scale->scalar_type(), " of shape ", scale->sizes());
    p.scale = scale->data_ptr();
    p.scale_type = dtype_of(scale->scalar_type());
  }
  set_bias(p, bias, "lut_linear");
  return p;
}

Problem make_dense_problem(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16),
              "linear16: the weight must be a contiguous 2-D float16/bfloat16 CPU tensor, got ",
              weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device(),
              " (float32 weights: use torch.nn.functional.linear)");
  Problem p;
  p.out = weight.size(0);
  p.in = weight.size(1);
  TORCH_CHECK(p.in > 0 && p.out > 0, "linear16: the weight must not be empty, got shape ", weight.sizes());
  p.weight = static_cast<const uint8_t*>(weight.data_ptr());
  p.weight_end = p.weight + weight.numel() * 2;
  p.row_bytes = p.in * 2;
  p.weight_type = dtype_of(weight.scalar_type());
  set_bias(p, bias, "linear16");
  return p;
}

void check_input(const at::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()), op,
              ": x must be a float32/float16/bfloat16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op, ": x's last dimension must be in_features=",
              in_features, ", got shape ", x.sizes());
}

// ------------------------------------------------------------------------------------------- threads
// Rows per parallel task: enough weights that a task outweighs the cost of waking a thread, a multiple of 8 (the
// loops' row blocks).
int64_t row_grain(const Problem& p, int64_t weights_per_task) {
  return (std::max<int64_t>(1, weights_per_task / p.in) + 7) / 8 * 8;
}

// Runs body(a, b) over chunks of `chunk` rows of [0, rows), with up to at::get_num_threads() threads: the caller
// and helpers posted to torch's inter-op pool (at::launch) claim chunks through a counter. The caller waits only
// for helpers that claimed a chunk, never for one that has not started: on a busy machine a helper scheduled late
// finds the work done and leaves, instead of holding up a fork/join barrier (an OpenMP region per layer made
// 2-thread decoding ~3x slower than 1 thread under load). The job is shared, so a late helper never touches
// freed memory, and it calls body only for a chunk it claimed, i.e. while the caller is still waiting.
struct ChunkJob {
  std::atomic<int64_t> next{0};
  std::atomic<int> in_flight{0};
  int64_t chunks = 0, chunk = 0, rows = 0;
  std::function<void(int64_t, int64_t)> body;

  void work() {
    in_flight.fetch_add(1);
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      body(c * chunk, std::min(rows, (c + 1) * chunk));
    in_flight.fetch_sub(1);
  }
};

// Below this many weights a layer takes a few microseconds on one core: a helper would arrive after the end.
constexpr int64_t kMinWeightsForHelpers = int64_t(1) << 18;

template <typename Body>
void for_row_chunks(int64_t rows, int64_t chunk, int64_t weights, const Body& body) {
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(chunks, at::get_num_threads()) - 1;
  if (helpers <= 0 || weights < kMinWeightsForHelpers || at::in_parallel_region()) {
    body(0, rows);
    return;
  }
  auto job = std::make_shared<ChunkJob>();
  job->chunks = chunks;
  job->chunk = chunk;
  job->rows = rows;
  job->body = [&body](int64_t a, int64_t b) { body(a, b); };
  for (int64_t h = 0; h < helpers; ++h) at::launch([job] { job->work(); });
  job->work();
  while (job->in_flight.load() > 0) std::this_thread::yield();
}

// ------------------------------------------------------------------------------------------- shared paths
// Dense fp32 rows [r0, r1), each scale[r] * lut[group(r), index].
void decode_into(const Problem& p, float* dense, int64_t r0, int64_t r1, int isa) {
  const DecodeFn fn = lut_decode_for(isa, p.bits);
  for_row_chunks(r1 - r0, row_grain(p, 1 << 16), (r1 - r0) * p.in,
                 [&](int64_t a, int64_t b) { fn(p, dense + a * p.in, r0 + a, r0 + b); });
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// The memory-bound path: the weight read once per pass over up to 8 rows of x. pick(mt) gives the loop.
template <typename Pick>
at::Tensor fused(const Problem& p, const at::Tensor& x, const Pick& pick, bool tables) {
  const int64_t m_rows = x.numel() / p.in;
  // float32 x and y as they are (decoding makes ~200 calls a token: every dispatcher call saved counts)
  const bool direct = x.scalar_type() == at::kFloat && x.is_contiguous();
  const at::Tensor xf = direct ? x : x.reshape({m_rows, p.in}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty(output_shape(x, p.out), x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < m_rows;) {
    const int64_t left = m_rows - m0;
    const int mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const GemvFn fn = pick(mt);
    const float* xt = xp + m0 * p.in;  // the loop writes y[m * out + r] relative to its rows of x
    float* yt = yp + m0 * p.out;
    Problem pass = p;
    std::vector<float> table_storage;
    if (tables && mt == 1) {
      table_storage.resize(scalar_table_floats(p));
      scalar_tables(p, xt, table_storage.data());
      pass.x_tables = table_storage.data();
    }
    for_row_chunks(p.out, row_grain(p, 1 << 16), p.out * p.in * mt,
                   [&](int64_t a, int64_t b) { fn(pass, xt, yt, a, b); });
    m0 += mt;
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// The compute-bound path: tiles of at most tile_bytes of the weight, as fp32 rows (tile(r0, rows) fills and
// returns them, in x's dtype), multiplied with torch's GEMM.
template <typename Tile>
at::Tensor tiled_gemm(const Problem& p, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                      int64_t tile_bytes, const Tile& tile) {
  const int64_t m_rows = x.numel() / p.in;
  const int64_t tile_rows = std::max<int64_t>(1, std::min<int64_t>(p.out, tile_bytes / (p.in * 4)));
  const bool has_bias = bias.has_value() && bias->defined();
  if (tile_rows >= p.out) {
    c10::optional<at::Tensor> b;
    if (has_bias) b = bias->to(x.scalar_type());
    return at::linear(x, tile(0, p.out), b);
  }
  const at::Tensor x2d = x.reshape({m_rows, p.in});
  at::Tensor y = at::empty({m_rows, p.out}, x.options());
  for (int64_t r0 = 0; r0 < p.out; r0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, p.out - r0);
    const at::Tensor w = tile(r0, rows);
    at::Tensor target = y.narrow(1, r0, rows);
    if (has_bias) {
      at::addmm_out(target, bias->narrow(0, r0, rows).to(x.scalar_type()), x2d, w.t());
    } else {
      at::mm_out(target, x2d, w.t());
    }
  }
  return y.view(output_shape(x, p.out));
}

// Rows of x from which decoding tiles + torch's GEMM beats the fused loops (measured with
// benchmarks/inference.py --kernel-sweep on SmolLM2's layer shapes). Portable LUT loops: only one row through
// the table kernel; otherwise their decode is slow enough that BLAS on a decoded copy wins from the first row.
int64_t default_gemm_min_rows(int isa, const Problem& p) {
  if (isa == kAvx512) return p.bits == 0 ? 40 : 32;
  if (isa == kAvx2) return 24;
  if (p.bits == 0) return 1;  // dense 16-bit rows
  return scalar_table_applies(p) ? 2 : 1;
}

// ------------------------------------------------------------------------------------------- ops
at::Tensor lut_decode(const at::Tensor& packed, const at::Tensor& lut, const c10::optional<at::Tensor>& scale,
                      int64_t in_features, int64_t out_features, int64_t bits, at::ScalarType dtype) {
  const Problem p = make_lut_problem(packed, lut, scale, c10::nullopt, in_features, out_features, bits);
  at::Tensor dense = at::empty({out_features, in_features}, packed.options().dtype(at::kFloat));
  decode_into(p, dense.data_ptr<float>(), 0, out_features, g_isa.load());
  return dtype == at::kFloat ? dense : dense.to(dtype);
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& lut,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                      int64_t in_features, int64_t out_features, int64_t bits, int64_t gemm_min_rows,
                      int64_t gemm_tile_bytes) {
  const Problem p = make_lut_problem(packed, lut, scale, bias, in_features, out_features, bits);
  check_input(x, in_features, "lut_linear");
  const int64_t m_rows = x.numel() / in_features;
  const int isa = g_isa.load();
  if (m_rows == 0) return at::empty(output_shape(x, out_features), x.options());
  if (gemm_min_rows <= 0) gemm_min_rows = default_gemm_min_rows(isa, p);
  if (m_rows >= gemm_min_rows) {
    // decoded tiles are exactly the reference's dense weight
    at::Tensor dense;
    return tiled_gemm(p, x, bias, gemm_tile_bytes, [&](int64_t r0, int64_t rows) {
      if (!dense.defined()) dense = at::empty({rows, in_features}, packed.options().dtype(at::kFloat));
      at::Tensor tile = dense.narrow(0, 0, rows);
      decode_into(p, tile.data_ptr<float>(), r0, r0 + rows, isa);
      return x.scalar_type() == at::kFloat ? tile : tile.to(x.scalar_type());
    });
  }
  const bool tables = isa == kScalar && scalar_table_applies(p);
  return fused(p, x, [&](int mt) { return lut_gemv_for(isa, bits, mt); }, tables);
}

at::Tensor linear16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    int64_t gemm_min_rows, int64_t gemm_tile_bytes) {
  const Problem p = make_dense_problem(weight, bias);
  check_input(x, p.in, "linear16");
  const int64_t m_rows = x.numel() / p.in;
  const int isa = g_isa.load();
  if (m_rows == 0) return at::empty(output_shape(x, p.out), x.options());
  if (gemm_min_rows <= 0) gemm_min_rows = default_gemm_min_rows(isa, p);
  if (m_rows >= gemm_min_rows) {
    // the tile in x's dtype: what the reference F.linear(x, weight.to(x.dtype)) multiplies
    return tiled_gemm(p, x, bias, gemm_tile_bytes,
                      [&](int64_t r0, int64_t rows) { return weight.narrow(0, r0, rows).to(x.scalar_type()); });
  }
  return fused(p, x, [&](int mt) { return dense_gemv_for(isa, p.weight_type, mt); }, false);
}

int64_t set_isa(const std::string& name) {
  int wanted = name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : name == "scalar" ? kScalar : -1;
  if (name == "best") wanted = kBestIsa;
  TORCH_CHECK(wanted >= 0, "set_isa: unknown ISA '", name, "'; expected one of best, avx512, avx2, scalar");
  TORCH_CHECK(wanted <= kBestIsa, "set_isa: this CPU (or build) does not support ", name, "; the best is ",
              isa_name(kBestIsa));
  g_isa.store(wanted);
  return wanted;
}

std::string current_isa() { return isa_name(g_isa.load()); }

bool set_narrow_one_row(bool enabled) { return g_narrow_one_row.exchange(enabled); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int isa = kScalar; isa <= kBestIsa; ++isa) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace
}  // namespace edkm_lut

TORCH_LIBRARY_FRAGMENT(optimum_edkm, m) {
  m.def("lut_linear(Tensor x, Tensor packed, Tensor lut, Tensor? scale, Tensor? bias, int in_features, "
        "int out_features, int bits, int gemm_min_rows, int gemm_tile_bytes) -> Tensor");
  m.def("lut_decode(Tensor packed, Tensor lut, Tensor? scale, int in_features, int out_features, int bits, "
        "ScalarType dtype) -> Tensor");
  m.def("linear16(Tensor x, Tensor weight, Tensor? bias, int gemm_min_rows, int gemm_tile_bytes) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_edkm, CPU, m) {
  m.impl("lut_linear", &edkm_lut::lut_linear);
  m.impl("lut_decode", &edkm_lut::lut_decode);
  m.impl("linear16", &edkm_lut::linear16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // the same functions as the torch operators, called without the dispatcher (eager decoding makes ~200 calls
  // a token; the operator is what torch.compile records)
  module.def("lut_linear", &edkm_lut::lut_linear, "lut_linear without the dispatcher (eager, no autograd)");
  module.def("linear16", &edkm_lut::linear16, "linear16 without the dispatcher (eager, no autograd)");
  module.def("set_isa", &edkm_lut::set_isa, "Force an instruction set (best, avx512, avx2, scalar); returns its id");
  module.def("current_isa", &edkm_lut::current_isa, "The instruction set the kernels use now");
  module.def("set_narrow_one_row", &edkm_lut::set_narrow_one_row,
             "One row of x of <= 3-bit LUT / 16-bit rows on 8 lanes where AVX-512 is in use (default true; false: "
             "the 16-lane loops, for comparisons); returns the previous setting");
  module.def("supported_isas", &edkm_lut::supported_isas, "Instruction sets this CPU and build can run, lowest first");
}
