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
