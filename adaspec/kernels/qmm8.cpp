// Matrix products over GGUF weight blocks with int8 activations: out[n, N] = q8(x)[n, K] @ dequant(W)[N, K]^T.
//
// Activations. Each activation row is quantised on its own: blocks of 32 values (for the 32-weight formats) or
// 256 values (for the K-quants) share one fp32 scale, d = max|x| / 127, q = round(x / d) in -127..127 (the
// function llama.cpp computes on CPU for these formats, which quantises activations to 8 bits per block too).
//
// Weights, as stored in GGUF (w: the weight; u: the stored code):
//   Q4_0  32 per block, 18 bytes: fp16 d, 16 bytes of nibbles             w = d (u - 8)
//   Q4_1  32 per block, 20 bytes: fp16 d, fp16 m, nibbles                 w = d u + m
//   Q5_0  32 per block, 22 bytes: fp16 d, 32 high bits, nibbles           w = d (u - 16)
//   Q5_1  32 per block, 24 bytes: fp16 d, fp16 m, 32 high bits, nibbles   w = d u + m
//   Q8_0  32 per block, 34 bytes: fp16 d, 32 int8                         w = d q
//   Q4_K  256 per block, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of 32,
//         128 bytes of nibbles                                            w = d sc_j u - dmin m_j
//   Q5_K  256 per block, 176 bytes: as Q4_K plus 32 bytes of high bits   w = d sc_j u - dmin m_j
//   Q6_K  256 per block, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales for
//         16 groups of 16, fp16 d                                         w = d sc_j (u - 32)
// At load they are rearranged once (pack8), the same bytes in another order: 8 output rows are interleaved so
// that one 32-byte vector holds 4 consecutive codes of each of the 8 rows. A broadcast of 4 activation bytes
// times that vector (vpmaddubsw, vpmaddwd) leaves output row r's partial sum in 32-bit lane r: no horizontal
// sums, each weight vector serves every activation row of a tile, and the per-row scales of 8 output rows are
// one vector. Integer partial sums are collected in 16 bits for as many steps as cannot overflow (8 for 4-bit
// codes, 4 for 5-bit, 2 for 6-bit, 1 for 8-bit), then widened. With AVX-512-VNNI one vpdpbusd does the 4-way
// products and the 32-bit accumulation (K-quant group sums then times their scales with vpmulld), on the same
// 256-bit vectors and packed layout.
//
// The arithmetic of one output element out[i, o]: per weight block, an integer dot product (exact, in any
// order), then a fixed sequence of fp32 operations with the block's scales:
//   32-weight formats: acc = fma(isum, dw dx, acc) [+ fma(mw, dx s, acc) for Q4_1/Q5_1], s = sum of q;
//   K-quants:          acc = fma(isum, d dx, acc), acc = fma(-msum, dmin dx, acc).
// It depends on row i and weight row o only, whatever n is, whichever tile or thread computes it: row i of an
// n-row call equals the one-row call on x[i] bit for bit, and no row depends on its neighbours. All three code
// paths (AVX-512-VNNI; AVX2; scalar, with fmaf) run that same sequence on the same exact integer sums, so they
// agree bit for bit too (tests/test_kernels.py).
// The VNNI path runs where qmm.cpp picks its AVX-512 path and the CPU also has AVX-512-VNNI (with VL); the AVX2
// path on other AVX2 CPUs (AVX-512 ones without VNNI included), and wherever a narrower path is forced
// (ADASPEC_KERNELS_ISA=avx2); the scalar one elsewhere (qmm8_path).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qmm.h"

