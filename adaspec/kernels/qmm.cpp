// Matrix products over GGUF weight blocks with fp32 activations: out[n, N] = x[n, K] @ dequant(W)[N, K]^T.
//
// Row independence, by construction: every output element out[i, o] is computed by one fixed sequence of
// operations over x[i, :] and weight row o (the blocks in order, a fixed set of vector accumulators, one fixed
// final reduction), whatever n is, whichever tile the element falls in and however output rows are split
// across threads. Tiles only decide which elements are computed side by side, never how. So row i of an n-row
// call equals, bit for bit, the one-row call on x[i]; tests/test_kernels.py checks it for every n up to 64.
//
// Weights stay in the GGUF block layout (Hugging Face row order), 32 weights a block:
//   Q4_0: fp16 d, 16 bytes of nibbles;           w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles;   w = d * q + m
//   Q8_0: fp16 d, 32 int8;                       w = d * q
// Nibble byte j holds weight j (low nibble) and weight j + 16 (high nibble). Each weight is dequantised to
// its exact fp32 value (the products above are exact in fp32) and multiplied with the fp32 activation.
//
// A block is dequantised once per tile of rows and reused from registers by every row of the tile, so the
// cost of a k-row call grows with k by the multiply-adds alone. Output rows are split across torch's own
// intra-op thread pool (at::parallel_for), so these kernels and torch's never run two pools at once.
//
// Dispatch happens once per process, at the first call: AVX-512 (F, BW, VL) where present, else AVX2 with
// FMA and F16C, else portable scalar code. Each path has its own fixed sequence, so results are bitwise
// reproducible on one machine, not across CPU families.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qmm.h"

namespace {

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
constexpr int64_t kBlock = 32;

// Bytes per block of 32 weights.
template <int KIND>
constexpr int64_t kBytes = KIND == Q4_0 ? 18 : KIND == Q4_1 ? 20 : 34;

int64_t block_bytes(int64_t kind) {
  switch (kind) {
    case Q4_0: return kBytes<Q4_0>;
    case Q4_1: return kBytes<Q4_1>;
    case Q8_0: return kBytes<Q8_0>;
  }
  TORCH_CHECK(false, "adaspec qmm: unknown block kind ", kind);
}

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return adaspec::half_to_float(h);
}

// ------------------------------------------------------------------------------------------------
// Scalar: one accumulator per element, blocks in order, weights in order.
// ------------------------------------------------------------------------------------------------

template <int KIND>
void rows_scalar(const float* x, int64_t n, int64_t K, const uint8_t* W, int64_t ldw, float* out, int64_t N,
                 int64_t o0, int64_t o1) {
  const int64_t G = K / kBlock;
  float w[kBlock];
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * K;
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b = W + o * ldw + g * kBytes<KIND>;
        const float d = half_to_float(b);
        if (KIND == Q8_0) {
          for (int j = 0; j < 32; ++j) w[j] = d * (float)(int8_t)b[2 + j];
        } else {
          const float m = KIND == Q4_1 ? half_to_float(b + 2) : 0.f;
          const uint8_t* q = b + (KIND == Q4_1 ? 4 : 2);
          for (int j = 0; j < 16; ++j) {
            const int lo = q[j] & 0xf, hi = q[j] >> 4;
            w[j] = KIND == Q4_1 ? __builtin_fmaf(d, (float)lo, m) : d * (float)(lo - 8);
            w[j + 16] = KIND == Q4_1 ? __builtin_fmaf(d, (float)hi, m) : d * (float)(hi - 8);
          }
        }
        for (int j = 0; j < 32; ++j) acc = __builtin_fmaf(w[j], xi[g * kBlock + j], acc);
      }
      out[i * N + o] = acc;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: a block is 4 vectors of 8; each element keeps 2 accumulators, a0 for the block's
// vectors 0 and 2, a1 for 1 and 3, summed a0 + a1, then lanes 0..7 in a fixed tree.
// ------------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 cvt8_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

