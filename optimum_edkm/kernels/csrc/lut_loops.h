// The loops of the x86 instruction-set files, written once over a vector type. Included by lut_avx2.cpp and
// lut_avx512.cpp inside their anonymous namespace and target region (so every function here is compiled for that
// instruction set), after they define
//   struct Simd: Vec, kLanes, kRowsPerPass (R * MT accumulators), zero, load, load_first, keep_first, fma, mul,
//                set1, store, store_first, reduce<N>;
//   LutRow<BITS>, DenseRow<TYPE>: one weight row as Vec chunks (start, chunk<kGuarded>, tail) with their Consts,
//                kOverread, kChunkBytes and kPrefetchBlocks.
//
// A pass multiplies R weight rows with MT rows of x (R * MT accumulators: enough independent FMA chains to hide
// their latency, few enough to stay in registers); each chunk of a row is expanded in registers once and FMA'd
// into the MT rows of x, whose chunk the R rows share; the accumulators are reduced together at the end.

// rows [r, r + R) times MT rows of x; kGuarded: the rows end so close to the buffer's end that chunk loads read
// only their own bytes
template <class Row, int MT, int R, bool kGuarded>
void block(const Problem& p, const typename Row::Consts& consts, const float* x, float* y, int64_t r) {
  using Vec = typename Simd::Vec;
  constexpr int64_t lanes = Simd::kLanes;
  Row rows[R];
  for (int i = 0; i < R; ++i) rows[i].start(p, r + i);
  Vec acc[R * MT];
  for (int j = 0; j < R * MT; ++j) acc[j] = Simd::zero();
  const int64_t full = p.in / lanes * lanes;
  // the rows Row::kPrefetchBlocks blocks ahead, a slice per chunk: a pass reads R interleaved streams, which the
  // hardware prefetcher alone follows at about half the memory bandwidth
  const uint8_t* ahead = p.weight + (r + Row::kPrefetchBlocks * R) * p.row_bytes;
  for (int64_t k = 0; k < full; k += lanes) {
    for (int64_t offset = 0; offset < R * Row::kChunkBytes; offset += 64)
      _mm_prefetch(reinterpret_cast<const char*>(ahead + k / lanes * R * Row::kChunkBytes + offset), _MM_HINT_T0);
    for (int i = 0; i < R; ++i) {
      const Vec w = rows[i].template chunk<kGuarded>(consts, k);
      for (int m = 0; m < MT; ++m) acc[i * MT + m] = Simd::fma(w, Simd::load(x + m * p.in + k), acc[i * MT + m]);
    }
  }
  if (full < p.in) {
    const int64_t count = p.in - full;
    for (int i = 0; i < R; ++i) {
      // lanes past the row's end are zero in w and x (a LUT entry there could be anything)
      const Vec w = Simd::keep_first(rows[i].tail(consts, full, count), count);
      for (int m = 0; m < MT; ++m)
        acc[i * MT + m] = Simd::fma(w, Simd::load_first(x + m * p.in + full, count), acc[i * MT + m]);
    }
  }
  alignas(64) float sums[R * MT];
  Simd::template reduce<R * MT>(acc, sums);
  for (int m = 0; m < MT; ++m) {
    float row_sums[R];
    for (int i = 0; i < R; ++i) row_sums[i] = sums[i * MT + m];
    store_rows(p, y, m, r, row_sums, R);
  }
}

// The loops for the pickers of lut_kernels.h.
struct Loops {
  template <int BITS>
  using Lut = LutRow<BITS>;
  template <int TYPE>
  using Dense = DenseRow<TYPE>;

  template <class Row, int MT>
  static void gemv(const Problem& p, const float* x, float* y, int64_t r0, int64_t r1) {
    constexpr int R = MT >= Simd::kRowsPerPass ? 1 : Simd::kRowsPerPass / MT;
    const typename Row::Consts consts;
    const int64_t unguarded = unguarded_rows(p, Row::kOverread), unguarded_end = unguarded < r1 ? unguarded : r1;
    int64_t r = r0;
    for (; r + R <= unguarded_end; r += R) block<Row, MT, R, false>(p, consts, x, y, r);
    for (; r < r1; ++r) block<Row, MT, 1, true>(p, consts, x, y, r);
  }

  // dense fp32 rows, bit-identical to the reference decode (one rounding of lut * scale)
  template <int BITS>
  static void decode(const Problem& p, float* dense, int64_t r0, int64_t r1) {
    using Vec = typename Simd::Vec;
    constexpr int64_t lanes = Simd::kLanes;
    const typename LutRow<BITS>::Consts consts;
    LutRow<BITS> row;
    const int64_t full = p.in / lanes * lanes, count = p.in - full;
    const int64_t unguarded_end = unguarded_rows(p, LutRow<BITS>::kOverread);
    for (int64_t r = r0; r < r1; ++r) {
      row.start(p, r);
      float* dst = dense + (r - r0) * p.in;
      const Vec s = Simd::set1(row_scale(p, r));
      for (int64_t k = 0; k < full; k += lanes) {
        const Vec w = r < unguarded_end ? row.template chunk<false>(consts, k) : row.template chunk<true>(consts, k);
        Simd::store(dst + k, Simd::mul(w, s));
      }
      if (count) Simd::store_first(dst + full, Simd::mul(row.tail(consts, full, count), s), count);
    }
  }
};
