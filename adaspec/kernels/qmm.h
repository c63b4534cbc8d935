// Shared between the kernel files: GGUF block layouts, the matrix products over GGUF blocks (qmm.cpp with fp32
// activations, qmm8.cpp with int8 activations).
#pragma once
#include <cstdint>
#include <cstring>

namespace adaspec {

// GGUF block types, numbered as the Python side numbers them (adaspec/kernels/__init__.py, KINDS).
namespace Kind {
enum : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q5_0 = 3, Q5_1 = 4, Q4_K = 5, Q5_K = 6, Q6_K = 7 };
}

// Weights per block (32, or 256 for the K-quants) and bytes per block; 0 for an unknown kind.
constexpr int64_t kind_weights(int64_t kind) { return kind >= Kind::Q4_K && kind <= Kind::Q6_K ? 256 : 32; }
constexpr int64_t kind_bytes(int64_t kind) {
  constexpr int64_t bytes[] = {18, 20, 34, 22, 24, 144, 176, 210};
  return kind >= 0 && kind < 8 ? bytes[kind] : 0;
}

// fp16 -> fp32, exact (GGUF scales are finite normals or subnormals), without relying on F16C.
inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Bytes of one group of 8 output rows of a weight with K inputs once packed for qmm8_into (pack8 in qmm8.cpp).
int64_t packed8_bytes(int64_t kind, int64_t K);

// out[i * ldo + o] = q8(x[i]) . dequant(w[o]) for i < n, o < N: each activation row quantised on its own to int8
// blocks, integer dot products with the weight blocks packed by pack8. Row independent. See qmm8.cpp.
void qmm8_into(const float* x, int64_t n, int64_t K, const uint8_t* packed, int64_t kind, float* out, int64_t ldo,
               int64_t N);

// The code path qmm8_into runs in this process: 0 scalar, 1 AVX2, 2 AVX-512-VNNI (where active_isa() is 2, AVX-512,
// and the CPU has VNNI; an AVX-512 CPU without it runs the AVX2 one). See qmm8.cpp.
int64_t qmm8_path();

// Bytes per block of 32 weights for a kind qmm_into computes (Q4_0, Q4_1, Q8_0); raises for others.
int64_t gguf_block_bytes(int64_t kind);

// out[i * ldo + o] = x[i] . dequant(w[o]) for i < n, o < N, rows of w ldw bytes apart; parallel over output rows
// in torch's pool.
void qmm_into(const float* x, int64_t n, int64_t K, const uint8_t* w, int64_t ldw, int64_t kind, float* out,
              int64_t ldo, int64_t N);

}  // namespace adaspec

namespace adaspec {

// The code path every kernel of this process runs: 0 scalar, 1 AVX2, 2 AVX-512 (qmm.cpp decides).
int64_t active_isa();

// Attention of one query row and head over keys K[slots[j]], values V[slots[j]] (rows of hd floats), in the
// order given; writes out[hd]. scratch holds at least m rounded up to 16 floats. See vector.cpp.
void attend(const float* q, const float* K, const float* V, const int64_t* slots, int64_t m, int64_t hd, float scale,
            float* out, float* scratch);

// out[i] = silu(g[i]) * u[i] for i < n; each element's arithmetic is the same wherever it sits.
void silu_mul(const float* g, const float* u, float* out, int64_t n);

}  // namespace adaspec
