// AVX-512 (F/BW/VL/DQ) loops of the LUT linear kernel (see lut_kernels.h). Compiled with function target
// attributes, so the file builds on any x86 compiler and runs only where lut_linear.cpp detected the features.
//
// A pass multiplies R weight rows with MT rows of x at once (R * MT = 8 accumulators: enough independent FMA
// chains to hide their latency, few enough to stay in registers): each 16-weight chunk of a row is expanded in
// registers and FMA'd into the MT rows of x, the x chunk is loaded once for the R rows, and the 8 accumulators
// are reduced together at the end of the rows. Expanding a LUT chunk: 16 indices are 2 * bits bytes; vpermw puts
// the two 16-bit words holding index i into lane i, vpsrlvd shifts it down, and vpermps looks the low 4 bits up
// in a register holding the row's LUT (replicated with period 2**bits, so the next index's bits above do not
// matter); 5 bits: vpermt2ps over two registers; 6-8 bits: a gather. 16-bit dense rows: vcvtph2ps / a shift.

#include "lut_kernels.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace edkm_lut {
namespace {

// 16 indices of BITS bits -> 16 int32 lanes holding index i in their low BITS bits.
template <int BITS>
struct Unpack {
  __m512i words, shifts;

  T512 Unpack() {
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
  T512 inline __m512i expand(__m128i raw) const {
    // up to 7 bits the words read lie in the low 128 bits: the upper ones may stay undefined
    const __m512i wide = BITS < 8 ? _mm512_castsi128_si512(raw) : _mm512_zextsi128_si512(raw);
    return _mm512_srlv_epi32(_mm512_permutexvar_epi16(words, wide), shifts);
  }
  // the chunk at src, read with a plain 16-byte load (the caller guarantees 16 readable bytes)
  T512 inline __m512i operator()(const uint8_t* src) const {
    return expand(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  }
  // the first `bytes` bytes at src only
  T512 inline __m512i partial(const uint8_t* src, int64_t bytes) const {
    return expand(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << bytes) - 1), src));
  }
};

// The LUT of one group in registers.
template <int BITS>
struct Lut {
  __m512 a, b;                                   // entries (replicated to 16 lanes), entries 16-31 (5 bits)
  alignas(64) float values[BITS >= 6 ? 256 : 1];  // 6-8 bits: the gather's source

  T512 inline void load(const Problem& p, int64_t group) {
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

  T512 inline __m512 operator()(__m512i idx) const {
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

  T512 inline void start(const Problem& p, int64_t r) {
    lut.load(p, p.rows_per_group == 1 ? r : r / p.rows_per_group);
    row = p.weight + r * p.row_bytes;
  }
  template <bool kGuarded>
  T512 inline __m512 chunk(const Consts& unpack, int64_t k) const {
    const uint8_t* src = row + k / 8 * BITS;
    return lut(kGuarded ? unpack.partial(src, 2 * BITS) : unpack(src));
  }
  T512 inline __m512 tail(const Consts& unpack, int64_t k, int64_t count) const {
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

  T512 inline void start(const Problem& p, int64_t r) {
    row = reinterpret_cast<const uint16_t*>(p.weight) + r * p.in;
  }
  T512 static inline __m512 widen(__m256i h) {
    if constexpr (TYPE == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  template <bool kGuarded>
  T512 inline __m512 chunk(const Consts&, int64_t k) const {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
  }
  T512 inline __m512 tail(const Consts&, int64_t k, int64_t count) const {
    return widen(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), row + k));
  }
};

// sums[j] = sum of the lanes of acc[j], j < N
template <int N>
T512 inline void reduce(const __m512* acc, float* sums) {
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

// rows [r, r + R) times MT rows of x; kGuarded: the rows end so close to the buffer's end that chunk loads
// read only their own bytes
template <class Row, int MT, int R, bool kGuarded>
T512 void block(const Problem& p, const typename Row::Consts& consts, const float* x, float* y, int64_t r) {
  Row rows[R];
  for (int i = 0; i < R; ++i) rows[i].start(p, r + i);
  __m512 acc[R * MT];
  for (int j = 0; j < R * MT; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t full = p.in & ~int64_t(15);
  // the rows Row::kPrefetchBlocks blocks ahead, a slice per chunk: a pass reads R interleaved streams, which the
  // hardware prefetcher alone follows at about half the memory bandwidth
  const uint8_t* ahead = p.weight + (r + Row::kPrefetchBlocks * R) * p.row_bytes;
  for (int64_t k = 0; k < full; k += 16) {
    for (int64_t offset = 0; offset < R * Row::kChunkBytes; offset += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k / 16 * R * Row::kChunkBytes + offset), _MM_HINT_T0);
    __m512 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_ps(x + m * p.in + k);
    for (int i = 0; i < R; ++i) {
      const __m512 w = rows[i].template chunk<kGuarded>(consts, k);
      for (int m = 0; m < MT; ++m) acc[i * MT + m] = _mm512_fmadd_ps(w, xv[m], acc[i * MT + m]);
    }
  }
  if (full < p.in) {
    const int64_t count = p.in - full;
    const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
    for (int i = 0; i < R; ++i) {
      // lanes past the row's end are zero in w and x (a LUT entry there could be anything)
      const __m512 w = _mm512_maskz_mov_ps(lanes, rows[i].tail(consts, full, count));
      for (int m = 0; m < MT; ++m)
        acc[i * MT + m] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lanes, x + m * p.in + full), acc[i * MT + m]);
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
T512 void gemv(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int R = MT >= 8 ? 1 : 8 / MT;
  const typename Row::Consts consts;
  const int64_t unguarded = unguarded_rows(p, Row::kOverread), unguarded_end = unguarded < r1 ? unguarded : r1;
  int64_t r = r0;
  for (; r + R <= unguarded_end; r += R) block<Row, MT, R, false>(p, consts, x, y, r);
  for (; r < r1; ++r) block<Row, MT, 1, true>(p, consts, x, y, r);
}

template <int BITS>
T512 void decode(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  const Unpack<BITS> unpack;
  LutRow<BITS> row;
  const int64_t full = p.in & ~int64_t(15), count = p.in - full;
  const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
  const int64_t unguarded_end = unguarded_rows(p, LutRow<BITS>::kOverread);
  for (int64_t r = r0; r < r1; ++r) {
    row.start(p, r);
    float* dst = dense + (r - r0) * p.in;
    const __m512 s = _mm512_set1_ps(row_scale(p, r));
    for (int64_t k = 0; k < full; k += 16) {
      const __m512 w = r < unguarded_end ? row.template chunk<false>(unpack, k) : row.template chunk<true>(unpack, k);
      _mm512_storeu_ps(dst + k, _mm512_mul_ps(w, s));
    }
    if (count) _mm512_mask_storeu_ps(dst + full, lanes, _mm512_mul_ps(row.tail(unpack, full, count), s));
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

GemvFn avx512_lut_gemv(int bits, int mt) {
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

DecodeFn avx512_lut_decode(int bits) {
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

GemvFn avx512_dense_gemv(Dtype weight_type, int mt) {
  return weight_type == kBF16 ? for_rows_of_x<DenseRow<kBF16>>(mt) : for_rows_of_x<DenseRow<kF16>>(mt);
}

}  // namespace edkm_lut

#else  // not x86: no AVX-512 loops

namespace edkm_lut {
GemvFn avx512_lut_gemv(int, int) { return nullptr; }
DecodeFn avx512_lut_decode(int) { return nullptr; }
GemvFn avx512_dense_gemv(Dtype, int) { return nullptr; }
}  // namespace edkm_lut

#endif
