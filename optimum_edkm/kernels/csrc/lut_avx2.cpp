// AVX2 + FMA + F16C loops of the LUT linear kernel (see lut_kernels.h): the row types and vector operations of
// this instruction set, and the shared loops of lut_loops.h compiled for it (a target region, so the file builds
// on any x86 compiler and runs only where lut_linear.cpp detected the features).
//
// 8 lanes, R * MT = 4 accumulators (16 registers). Expanding a LUT chunk: 8 indices of up to 4 bits fit one
// 32-bit word, broadcast from memory to the 8 lanes and shifted by vpsrlvd (lane i by i * bits); vpermps looks up
// 8 entries (1-3 bits: the LUT replicated to 8; 4 bits: two lookups blended on bit 3; 5-8 bits: a gather).
// 16-bit dense rows: vcvtph2ps / a shift.

#include "lut_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

// every function from here to the end of the region is compiled for this instruction set (lut_linear.cpp calls
// them only where the CPU has it); nothing of torch or the standard library is defined inside
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace edkm_lut {
namespace {

inline uint32_t load_u32(const uint8_t* src) {
  uint32_t word;
  std::memcpy(&word, src, 4);
  return word;
}

inline uint64_t load_u64(const uint8_t* src) {
  uint64_t word;
  std::memcpy(&word, src, 8);
  return word;
}

// 8 indices of BITS bits (BITS bytes) -> 8 int32 lanes holding index i in their low BITS bits.
template <int BITS>
struct Unpack {
  __m256i shifts;

  Unpack() {
    // up to 4 bits: lane i reads the whole word; 5-8 bits: lanes 0-3 the low half, lanes 4-7 the high half
    const int step = BITS;
    const int base = BITS <= 4 ? 4 * BITS : 0;
    shifts = _mm256_setr_epi32(0, step, 2 * step, 3 * step, base, base + step, base + 2 * step, base + 3 * step);
  }
  inline __m256i from_word(uint64_t word) const {
    if constexpr (BITS <= 4) return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    const __m128i lo = _mm_set1_epi32(static_cast<int>(word)), hi = _mm_set1_epi32(static_cast<int>(word >> (4 * BITS)));
    return _mm256_srlv_epi32(_mm256_set_m128i(hi, lo), shifts);
  }
  // the chunk at src with a whole-word load (the caller guarantees 4 / 8 readable bytes)
  inline __m256i operator()(const uint8_t* src) const {
    if constexpr (BITS <= 4) return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(src))), shifts);
    return from_word(load_u64(src));
  }
  // the first `bytes` bytes at src only
  inline __m256i partial(const uint8_t* src, int64_t bytes) const { return from_word(load_bytes(src, bytes)); }
};

template <int BITS>
struct Lut {
  __m256 a, b;                                   // entries (replicated to 8 lanes) / entries 0-7, entries 8-15
  alignas(32) float values[BITS >= 5 ? 256 : 1];  // 5-8 bits: the gather's source

  inline void load(const Problem& p, int64_t group) {
    constexpr int entries = 1 << BITS;
    if constexpr (BITS <= 4) {
      if (p.lut_type == kF16) {
        const uint8_t* src = static_cast<const uint8_t*>(p.lut) + group * entries * 2;
        if constexpr (BITS == 4) {
          a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
          b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16)));
        }
        if constexpr (BITS == 3) a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        if constexpr (BITS == 2) a = _mm256_cvtph_ps(_mm_set1_epi64x(static_cast<long long>(load_u64(src))));
        if constexpr (BITS == 1) a = _mm256_cvtph_ps(_mm_set1_epi32(static_cast<int>(load_u32(src))));
        return;
      }
      if (p.lut_type == kF32) {
        const float* src = static_cast<const float*>(p.lut) + group * entries;
        if constexpr (BITS == 4) {
          a = _mm256_loadu_ps(src);
          b = _mm256_loadu_ps(src + 8);
        }
        if constexpr (BITS == 3) a = _mm256_loadu_ps(src);
        if constexpr (BITS == 2) a = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(src));
        if constexpr (BITS == 1) {
          double pair;
          std::memcpy(&pair, src, 8);
          a = _mm256_castpd_ps(_mm256_set1_pd(pair));
        }
        return;
      }
    }
    alignas(32) float table[256];
    for (int j = 0; j < entries; ++j) table[j] = read_float(p.lut, p.lut_type, group * entries + j);
    if constexpr (BITS <= 4) {
      for (int j = entries; j < 16; ++j) table[j] = table[j % entries];
      a = _mm256_load_ps(table);
      b = _mm256_load_ps(table + 8);
    } else {
      for (int j = 0; j < entries; ++j) values[j] = table[j];
    }
  }

  inline __m256 operator()(__m256i idx) const {
    if constexpr (BITS <= 3) return _mm256_permutevar8x32_ps(a, idx);
    if constexpr (BITS == 4) {
      const __m256 low = _mm256_permutevar8x32_ps(a, idx), high = _mm256_permutevar8x32_ps(b, idx);
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    return _mm256_i32gather_ps(values, _mm256_and_si256(idx, _mm256_set1_epi32((1 << BITS) - 1)), 4);
  }
};

