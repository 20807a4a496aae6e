// Fused LUT (palettized) linear layer on CPU: y = x @ decode(indices, lut, scale)^T + bias.
//
// The weight stays in the checkpoint's packed format: n-bit indices, LSB-first, row-major over [out, in], one
// row every in*bits/8 bytes (rows must be byte-aligned: in*bits % 8 == 0; the Python wrapper falls back to the
// pure-torch path otherwise). A LUT of 2**bits entries per group of consecutive output rows, an optional
// per-row scale, an optional bias.
//
// Few rows of x (decoding): each 8/16-index chunk of a weight row is expanded in registers (shift the packed
// bits into 32-bit lanes, look the lanes up in a LUT held in one register) and multiplied into every row of x
// at once; the dense weight never exists. The row scale is applied once per dot product. Many rows of x
// (prefill): the weight is decoded in tiles of rows (the same code, stored) and multiplied with torch's GEMM,
// O(|W|) of decoding against O(M |W|) of arithmetic.
//
// ISA: AVX-512 (F/BW/VL) and AVX2+FMA variants are compiled with function target attributes and chosen at run
// time from the CPU's features; a portable scalar path runs everywhere else (ARM, old x86) and serves as the
// in-extension reference. `set_isa` forces a lower path (tests compare all of them).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define EDKM_X86 1
#include <immintrin.h>
#else
#define EDKM_X86 0
#endif

namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
#if EDKM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

const int kBestIsa = detect_isa();
std::atomic<int> g_isa{kBestIsa};

const char* isa_name(int isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

// Reads element i of a 1-D float32 / float16 / bfloat16 buffer as float.
inline float read_float(const void* data, at::ScalarType type, int64_t i) {
  switch (type) {
    case at::kFloat: return static_cast<const float*>(data)[i];
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
    default: return static_cast<float>(static_cast<const double*>(data)[i]);
  }
}

struct Problem {
  const uint8_t* packed;
  int64_t in, out, bits, row_bytes;
  int64_t rows_per_group;   // consecutive output rows sharing one LUT
  int64_t entries;          // 2**bits
  const void* lut; at::ScalarType lut_type;
  const void* scale; at::ScalarType scale_type;   // null: no scale
  const void* bias; at::ScalarType bias_type;     // null: no bias
  const float* x_tables = nullptr;                // portable one-row kernel: partial-sum tables (per LUT group)
};

// The LUT of one group as float, replicated with period 2**bits to fill 16 lanes (so that a lookup may use the
// low 4 bits of a lane that also holds the next index's bits).
struct GroupLut {
  int64_t group = -1;
  alignas(64) float values[256];
  alignas(64) float replicated[16];

  void load(const Problem& p, int64_t row) {
    const int64_t g = row / p.rows_per_group;
    if (g == group) return;
    group = g;
    for (int64_t j = 0; j < p.entries; ++j) values[j] = read_float(p.lut, p.lut_type, g * p.entries + j);
    for (int j = 0; j < 16; ++j) replicated[j] = values[j % p.entries];
  }
};

inline float row_scale(const Problem& p, int64_t row) {
  return p.scale ? read_float(p.scale, p.scale_type, row) : 1.0f;
}

inline float row_bias(const Problem& p, int64_t row) {
  return p.bias ? read_float(p.bias, p.bias_type, row) : 0.0f;
}

// The 8 indices starting at index k of a row (k a multiple of 8) fill exactly BITS bytes, assembled with shifts
// (a memcpy of 3 bytes into a zeroed word stalls on store forwarding; the stream is LSB-first).
template <int BITS>
inline uint64_t load_chunk8(const uint8_t* row, int64_t k) {
  const uint8_t* src = row + (k / 8) * BITS;
  if constexpr (BITS == 8) {
    uint64_t word;
    std::memcpy(&word, src, 8);
    return word;
  } else if constexpr (BITS == 4) {
    uint32_t word;
    std::memcpy(&word, src, 4);
    return word;
  } else if constexpr (BITS == 2) {
    uint16_t word;
    std::memcpy(&word, src, 2);
    return word;
  } else {
    uint64_t word = 0;
    for (int b = 0; b < BITS; ++b) word |= uint64_t(src[b]) << (8 * b);
    return word;
  }
}

// The last count < 8 indices of a row.
template <int BITS>
inline uint64_t load_tail8(const uint8_t* row, int64_t k, int64_t count) {
  uint64_t word = 0;
  const uint8_t* src = row + (k / 8) * BITS;
  for (int64_t b = 0; b < (count * BITS + 7) / 8; ++b) word |= uint64_t(src[b]) << (8 * b);
  return word;
}

// --------------------------------------------------------------------------------------------- scalar
template <int BITS>
void decode_row_scalar(const Problem& p, const GroupLut& lut, const uint8_t* row, float* dst) {
  constexpr uint64_t mask = (1u << BITS) - 1;
  for (int64_t k = 0; k < p.in; k += 8) {
    const int64_t count = std::min<int64_t>(8, p.in - k);
    const uint64_t word = count == 8 ? load_chunk8<BITS>(row, k) : load_tail8<BITS>(row, k, count);
    for (int64_t j = 0; j < count; ++j) dst[k + j] = lut.values[(word >> (j * BITS)) & mask];
  }
}

// y[m, r] for rows [r0, r1): decode the row into a float buffer, then one dot product per row of x (eight
// partial sums, so that the compiler may vectorize without reassociating).
template <int BITS>
void gemv_scalar(const Problem& p, const float* x, int64_t m_rows, float* y, int64_t r0, int64_t r1) {
  GroupLut lut;
  std::vector<float> w(p.in);
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r);
    decode_row_scalar<BITS>(p, lut, p.packed + r * p.row_bytes, w.data());
    const float s = row_scale(p, r), b = row_bias(p, r);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xm = x + m * p.in;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= p.in; k += 8)
        for (int j = 0; j < 8; ++j) part[j] += w[k + j] * xm[k + j];
      for (; k < p.in; ++k) part[k % 8] += w[k] * xm[k];
      const float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
      y[m * p.out + r] = sum * s + b;
    }
  }
}

