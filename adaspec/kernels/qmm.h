// Shared between the kernel files: the matrix product over GGUF blocks (qmm.cpp).
#pragma once
#include <cstdint>

namespace adaspec {

// Bytes per block of 32 weights for a block kind (0: Q4_0, 1: Q4_1, 2: Q8_0); raises for others.
int64_t gguf_block_bytes(int64_t kind);

// out[n, N] = x[n, K] @ dequant(w)[N, K]^T, rows of w ldw bytes apart; parallel over output rows in torch's pool.
void qmm_into(const float* x, int64_t n, int64_t K, const uint8_t* w, int64_t ldw, int64_t kind, float* out,
              int64_t N);

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