namespace {

namespace Kind = adaspec::Kind;

// ------------------------------------------------------------------------------------------------
// Activations
// ------------------------------------------------------------------------------------------------

struct A32 {  // 32 activations
  float d;
  int32_t s;  // sum of q
  int8_t q[32];
};

struct A256 {  // 256 activations
  float d;
  int16_t s16[16];  // sums of q over each group of 16
  int16_t s32[8];   // ... and of 32
  int8_t q[256];
};

// d = max|x| / 127; q = round-to-nearest-even(x / d). Depends on these values only.
template <int B>
inline float quantise_block(const float* x, int8_t* q) {
  float amax = 0.f;
  for (int j = 0; j < B; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.f;
  const float id = d > 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < B; ++j) q[j] = (int8_t)std::nearbyint(x[j] * id);
  return d;
}

void quantise_row(const float* x, int64_t K, bool k256, void* out) {
  if (k256) {
    A256* a = (A256*)out;
    for (int64_t g = 0; g < K / 256; ++g) {
      a[g].d = quantise_block<256>(x + g * 256, a[g].q);
      for (int t = 0; t < 16; ++t) {
        int32_t s = 0;
        for (int j = 0; j < 16; ++j) s += a[g].q[16 * t + j];
        a[g].s16[t] = (int16_t)s;
      }
      for (int t = 0; t < 8; ++t) a[g].s32[t] = (int16_t)(a[g].s16[2 * t] + a[g].s16[2 * t + 1]);
    }
  } else {
    A32* a = (A32*)out;
    for (int64_t g = 0; g < K / 32; ++g) {
      a[g].d = quantise_block<32>(x + g * 32, a[g].q);
      int32_t s = 0;
      for (int j = 0; j < 32; ++j) s += a[g].q[j];
      a[g].s = s;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The GGUF blocks, read one code at a time (packing and nothing else)
// ------------------------------------------------------------------------------------------------

inline uint16_t u16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

inline float fp16(const uint8_t* p) { return adaspec::half_to_float(u16(p)); }

// The 6-bit scale and min of group j (0..7) of a Q4_K/Q5_K block (12 packed bytes).
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The stored code of weight k of a GGUF block: unsigned for every kind but Q8_0 (signed).
int gguf_code(int kind, const uint8_t* b, int k) {
  switch (kind) {
    case Kind::Q8_0: return (int8_t)b[2 + k];
    case Kind::Q4_0: case Kind::Q4_1: {
      const uint8_t q = b[(kind == Kind::Q4_0 ? 2 : 4) + k % 16];
      return k < 16 ? q & 0xF : q >> 4;
    }
    case Kind::Q5_0: case Kind::Q5_1: {
      uint32_t qh;
      std::memcpy(&qh, b + (kind == Kind::Q5_0 ? 2 : 4), 4);
      const uint8_t q = b[(kind == Kind::Q5_0 ? 6 : 8) + k % 16];
      return (k < 16 ? q & 0xF : q >> 4) | (int)((qh >> k) & 1) << 4;
    }
    case Kind::Q4_K: case Kind::Q5_K: {
      const int j = k / 32, l = k % 32;
      const uint8_t q = b[(kind == Kind::Q4_K ? 16 : 48) + 32 * (j / 2) + l];
      const int lo = j % 2 ? q >> 4 : q & 0xF;
      return kind == Kind::Q4_K ? lo : lo | ((b[16 + l] >> j) & 1) << 4;
    }
    case Kind::Q6_K: {
      const int half = k / 128, r = (k % 128) / 32, l = k % 32;
      const uint8_t q = b[64 * half + l + 32 * (r & 1)];
      return (r < 2 ? q & 0xF : q >> 4) | ((b[128 + 32 * half + l] >> (2 * r)) & 3) << 4;
    }
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// The packed layout: per 8 output rows and weight block, in this order
//   32-weight formats: d[8] fp16 | m[8] fp16 (Q4_1, Q5_1) | hb[32] (Q5_0, Q5_1) | codes
//   Q4_K, Q5_K:        d[8] fp16 | dmin[8] fp16 | sc[8 groups][8 rows] u8 | m[8][8] u8 | per group of 32:
//                      hb[32] (Q5_K) and codes
//   Q6_K:              d[8] fp16 | sc[16 groups of 16][8 rows] i8 | per group of 32: h2[2][32], codes
// Codes of a group of 32 weights (k = 0..31) of 8 rows (r), in 32-byte vectors, byte p = 4 r + t:
//   4/5/6-bit: nib[4][32], vector j: low nibble = low 4 bits of (r, k = 4 j + t), high = of (r, 16 + 4 j + t)
//   8-bit:     q[8][32], vector c = (r, k = 4 c + t)
//   hb[32]:    bit c = bit 4 of (r, k = 4 c + t);  h2[h][32]: bits 2 c', 2 c' + 1 = bits 4, 5 of (r, 4 (4 h + c') + t)
// ------------------------------------------------------------------------------------------------

constexpr int64_t group_bytes(int kind) {  // codes (and high bits) of one group of 32 weights x 8 rows
  return kind == Kind::Q8_0 ? 256 : kind == Kind::Q5_0 || kind == Kind::Q5_1 || kind == Kind::Q5_K ? 160
       : kind == Kind::Q6_K ? 192 : 128;
}

constexpr int64_t head_bytes(int kind) {  // scales before the groups of one block x 8 rows
  return kind == Kind::Q4_K || kind == Kind::Q5_K ? 16 + 16 + 64 + 64
       : kind == Kind::Q6_K ? 16 + 128 : kind == Kind::Q4_1 || kind == Kind::Q5_1 ? 32 : 16;
}

constexpr int64_t packed_block_bytes(int kind) {
  return head_bytes(kind) + adaspec::kind_weights(kind) / 32 * group_bytes(kind);
}

// Pack 8 rows (fewer at the end: missing rows are zero blocks) of GGUF blocks g.
void pack_block(int kind, const uint8_t* const rows[8], int nrows, int64_t g, uint8_t* dst) {
  const int64_t bb = adaspec::kind_bytes(kind), bw = adaspec::kind_weights(kind);
  static const uint8_t zero[256] = {};
  const uint8_t* b[8];
  for (int r = 0; r < 8; ++r) b[r] = r < nrows ? rows[r] + g * bb : zero;
  std::memset(dst, 0, packed_block_bytes(kind));
  uint8_t* p = dst;
  if (kind == Kind::Q6_K) {
    for (int r = 0; r < 8; ++r) std::memcpy(p + 2 * r, b[r] + 208, 2);
    for (int i = 0; i < 16; ++i)
      for (int r = 0; r < 8; ++r) p[16 + 8 * i + r] = b[r][192 + i];
  } else {
    for (int r = 0; r < 8; ++r) std::memcpy(p + 2 * r, b[r], 2);
    if (kind == Kind::Q4_K || kind == Kind::Q5_K) {
      for (int r = 0; r < 8; ++r) std::memcpy(p + 16 + 2 * r, b[r] + 2, 2);
      for (int j = 0; j < 8; ++j)
        for (int r = 0; r < 8; ++r) {
          int sc, m;
          scale_min_k4(j, b[r] + 4, &sc, &m);
          p[32 + 8 * j + r] = (uint8_t)sc;
          p[96 + 8 * j + r] = (uint8_t)m;
        }
    } else if (kind == Kind::Q4_1 || kind == Kind::Q5_1) {
      for (int r = 0; r < 8; ++r) std::memcpy(p + 16 + 2 * r, b[r] + 2, 2);
    }
  }
  p += head_bytes(kind);
  const bool five = kind == Kind::Q5_0 || kind == Kind::Q5_1 || kind == Kind::Q5_K;
  for (int64_t j = 0; j < bw / 32; ++j, p += group_bytes(kind)) {
    uint8_t* hb = p;                               // Q5: 32 bytes of high bits first
    uint8_t* h2 = p;                               // Q6_K: 64 bytes of 2-bit highs first
    uint8_t* codes = p + (five ? 32 : kind == Kind::Q6_K ? 64 : 0);
    for (int r = 0; r < 8; ++r)
      for (int k = 0; k < 32; ++k) {
        const int c = k / 4, t = k % 4, at = 4 * r + t;
        const int code = gguf_code(kind, b[r], (int)(32 * j + k));
        if (kind == Kind::Q8_0) {
          codes[32 * c + at] = (uint8_t)(int8_t)code;
          continue;
        }
        const int lo = code & 0xF;
        codes[32 * (c % 4) + at] |= (uint8_t)(c < 4 ? lo : lo << 4);
        if (five) hb[at] |= (uint8_t)(((code >> 4) & 1) << c);
        if (kind == Kind::Q6_K) h2[32 * (c / 4) + at] |= (uint8_t)(((code >> 4) & 3) << (2 * (c % 4)));
      }
  }
}

// ------------------------------------------------------------------------------------------------
// Scalar path: the same integer sums and the same fp32 sequence as the vector path, one lane at a time.
// ------------------------------------------------------------------------------------------------

// Code of (row r, weight k of group j) from a packed block; unsigned except Q8_0.
inline int packed_code(int kind, const uint8_t* blk, int j, int r, int k) {
  const uint8_t* p = blk + head_bytes(kind) + j * group_bytes(kind);
  const int c = k / 4, at = 4 * r + k % 4;
  if (kind == Kind::Q8_0) return (int8_t)p[32 * c + at];
  const bool five = kind == Kind::Q5_0 || kind == Kind::Q5_1 || kind == Kind::Q5_K;
  const uint8_t* codes = p + (five ? 32 : kind == Kind::Q6_K ? 64 : 0);
  int u = c < 4 ? codes[32 * c + at] & 0xF : codes[32 * (c - 4) + at] >> 4;
  if (five) u |= ((p[at] >> c) & 1) << 4;
  if (kind == Kind::Q6_K) u |= ((p[32 * (c / 4) + at] >> (2 * (c % 4))) & 3) << 4;
  return u;
}

void rows_scalar(int kind, const char* xq, int64_t n, int64_t K, const uint8_t* P, int64_t N, float* out,
                 int64_t ldo, int64_t g0, int64_t g1) {
  const int64_t bw = adaspec::kind_weights(kind), G = K / bw, pb = packed_block_bytes(kind);
  const int64_t abytes = bw == 256 ? sizeof(A256) : sizeof(A32);
  for (int64_t grp = g0; grp < g1; ++grp)
    for (int64_t i = 0; i < n; ++i) {
      float acc[8] = {};
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* blk = P + (grp * G + g) * pb;
        const char* xa = xq + (i * G + g) * abytes;
        for (int r = 0; r < 8; ++r) {
          if (bw == 32) {
            const A32& a = *(const A32*)xa;
            int32_t isum = 0;
            for (int k = 0; k < 32; ++k) isum += packed_code(kind, blk, 0, r, k) * a.q[k];
            if (kind == Kind::Q4_0) isum -= 8 * a.s;
            if (kind == Kind::Q5_0) isum -= 16 * a.s;
            acc[r] = std::fma((float)isum, fp16(blk + 2 * r) * a.d, acc[r]);
            if (kind == Kind::Q4_1 || kind == Kind::Q5_1)
              acc[r] = std::fma(fp16(blk + 16 + 2 * r), a.d * (float)a.s, acc[r]);
          } else {
            const A256& a = *(const A256*)xa;
            int32_t isum = 0, msum = 0;
            for (int j = 0; j < 8; ++j)
              for (int h = 0; h < 2; ++h) {
                int32_t part = 0;
                for (int k = 16 * h; k < 16 * h + 16; ++k) part += packed_code(kind, blk, j, r, k) * a.q[32 * j + k];
                if (kind == Kind::Q6_K)
                  isum += (int8_t)blk[16 + 8 * (2 * j + h) + r] * part;
                else
                  isum += blk[32 + 8 * j + r] * part;
              }
            if (kind == Kind::Q6_K) {
              int32_t off = 0;
              for (int t = 0; t < 16; ++t) off += (int8_t)blk[16 + 8 * t + r] * a.s16[t];
              isum -= 32 * off;
              acc[r] = std::fma((float)isum, fp16(blk + 2 * r) * a.d, acc[r]);
            } else {
              for (int j = 0; j < 8; ++j) msum += blk[96 + 8 * j + r] * a.s32[j];
              acc[r] = std::fma((float)isum, fp16(blk + 2 * r) * a.d, acc[r]);
              acc[r] = std::fma(-(float)msum, fp16(blk + 16 + 2 * r) * a.d, acc[r]);
            }
          }
        }
      }
      for (int r = 0; r < 8 && 8 * grp + r < N; ++r) out[i * ldo + 8 * grp + r] = acc[r];
    }
}

// ------------------------------------------------------------------------------------------------
// Vector paths: R activation rows x 8 output rows per tile (qmm8_tile.h), on AVX2 or AVX-512-VNNI.
// ------------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load_halves(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }

// 8 bytes (one per output row) widened to 16 int16 lanes, each twice: lanes 2 r, 2 r + 1 = v[r].
inline __m256i pairs_u8(const uint8_t* v) {
  const __m128i b = _mm_loadl_epi64((const __m128i*)v);
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(b, b));
}
inline __m256i pairs_i8(const uint8_t* v) {
  const __m128i b = _mm_loadl_epi64((const __m128i*)v);
  return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(b, b));
}
// lanes 2 r = a[r], 2 r + 1 = b[r] (unsigned or signed bytes)
inline __m256i zip_u8(const uint8_t* a, const uint8_t* b) {
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i*)a), _mm_loadl_epi64((const __m128i*)b)));
}
inline __m256i zip_i8(const uint8_t* a, const uint8_t* b) {
  return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i*)a), _mm_loadl_epi64((const __m128i*)b)));
}