// One row of x, portable: per group of G consecutive indices (G*BITS <= 8 bits, G | 8), a table of the K**G
// partial dot products sum_j lut[idx_j] * x[g*G + j] is built once per call (and LUT group); a weight row then
// costs one shift, one mask, one load and one add per G weights instead of a decode and an FMA per weight.
// (4 bits: tables of 256 entries per pair fall out of L1 and measured slower than decode + GEMM)
template <int BITS>
constexpr int table_group() { return BITS == 1 ? 8 : BITS == 2 ? 4 : BITS == 3 ? 2 : 1; }

template <int BITS>
bool table_applies(const Problem& p) {
  constexpr int64_t G = table_group<BITS>();
  const int64_t entries = int64_t(1) << (G * BITS);
  // building costs entries/G adds per x element and per LUT group; a row costs one lookup per G weights
  return G > 1 && p.in >= 8 && entries * (p.out / p.rows_per_group) * 2 <= p.out;
}

// Tables of every LUT group for one row of x: [groups][in/8*8 / G][K**G].
template <int BITS>
std::vector<float> build_tables(const Problem& p, const float* x) {
  constexpr int64_t G = table_group<BITS>();
  constexpr int64_t E = int64_t(1) << (G * BITS);
  const int64_t groups_of_x = p.in / 8 * 8 / G, lut_groups = p.out / p.rows_per_group;
  std::vector<float> tables(lut_groups * groups_of_x * E);
  GroupLut lut;
  for (int64_t group = 0; group < lut_groups; ++group) {
    lut.load(p, group * p.rows_per_group);
    for (int64_t g = 0; g < groups_of_x; ++g) {
      float* t = tables.data() + (group * groups_of_x + g) * E;
      for (int64_t c = 0; c < (int64_t(1) << BITS); ++c) t[c] = lut.values[c] * x[g * G];
      for (int64_t j = 1; j < G; ++j) {
        const int64_t filled = int64_t(1) << (j * BITS);
        const float xj = x[g * G + j];
        // high blocks first: block 0 is the source of the others and is overwritten last
        for (int64_t hi = (int64_t(1) << BITS) - 1; hi >= 0; --hi) {
          const float add = lut.values[hi] * xj;
          for (int64_t lo = 0; lo < filled; ++lo) t[hi * filled + lo] = t[lo] + add;
        }
      }
    }
  }
  return tables;
}

