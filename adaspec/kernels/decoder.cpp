// The decoder layers of a Llama-family model (Llama 2/3, Qwen2, Qwen3) over GGUF blocks, for the rows of one
// verification (or decoding) forward, in one call: RMSNorm, fused QKV (+ bias), per-head q/k RMSNorm, RoPE,
// KV-cache write, attention, output projection, RMSNorm, fused gate/up, SiLU, down projection, residuals.
// A projection is one or more parts stacked along its outputs, each a GGUF block type of its own (a Q4_K_M
// file mixes them within a layer), computed with fp32 activations (qmm.cpp) or int8 activations (qmm8.cpp).
//
// Row independence, by construction: every row's arithmetic is fixed by that row alone. The projections are
// qmm.cpp's row-independent products; norms, RoPE, SiLU and residuals are per-row loops; each (row, head) of
// attention runs in its own loop over the row's own keys, in decoding order (the committed prefix, then the
// row's ancestors among the new tokens, then itself), with a fixed order of every sum. So row i of a k-row
// forward, chain or tree, equals the one-row forward of that token after its path, bit for bit. Several
// sequences go through one call (`forward_batch`, each with its own cache): the projections take all their rows
// at once and each row attends within its own sequence, so a sequence's rows do not depend on the others.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "qmm.h"

namespace {

struct Part {
  at::Tensor blocks;  // fp32 activations: [rows, in / 32 * bytes] GGUF blocks; int8: pack8's packed blocks
  int64_t kind = 0, rows = 0;
  bool int8 = false;
};

struct Proj {
  std::vector<Part> parts;  // stacked along the outputs
  int64_t in = 0, out = 0;  // expected shape
};

struct Layer {
  at::Tensor attn_norm, mlp_norm;  // [d] float32
  at::Tensor qkv_bias;             // [(H + 2 KV) hd] or empty
  at::Tensor q_norm, k_norm;       // [hd] or empty
  Proj qkv, o, gate_up, down;
};

// y = x / sqrt(mean(x^2) + eps) * w, one row. The sum of squares runs in plain index order (a float reduction
// the compiler may not reorder); the rest is elementwise.
inline void rms_norm(const float* x, const float* w, float* y, int64_t d, float eps) {
  float ss = 0.f;
  for (int64_t t = 0; t < d; ++t) ss += x[t] * x[t];
  const float r = 1.f / std::sqrt(ss / (float)d + eps);
  for (int64_t t = 0; t < d; ++t) y[t] = x[t] * r * w[t];
}

class Decoder : public torch::CustomClassHolder {
 public:
  Decoder(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t hidden, int64_t intermediate, double eps)
      : H_(heads), KV_(kv_heads), hd_(head_dim), d_(hidden), I_(intermediate), eps_((float)eps) {
    TORCH_CHECK(H_ > 0 && KV_ > 0 && H_ % KV_ == 0 && hd_ % 2 == 0 && H_ * hd_ > 0, "adaspec decoder: bad shape");
  }

  // A layer's norms (and optional q/k/v bias and per-head q/k norm weights: empty tensors when absent); its
  // projections follow with add_part.
  void add_layer(at::Tensor attn_norm, at::Tensor mlp_norm, at::Tensor qkv_bias, at::Tensor q_norm,
                 at::Tensor k_norm) {
    Layer L;
    L.attn_norm = vec(attn_norm, d_);
    L.mlp_norm = vec(mlp_norm, d_);
    const int64_t nqkv = (H_ + 2 * KV_) * hd_;
    if (qkv_bias.numel()) L.qkv_bias = vec(qkv_bias, nqkv);
    TORCH_CHECK(q_norm.numel() == k_norm.numel(), "adaspec decoder: q and k norms come together");
    if (q_norm.numel()) L.q_norm = vec(q_norm, hd_), L.k_norm = vec(k_norm, hd_);
    L.qkv.in = d_, L.qkv.out = nqkv;
    L.o.in = H_ * hd_, L.o.out = d_;
    L.gate_up.in = d_, L.gate_up.out = 2 * I_;
    L.down.in = I_, L.down.out = d_;
    layers_.push_back(std::move(L));
  }