// Codes of chunk c (weights 4 c .. 4 c + 3 of every row) of one group of 32.
template <int KIND>
inline __m256i chunk_codes(const uint8_t* p, int c) {
  if (KIND == Kind::Q8_0) return _mm256_loadu_si256((const __m256i*)(p + 32 * c));
  constexpr bool five = KIND == Kind::Q5_0 || KIND == Kind::Q5_1 || KIND == Kind::Q5_K;
  const uint8_t* codes = p + (five ? 32 : KIND == Kind::Q6_K ? 64 : 0);
  const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + 32 * (c % 4)));
  const __m256i m4 = _mm256_set1_epi8(0xF);
  __m256i u = c < 4 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if (five) {
    const __m256i hb = _mm256_loadu_si256((const __m256i*)p);
    const __m256i h = c < 4 ? _mm256_slli_epi16(hb, 4 - c) : _mm256_srli_epi16(hb, c - 4);
    u = _mm256_or_si256(u, _mm256_and_si256(h, _mm256_set1_epi8(0x10)));
  }
  if (KIND == Kind::Q6_K) {
    const __m256i h2 = _mm256_loadu_si256((const __m256i*)(p + 32 * (c / 4)));
    const int cc = c % 4;
    const __m256i h = cc < 3 ? _mm256_slli_epi16(h2, 4 - 2 * cc) : _mm256_srli_epi16(h2, 2);
    u = _mm256_or_si256(u, _mm256_and_si256(h, _mm256_set1_epi8(0x30)));
  }
  return u;
}