template <int BITS>
void gemv_scalar_table(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int64_t G = table_group<BITS>();
  constexpr int64_t E = int64_t(1) << (G * BITS);
  constexpr uint64_t code_mask = uint64_t(E - 1);
  const int64_t full = p.in / 8 * 8, groups_of_x = full / G;
  GroupLut lut;
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r);
    const uint8_t* row = p.packed + r * p.row_bytes;
    float part[4] = {0, 0, 0, 0};
    const float* t = p.x_tables + lut.group * groups_of_x * E;
    for (int64_t k = 0; k < full; k += 8, t += (8 / G) * E) {
      const uint64_t word = load_chunk8<BITS>(row, k);
      for (int64_t c = 0; c < 8 / G; ++c) part[c % 4] += t[c * E + ((word >> (c * G * BITS)) & code_mask)];
    }
    float sum = (part[0] + part[2]) + (part[1] + part[3]);
    if (full < p.in) {
      const uint64_t word = load_tail8<BITS>(row, full, p.in - full);
      for (int64_t j = 0; j < p.in - full; ++j)
        sum += lut.values[(word >> (j * BITS)) & ((1u << BITS) - 1)] * x[full + j];
    }
    y[r] = sum * row_scale(p, r) + row_bias(p, r);
  }
}

template <int BITS>
void decode_scalar(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  GroupLut lut;
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r);
    float* dst = dense + (r - r0) * p.in;
    decode_row_scalar<BITS>(p, lut, p.packed + r * p.row_bytes, dst);
    if (p.scale) {
      const float s = row_scale(p, r);
      for (int64_t k = 0; k < p.in; ++k) dst[k] *= s;
    }
  }
}

#if EDKM_X86
// --------------------------------------------------------------------------------------------- AVX2
#define EDKM_AVX2 __attribute__((target("avx2,fma")))

// 8 indices -> 8 int32 lanes. The chunk is BITS bytes; lanes 0-3 read its low half, lanes 4-7 its high half
// (4*BITS <= 32 bits each), each shifted to its index's bit offset.
template <int BITS>
EDKM_AVX2 inline __m256i indices8_avx2(uint64_t word) {
  const uint32_t lo = static_cast<uint32_t>(word), hi = static_cast<uint32_t>(word >> (4 * BITS));
  const __m256i v = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
  return _mm256_srlv_epi32(v, shifts);
}

struct LutRegs2 {
  __m256 lo, hi;
};

template <int BITS>
EDKM_AVX2 inline LutRegs2 lut_regs_avx2(const GroupLut& lut) {
  return {_mm256_loadu_ps(lut.replicated), _mm256_loadu_ps(lut.replicated + 8)};
}