template <int KIND>
inline void dequant_avx2(const uint8_t* b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)b));
  if (KIND == Q8_0) {
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64((const __m128i*)(b + 2 + 8 * j));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
    return;
  }
  const __m128i q = _mm_loadu_si128((const __m128i*)(b + (KIND == Q4_1 ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  const __m256 f[4] = {cvt8_u8(lo), cvt8_u8(_mm_srli_si128(lo, 8)), cvt8_u8(hi), cvt8_u8(_mm_srli_si128(hi, 8))};
  if (KIND == Q4_1) {
    const __m256 m = _mm256_set1_ps(_cvtsh_ss(*(const uint16_t*)(b + 2)));
    for (int j = 0; j < 4; ++j) w[j] = _mm256_fmadd_ps(f[j], d, m);
  } else {
    const __m256 eight = _mm256_set1_ps(8.f);
    for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(_mm256_sub_ps(f[j], eight), d);
  }
}

inline float hsum_avx2(__m256 a0, __m256 a1) {
  const __m256 s = _mm256_add_ps(a0, a1);
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// O output rows x R input rows.
template <int KIND, int O, int R>
inline void tile_avx2(const float* x, int64_t K, const uint8_t* W, int64_t ldw, float* out, int64_t N, int64_t o,
                      int64_t i) {
  constexpr int64_t bb = kBytes<KIND>;
  const int64_t G = K / kBlock;
  __m256 acc[O][R][2];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) acc[a][r][0] = acc[a][r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int a = 0; a < O; ++a) {
      __m256 w[4];
      dequant_avx2<KIND>(W + (o + a) * ldw + g * bb, w);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + (i + r) * K + g * kBlock;
        for (int j = 0; j < 4; ++j)
          acc[a][r][j & 1] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[a][r][j & 1]);
      }
    }
  }
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) out[(i + r) * N + o + a] = hsum_avx2(acc[a][r][0], acc[a][r][1]);
}

template <int KIND>
void rows_avx2(const float* x, int64_t n, int64_t K, const uint8_t* W, int64_t ldw, float* out, int64_t N, int64_t o0,
               int64_t o1) {
  if (n == 1) {
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2) tile_avx2<KIND, 2, 1>(x, K, W, ldw, out, N, o, 0);
    for (; o < o1; ++o) tile_avx2<KIND, 1, 1>(x, K, W, ldw, out, N, o, 0);
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) tile_avx2<KIND, 1, 4>(x, K, W, ldw, out, N, o, i);
    switch (n - i) {
      case 3: tile_avx2<KIND, 1, 3>(x, K, W, ldw, out, N, o, i); break;
      case 2: tile_avx2<KIND, 1, 2>(x, K, W, ldw, out, N, o, i); break;
      case 1: tile_avx2<KIND, 1, 1>(x, K, W, ldw, out, N, o, i); break;
    }
  }
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------
// AVX-512 (F, BW, VL): a block is 2 vectors of 16; each element keeps 2 accumulators (one per half of the
// block), summed a0 + a1, then lanes 0..15 in a fixed tree.
// ------------------------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

template <int KIND>
inline void dequant_avx512(const uint8_t* b, __m512 w[2]) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(*(const uint16_t*)b));
  if (KIND == Q8_0) {
    for (int j = 0; j < 2; ++j) {
      const __m128i q = _mm_loadu_si128((const __m128i*)(b + 2 + 16 * j));
      w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
    }
    return;
  }
  const __m128i q = _mm_loadu_si128((const __m128i*)(b + (KIND == Q4_1 ? 4 : 2)));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
  if (KIND == Q4_1) {
    const __m512 m = _mm512_set1_ps(_cvtsh_ss(*(const uint16_t*)(b + 2)));
    w[0] = _mm512_fmadd_ps(lo, d, m);
    w[1] = _mm512_fmadd_ps(hi, d, m);
  } else {
    const __m512 eight = _mm512_set1_ps(8.f);
    w[0] = _mm512_mul_ps(_mm512_sub_ps(lo, eight), d);
    w[1] = _mm512_mul_ps(_mm512_sub_ps(hi, eight), d);
  }
}

inline float hsum_avx512(__m512 a0, __m512 a1) {
  const __m512 s = _mm512_add_ps(a0, a1);
  __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

template <int KIND, int O, int R>
inline void tile_avx512(const float* x, int64_t K, const uint8_t* W, int64_t ldw, float* out, int64_t N, int64_t o,
                        int64_t i) {
  constexpr int64_t bb = kBytes<KIND>;
  const int64_t G = K / kBlock;
  __m512 acc[O][R][2];
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) acc[a][r][0] = acc[a][r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int a = 0; a < O; ++a) {
      __m512 w[2];
      dequant_avx512<KIND>(W + (o + a) * ldw + g * bb, w);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + (i + r) * K + g * kBlock;
        acc[a][r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), acc[a][r][0]);
        acc[a][r][1] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), acc[a][r][1]);
      }
    }
  }
  for (int a = 0; a < O; ++a)
    for (int r = 0; r < R; ++r) out[(i + r) * N + o + a] = hsum_avx512(acc[a][r][0], acc[a][r][1]);
}