  // The next rows of projection `which` (0 qkv, 1 o, 2 gate_up, 3 down) of the last layer added.
  void add_part(int64_t which, at::Tensor blocks, int64_t kind, int64_t rows, bool int8) {
    TORCH_CHECK(!layers_.empty() && which >= 0 && which < 4, "adaspec decoder: add_part before add_layer");
    Layer& L = layers_.back();
    Proj& p = which == 0 ? L.qkv : which == 1 ? L.o : which == 2 ? L.gate_up : L.down;
    TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && rows > 0,
                "adaspec decoder: projection blocks must be a 2-D uint8 tensor");
    if (int8) {
      TORCH_CHECK(adaspec::kind_bytes(kind) > 0 && p.in % adaspec::kind_weights(kind) == 0 &&
                      blocks.size(0) == (rows + 7) / 8 && blocks.size(1) == adaspec::packed8_bytes(kind, p.in),
                  "adaspec decoder: packed projection blocks of the wrong shape");
    } else {
      TORCH_CHECK(blocks.size(0) == rows && p.in % 32 == 0 &&
                      blocks.size(1) == p.in / 32 * adaspec::gguf_block_bytes(kind),
                  "adaspec decoder: projection blocks of the wrong shape");
    }
    p.parts.push_back(Part{blocks.contiguous(), kind, rows, int8});
  }

  // x: [n, d] embeddings (float32), updated to the last layer's output and returned.
  // rope: [n, hd / 2, 2] (cos, sin) of each row's position. kc, vc: [layers, KV, capacity, hd] float32.
  // start: committed positions; the new rows are written to slots start .. start + n - 1.
  // anc: [n, n] bool, row i attends to new token j when anc[i][j] (ancestor or self); empty for a chain.
  at::Tensor forward(at::Tensor x, at::Tensor rope, at::Tensor kc, at::Tensor vc, int64_t start, at::Tensor anc) {
    return forward_batch(x, rope, {kc}, {vc}, {start}, {x.size(0)}, {anc});
  }

