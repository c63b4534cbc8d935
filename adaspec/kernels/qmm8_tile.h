// The vector tile of qmm8.cpp: R activation rows x 8 output rows. Not an ordinary header (no include guard):
// qmm8.cpp includes it twice, inside namespace avx2 (kVnni false, compiled for AVX2 + FMA + F16C) and namespace
// vnni (kVnni true, compiled for AVX-512-VNNI + VL as well), so both paths share every line but the integer dot
// products (group_dot, row_scales). Both form the same exact int32 sums, and the fp32 part is this same code in
// the same order, so they agree bit for bit.

// Per-row scales of 8 output rows as group_dot multiplies them: AVX2 widens 16-bit partial sums with vpmaddwd,
// so lanes 2 r, 2 r + 1 = v[r] (16 bits each); VNNI multiplies 32-bit sums, so lane r = v[r] (32 bits).
template <bool SIGNED>
inline __m256i row_scales(const uint8_t* v) {
  if constexpr (kVnni) {
    const __m128i b = _mm_loadl_epi64((const __m128i*)v);
    return SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  } else {
    return SIGNED ? pairs_i8(v) : pairs_u8(v);
  }
}

// The integer dot products of one group of 32 weights x 8 rows with R activation rows (q[r]: the group's 32
// activations of row r), each row's sums multiplied by `widen` (row_scales; unused for the 32-weight formats,
// whose sums are not scaled) and added to isum[r]. `widen2` is used for chunks 4..7 (Q6_K's second scale of the
// group). The group's codes are unpacked once into w (a few hundred bytes the compiler keeps in L1), then each
// row runs over them.
//
// Exact in both paths, so both give the same int32 sums. Products of a code and an activation (|q| <= 127) are
// at most 15 * 127, 31 * 127, 63 * 127 for 4-, 5-, 6-bit codes and 128 * 127 for Q8_0 (|w| <= 128 times
// sign(w) q); AVX2 adds them in 16 bits over runs of 16, 8, 4 and 2 products (vpmaddubsw pairs, then `run`
// vectors): at most 30480, 31496, 32004, 32512, never past 32767, so vpmaddubsw's saturation never acts. VNNI
// (vpdpbusd) adds 4 products at a time straight into 32 bits. Scaled group sums (K-quants: |group| <= 32 * 31 *
// 127 times a scale <= 63; Q6_K: |half group| <= 16 * 63 * 127 times |scale| <= 128) stay far below 2^31, as do
// their totals over a block (< 2^28), so vpmulld's product equals vpmaddwd's sum of two 16-bit products.
template <int KIND, int R>
inline void group_dot(const uint8_t* p, const int8_t* const q[R], __m256i widen, __m256i widen2, __m256i isum[R]) {
  constexpr int run = KIND == Kind::Q8_0 ? 1 : KIND == Kind::Q6_K ? 2
                    : (KIND == Kind::Q5_0 || KIND == Kind::Q5_1 || KIND == Kind::Q5_K) ? 4 : 8;
  constexpr bool scaled = adaspec::kind_weights(KIND) == 256;
  __m256i w[8], aw[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    w[c] = chunk_codes<KIND>(p, c);
    aw[c] = KIND == Kind::Q8_0 ? _mm256_sign_epi8(w[c], w[c]) : w[c];  // |w| for the signed codes
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (kVnni) {
      // Two accumulators, so that consecutive vpdpbusd do not wait on each other: even and odd chunks, or for
      // Q6_K the two groups of 16 (chunks 0..3 and 4..7), which have scales of their own.
      __m256i a0 = scaled ? _mm256_setzero_si256() : isum[r], a1 = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        __m256i x = bcast4(q[r] + 4 * c);
        if (KIND == Kind::Q8_0) x = _mm256_sign_epi8(x, w[c]);  // |w| * sign(w) x = w x
        if (KIND == Kind::Q6_K ? c < 4 : c % 2 == 0)
          a0 = _mm256_dpbusd_epi32(a0, aw[c], x);
        else
          a1 = _mm256_dpbusd_epi32(a1, aw[c], x);
      }
      if constexpr (KIND == Kind::Q6_K)
        isum[r] = _mm256_add_epi32(isum[r],
                                   _mm256_add_epi32(_mm256_mullo_epi32(a0, widen), _mm256_mullo_epi32(a1, widen2)));
      else if constexpr (scaled)
        isum[r] = _mm256_add_epi32(isum[r], _mm256_mullo_epi32(_mm256_add_epi32(a0, a1), widen));
      else
        isum[r] = _mm256_add_epi32(a0, a1);
    } else {
      __m256i s16 = _mm256_setzero_si256(), s32 = isum[r];
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        __m256i x = bcast4(q[r] + 4 * c);
        if (KIND == Kind::Q8_0) x = _mm256_sign_epi8(x, w[c]);  // |w| * sign(w) x = w x
        const __m256i prod = _mm256_maddubs_epi16(aw[c], x);
        s16 = c % run == 0 ? prod : _mm256_add_epi16(s16, prod);
        if (c % run == run - 1) s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, c < 4 ? widen : widen2));
      }
      isum[r] = s32;
    }
  }
}

