// The vector pieces of a decoder layer besides the matrix products: attention and SiLU.
//
// Attention of one query row and head over its own keys, in the order given (decoding order), with every sum
// in a fixed order that depends only on the number of keys and the head size: the same row gives the same
// result whichever forward it is part of. Explicit vector code (AVX-512, AVX2, scalar; the path qmm.cpp
// picked), so no compiler choice (loop peeling for alignment, splitting, contraction) can make the
// arithmetic depend on where the row sits in memory.
//
//   s_j = (q . K[slot_j]) * scale              dot products over the head dimension, fixed lane tree
//   p_j = exp(s_j - max_j s_j)                  a fixed polynomial exp on the vector paths
//   out = (sum_j p_j V[slot_j]) / (sum_j p_j)   both sums in key order

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "qmm.h"

namespace {

void attend_scalar(const float* q, const float* K, const float* V, const int64_t* slots, int64_t m, int64_t hd,
                   float scale, float* out, float* sc) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < m; ++j) {
    const float* k = K + slots[j] * hd;
    float s = 0.f;
    for (int64_t e = 0; e < hd; ++e) s = __builtin_fmaf(q[e], k[e], s);
    sc[j] = s * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  float sum = 0.f;
  for (int64_t j = 0; j < m; ++j) {
    sc[j] = std::exp(sc[j] - mx);
    sum += sc[j];
  }
  for (int64_t e = 0; e < hd; ++e) out[e] = 0.f;
  for (int64_t j = 0; j < m; ++j) {
    const float* v = V + slots[j] * hd;
    for (int64_t e = 0; e < hd; ++e) out[e] = __builtin_fmaf(sc[j], v[e], out[e]);
  }
  const float inv = 1.f / sum;
  for (int64_t e = 0; e < hd; ++e) out[e] *= inv;
}

// exp(x) by Cephes' single-precision polynomial, for x clamped to [-87, 88] (below: ~1e-38; above: ~1.7e38).
#define EXP_BODY(V, set1, fmadd, mul, add, sub, maxf, minf, roundf, cvtps, cvtepi, addi, slli, castsi)        \
  x = minf(maxf(x, set1(-87.0f)), set1(88.0f));                                                               \
  const V n = roundf(mul(x, set1(1.44269504088896341f)));                                                     \
  V r = fmadd(n, set1(-0.693359375f), x);                                                                     \
  r = fmadd(n, set1(2.12194440e-4f), r);                                                                      \
  V p = set1(1.9875691500e-4f);                                                                               \
  p = fmadd(p, r, set1(1.3981999507e-3f));                                                                    \
  p = fmadd(p, r, set1(8.3334519073e-3f));                                                                    \
  p = fmadd(p, r, set1(4.1665795894e-2f));                                                                    \
  p = fmadd(p, r, set1(1.6666665459e-1f));                                                                    \
  p = fmadd(p, r, set1(5.0000001201e-1f));                                                                    \
  const V y = add(fmadd(mul(p, r), r, r), set1(1.f));                                                         \
  return mul(y, castsi(slli(addi(cvtps(n), cvtepi(127)), 23)));

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 exp_avx2(__m256 x) {
  EXP_BODY(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_sub_ps, _mm256_max_ps,
           _mm256_min_ps, [](__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); },
           _mm256_cvtps_epi32, _mm256_set1_epi32, _mm256_add_epi32, _mm256_slli_epi32, _mm256_castsi256_ps)
}

inline float hsum8(__m256 s) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// hd a multiple of 8; sc has room for m rounded up to 8.
void attend_avx2(const float* q, const float* K, const float* V, const int64_t* slots, int64_t m, int64_t hd,
                 float scale, float* out, float* sc) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < m; ++j) {
    const float* k = K + slots[j] * hd;
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(k));
    for (int64_t e = 8; e < hd; e += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), a);
    sc[j] = hsum8(a) * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  const int64_t mp = (m + 7) / 8 * 8;
  for (int64_t j = m; j < mp; ++j) sc[j] = mx;  // padding: computed, never summed
  const __m256 vmx = _mm256_set1_ps(mx);
  for (int64_t j = 0; j < mp; j += 8) _mm256_storeu_ps(sc + j, exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx)));
  float sum = 0.f;
  for (int64_t j = 0; j < m; ++j) sum += sc[j];
  for (int64_t e = 0; e < hd; e += 8) _mm256_storeu_ps(out + e, _mm256_setzero_ps());
  for (int64_t j = 0; j < m; ++j) {
    const float* v = V + slots[j] * hd;
    const __m256 p = _mm256_set1_ps(sc[j]);
    for (int64_t e = 0; e < hd; e += 8)
      _mm256_storeu_ps(out + e, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + e), _mm256_loadu_ps(out + e)));
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int64_t e = 0; e < hd; e += 8) _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_loadu_ps(out + e), inv));
}