// vpermps uses the low 3 bits of each lane: LUTs of <= 8 entries (replicated) in one register, 16 entries in
// two registers blended on bit 3, larger LUTs through a gather.
template <int BITS>
EDKM_AVX2 inline __m256 lookup_avx2(__m256i idx, const LutRegs2& regs, const GroupLut& lut) {
  if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(regs.lo, idx);
  } else if constexpr (BITS == 4) {
    const __m256 a = _mm256_permutevar8x32_ps(regs.lo, idx), b = _mm256_permutevar8x32_ps(regs.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else {
    const __m256i masked = _mm256_and_si256(idx, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_i32gather_ps(lut.values, masked, 4);
  }
}

EDKM_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS, int MT>
EDKM_AVX2 void gemv_avx2_tile(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  GroupLut lut;
  alignas(32) float tail_x[MT][8];
  const int64_t full = p.in / 8 * 8, rest = p.in - full;
  for (int m = 0; m < MT; ++m) {
    for (int j = 0; j < 8; ++j) tail_x[m][j] = j < rest ? x[m * p.in + full + j] : 0.0f;
  }
  LutRegs2 regs{};
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t group = lut.group;
    lut.load(p, r);
    if (lut.group != group || r == r0) regs = lut_regs_avx2<BITS>(lut);
    const uint8_t* row = p.packed + r * p.row_bytes;
    // U independent accumulators per row of x: one FMA chain alone would wait on its own latency
    constexpr int U = MT >= 4 ? 1 : 4 / MT;
    __m256 acc[U][MT];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= full; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 8 * u;
        const __m256 w = lookup_avx2<BITS>(indices8_avx2<BITS>(load_chunk8<BITS>(row, ku)), regs, lut);
        for (int m = 0; m < MT; ++m)
          acc[u][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * p.in + ku), acc[u][m]);
      }
    }
    for (; k < full; k += 8) {
      const __m256 w = lookup_avx2<BITS>(indices8_avx2<BITS>(load_chunk8<BITS>(row, k)), regs, lut);
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * p.in + k), acc[0][m]);
    }
    if (rest) {
      // lanes past the row's end multiply zeros of tail_x (their LUT values are finite)
      const __m256 w = lookup_avx2<BITS>(indices8_avx2<BITS>(load_tail8<BITS>(row, full, rest)), regs, lut);
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_load_ps(tail_x[m]), acc[0][m]);
    }
    const float s = row_scale(p, r), b = row_bias(p, r);
    for (int m = 0; m < MT; ++m) {
      __m256 total = acc[0][m];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[u][m]);
      y[m * p.out + r] = hsum_avx2(total) * s + b;
    }
  }
}

template <int BITS>
EDKM_AVX2 void decode_avx2(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  GroupLut lut;
  LutRegs2 regs{};
  const int64_t full = p.in / 8 * 8, rest = p.in - full;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t group = lut.group;
    lut.load(p, r);
    if (lut.group != group || r == r0) regs = lut_regs_avx2<BITS>(lut);
    const uint8_t* row = p.packed + r * p.row_bytes;
    float* dst = dense + (r - r0) * p.in;
    const __m256 s = _mm256_set1_ps(row_scale(p, r));
    for (int64_t k = 0; k < full; k += 8) {
      const __m256 w = lookup_avx2<BITS>(indices8_avx2<BITS>(load_chunk8<BITS>(row, k)), regs, lut);
      _mm256_storeu_ps(dst + k, _mm256_mul_ps(w, s));
    }
    if (rest) {
      alignas(32) float tmp[8];
      const __m256 w = lookup_avx2<BITS>(indices8_avx2<BITS>(load_tail8<BITS>(row, full, rest)), regs, lut);
      _mm256_store_ps(tmp, _mm256_mul_ps(w, s));
      std::memcpy(dst + full, tmp, rest * sizeof(float));
    }
  }
}

// --------------------------------------------------------------------------------------------- AVX-512
#define EDKM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// 16 indices occupy 2*BITS bytes (a masked load never reads past them). Lane i needs the bits at offset
// BITS*i: vpermw gathers the two 16-bit words that hold them into the lane, vpsrlvd aligns them.
template <int BITS>
struct Unpack16 {
  __m512i words, shifts;
  EDKM_AVX512 Unpack16() {
    alignas(64) int16_t w[32];
    alignas(64) int32_t s[16];
    for (int i = 0; i < 16; ++i) {
      w[2 * i] = static_cast<int16_t>((BITS * i) >> 4);
      w[2 * i + 1] = static_cast<int16_t>(((BITS * i) >> 4) + 1);
      s[i] = (BITS * i) & 15;
    }
    words = _mm512_load_si512(w);
    shifts = _mm512_load_si512(s);
  }
  EDKM_AVX512 inline __m512i operator()(const uint8_t* src, __mmask16 byte_mask) const {
    const __m512i raw = _mm512_zextsi128_si512(_mm_maskz_loadu_epi8(byte_mask, src));
    return _mm512_srlv_epi32(_mm512_permutexvar_epi16(words, raw), shifts);
  }
};

