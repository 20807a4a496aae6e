// AVX-512 (F/BW/VL/DQ) loops of the LUT linear kernel (see lut_kernels.h): the row types and vector operations
// of this instruction set, and the shared loops of lut_loops.h compiled for it (a target region, so the file
// builds on any x86 compiler and runs only where lut_linear.cpp detected the features).
//
// 16 lanes, R * MT = 8 accumulators. Expanding a LUT chunk: 16 indices are 2 * bits bytes; vpermw puts the two
// 16-bit words holding index i into lane i, vpsrlvd shifts it down, and vpermps looks the low 4 bits up in a
// register holding the row's LUT (replicated with period 2**bits, so the next index's bits above do not matter);
// 5 bits: vpermt2ps over two registers; 6-8 bits: a gather. 16-bit dense rows: vcvtph2ps / a shift.

#include "lut_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

// every function from here to the end of the region is compiled for this instruction set (lut_linear.cpp calls
// them only where the CPU has it); nothing of torch or the standard library is defined inside
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

namespace edkm_lut {
namespace {

// 16 indices of BITS bits -> 16 int32 lanes holding index i in their low BITS bits.
template <int BITS>
struct Unpack {
  __m512i words, shifts;

  Unpack() {
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
  inline __m512i expand(__m128i raw) const {
    // up to 7 bits the words read lie in the low 128 bits: the upper ones may stay undefined
    const __m512i wide = BITS < 8 ? _mm512_castsi128_si512(raw) : _mm512_zextsi128_si512(raw);
    return _mm512_srlv_epi32(_mm512_permutexvar_epi16(words, wide), shifts);
  }
  // the chunk at src, read with a plain 16-byte load (the caller guarantees 16 readable bytes)
  inline __m512i operator()(const uint8_t* src) const {
    return expand(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  // the first `bytes` bytes at src only
  inline __m512i partial(const uint8_t* src, int64_t bytes) const {
    return expand(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << bytes) - 1), src));
  }
};

// The LUT of one group in registers.
template <int BITS>
struct Lut {
  __m512 a, b;                                   // entries (replicated to 16 lanes), entries 16-31 (5 bits)
  alignas(64) float values[BITS >= 6 ? 256 : 1];  // 6-8 bits: the gather's source

  inline void load(const Problem& p, int64_t group) {
    constexpr int entries = 1 << BITS;
    if constexpr (BITS <= 4) {
      if (p.lut_type == kF16) {
        const uint8_t* src = static_cast<const uint8_t*>(p.lut) + group * entries * 2;
        __m256i halves;
        if constexpr (BITS == 4) halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        if constexpr (BITS == 3) halves = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        if constexpr (BITS == 2) halves = _mm256_set1_epi64x(static_cast<long long>(load_bytes(src, 8)));
        if constexpr (BITS == 1) halves = _mm256_set1_epi32(static_cast<int>(load_bytes(src, 4)));
        a = _mm512_cvtph_ps(halves);
        return;
      }
      if (p.lut_type == kF32) {
        const float* src = static_cast<const float*>(p.lut) + group * entries;
        if constexpr (BITS == 4) a = _mm512_loadu_ps(src);
        if constexpr (BITS == 3) a = _mm512_broadcast_f32x8(_mm256_loadu_ps(src));
        if constexpr (BITS == 2) a = _mm512_broadcast_f32x4(_mm_loadu_ps(src));
        if constexpr (BITS == 1) {
          double pair;
          std::memcpy(&pair, src, 8);
          a = _mm512_castpd_ps(_mm512_set1_pd(pair));
        }
        return;
      }
    }
    alignas(64) float table[256];
    for (int j = 0; j < entries; ++j) table[j] = read_float(p.lut, p.lut_type, group * entries + j);
    if constexpr (BITS <= 4) {
      for (int j = entries; j < 16; ++j) table[j] = table[j % entries];
      a = _mm512_load_ps(table);
    } else if constexpr (BITS == 5) {
      a = _mm512_load_ps(table);
      b = _mm512_load_ps(table + 16);
    } else {
      for (int j = 0; j < entries; ++j) values[j] = table[j];
    }
  }