// out = silu(g) * u = g / (1 + exp(-g)) * u. A tail shorter than a vector runs through the same vector code
// on a padded copy, so every element gets the same arithmetic wherever it sits.
void silu_mul_avx2(const float* g, const float* u, float* out, int64_t n) {
  auto one = [](__m256 gv, __m256 uv) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), uv);
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, one(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  if (i < n) {
    float gt[8] = {0}, ut[8] = {0}, ot[8];
    std::memcpy(gt, g + i, (n - i) * sizeof(float));
    std::memcpy(ut, u + i, (n - i) * sizeof(float));
    _mm256_storeu_ps(ot, one(_mm256_loadu_ps(gt), _mm256_loadu_ps(ut)));
    std::memcpy(out + i, ot, (n - i) * sizeof(float));
  }
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

inline __m512 exp_avx512(__m512 x) {
  EXP_BODY(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_sub_ps, _mm512_max_ps,
           _mm512_min_ps, [](__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); },
           _mm512_cvtps_epi32, _mm512_set1_epi32, _mm512_add_epi32, _mm512_slli_epi32, _mm512_castsi512_ps)
}

inline float hsum16(__m512 s) {
  const __m256 v8 = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps(v8, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}

// hd a multiple of 16; sc has room for m rounded up to 16.
void attend_avx512(const float* q, const float* K, const float* V, const int64_t* slots, int64_t m, int64_t hd,
                   float scale, float* out, float* sc) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < m; ++j) {
    const float* k = K + slots[j] * hd;
    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
    for (int64_t e = 16; e < hd; e += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + e), _mm512_loadu_ps(k + e), a);
    sc[j] = hsum16(a) * scale;
    mx = sc[j] > mx ? sc[j] : mx;
  }
  const int64_t mp = (m + 15) / 16 * 16;
  for (int64_t j = m; j < mp; ++j) sc[j] = mx;  // padding: computed, never summed
  const __m512 vmx = _mm512_set1_ps(mx);
  for (int64_t j = 0; j < mp; j += 16)
    _mm512_storeu_ps(sc + j, exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(sc + j), vmx)));
  float sum = 0.f;
  for (int64_t j = 0; j < m; ++j) sum += sc[j];
  for (int64_t e = 0; e < hd; e += 16) _mm512_storeu_ps(out + e, _mm512_setzero_ps());
  for (int64_t j = 0; j < m; ++j) {
    const float* v = V + slots[j] * hd;
    const __m512 p = _mm512_set1_ps(sc[j]);
    for (int64_t e = 0; e < hd; e += 16)
      _mm512_storeu_ps(out + e, _mm512_fmadd_ps(p, _mm512_loadu_ps(v + e), _mm512_loadu_ps(out + e)));
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int64_t e = 0; e < hd; e += 16) _mm512_storeu_ps(out + e, _mm512_mul_ps(_mm512_loadu_ps(out + e), inv));
}

void silu_mul_avx512(const float* g, const float* u, float* out, int64_t n) {
  auto one = [](__m512 gv, __m512 uv) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    return _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), uv);
  };
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, one(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
  if (i < n) {
    float gt[16] = {0}, ut[16] = {0}, ot[16];
    std::memcpy(gt, g + i, (n - i) * sizeof(float));
    std::memcpy(ut, u + i, (n - i) * sizeof(float));
    _mm512_storeu_ps(ot, one(_mm512_loadu_ps(gt), _mm512_loadu_ps(ut)));
    std::memcpy(out + i, ot, (n - i) * sizeof(float));
  }
}

#pragma GCC pop_options

void silu_mul_scalar(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace

namespace adaspec {

void attend(const float* q, const float* K, const float* V, const int64_t* slots, int64_t m, int64_t hd, float scale,
            float* out, float* scratch) {
  const int64_t isa = active_isa();
  if (isa >= 2 && hd % 16 == 0) return attend_avx512(q, K, V, slots, m, hd, scale, out, scratch);
  if (isa >= 1 && hd % 8 == 0) return attend_avx2(q, K, V, slots, m, hd, scale, out, scratch);
  attend_scalar(q, K, V, slots, m, hd, scale, out, scratch);
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  const int64_t isa = active_isa();
  if (isa >= 2) return silu_mul_avx512(g, u, out, n);
  if (isa >= 1) return silu_mul_avx2(g, u, out, n);
  silu_mul_scalar(g, u, out, n);
}

}  // namespace adaspec