template <int KIND, int R>
inline void tile(const char* xq, int64_t G, const uint8_t* P, float* out, int64_t ldo, int valid) {
  constexpr int64_t bw = adaspec::kind_weights(KIND), pb = packed_block_bytes(KIND);
  constexpr int64_t abytes = bw == 256 ? sizeof(A256) : sizeof(A32);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* blk = P + g * pb;
    __m256i isum[R];
    for (int r = 0; r < R; ++r) isum[r] = _mm256_setzero_si256();
    const __m256 d = load_halves(blk);
    if constexpr (bw == 32) {
      const int8_t* q[R];
      for (int r = 0; r < R; ++r) q[r] = ((const A32*)(xq + (r * G + g) * abytes))->q;
      group_dot<KIND, R>(blk + head_bytes(KIND), q, ones, ones, isum);
      for (int r = 0; r < R; ++r) {
        const A32& a = *(const A32*)(xq + (r * G + g) * abytes);
        __m256i s = isum[r];
        if (KIND == Kind::Q4_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * a.s));
        if (KIND == Kind::Q5_0) s = _mm256_sub_epi32(s, _mm256_set1_epi32(16 * a.s));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(a.d)), acc[r]);
        if (KIND == Kind::Q4_1 || KIND == Kind::Q5_1)
          acc[r] = _mm256_fmadd_ps(load_halves(blk + 16), _mm256_set1_ps(a.d * (float)a.s), acc[r]);
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        const int8_t* q[R];
        for (int r = 0; r < R; ++r) q[r] = ((const A256*)(xq + (r * G + g) * abytes))->q + 32 * j;
        const uint8_t* grp = blk + head_bytes(KIND) + j * group_bytes(KIND);
        if (KIND == Kind::Q6_K)
          group_dot<KIND, R>(grp, q, row_scales<true>(blk + 16 + 8 * (2 * j)),
                             row_scales<true>(blk + 16 + 8 * (2 * j + 1)), isum);
        else {
          const __m256i sc = row_scales<false>(blk + 32 + 8 * j);
          group_dot<KIND, R>(grp, q, sc, sc, isum);
        }
      }
      if (KIND == Kind::Q6_K) {
        __m256i sc2[8];  // lanes 2 r, 2 r + 1: the scales of groups of 16 number 2 t and 2 t + 1 of row r
        for (int t = 0; t < 8; ++t) sc2[t] = zip_i8(blk + 16 + 8 * (2 * t), blk + 16 + 8 * (2 * t + 1));
        for (int r = 0; r < R; ++r) {
          const A256& a = *(const A256*)(xq + (r * G + g) * abytes);
          __m256i off = _mm256_setzero_si256();
          for (int t = 0; t < 8; ++t) {
            int32_t pair;
            std::memcpy(&pair, a.s16 + 2 * t, 4);
            off = _mm256_add_epi32(off, _mm256_madd_epi16(sc2[t], _mm256_set1_epi32(pair)));
          }
          const __m256i s = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(off, 5));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(a.d)), acc[r]);
        }
      } else {
        __m256i m2[4];  // lanes 2 r, 2 r + 1: the mins of groups 2 t and 2 t + 1 of row r
        for (int t = 0; t < 4; ++t) m2[t] = zip_u8(blk + 96 + 8 * (2 * t), blk + 96 + 8 * (2 * t + 1));
        const __m256 dmin = load_halves(blk + 16);
        for (int r = 0; r < R; ++r) {
          const A256& a = *(const A256*)(xq + (r * G + g) * abytes);
          __m256i ms = _mm256_setzero_si256();
          for (int t = 0; t < 4; ++t) {
            int32_t pair;
            std::memcpy(&pair, a.s32 + 2 * t, 4);
            ms = _mm256_add_epi32(ms, _mm256_madd_epi16(m2[t], _mm256_set1_epi32(pair)));
          }
          const __m256 ad = _mm256_set1_ps(a.d);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, ad), acc[r]);
          acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(dmin, ad), acc[r]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if (valid == 8) {
      _mm256_storeu_ps(out + r * ldo, acc[r]);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, acc[r]);
      std::memcpy(out + r * ldo, tmp, valid * sizeof(float));
    }
  }
}