inline __m256i bcast4(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, 4);
  return _mm256_set1_epi32(v);
}

#pragma GCC pop_options

using RowsFn = void (*)(const char*, int64_t, int64_t, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t);

// The tile itself, twice: plain AVX2, and with AVX-512-VNNI's vpdpbusd for the integer dot products (the helpers
// above inline into both). Only the VNNI copy may use AVX-512 instructions; qmm8_into runs it only where the CPU
// has them.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr bool kVnni = false;
#include "qmm8_tile.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")
namespace vnni {
constexpr bool kVnni = true;
#include "qmm8_tile.h"
}  // namespace vnni
#pragma GCC pop_options

void check_kind(int64_t kind) {
  TORCH_CHECK(adaspec::kind_bytes(kind) > 0, "adaspec qmm8: unknown block kind ", kind);
}

// [N, K / bw * bytes] GGUF blocks -> [ceil(N / 8), K / bw * packed bytes] packed blocks.
at::Tensor pack8(const at::Tensor& w, int64_t kind) {
  check_kind(kind);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              "adaspec pack8: w must be a 2-D uint8 CPU tensor of blocks");
  const int64_t bb = adaspec::kind_bytes(kind), N = w.size(0);
  TORCH_CHECK(w.size(1) % bb == 0, "adaspec pack8: rows of ", w.size(1), " bytes are not whole blocks of ", bb);
  const int64_t G = w.size(1) / bb, groups = (N + 7) / 8, pb = packed_block_bytes((int)kind);
  const at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({groups, G * pb}, w.options());
  const uint8_t* src = wc.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t a, int64_t b) {
    for (int64_t grp = a; grp < b; ++grp) {
      const uint8_t* rows[8];
      const int nrows = (int)std::min<int64_t>(8, N - 8 * grp);
      for (int r = 0; r < nrows; ++r) rows[r] = src + (8 * grp + r) * w.size(1);
      for (int64_t g = 0; g < G; ++g) pack_block((int)kind, rows, nrows, g, dst + (grp * G + g) * pb);
    }
  });
  return out;
}

