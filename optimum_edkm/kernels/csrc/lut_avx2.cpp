// AVX2 + FMA + F16C loops of the LUT linear kernel (see lut_kernels.h), compiled with function target attributes.
//
// The AVX-512 file's scheme on 8 lanes, with R * MT = 4 accumulators (16 registers): 8 indices of up to 4 bits
// fit one 32-bit word, broadcast from memory to the 8 lanes and shifted by vpsrlvd (lane i by i * bits); vpermps
// looks up 8 entries (1-3 bits: the LUT replicated to 8; 4 bits: two lookups blended on bit 3; 5-8 bits: a
// gather). 16-bit dense rows: vcvtph2ps / a shift.

#include "lut_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define T256 __attribute__((target("avx2,fma,f16c")))

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

  T256 Unpack() {
    // up to 4 bits: lane i reads the whole word; 5-8 bits: lanes 0-3 the low half, lanes 4-7 the high half
    const int step = BITS;
    const int base = BITS <= 4 ? 4 * BITS : 0;
    shifts = _mm256_setr_epi32(0, step, 2 * step, 3 * step, base, base + step, base + 2 * step, base + 3 * step);
  }
  T256 inline __m256i from_word(uint64_t word) const {
    if constexpr (BITS <= 4) return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
    const __m128i lo = _mm_set1_epi32(static_cast<int>(word)), hi = _mm_set1_epi32(static_cast<int>(word >> (4 * BITS)));
    return _mm256_srlv_epi32(_mm256_set_m128i(hi, lo), shifts);
  }
  // the chunk at src with a whole-word load (the caller guarantees 4 / 8 readable bytes)
  T256 inline __m256i operator()(const uint8_t* src) const {
    if constexpr (BITS <= 4) return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(src))), shifts);
    return from_word(load_u64(src));
  }
  // the first `bytes` bytes at src only
  T256 inline __m256i partial(const uint8_t* src, int64_t bytes) const { return from_word(load_bytes(src, bytes)); }
};

template <int BITS>
struct Lut {
  __m256 a, b;                                   // entries (replicated to 8 lanes) / entries 0-7, entries 8-15
  alignas(32) float values[BITS >= 5 ? 256 : 1];  // 5-8 bits: the gather's source

