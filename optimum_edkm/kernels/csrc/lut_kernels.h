// Shared by the LUT linear kernel's translation units: lut_linear.cpp (the torch ops, argument checks, threads,
// dispatch) and one file per instruction set (lut_scalar.cpp, lut_avx2.cpp, lut_avx512.cpp), which hold the
// loops. Plain data and plain C++ only, so that the instruction-set files include nothing of torch inside code
// compiled for AVX-512 / AVX2 (an inline function of a header compiled there could be linked into the portable
// path and fault on an older CPU).
//
// Two kinds of weight rows:
// * LUT (palettized): n-bit indices, LSB-first, row-major over [out, in], row r at byte r * in * bits / 8 (rows
//   byte-aligned: in * bits % 8 == 0); weight[r, k] = scale[r] * lut[r / rows_per_group, index[r, k]];
// * dense 16-bit: fp16 or bf16 values, row r at element r * in (the float parts of a palettized model).
// Every loop accumulates in fp32 and applies the row scale after the dot product.

#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace edkm_lut {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// storage type of a LUT, scale, bias or 16-bit weight
enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Problem {
  const uint8_t* weight = nullptr;      // packed indices, or 16-bit rows
  const uint8_t* weight_end = nullptr;  // one past the last byte: no load reaches it
  int64_t in = 0, out = 0;
  int64_t bits = 0;            // LUT: index width; dense: 0
  int64_t row_bytes = 0;       // bytes per weight row
  int64_t rows_per_group = 1;  // consecutive output rows sharing one LUT
  Dtype weight_type = kF16;    // dense rows: kF16 or kBF16
  const void* lut = nullptr;
  Dtype lut_type = kF32;
  const void* scale = nullptr;  // null: no scale
  Dtype scale_type = kF32;
  const void* bias = nullptr;   // null: no bias
  Dtype bias_type = kF32;
  const float* x_tables = nullptr;  // portable one-row LUT kernel: partial-sum tables (lut_scalar.cpp)
};

// y[m * out + r] = dot(weight row r, x[m * in : (m + 1) * in]) * scale[r] + bias[r] for r in [r0, r1), m < MT
// (MT, the rows of x a pass reads the weights for, is part of the function chosen)
using GemvFn = void (*)(const Problem&, const float* x, float* y, int64_t r0, int64_t r1);
// dense fp32 rows [r0, r1) of a LUT weight (scale applied) into dense[(r - r0) * in ...]
using DecodeFn = void (*)(const Problem&, float* dense, int64_t r0, int64_t r1);

// The loops of each instruction set (null where the set does not offer one: the caller uses the portable one).
// mt: 1, 2, 4 or 8 rows of x per pass. Dense: weight_type picks fp16 / bf16.
GemvFn scalar_lut_gemv(int bits, int mt);
DecodeFn scalar_lut_decode(int bits);
GemvFn scalar_dense_gemv(Dtype weight_type, int mt);
bool scalar_table_applies(const Problem& p);  // the portable one-row kernel's partial-sum tables pay off
void scalar_tables(const Problem& p, const float* x, float* tables);  // fill them (scalar_table_floats each)
int64_t scalar_table_floats(const Problem& p);

GemvFn avx2_lut_gemv(int bits, int mt);
DecodeFn avx2_lut_decode(int bits);
GemvFn avx2_dense_gemv(Dtype weight_type, int mt);

GemvFn avx512_lut_gemv(int bits, int mt);
DecodeFn avx512_lut_decode(int bits);
GemvFn avx512_dense_gemv(Dtype weight_type, int mt);

// ------------------------------------------------------------------------------------- picking a loop
// Each instruction-set file describes its loops as a struct `Loops` with the row types `Lut<BITS>` and
// `Dense<TYPE>` and the function templates `gemv<Row, MT>` and `decode<BITS>`; these helpers pick one for the
// run-time bit width, weight type and rows of x.
template <class Loops, class Row>
GemvFn gemv_for_rows(int mt) {
  switch (mt) {
    case 1: return &Loops::template gemv<Row, 1>;
    case 2: return &Loops::template gemv<Row, 2>;
    case 4: return &Loops::template gemv<Row, 4>;
    default: return &Loops::template gemv<Row, 8>;
  }
}