at::Tensor qmm8(const at::Tensor& x, const at::Tensor& packed, int64_t kind, int64_t N) {
  check_kind(kind);
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "adaspec qmm8: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "adaspec qmm8: x must be a 2-D float32 tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == (N + 7) / 8,
              "adaspec qmm8: packed must be pack8's [ceil(N / 8), bytes] uint8 tensor");
  const int64_t pb = packed_block_bytes((int)kind), bw = adaspec::kind_weights(kind);
  const int64_t n = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.size(1) % pb == 0 && packed.size(1) / pb * bw == K, "adaspec qmm8: x has ", K,
              " columns, the weight blocks hold ", packed.size(1) / pb * bw);
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous();
  at::Tensor out = at::empty({n, N}, x.options());
  adaspec::qmm8_into(xc.data_ptr<float>(), n, K, pc.data_ptr<uint8_t>(), kind, out.data_ptr<float>(), N, N);
  return out;
}

}  // namespace

namespace adaspec {

int64_t packed8_bytes(int64_t kind, int64_t K) {
  return kind_bytes(kind) > 0 ? K / kind_weights(kind) * packed_block_bytes((int)kind) : 0;
}

int64_t qmm8_path() {
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  const int64_t isa = active_isa();  // 2 (AVX-512) only where the CPU has it and no narrower path is forced
  return isa >= 2 && vnni ? 2 : isa >= 1 ? 1 : 0;
}

void qmm8_into(const float* x, int64_t n, int64_t K, const uint8_t* packed, int64_t kind, float* out, int64_t ldo,
               int64_t N) {
  if (n == 0 || N == 0) return;
  const bool k256 = kind_weights(kind) == 256;
  const int64_t G = K / kind_weights(kind), abytes = k256 ? sizeof(A256) : sizeof(A32);
  thread_local std::vector<char> buf;  // the quantised rows, reused between calls of this thread
  if ((int64_t)buf.size() < n * G * abytes) buf.resize(n * G * abytes);
  char* xq = buf.data();
  at::parallel_for(0, n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) quantise_row(x + i * K, K, k256, xq + i * G * abytes);
  });
  const int64_t groups = (N + 7) / 8, gbytes = packed8_bytes(kind, K);
  // Tasks of >= 64 KB of weights; inside a task, pieces of <= 128 KB that every row tile passes over while
  // they are in cache.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(gbytes, 1));
  const int64_t piece = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(gbytes, 1));
  const int64_t path = qmm8_path();
  const bool vec = path >= 1;
  const RowsFn fn = path == 2 ? vnni::pick(kind) : vec ? avx2::pick(kind) : nullptr;
  at::parallel_for(0, groups, grain, [&](int64_t a, int64_t b) {
    for (int64_t p = a; p < b; p += piece) {
      const int64_t e = std::min(b, p + piece);
      if (vec)
        fn(xq, n, K, packed, N, out, ldo, p, e);
      else
        rows_scalar((int)kind, xq, n, K, packed, N, out, ldo, p, e);
    }
  });
}

}  // namespace adaspec

TORCH_LIBRARY_FRAGMENT(adaspec_kernels, m) {
  m.def("pack8(Tensor w, int kind) -> Tensor", pack8);
  m.def("qmm8(Tensor x, Tensor packed, int kind, int N) -> Tensor", qmm8);
  m.def("qmm8_isa() -> int", adaspec::qmm8_path);
}