template <int BITS>
struct LutRow {
  using Consts = Unpack<BITS>;
  static constexpr int64_t kOverread = BITS <= 4 ? 4 : 8;  // a chunk load may read this many bytes
  static constexpr int64_t kChunkBytes = BITS;
  static constexpr int64_t kPrefetchBlocks = 2;  // row blocks ahead of the one being multiplied
  Lut<BITS> lut;
  const uint8_t* row;

  inline void start(const Problem& p, int64_t r) {
    lut.load(p, p.rows_per_group == 1 ? r : r / p.rows_per_group);
    row = p.weight + r * p.row_bytes;
  }
  template <bool kGuarded>
  inline __m256 chunk(const Consts& unpack, int64_t k) const {
    const uint8_t* src = row + k / 8 * BITS;
    return lut(kGuarded ? unpack.partial(src, BITS) : unpack(src));
  }
  inline __m256 tail(const Consts& unpack, int64_t k, int64_t count) const {
    return lut(unpack.partial(row + k / 8 * BITS, (count * BITS + 7) / 8));
  }
};

struct NoConsts {};

template <int TYPE>
struct DenseRow {
  using Consts = NoConsts;
  static constexpr int64_t kOverread = 0;  // loads never pass the chunk
  static constexpr int64_t kChunkBytes = 16;
  static constexpr int64_t kPrefetchBlocks = 4;
  const uint16_t* row;

  inline void start(const Problem& p, int64_t r) {
    row = reinterpret_cast<const uint16_t*>(p.weight) + r * p.in;
  }
  static inline __m256 widen(__m128i h) {
    if constexpr (TYPE == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  template <bool kGuarded>
  inline __m256 chunk(const Consts&, int64_t k) const {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
  }
  inline __m256 tail(const Consts&, int64_t k, int64_t count) const {
    alignas(16) uint16_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(part, row + k, count * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
  }
};

// 8 fp32 lanes; 4 accumulators per pass (of 16 registers)
struct Simd {
  using Vec = __m256;
  static constexpr int64_t kLanes = 8;
  static constexpr int kRowsPerPass = 4;

  static inline __m256i first(int64_t count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec set1(float value) { return _mm256_set1_ps(value); }
  static inline Vec load(const float* src) { return _mm256_loadu_ps(src); }
  static inline Vec load_first(const float* src, int64_t count) { return _mm256_maskload_ps(src, first(count)); }
  static inline Vec keep_first(Vec v, int64_t count) { return _mm256_and_ps(v, _mm256_castsi256_ps(first(count))); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static inline void store(float* dst, Vec v) { _mm256_storeu_ps(dst, v); }
  static inline void store_first(float* dst, Vec v, int64_t count) { _mm256_maskstore_ps(dst, first(count), v); }

  // sums[j] = sum of the lanes of acc[j], j < N
  template <int N>
  static inline void reduce(const Vec* acc, float* sums) {
    if constexpr (N == 8 || N == 4) {
      const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      if constexpr (N == 4) {
        // [acc0..3 over lanes 0-3 | acc0..3 over lanes 4-7]
        _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(s0123), _mm256_extractf128_ps(s0123, 1)));
      } else {
        const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                             _mm256_permute2f128_ps(s0123, s4567, 0x31)));
      }
    } else {
      for (int j = 0; j < N; ++j) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[j]), _mm256_extractf128_ps(acc[j], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        sums[j] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
      }
    }
  }
};

#include "lut_loops.h"

}  // namespace
}  // namespace edkm_lut

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace edkm_lut {

GemvFn avx2_lut_gemv(int bits, int mt) { return lut_gemv_for<Loops>(bits, mt); }
DecodeFn avx2_lut_decode(int bits) { return lut_decode_for<Loops>(bits); }
GemvFn avx2_dense_gemv(Dtype weight_type, int mt) { return dense_gemv_for<Loops>(weight_type, mt); }

}  // namespace edkm_lut

#else  // not x86: no AVX2 loops

namespace edkm_lut {
GemvFn avx2_lut_gemv(int, int) { return nullptr; }
DecodeFn avx2_lut_decode(int) { return nullptr; }
GemvFn avx2_dense_gemv(Dtype, int) { return nullptr; }
}  // namespace edkm_lut

#endif