// pick(std::integral_constant<int, bits>) for bits in [1, 8]
template <class Pick>
auto for_bits(int bits, const Pick& pick) {
  switch (bits) {
    case 1: return pick(std::integral_constant<int, 1>());
    case 2: return pick(std::integral_constant<int, 2>());
    case 3: return pick(std::integral_constant<int, 3>());
    case 4: return pick(std::integral_constant<int, 4>());
    case 5: return pick(std::integral_constant<int, 5>());
    case 6: return pick(std::integral_constant<int, 6>());
    case 7: return pick(std::integral_constant<int, 7>());
    default: return pick(std::integral_constant<int, 8>());
  }
}

template <class Loops>
GemvFn lut_gemv_for(int bits, int mt) {
  return for_bits(bits, [mt](auto b) { return gemv_for_rows<Loops, typename Loops::template Lut<decltype(b)::value>>(mt); });
}

template <class Loops>
DecodeFn lut_decode_for(int bits) {
  return for_bits(bits, [](auto b) -> DecodeFn { return &Loops::template decode<decltype(b)::value>; });
}

template <class Loops>
GemvFn dense_gemv_for(Dtype weight_type, int mt) {
  if (weight_type == kBF16) return gemv_for_rows<Loops, typename Loops::template Dense<kBF16>>(mt);
  return gemv_for_rows<Loops, typename Loops::template Dense<kF16>>(mt);
}

// ---------------------------------------------------------------------------------------------- scalar reads
inline float f16_to_float(uint16_t h) {
#if defined(__FLT16_MAX__)
  // the compiler's half type: one instruction where the CPU converts (ARMv8, x86 with F16C)
  _Float16 value;
  std::memcpy(&value, &h, 2);
  return static_cast<float>(value);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (uint32_t(113 - shift) << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
#endif
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// element i of a float32 / float16 / bfloat16 buffer
inline float read_float(const void* data, Dtype type, int64_t i) {
  switch (type) {
    case kF16: return f16_to_float(static_cast<const uint16_t*>(data)[i]);
    case kBF16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    default: return static_cast<const float*>(data)[i];
  }
}

inline float row_scale(const Problem& p, int64_t row) { return p.scale ? read_float(p.scale, p.scale_type, row) : 1.0f; }
inline float row_bias(const Problem& p, int64_t row) { return p.bias ? read_float(p.bias, p.bias_type, row) : 0.0f; }

// y for rows r..r+count-1 of pass-row m from their fp32 dot products
inline void store_rows(const Problem& p, float* y, int m, int64_t r, const float* sums, int count) {
  for (int i = 0; i < count; ++i) y[m * p.out + r + i] = sums[i] * row_scale(p, r + i) + row_bias(p, r + i);
}

// The LUT of one group as fp32 (2**bits entries); `replicated`: the first 16 entries repeated with period 2**bits
// (bits <= 4), so that a lookup may use the low 4 bits of a lane that also holds the next index's bits.
struct GroupLut {
  int64_t group = -1;
  alignas(64) float values[256];
  alignas(64) float replicated[16];

  void load(const Problem& p, int64_t g) {
    if (g == group) return;
    group = g;
    const int64_t entries = int64_t(1) << p.bits;
    for (int64_t j = 0; j < entries; ++j) values[j] = read_float(p.lut, p.lut_type, g * entries + j);
    for (int j = 0; j < 16; ++j) replicated[j] = values[j % entries];
  }
};

// Rows [0, n) whose every chunk load, reading `overread` bytes from a chunk's start, stays inside the buffer
// (rows end byte-aligned, so a later row supplies the bytes read past a row's end).
inline int64_t unguarded_rows(const Problem& p, int64_t overread) {
  const int64_t total = p.weight_end - p.weight;
  return total < overread ? 0 : (total - overread) / p.row_bytes;
}

// The `count` (<= 8) bytes at src as the low bytes of a word, zero above; never reads past them.
inline uint64_t load_bytes(const uint8_t* src, int64_t count) {
  uint64_t word = 0;
  for (int64_t b = 0; b < count; ++b) word |= uint64_t(src[b]) << (8 * b);
  return word;
}

}  // namespace edkm_lut