struct LutRegs4 {
  __m512 a, b;
};

template <int BITS>
EDKM_AVX512 inline LutRegs4 lut_regs_avx512(const GroupLut& lut) {
  if constexpr (BITS == 5) return {_mm512_loadu_ps(lut.values), _mm512_loadu_ps(lut.values + 16)};
  return {_mm512_loadu_ps(lut.replicated), _mm512_setzero_ps()};
}

// vpermps: the low 4 bits of a lane select one of 16 (replicated) entries; vpermt2ps: 5 bits, 32 entries in
// two registers; larger LUTs through a gather.
template <int BITS>
EDKM_AVX512 inline __m512 lookup_avx512(__m512i idx, const LutRegs4& regs, const GroupLut& lut) {
  if constexpr (BITS <= 4) {
    return _mm512_permutexvar_ps(idx, regs.a);
  } else if constexpr (BITS == 5) {
    return _mm512_permutex2var_ps(regs.a, idx, regs.b);
  } else {
    return _mm512_i32gather_ps(_mm512_and_si512(idx, _mm512_set1_epi32((1 << BITS) - 1)), lut.values, 4);
  }
}

template <int BITS, int MT>
EDKM_AVX512 void gemv_avx512_tile(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  const Unpack16<BITS> unpack;
  GroupLut lut;
  LutRegs4 regs{};
  const int64_t full = p.in / 16 * 16, rest = p.in - full;
  const __mmask16 chunk_bytes = static_cast<__mmask16>((1u << (2 * BITS)) - 1);
  const __mmask16 rest_bytes = static_cast<__mmask16>((1u << ((rest * BITS + 7) / 8)) - 1);
  const __mmask16 rest_lanes = static_cast<__mmask16>((1u << rest) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t group = lut.group;
    lut.load(p, r);
    if (lut.group != group || r == r0) regs = lut_regs_avx512<BITS>(lut);
    const uint8_t* row = p.packed + r * p.row_bytes;
    // U independent accumulators per row of x: one FMA chain alone would wait on its own latency
    constexpr int U = MT >= 4 ? 1 : 4 / MT;
    __m512 acc[U][MT];
    for (int u = 0; u < U; ++u)
      for (int m = 0; m < MT; ++m) acc[u][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= full; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t ku = k + 16 * u;
        const __m512 w = lookup_avx512<BITS>(unpack(row + ku / 8 * BITS, chunk_bytes), regs, lut);
        for (int m = 0; m < MT; ++m)
          acc[u][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * p.in + ku), acc[u][m]);
      }
    }
    for (; k < full; k += 16) {
      const __m512 w = lookup_avx512<BITS>(unpack(row + k / 8 * BITS, chunk_bytes), regs, lut);
      for (int m = 0; m < MT; ++m) acc[0][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * p.in + k), acc[0][m]);
    }
    if (rest) {
      const __m512 w = lookup_avx512<BITS>(unpack(row + full / 8 * BITS, rest_bytes), regs, lut);
      for (int m = 0; m < MT; ++m)
        acc[0][m] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(rest_lanes, x + m * p.in + full), acc[0][m]);
    }
    const float s = row_scale(p, r), b = row_bias(p, r);
    for (int m = 0; m < MT; ++m) {
      __m512 total = acc[0][m];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[u][m]);
      y[m * p.out + r] = _mm512_reduce_add_ps(total) * s + b;
    }
  }
}

