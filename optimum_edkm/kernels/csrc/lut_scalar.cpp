// Portable loops of the LUT linear kernel (see lut_kernels.h): plain C++ that the compiler vectorizes for the
// machine it is built on (NEON on ARM, SSE/AVX on x86 without the AVX2 / AVX-512 files' paths). They are also
// the in-extension reference the tests compare the other instruction sets with.

#include "lut_kernels.h"

#include <algorithm>
#include <vector>

namespace edkm_lut {
namespace {

// The 8 indices starting at index k of a row (k a multiple of 8) fill exactly BITS bytes.
template <int BITS>
inline uint64_t chunk8(const uint8_t* row, int64_t k) {
  return load_bytes(row + (k / 8) * BITS, BITS);
}

template <int BITS>
void decode_row(const Problem& p, const GroupLut& lut, const uint8_t* row, float* dst) {
  constexpr uint64_t mask = (1u << BITS) - 1;
  for (int64_t k = 0; k < p.in; k += 8) {
    const int64_t count = std::min<int64_t>(8, p.in - k);
    const uint64_t word = load_bytes(row + (k / 8) * BITS, (count * BITS + 7) / 8);
    for (int64_t j = 0; j < count; ++j) dst[k + j] = lut.values[(word >> (j * BITS)) & mask];
  }
}

// Dot products of one decoded row with MT rows of x (eight partial sums each, so that the compiler may vectorize
// without reassociating).
template <int MT>
void dot_rows(const Problem& p, const float* w, const float* x, float* sums) {
  for (int m = 0; m < MT; ++m) {
    const float* xm = x + m * p.in;
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= p.in; k += 8)
      for (int j = 0; j < 8; ++j) part[j] += w[k + j] * xm[k + j];
    for (; k < p.in; ++k) part[k % 8] += w[k] * xm[k];
    sums[m] = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  }
}

inline void store_column(const Problem& p, float* y, int64_t r, const float* sums, int mt) {
  const float s = row_scale(p, r), b = row_bias(p, r);
  for (int m = 0; m < mt; ++m) y[m * p.out + r] = sums[m] * s + b;
}

// One row of x, 1-3 bits, a LUT shared by many rows: per group of G consecutive indices (G * BITS <= 8 bits,
// G | 8), a table of the K**G partial dot products sum_j lut[idx_j] * x[g * G + j] is built once per call (and
// LUT group); a weight row then costs one shift, one mask, one load and one add per G weights.
template <int BITS>
constexpr int table_group() {
  return BITS == 1 ? 8 : BITS == 2 ? 4 : BITS == 3 ? 2 : 1;
}

template <int BITS>
void gemv_table(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  constexpr int64_t G = table_group<BITS>();
  constexpr int64_t E = int64_t(1) << (G * BITS);
  constexpr uint64_t code_mask = uint64_t(E - 1);
  const int64_t full = p.in / 8 * 8, groups_of_x = full / G;
  GroupLut lut;
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r / p.rows_per_group);
    const uint8_t* row = p.weight + r * p.row_bytes;
    float part[4] = {0, 0, 0, 0};
    const float* t = p.x_tables + lut.group * groups_of_x * E;
    for (int64_t k = 0; k < full; k += 8, t += (8 / G) * E) {
      const uint64_t word = chunk8<BITS>(row, k);
      for (int64_t c = 0; c < 8 / G; ++c) part[c % 4] += t[c * E + ((word >> (c * G * BITS)) & code_mask)];
    }
    float sum = (part[0] + part[2]) + (part[1] + part[3]);
    if (full < p.in) {
      const uint64_t word = load_bytes(row + (full / 8) * BITS, ((p.in - full) * BITS + 7) / 8);
      for (int64_t j = 0; j < p.in - full; ++j) sum += lut.values[(word >> (j * BITS)) & ((1u << BITS) - 1)] * x[full + j];
    }
    store_column(p, y, r, &sum, 1);
  }
}

template <int BITS, int MT>
void gemv_lut(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  if constexpr (BITS <= 3) {
    if (MT == 1 && p.x_tables) return gemv_table<BITS>(p, x, y, r0, r1);
  }
  GroupLut lut;
  std::vector<float> w(p.in);
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r / p.rows_per_group);
    decode_row<BITS>(p, lut, p.weight + r * p.row_bytes, w.data());
    float sums[MT];
    dot_rows<MT>(p, w.data(), x, sums);
    store_column(p, y, r, sums, MT);
  }
}