  T256 inline void load(const Problem& p, int64_t group) {
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

  T256 inline __m256 operator()(__m256i idx) const {
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

  T256 inline void start(const Problem& p, int64_t r) {
    lut.load(p, p.rows_per_group == 1 ? r : r / p.rows_per_group);
    row = p.weight + r * p.row_bytes;
  }
  template <bool kGuarded>
  T256 inline __m256 chunk(const Consts& unpack, int64_t k) const {
    const uint8_t* src = row + k / 8 * BITS;
    return lut(kGuarded ? unpack.partial(src, BITS) : unpack(src));
  }
  T256 inline __m256 tail(const Consts& unpack, int64_t k, int64_t count) const {
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

  T256 inline void start(const Problem& p, int64_t r) {
    row = reinterpret_cast<const uint16_t*>(p.weight) + r * p.in;
  }
  T256 static inline __m256 widen(__m128i h) {
    if constexpr (TYPE == kF16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  template <bool kGuarded>
  T256 inline __m256 chunk(const Consts&, int64_t k) const {
    return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
  }
  T256 inline __m256 tail(const Consts&, int64_t k, int64_t count) const {
    alignas(16) uint16_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(part, row + k, count * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
  }
};

template <int N>
T256 inline void reduce(const __m256* acc, float* sums) {
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

// rows [r, r + R) times MT rows of x; kGuarded: chunk loads read only their own bytes (rows near the buffer's end)
template <class Row, int MT, int R, bool kGuarded>
T256 void block(const Problem& p, const typename Row::Consts& consts, const float* x, float* y, int64_t r) {
  Row rows[R];
  for (int i = 0; i < R; ++i) rows[i].start(p, r + i);
  __m256 acc[R * MT];
  for (int j = 0; j < R * MT; ++j) acc[j] = _mm256_setzero_ps();
  const int64_t full = p.in & ~int64_t(7);
  // the rows Row::kPrefetchBlocks blocks ahead, a slice per chunk (see lut_avx512.cpp)
  const uint8_t* ahead = p.weight + (r + Row::kPrefetchBlocks * R) * p.row_bytes;
  for (int64_t k = 0; k < full; k += 8) {
    for (int64_t offset = 0; offset < R * Row::kChunkBytes; offset += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k / 8 * R * Row::kChunkBytes + offset), _MM_HINT_T0);
    for (int i = 0; i < R; ++i) {
      const __m256 w = rows[i].template chunk<kGuarded>(consts, k);
      for (int m = 0; m < MT; ++m)
        acc[i * MT + m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * p.in + k), acc[i * MT + m]);
    }
  }
  if (full < p.in) {
    const int64_t count = p.in - full;
    alignas(32) int32_t mask_bits[8];
    for (int j = 0; j < 8; ++j) mask_bits[j] = j < count ? -1 : 0;
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask_bits));
    for (int i = 0; i < R; ++i) {
      // lanes past the row's end are zero in w and x (a LUT entry there could be anything)
      const __m256 w = _mm256_and_ps(rows[i].tail(consts, full, count), _mm256_castsi256_ps(lanes));
      for (int m = 0; m < MT; ++m)
        acc[i * MT + m] = _mm256_fmadd_ps(w, _mm256_maskload_ps(x + m * p.in + full, lanes), acc[i * MT + m]);
    }
  }
  alignas(32) float sums[R * MT];
  reduce<R * MT>(acc, sums);
  for (int m = 0; m < MT; ++m) {
    float row_sums[R];
    for (int i = 0; i < R; ++i) row_sums[i] = sums[i * MT + m];
    store_rows(p, y, m, r, row_sums, R);
  }
}

template <class Row, int MT>
T256 void gemv(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int R = MT >= 4 ? 1 : 4 / MT;
  const typename Row::Consts consts;
  const int64_t unguarded = unguarded_rows(p, Row::kOverread), unguarded_end = unguarded < r1 ? unguarded : r1;
  int64_t r = r0;
  for (; r + R <= unguarded_end; r += R) block<Row, MT, R, false>(p, consts, x, y, r);
  for (; r < r1; ++r) block<Row, MT, 1, true>(p, consts, x, y, r);
}

template <int BITS>
T256 void decode(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  const Unpack<BITS> unpack;
  LutRow<BITS> row;
  const int64_t full = p.in & ~int64_t(7), count = p.in - full;
  const int64_t unguarded_end = unguarded_rows(p, LutRow<BITS>::kOverread);
  for (int64_t r = r0; r < r1; ++r) {
    row.start(p, r);
    float* dst = dense + (r - r0) * p.in;
    const __m256 s = _mm256_set1_ps(row_scale(p, r));
    for (int64_t k = 0; k < full; k += 8) {
      const __m256 w = r < unguarded_end ? row.template chunk<false>(unpack, k) : row.template chunk<true>(unpack, k);
      _mm256_storeu_ps(dst + k, _mm256_mul_ps(w, s));
    }
    if (count) {
      alignas(32) float part[8];
      _mm256_store_ps(part, _mm256_mul_ps(row.tail(unpack, full, count), s));
      std::memcpy(dst + full, part, count * sizeof(float));
    }
  }
}

template <class Row>
GemvFn for_rows_of_x(int mt) {
  switch (mt) {
    case 1: return &gemv<Row, 1>;
    case 2: return &gemv<Row, 2>;
    case 4: return &gemv<Row, 4>;
    default: return &gemv<Row, 8>;
  }
}

}  // namespace

GemvFn avx2_lut_gemv(int bits, int mt) {
  switch (bits) {
    case 1: return for_rows_of_x<LutRow<1>>(mt);
    case 2: return for_rows_of_x<LutRow<2>>(mt);
    case 3: return for_rows_of_x<LutRow<3>>(mt);
    case 4: return for_rows_of_x<LutRow<4>>(mt);
    case 5: return for_rows_of_x<LutRow<5>>(mt);
    case 6: return for_rows_of_x<LutRow<6>>(mt);
    case 7: return for_rows_of_x<LutRow<7>>(mt);
    default: return for_rows_of_x<LutRow<8>>(mt);
  }
}

DecodeFn avx2_lut_decode(int bits) {
  switch (bits) {
    case 1: return &decode<1>;
    case 2: return &decode<2>;
    case 3: return &decode<3>;
    case 4: return &decode<4>;
    case 5: return &decode<5>;
    case 6: return &decode<6>;
    case 7: return &decode<7>;
    default: return &decode<8>;
  }
}

GemvFn avx2_dense_gemv(Dtype weight_type, int mt) {
  return weight_type == kBF16 ? for_rows_of_x<DenseRow<kBF16>>(mt) : for_rows_of_x<DenseRow<kF16>>(mt);
}

}  // namespace edkm_lut

#else  // not x86: no AVX2 loops

namespace edkm_lut {
GemvFn avx2_lut_gemv(int, int) { return nullptr; }
DecodeFn avx2_lut_decode(int) { return nullptr; }
GemvFn avx2_dense_gemv(Dtype, int) { return nullptr; }
}  // namespace edkm_lut

#endif