template <int BITS>
EDKM_AVX512 void decode_avx512(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  const Unpack16<BITS> unpack;
  GroupLut lut;
  LutRegs4 regs{};
  const int64_t full = p.in / 16 * 16, rest = p.in - full;
  const __mmask16 chunk_bytes = static_cast<__mmask16>((1u << (2 * BITS)) - 1);
  const __mmask16 rest_bytes = static_cast<__mmask16>((1u << ((rest * BITS + 7) / 8)) - 1);
  const __mmask16 rest_lanes = static_cast<__mmask16>((1u << rest) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t group = lut.group;
    lut.load(p, r);
    if (lut.group != group || r == r0) regs = lut_regs_avx512<BITS>(lut);
    const uint8_t* row = p.packed + r * p.row_bytes;
    float* dst = dense + (r - r0) * p.in;
    const __m512 s = _mm512_set1_ps(row_scale(p, r));
    for (int64_t k = 0; k < full; k += 16) {
      const __m512 w = lookup_avx512<BITS>(unpack(row + k / 8 * BITS, chunk_bytes), regs, lut);
      _mm512_storeu_ps(dst + k, _mm512_mul_ps(w, s));
    }
    if (rest) {
      const __m512 w = lookup_avx512<BITS>(unpack(row + full / 8 * BITS, rest_bytes), regs, lut);
      _mm512_mask_storeu_ps(dst + full, rest_lanes, _mm512_mul_ps(w, s));
    }
  }
}
#endif  // EDKM_X86

// ------------------------------------------------------------------------------------------- dispatch
using GemvFn = void (*)(const Problem&, const float*, float*, int64_t, int64_t);
using DecodeFn = void (*)(const Problem&, float*, int64_t, int64_t);

template <int BITS, int MT>
void gemv_scalar_tile(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  if (MT == 1 && p.x_tables) return gemv_scalar_table<BITS>(p, x, y, r0, r1);
  gemv_scalar<BITS>(p, x, MT, y, r0, r1);
}

std::vector<float> scalar_tables(const Problem& p, const float* x) {
  switch (p.bits) {
    case 1: return build_tables<1>(p, x);
    case 2: return build_tables<2>(p, x);
    default: return build_tables<3>(p, x);
  }
}

bool scalar_table_applies(const Problem& p) {
  switch (p.bits) {
    case 1: return table_applies<1>(p);
    case 2: return table_applies<2>(p);
    case 3: return table_applies<3>(p);
    case 4: return table_applies<4>(p);
    default: return false;
  }
}

template <int BITS, int MT>
GemvFn gemv_for_isa(int isa) {
#if EDKM_X86
  if (isa == kAvx512) return &gemv_avx512_tile<BITS, MT>;
  if (isa == kAvx2) return &gemv_avx2_tile<BITS, MT>;
#endif
  (void)isa;
  return &gemv_scalar_tile<BITS, MT>;
}

template <int BITS>
GemvFn gemv_for_bits(int isa, int mt) {
  switch (mt) {
    case 1: return gemv_for_isa<BITS, 1>(isa);
    case 2: return gemv_for_isa<BITS, 2>(isa);
    case 4: return gemv_for_isa<BITS, 4>(isa);
    default: return gemv_for_isa<BITS, 8>(isa);
  }
}

GemvFn select_gemv(int isa, int64_t bits, int mt) {
  switch (bits) {
    case 1: return gemv_for_bits<1>(isa, mt);
    case 2: return gemv_for_bits<2>(isa, mt);
    case 3: return gemv_for_bits<3>(isa, mt);
    case 4: return gemv_for_bits<4>(isa, mt);
    case 5: return gemv_for_bits<5>(isa, mt);
    case 6: return gemv_for_bits<6>(isa, mt);
    case 7: return gemv_for_bits<7>(isa, mt);
    default: return gemv_for_bits<8>(isa, mt);
  }
}

template <int BITS>
DecodeFn decode_for_isa(int isa) {
#if EDKM_X86
  if (isa == kAvx512) return &decode_avx512<BITS>;
  if (isa == kAvx2) return &decode_avx2<BITS>;
#endif
  (void)isa;
  return &decode_scalar<BITS>;
}

