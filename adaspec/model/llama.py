"""A Llama-architecture target written for speculative decoding.

It works on token ids only, keeps its KV cache in one preallocated tensor per
sequence, and runs a chain or a token tree of new tokens in one forward with a
tree attention mask. Weights use the Hugging Face layout (``q_proj`` etc.);
the projections are fused (``qkv``, ``gate_up``) so a layer costs four matrix
products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .base import ForwardOutput


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_context: int = 2048
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict."""
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            max_context=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        )


# A projection: x [n, in] -> [n, out]. Plain fp32 by default; model/quant.py swaps in faster kernels.
Linear = Callable[[torch.Tensor], torch.Tensor]


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()  # [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LlamaCache:
    """KV cache of one sequence: ``k``/``v`` are [layers, kv_heads, capacity, head_dim]."""

    def __init__(self, cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, capacity: int = 256):
        self.cfg = cfg
        self.capacity = min(capacity, cfg.max_context)
        shape = (cfg.num_layers, cfg.num_kv_heads, self.capacity, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions after the committed ones (grows by doubling)."""
        need = self._length + n
        if need > self.cfg.max_context:
            raise ValueError(f"sequence of {need} tokens exceeds the model context of {self.cfg.max_context}")
        if need <= self.capacity:
            return
        cap = min(max(need, 2 * self.capacity), self.cfg.max_context)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[:2] + (cap,) + old.shape[3:])
            new[:, :, : self._length] = old[:, :, : self._length]
            setattr(self, name, new)
        self.capacity = cap

    def commit(self, keep: Sequence[int]) -> None:
        keep = [int(i) for i in keep]
        m, start = len(keep), self._length
        if keep != list(range(m)):  # a tree path: gather the kept rows down to the committed prefix
            idx = torch.tensor(keep, device=self.k.device) + start
            self.k[:, :, start : start + m] = self.k[:, :, idx]
            self.v[:, :, start : start + m] = self.v[:, :, idx]
        self._length = start + m

    def truncate(self, length: int) -> None:
        self._length = max(0, min(self._length, length))


def tree_layout(parents: Sequence[int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depth (0-based) of every new token, and its [n, n] ancestor-or-self mask (None for a chain)."""
    if parents is None or list(parents) == list(range(-1, n - 1)):
        return torch.arange(n), None
    depth = torch.zeros(n, dtype=torch.long)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise ValueError("tree parents must point to earlier tokens")
            depth[i] = depth[p] + 1
            anc[i] |= anc[p]
    return depth, anc


class LlamaModel:
    """Weights plus the forward pass. Stateless across sequences: state lives in ``LlamaCache``."""

    def __init__(self, cfg: LlamaConfig, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.max_context = cfg.max_context
        w = {k: v.to(self.device, dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # [vocab, d]
        self.norm = w["model.norm.weight"]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            qkv = torch.cat([w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                             w[p + "self_attn.v_proj.weight"]])
            gate_up = torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
            self.layers.append({
                "attn_norm": w[p + "input_layernorm.weight"],
                "mlp_norm": w[p + "post_attention_layernorm.weight"],
                "qkv": DenseLinear(qkv),
                "o": DenseLinear(w[p + "self_attn.o_proj.weight"]),
                "gate_up": DenseLinear(gate_up),
                "down": DenseLinear(w[p + "mlp.down_proj.weight"]),
            })
        head = self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in w else w["lm_head.weight"]
        self.lm_head: Linear = DenseLinear(head)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        pos = torch.arange(cfg.max_context, dtype=torch.float64)[:, None] * inv_freq[None]
        emb = torch.cat([pos, pos], dim=-1)
        self._cos = emb.cos().to(self.device, dtype)  # [max_context, head_dim]
        self._sin = emb.sin().to(self.device, dtype)

    @classmethod
    def random(cls, cfg: LlamaConfig, seed: int = 0, device: str = "cpu") -> "LlamaModel":
        """A randomly initialised model, for tests."""
        g = torch.Generator().manual_seed(seed)
        d, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

        w = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, d, generator=g),
             "model.norm.weight": torch.ones(d)}
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            w[p + "input_layernorm.weight"] = torch.ones(d)
            w[p + "post_attention_layernorm.weight"] = torch.ones(d)
            w[p + "self_attn.q_proj.weight"] = r(cfg.num_heads * hd, d)
            w[p + "self_attn.k_proj.weight"] = r(cfg.num_kv_heads * hd, d)
            w[p + "self_attn.v_proj.weight"] = r(cfg.num_kv_heads * hd, d)
            w[p + "self_attn.o_proj.weight"] = r(d, cfg.num_heads * hd)
            w[p + "mlp.gate_proj.weight"] = r(inter, d)
            w[p + "mlp.up_proj.weight"] = r(inter, d)
            w[p + "mlp.down_proj.weight"] = r(d, inter)
        return cls(cfg, w, device=device)

    # -- the protocol -------------------------------------------------------------------------

    def new_cache(self, capacity: int = 256) -> LlamaCache:
        return LlamaCache(self.cfg, self.device, self.dtype, capacity)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids]

    @torch.inference_mode()
    def prefill(self, cache: LlamaCache, tokens: Sequence[int], chunk: int = 512) -> ForwardOutput:
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        for s in range(0, len(tokens), chunk):
            part = tokens[s : s + chunk]
            last = s + chunk >= len(tokens)
            out = self._run(cache, part, None, logits_rows=slice(-1, None) if last else slice(0, 0))
            cache.commit(range(len(part)))
        return out

    @torch.inference_mode()
    def forward(self, cache: LlamaCache, tokens: Sequence[int], parents: Sequence[int] | None = None) -> ForwardOutput:
        return self._run(cache, tokens, parents, logits_rows=slice(None))

    # -- the computation ----------------------------------------------------------------------

    def _run(self, cache: LlamaCache, tokens: Sequence[int], parents: Sequence[int] | None,
             logits_rows: slice) -> ForwardOutput:
        cfg = self.cfg
        n, start = len(tokens), cache.length
        if n == 0:
            raise ValueError("forward needs at least one token")
        cache.reserve(n)
        depth, anc = tree_layout(parents, n)
        pos = (depth + start).to(self.device)
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]  # [n, 1, hd]
        end = start + n
        if n == 1:
            mask = None
        else:
            if anc is None:
                anc = torch.ones(n, n, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(n, start, dtype=torch.bool), anc], dim=1).to(self.device)  # [n, end]
        H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.embed[torch.as_tensor(list(tokens), device=self.device)]  # [n, d]
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (cfg.hidden_size,), L["attn_norm"], cfg.rms_norm_eps)
            qkv = L["qkv"](h)  # [n, (H + 2 KV) hd]
            q = qkv[:, : H * hd].view(n, H, hd)
            k = qkv[:, H * hd : (H + KV) * hd].view(n, KV, hd)
            v = qkv[:, (H + KV) * hd :].view(n, KV, hd)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[li, :, start:end] = k.transpose(0, 1)
            cache.v[li, :, start:end] = v.transpose(0, 1)
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], cache.k[li, :, :end][None], cache.v[li, :, :end][None],
                attn_mask=mask, enable_gqa=True)  # [1, H, n, hd]
            x = x + L["o"](att[0].transpose(0, 1).reshape(n, H * hd))
            h = F.rms_norm(x, (cfg.hidden_size,), L["mlp_norm"], cfg.rms_norm_eps)
            gu = L["gate_up"](h)  # [n, 2 I]
            g, u = gu.chunk(2, dim=-1)
            x = x + L["down"](F.silu(g) * u)
        hidden = F.rms_norm(x, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps)  # [n, d]
        hidden = hidden[logits_rows]
        logits = self.lm_head(hidden).float() if hidden.shape[0] else hidden.new_zeros(0, cfg.vocab_size)
        return ForwardOutput(logits=logits, hidden=hidden)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)