template <int TYPE, int MT>
void gemv_dense(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
  std::vector<float> w(p.in);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = reinterpret_cast<const uint16_t*>(p.weight) + r * p.in;
    for (int64_t k = 0; k < p.in; ++k) w[k] = TYPE == kF16 ? f16_to_float(row[k]) : bf16_to_float(row[k]);
    float sums[MT];
    dot_rows<MT>(p, w.data(), x, sums);
    store_column(p, y, r, sums, MT);
  }
}

template <int BITS>
void decode_rows(const Problem& p, float* dense, int64_t r0, int64_t r1) {
  GroupLut lut;
  for (int64_t r = r0; r < r1; ++r) {
    lut.load(p, r / p.rows_per_group);
    float* dst = dense + (r - r0) * p.in;
    decode_row<BITS>(p, lut, p.weight + r * p.row_bytes, dst);
    if (p.scale) {
      const float s = row_scale(p, r);
      for (int64_t k = 0; k < p.in; ++k) dst[k] *= s;
    }
  }
}

// The loops of this file, for the pickers of lut_kernels.h (row types are tags: the loops take BITS / TYPE).
struct Loops {
  template <int BITS>
  struct Lut {
    static constexpr bool kLut = true;
    static constexpr int kBits = BITS;
  };
  template <int TYPE>
  struct Dense {
    static constexpr bool kLut = false;
    static constexpr int kType = TYPE;
  };

  template <class Row, int MT>
  static void gemv(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
    if constexpr (Row::kLut) {
      gemv_lut<Row::kBits, MT>(p, x, y, r0, r1);
    } else {
      gemv_dense<Row::kType, MT>(p, x, y, r0, r1);
    }
  }

  template <int BITS>
  static void decode(const Problem& p, float* dense, int64_t r0, int64_t r1) {
    decode_rows<BITS>(p, dense, r0, r1);
  }
};

// Tables of every LUT group for one row of x: [groups][in / 8 * 8 / G][K**G].
template <int BITS>
void build_tables(const Problem& p, const float* x, float* tables) {
  constexpr int64_t G = table_group<BITS>();
  constexpr int64_t E = int64_t(1) << (G * BITS);
  const int64_t groups_of_x = p.in / 8 * 8 / G, lut_groups = p.out / p.rows_per_group;
  GroupLut lut;
  for (int64_t group = 0; group < lut_groups; ++group) {
    lut.load(p, group);
    for (int64_t g = 0; g < groups_of_x; ++g) {
      float* t = tables + (group * groups_of_x + g) * E;
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
}

}  // namespace

GemvFn scalar_lut_gemv(int bits, int mt) { return lut_gemv_for<Loops>(bits, mt); }
DecodeFn scalar_lut_decode(int bits) { return lut_decode_for<Loops>(bits); }
GemvFn scalar_dense_gemv(Dtype weight_type, int mt) { return dense_gemv_for<Loops>(weight_type, mt); }

// The tables cost entries / G adds per x element and per LUT group; a weight row costs one lookup per G weights.
// (4 bits: tables of 256 entries per pair fall out of L1 and measured slower than decode + GEMM)
bool scalar_table_applies(const Problem& p) {
  if (p.bits < 1 || p.bits > 3 || p.in < 8) return false;
  const int64_t group = p.bits == 1 ? 8 : p.bits == 2 ? 4 : 2;
  const int64_t entries = int64_t(1) << (group * p.bits);
  return entries * (p.out / p.rows_per_group) * 2 <= p.out;
}

int64_t scalar_table_floats(const Problem& p) {
  const int64_t group = p.bits == 1 ? 8 : p.bits == 2 ? 4 : 2;
  return (p.out / p.rows_per_group) * (p.in / 8 * 8 / group) * (int64_t(1) << (group * p.bits));
}

void scalar_tables(const Problem& p, const float* x, float* tables) {
  switch (p.bits) {
    case 1: return build_tables<1>(p, x, tables);
    case 2: return build_tables<2>(p, x, tables);
    default: return build_tables<3>(p, x, tables);
  }
}

}  // namespace edkm_lut