DecodeFn select_decode(int isa, int64_t bits) {
  switch (bits) {
    case 1: return decode_for_isa<1>(isa);
    case 2: return decode_for_isa<2>(isa);
    case 3: return decode_for_isa<3>(isa);
    case 4: return decode_for_isa<4>(isa);
    case 5: return decode_for_isa<5>(isa);
    case 6: return decode_for_isa<6>(isa);
    case 7: return decode_for_isa<7>(isa);
    default: return decode_for_isa<8>(isa);
  }
}

// ------------------------------------------------------------------------------------------- checks
bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

Problem make_problem(const at::Tensor& packed, const at::Tensor& lut, const c10::optional<at::Tensor>& scale,
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
  Problem p{};
  p.packed = packed.data_ptr<uint8_t>();
  p.in = in;
  p.out = out;
  p.bits = bits;
  p.row_bytes = in * bits / 8;
  p.rows_per_group = out / lut.size(0);
  p.entries = int64_t(1) << bits;
  TORCH_CHECK(lut.is_contiguous(), "lut_linear: the LUT must be contiguous");
  p.lut = lut.data_ptr();
  p.lut_type = lut.scalar_type();
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->device().is_cpu() && scale->dim() == 1 && scale->numel() == out &&
                    scale->is_contiguous() && is_float_type(scale->scalar_type()),
                "lut_linear: the scale must be a contiguous float [", out, "] CPU tensor, got ",
                scale->scalar_type(), " of shape ", scale->sizes());
    p.scale = scale->data_ptr();
    p.scale_type = scale->scalar_type();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->numel() == out && bias->is_contiguous() &&
                    is_float_type(bias->scalar_type()),
                "lut_linear: the bias must be a contiguous float [", out, "] CPU tensor, got ",
                bias->scalar_type(), " of shape ", bias->sizes());
    p.bias = bias->data_ptr();
    p.bias_type = bias->scalar_type();
  }
  return p;
}

// Rows per parallel task: enough weights that a task outweighs the cost of waking a thread.
int64_t row_grain(const Problem& p, int64_t weights_per_task) {
  return std::max<int64_t>(1, weights_per_task / p.in);
}