// Row tiles of 8 (4 for Q8_0, whose tiles of 8 measured slower), then 4, 3, 2, 1, outermost; groups of output
// rows inside: the weights of this piece of output rows stay in cache while every row tile streams over them.
template <int KIND>
void rows(const char* xq, int64_t n, int64_t K, const uint8_t* P, int64_t N, float* out, int64_t ldo, int64_t g0,
          int64_t g1) {
  constexpr int64_t bw = adaspec::kind_weights(KIND), pb = packed_block_bytes(KIND);
  constexpr int64_t abytes = bw == 256 ? sizeof(A256) : sizeof(A32);
  const int64_t G = K / bw;
  for (int64_t i = 0; i < n;) {
    const int64_t R = n - i >= 8 && KIND != Kind::Q8_0 ? 8 : std::min<int64_t>(4, n - i);
    const char* x = xq + i * G * abytes;
    for (int64_t grp = g0; grp < g1; ++grp) {
      const uint8_t* w = P + grp * G * pb;
      float* dst = out + i * ldo + 8 * grp;
      const int valid = (int)std::min<int64_t>(8, N - 8 * grp);
      switch (R) {
        case 8: tile<KIND, 8>(x, G, w, dst, ldo, valid); break;
        case 4: tile<KIND, 4>(x, G, w, dst, ldo, valid); break;
        case 3: tile<KIND, 3>(x, G, w, dst, ldo, valid); break;
        case 2: tile<KIND, 2>(x, G, w, dst, ldo, valid); break;
        default: tile<KIND, 1>(x, G, w, dst, ldo, valid); break;
      }
    }
    i += R;
  }
}

RowsFn pick(int64_t kind) {
  switch (kind) {
    case Kind::Q4_0: return rows<Kind::Q4_0>;
    case Kind::Q4_1: return rows<Kind::Q4_1>;
    case Kind::Q5_0: return rows<Kind::Q5_0>;
    case Kind::Q5_1: return rows<Kind::Q5_1>;
    case Kind::Q8_0: return rows<Kind::Q8_0>;
    case Kind::Q4_K: return rows<Kind::Q4_K>;
    case Kind::Q5_K: return rows<Kind::Q5_K>;
    case Kind::Q6_K: return rows<Kind::Q6_K>;
  }
  TORCH_CHECK(false, "adaspec qmm8: unknown block kind ", kind);
}