template <int KIND, int O>
inline void rowtiles_avx512(const float* x, int64_t n, int64_t K, const uint8_t* W, int64_t ldw, float* out,
                            int64_t N, int64_t o) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) tile_avx512<KIND, O, 4>(x, K, W, ldw, out, N, o, i);
  switch (n - i) {
    case 3: tile_avx512<KIND, O, 3>(x, K, W, ldw, out, N, o, i); break;
    case 2: tile_avx512<KIND, O, 2>(x, K, W, ldw, out, N, o, i); break;
    case 1: tile_avx512<KIND, O, 1>(x, K, W, ldw, out, N, o, i); break;
  }
}

template <int KIND>
void rows_avx512(const float* x, int64_t n, int64_t K, const uint8_t* W, int64_t ldw, float* out, int64_t N,
                 int64_t o0, int64_t o1) {
  int64_t i = 0;
  // 8 rows share each dequantised block where their activations stay in L1 (8 x K floats <= 24 KB).
  if (K <= 768)
    for (; i + 8 <= n; i += 8)
      for (int64_t o = o0; o < o1; ++o) tile_avx512<KIND, 1, 8>(x, K, W, ldw, out, N, o, i);
  if (i == n) return;
  const float* xr = x + i * K;
  float* outr = out + i * N;
  int64_t o = o0;
  for (; o + 2 <= o1; o += 2) rowtiles_avx512<KIND, 2>(xr, n - i, K, W, ldw, outr, N, o);
  for (; o < o1; ++o) rowtiles_avx512<KIND, 1>(xr, n - i, K, W, ldw, outr, N, o);
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------
// Dispatch
// ------------------------------------------------------------------------------------------------

enum Isa : int64_t { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
  return SCALAR;
}

Isa forced = static_cast<Isa>(-1);  // set by set_isa (tests); -1: detect

Isa active() {
  static const Isa best = detect();
  return forced >= 0 && forced <= best ? forced : best;
}

using RowsFn = void (*)(const float*, int64_t, int64_t, const uint8_t*, int64_t, float*, int64_t, int64_t, int64_t);

template <int KIND>
RowsFn pick(Isa isa) {
  switch (isa) {
    case AVX512: return rows_avx512<KIND>;
    case AVX2: return rows_avx2<KIND>;
    default: return rows_scalar<KIND>;
  }
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, int64_t kind) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "adaspec qmm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "adaspec qmm: x must be a 2-D float32 tensor");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "adaspec qmm: w must be a 2-D uint8 tensor of blocks");
  const int64_t bb = block_bytes(kind);
  const int64_t n = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) % bb == 0 && w.size(1) / bb * kBlock == K, "adaspec qmm: x has ", K,
              " columns, the weight blocks hold ", w.size(1) / bb * kBlock);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty({n, N}, x.options());
  adaspec::qmm_into(xc.data_ptr<float>(), n, K, wc.data_ptr<uint8_t>(), wc.size(1), kind, out.data_ptr<float>(), N, N);
  return out;
}

int64_t isa() { return active(); }

int64_t set_isa(int64_t want) {
  TORCH_CHECK(want >= -1 && want <= 2, "adaspec qmm: isa must be -1 (detect), 0 (scalar), 1 (avx2) or 2 (avx512)");
  forced = static_cast<Isa>(want);
  return active();
}

}  // namespace

namespace adaspec {

int64_t gguf_block_bytes(int64_t kind) { return block_bytes(kind); }

int64_t active_isa() { return active(); }

void qmm_into(const float* x, int64_t n, int64_t K, const uint8_t* w, int64_t ldw, int64_t kind, float* out,
              int64_t ldo, int64_t N) {
  if (n == 0 || N == 0) return;
  const Isa isa = active();
  const RowsFn fn = kind == Q4_0 ? pick<Q4_0>(isa) : kind == Q4_1 ? pick<Q4_1>(isa) : pick<Q8_0>(isa);
  // Enough output rows per task that a task reads ~64 KB of weights; fewer rows than that run on one thread.
  const int64_t grain = std::max<int64_t>(16, (64 << 10) / std::max<int64_t>(ldw, 1));
  at::parallel_for(0, N, grain, [&](int64_t o0, int64_t o1) { fn(x, n, K, w, ldw, out, ldo, o0, o1); });
}

}  // namespace adaspec

TORCH_LIBRARY_FRAGMENT(adaspec_kernels, m) {
  m.def("qmm(Tensor x, Tensor w, int kind) -> Tensor", qmm);
  m.def("isa() -> int", isa);
  m.def("set_isa(int want) -> int", set_isa);
}