// Rows of x from which decoding tiles + torch's GEMM beats the fused kernel, per instruction set (measured with
// benchmarks/inference.py --kernel-sweep on SmolLM2's layer shapes). Scalar: only one row through the table
// kernel; otherwise the scalar decode is slow enough that BLAS on a decoded copy wins from the first row.
int64_t default_gemm_min_rows(int isa, const Problem& p) {
  if (isa == kAvx512) return 64;
  if (isa == kAvx2) return 32;
  return scalar_table_applies(p) ? 2 : 1;
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

// Dense fp32 rows [r0, r1), each scale[r] * lut[group(r), index].
void decode_into(const Problem& p, float* dense, int64_t r0, int64_t r1, int isa) {
  const DecodeFn fn = select_decode(isa, p.bits);
  for_row_chunks(r1 - r0, row_grain(p, 1 << 16), (r1 - r0) * p.in,
                 [&](int64_t a, int64_t b) { fn(p, dense + a * p.in, r0 + a, r0 + b); });
}

at::Tensor lut_decode(const at::Tensor& packed, const at::Tensor& lut, const c10::optional<at::Tensor>& scale,
                      int64_t in_features, int64_t out_features, int64_t bits, at::ScalarType dtype) {
  const Problem p = make_problem(packed, lut, scale, c10::nullopt, in_features, out_features, bits);
  at::Tensor dense = at::empty({out_features, in_features}, packed.options().dtype(at::kFloat));
  decode_into(p, dense.data_ptr<float>(), 0, out_features, g_isa.load());
  return dtype == at::kFloat ? dense : dense.to(dtype);
}

at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& lut,
                      const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                      int64_t in_features, int64_t out_features, int64_t bits, int64_t gemm_min_rows,
                      int64_t gemm_tile_bytes) {
  const Problem p = make_problem(packed, lut, scale, bias, in_features, out_features, bits);
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()),
              "lut_linear: x must be a float32/float16/bfloat16 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "lut_linear: x's last dimension must be in_features=",
              in_features, ", got shape ", x.sizes());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  const int64_t m_rows = x.numel() / in_features;
  const int isa = g_isa.load();
  if (m_rows == 0) return at::empty(out_shape, x.options());
  if (gemm_min_rows <= 0) gemm_min_rows = default_gemm_min_rows(isa, p);

  if (m_rows >= gemm_min_rows) {
    // compute-bound: decode tiles of rows (exactly the reference's dense weight) and use torch's GEMM
    const at::Tensor x2d = x.reshape({m_rows, in_features});
    const int64_t tile_rows = std::max<int64_t>(
        1, std::min<int64_t>(out_features, gemm_tile_bytes / (in_features * int64_t(sizeof(float)))));
    if (tile_rows >= out_features) {
      at::Tensor dense = at::empty({out_features, in_features}, packed.options().dtype(at::kFloat));
      decode_into(p, dense.data_ptr<float>(), 0, out_features, isa);
      const at::Tensor w = x.scalar_type() == at::kFloat ? dense : dense.to(x.scalar_type());
      c10::optional<at::Tensor> b;
      if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type());
      return at::linear(x, w, b);
    }
    at::Tensor y = at::empty({m_rows, out_features}, x.options());
    at::Tensor dense = at::empty({tile_rows, in_features}, packed.options().dtype(at::kFloat));
    for (int64_t r0 = 0; r0 < out_features; r0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, out_features - r0);
      at::Tensor tile = dense.narrow(0, 0, rows);
      decode_into(p, tile.data_ptr<float>(), r0, r0 + rows, isa);
      const at::Tensor w = x.scalar_type() == at::kFloat ? tile : tile.to(x.scalar_type());
      at::Tensor target = y.narrow(1, r0, rows);
      if (bias.has_value() && bias->defined()) {
        at::addmm_out(target, bias->narrow(0, r0, rows).to(x.scalar_type()), x2d, w.t());
      } else {
        at::mm_out(target, x2d, w.t());
      }
    }
    return y.view(out_shape);
  }

  // memory-bound: fused decode + dot products, the weight read once per tile of up to 8 rows of x
  const at::Tensor xf = x.reshape({m_rows, in_features}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({m_rows, out_features}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m0 = 0; m0 < m_rows;) {
    const int64_t left = m_rows - m0;
    const int mt = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const GemvFn fn = select_gemv(isa, bits, mt);
    // y rows are offset by m0; the kernel writes y[m * out + r] relative to its x tile
    const float* xt = xp + m0 * in_features;
    float* yt = yp + m0 * out_features;
    Problem tile = p;
    std::vector<float> tables;
    if (isa == kScalar && mt == 1 && scalar_table_applies(p)) {
      tables = scalar_tables(p, xt);
      tile.x_tables = tables.data();
    }
    for_row_chunks(out_features, row_grain(p, 1 << 16), out_features * in_features * mt,
                   [&](int64_t a, int64_t b) { fn(tile, xt, yt, a, b); });
    m0 += mt;
  }
  at::Tensor result = x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  return result.view(out_shape);
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

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int isa = kScalar; isa <= kBestIsa; ++isa) names.emplace_back(isa_name(isa));
  return names;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_edkm, m) {
  m.def("lut_linear(Tensor x, Tensor packed, Tensor lut, Tensor? scale, Tensor? bias, int in_features, "
        "int out_features, int bits, int gemm_min_rows, int gemm_tile_bytes) -> Tensor");
  m.def("lut_decode(Tensor packed, Tensor lut, Tensor? scale, int in_features, int out_features, int bits, "
        "ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_edkm, CPU, m) {
  m.impl("lut_linear", &lut_linear);
  m.impl("lut_decode", &lut_decode);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_isa", &set_isa, "Force an instruction set (best, avx512, avx2, scalar); returns its id");
  module.def("current_isa", &current_isa, "The instruction set the kernels use now");
  module.def("supported_isas", &supported_isas, "Instruction sets this CPU and build can run, lowest first");
}