  inline __m512 operator()(__m512i idx) const {
    if constexpr (BITS <= 4) return _mm512_permutexvar_ps(idx, a);
    if constexpr (BITS == 5) return _mm512_permutex2var_ps(a, idx, b);
    return _mm512_i32gather_ps(_mm512_and_si512(idx, _mm512_set1_epi32((1 << BITS) - 1)), values, 4);
  }
};

// One palettized weight row as 16-float chunks.
template <int BITS>
struct LutRow {
  using Consts = Unpack<BITS>;
  static constexpr int64_t kOverread = 16;  // a chunk load may read this many bytes from the chunk's start
  static constexpr int64_t kChunkBytes = 2 * BITS;
  static constexpr int64_t kPrefetchBlocks = 2;  // row blocks ahead of the one being multiplied
  Lut<BITS> lut;
  const uint8_t* row;

  inline void start(const Problem& p, int64_t r) {
    lut.load(p, p.rows_per_group == 1 ? r : r / p.rows_per_group);
    row = p.weight + r * p.row_bytes;
  }
  template <bool kGuarded>
  inline __m512 chunk(const Consts& unpack, int64_t k) const {
    const uint8_t* src = row + k / 8 * BITS;
    return lut(kGuarded ? unpack.partial(src, 2 * BITS) : unpack(src));
  }
  inline __m512 tail(const Consts& unpack, int64_t k, int64_t count) const {
    return lut(unpack.partial(row + k / 8 * BITS, (count * BITS + 7) / 8));
  }
};

struct NoConsts {};

// One 16-bit dense weight row as 16-float chunks (fp16: vcvtph2ps; bf16: the upper half of an fp32).
template <int TYPE>
struct DenseRow {
  using Consts = NoConsts;
  static constexpr int64_t kOverread = 0;  // loads never pass the chunk
  static constexpr int64_t kChunkBytes = 32;
  static constexpr int64_t kPrefetchBlocks = 4;
  const uint16_t* row;

  inline void start(const Problem& p, int64_t r) {
    row = reinterpret_cast<const uint16_t*>(p.weight) + r * p.in;
  }
  static inline __m512 widen(__m256i h) {
    if constexpr (TYPE == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <bool kGuarded>
  inline __m512 chunk(const Consts&, int64_t k) const {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
  }
  inline __m512 tail(const Consts&, int64_t k, int64_t count) const {
    return widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), row + k));
  }
};

// 16 fp32 lanes; 8 accumulators per pass (of 32 registers)
struct Simd {
  using Vec = __m512;
  static constexpr int64_t kLanes = 16;
  static constexpr int kRowsPerPass = 8;

  static inline __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec set1(float value) { return _mm512_set1_ps(value); }
  static inline Vec load(const float* src) { return _mm512_loadu_ps(src); }
  static inline Vec load_first(const float* src, int64_t count) { return _mm512_maskz_loadu_ps(first(count), src); }
  static inline Vec keep_first(Vec v, int64_t count) { return _mm512_maskz_mov_ps(first(count), v); }
  static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static inline void store(float* dst, Vec v) { _mm512_storeu_ps(dst, v); }
  static inline void store_first(float* dst, Vec v, int64_t count) { _mm512_mask_storeu_ps(dst, first(count), v); }

  // sums[j] = sum of the lanes of acc[j], j < N
  template <int N>
  static inline void reduce(const Vec* acc, float* sums) {
    if constexpr (N == 8) {
      __m256 h[8];
      for (int j = 0; j < 8; ++j) h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]), _mm512_extractf32x8_ps(acc[j], 1));
      const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
      // s0123: [h0..h3 over lanes 0-3 | h0..h3 over lanes 4-7]
      _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                           _mm256_permute2f128_ps(s0123, s4567, 0x31)));
    } else {
      for (int j = 0; j < N; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
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

GemvFn avx512_lut_gemv(int bits, int mt) { return lut_gemv_for<Loops>(bits, mt); }
DecodeFn avx512_lut_decode(int bits) { return lut_decode_for<Loops>(bits); }
GemvFn avx512_dense_gemv(Dtype weight_type, int mt) { return dense_gemv_for<Loops>(weight_type, mt); }

}  // namespace edkm_lut

#else  // not x86: no AVX-512 loops

namespace edkm_lut {
GemvFn avx512_lut_gemv(int, int) { return nullptr; }
DecodeFn avx512_lut_decode(int) { return nullptr; }
GemvFn avx512_dense_gemv(Dtype, int) { return nullptr; }
}  // namespace edkm_lut

#endif