  // Several sequences in one call: the rows of x are the sequences' new tokens one sequence after another
  // (counts[s] rows for sequence s), and sequence s has its own cache (kcs[s], vcs[s], each as `forward` takes
  // them), committed positions starts[s] and tree ancs[s] (empty for a chain). The projections run once over all
  // rows; each row attends to its own sequence's keys only. Since every row's arithmetic is fixed by that row and
  // its own sequence, a sequence's rows are bit for bit those of `forward` on it alone, whatever else is batched.
  at::Tensor forward_batch(at::Tensor x, at::Tensor rope, std::vector<at::Tensor> kcs, std::vector<at::Tensor> vcs,
                           std::vector<int64_t> starts, std::vector<int64_t> counts, std::vector<at::Tensor> ancs) {
    const int64_t n = x.size(0), nl = (int64_t)layers_.size(), ns = (int64_t)kcs.size();
    for (const Layer& L : layers_)
      for (const Proj* p : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
        int64_t rows = 0;
        for (const Part& part : p->parts) rows += part.rows;
        TORCH_CHECK(rows == p->out, "adaspec decoder: a projection has ", rows, " output rows, expected ", p->out);
      }
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == d_,
                "adaspec decoder: x must be a contiguous [n, hidden] float32 tensor");
    TORCH_CHECK(rope.is_contiguous() && rope.scalar_type() == at::kFloat && rope.numel() == n * hd_,
                "adaspec decoder: rope must be a contiguous [n, head_dim / 2, 2] float32 tensor");
    TORCH_CHECK(ns > 0 && (int64_t)vcs.size() == ns && (int64_t)starts.size() == ns &&
                    (int64_t)counts.size() == ns && (int64_t)ancs.size() == ns,
                "adaspec decoder: one cache, start, count and tree per sequence");
    // Per row: its sequence's caches (and capacity), the slot it writes, and its keys' slots in decoding order:
    // the committed prefix, then its ancestors among the sequence's new tokens and itself, root first (ascending
    // indices are root first in a tree). Every loop below reads keys through this list, so a key's arithmetic
    // never depends on whether it is committed or new.
    std::vector<int64_t> seq_of(n), slot(n);
    std::vector<std::vector<int64_t>> keys(n);
    int64_t row = 0, longest = 0;
    for (int64_t s = 0; s < ns; ++s) {
      const at::Tensor &kc = kcs[s], &vc = vcs[s];
      TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == at::kFloat &&
                      vc.scalar_type() == at::kFloat && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
                      kc.size(0) == nl && kc.size(1) == KV_ && kc.size(3) == hd_,
                  "adaspec decoder: caches must be contiguous [layers, kv_heads, capacity, head_dim] float32");
      for (int64_t o = 0; o < s; ++o)
        TORCH_CHECK(!kcs[o].is_same(kc), "adaspec decoder: a cache appears twice in one batch");
      const int64_t m = counts[s], start = starts[s];
      TORCH_CHECK(m > 0 && row + m <= n, "adaspec decoder: sequence row counts must be positive and sum to n");
      TORCH_CHECK(start >= 0 && start + m <= kc.size(2), "adaspec decoder: rows past the cache capacity");
      const bool tree = ancs[s].numel() > 0;
      at::Tensor anc;
      if (tree) {
        anc = ancs[s].to(at::kBool).contiguous();
        TORCH_CHECK(anc.dim() == 2 && anc.size(0) == m && anc.size(1) == m, "adaspec decoder: anc must be [n, n]");
      }
      for (int64_t i = 0; i < m; ++i, ++row) {
        seq_of[row] = s, slot[row] = start + i;
        std::vector<int64_t>& k = keys[row];
        k.reserve(start + i + 1);
        for (int64_t j = 0; j < start; ++j) k.push_back(j);
        for (int64_t j = 0; j <= i; ++j)
          if (!tree || anc.data_ptr<bool>()[i * m + j]) k.push_back(start + j);
        longest = std::max(longest, (int64_t)k.size());
      }
    }
    TORCH_CHECK(row == n, "adaspec decoder: sequence row counts must sum to n");

    const int64_t nq = H_ * hd_, nqkv = (H_ + 2 * KV_) * hd_, half = hd_ / 2;
    auto opts = x.options();
    at::Tensor h = at::empty({n, d_}, opts), qkv = at::empty({n, nqkv}, opts), att = at::empty({n, nq}, opts);
    at::Tensor gu = at::empty({n, 2 * I_}, opts), act = at::empty({n, I_}, opts), y = at::empty({n, d_}, opts);
    float *X = x.data_ptr<float>(), *Hb = h.data_ptr<float>(), *QKV = qkv.data_ptr<float>();
    float *ATT = att.data_ptr<float>(), *GU = gu.data_ptr<float>(), *ACT = act.data_ptr<float>();
    float* Y = y.data_ptr<float>();
    const float* R = rope.data_ptr<float>();
    const float scale = 1.f / std::sqrt((float)hd_);
    const int64_t group = H_ / KV_;
    std::vector<float*> Ks(ns), Vs(ns);  // this layer's [KV, cap, hd] block of each sequence's cache
    std::vector<int64_t> caps(ns);
    for (int64_t s = 0; s < ns; ++s) caps[s] = kcs[s].size(2);

    for (int64_t li = 0; li < nl; ++li) {
      const Layer& L = layers_[li];
      for (int64_t s = 0; s < ns; ++s) {
        Ks[s] = kcs[s].data_ptr<float>() + li * KV_ * caps[s] * hd_;
        Vs[s] = vcs[s].data_ptr<float>() + li * KV_ * caps[s] * hd_;
      }
      for (int64_t i = 0; i < n; ++i) rms_norm(X + i * d_, L.attn_norm.data_ptr<float>(), Hb + i * d_, d_, eps_);
      mm(L.qkv, Hb, n, QKV);
      for (int64_t i = 0; i < n; ++i) {
        float* r = QKV + i * nqkv;
        const float* cs = R + i * hd_;
        if (L.qkv_bias.defined()) {
          const float* b = L.qkv_bias.data_ptr<float>();
          for (int64_t t = 0; t < nqkv; ++t) r[t] += b[t];
        }
        if (L.q_norm.defined())  // per head, before RoPE
          for (int64_t hh = 0; hh < H_ + KV_; ++hh) {
            float* p = r + hh * hd_;
            rms_norm(p, (hh < H_ ? L.q_norm : L.k_norm).data_ptr<float>(), p, hd_, eps_);
          }
        for (int64_t hh = 0; hh < H_ + KV_; ++hh) {  // RoPE on q and k heads: pairs (a, b) * (cos + i sin)
          float* p = r + hh * hd_;
          for (int64_t j = 0; j < half; ++j) {
            const float a = p[2 * j], b = p[2 * j + 1], c = cs[2 * j], s = cs[2 * j + 1];
            p[2 * j] = a * c - b * s;
            p[2 * j + 1] = a * s + b * c;
          }
        }
        const int64_t s = seq_of[i], cap = caps[s];
        for (int64_t g = 0; g < KV_; ++g) {
          std::memcpy(Ks[s] + (g * cap + slot[i]) * hd_, r + nq + g * hd_, hd_ * sizeof(float));
          std::memcpy(Vs[s] + (g * cap + slot[i]) * hd_, r + nq + (KV_ + g) * hd_, hd_ * sizeof(float));
        }
      }
      // Attention, one (row, head) at a time over the row's keys in decoding order, in its own sequence's cache.
      at::parallel_for(0, n * H_, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> sc(longest + 16);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / H_, hh = t % H_, g = hh / group, s = seq_of[i], cap = caps[s];
          adaspec::attend(QKV + i * nqkv + hh * hd_, Ks[s] + g * cap * hd_, Vs[s] + g * cap * hd_, keys[i].data(),
                          (int64_t)keys[i].size(), hd_, scale, ATT + i * nq + hh * hd_, sc.data());
        }
      });
      mm(L.o, ATT, n, Y);
      for (int64_t e = 0; e < n * d_; ++e) X[e] += Y[e];
      for (int64_t i = 0; i < n; ++i) rms_norm(X + i * d_, L.mlp_norm.data_ptr<float>(), Hb + i * d_, d_, eps_);
      mm(L.gate_up, Hb, n, GU);
      for (int64_t i = 0; i < n; ++i) adaspec::silu_mul(GU + i * 2 * I_, GU + i * 2 * I_ + I_, ACT + i * I_, I_);
      mm(L.down, ACT, n, Y);
      for (int64_t e = 0; e < n * d_; ++e) X[e] += Y[e];
    }
    return x;
  }

  int64_t num_layers() const { return (int64_t)layers_.size(); }

 private:
  at::Tensor vec(const at::Tensor& t, int64_t size) const {
    TORCH_CHECK(t.numel() == size, "adaspec decoder: a norm weight of ", t.numel(), " values, expected ", size);
    return t.to(at::kFloat).contiguous();
  }

  // out[n, p.out] = x[n, p.in] @ W^T, part by part.
  static void mm(const Proj& p, const float* x, int64_t n, float* out) {
    int64_t at = 0;
    for (const Part& part : p.parts) {
      const uint8_t* w = part.blocks.data_ptr<uint8_t>();
      if (part.int8)
        adaspec::qmm8_into(x, n, p.in, w, part.kind, out + at, p.out, part.rows);
      else
        adaspec::qmm_into(x, n, p.in, w, part.blocks.size(1), part.kind, out + at, p.out, part.rows);
      at += part.rows;
    }
  }

  int64_t H_, KV_, hd_, d_, I_;
  float eps_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY(adaspec_kernels, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>())
      .def("add_layer", &Decoder::add_layer)
      .def("add_part", &Decoder::add_part)
      .def("forward", &Decoder::forward)
      .def("forward_batch", &Decoder::forward_batch)
      .def("num_layers", &Decoder::num_layers);
}
