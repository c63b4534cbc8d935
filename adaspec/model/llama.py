"""A Llama-architecture target written for speculative decoding (Llama 2/3, Qwen2, Qwen3: one decoder whose
differences are fields of :class:`LlamaConfig`).

It works on token ids only, keeps its KV cache in one preallocated tensor per sequence, and runs a chain or a token
tree of new tokens in one forward that is row independent bit for bit, so greedy speculation over this target
reproduces plain greedy decoding exactly. How, and the weight layout it uses, on :class:`LlamaModel`.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .base import Capabilities, ForwardOutput
from .quant import DenseLinear, GGUFBlocks, Linear, QLinear, kernels_take, make_linear

__all__ = ["ARCHITECTURES", "LlamaConfig", "llama3_freq_factors", "LlamaCache", "LlamaModel", "Linear", "DenseLinear",
           "tree_layout"]


ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""Model families the decoder computes; what differs between them is data in :class:`LlamaConfig`."""


@dataclass
class LlamaConfig:
    """Dimensions and architecture features of the one decoder that runs Llama 2/3, Qwen2 and Qwen3 models.

    Each family is the same pre-norm decoder (RMSNorm, grouped-query attention with RoPE, SwiGLU MLP); the
    fields after ``tie_word_embeddings`` say where a family departs from plain Llama.
    """

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
    head_dim: int = 0
    """Width of one attention head; 0 means ``hidden_size / num_heads``. Qwen3 sets it explicitly (attention is
    ``num_heads * head_dim`` wide, which need not be ``hidden_size``)."""
    qkv_bias: bool = False
    """The q, k and v projections add a bias (Qwen2; its output projection has none)."""
    qk_norm: bool = False
    """q and k are RMS-normalised per head (over ``head_dim``, own weights, ``rms_norm_eps``) before RoPE (Qwen3)."""
    rope_freq_factors: tuple[float, ...] | None = None
    """Per rotated pair (``head_dim / 2`` values), the divisor of RoPE's inverse frequency: Llama 3.x's long-context
    scaling, as a GGUF stores it (``rope_freqs.weight``) and as :func:`llama3_freq_factors` computes it from a
    Hugging Face ``rope_scaling`` of type ``llama3``. ``None``: plain RoPE."""
    architecture: str = "llama"
    """The family's name (one of ``ARCHITECTURES``), for messages and configs; the fields above carry the
    differences."""

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.rope_freq_factors is not None:
            self.rope_freq_factors = tuple(float(f) for f in self.rope_freq_factors)
            if len(self.rope_freq_factors) != self.head_dim // 2:
                raise ValueError(f"{len(self.rope_freq_factors)} RoPE frequency factors for a head of "
                                 f"{self.head_dim} (need {self.head_dim // 2})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict (``model_type`` llama, qwen2 or qwen3); ``ValueError`` for
        what this implementation does not compute.

        Qwen2 always has q/k/v biases, Qwen3 always has q/k norms; Llama 3.x's ``rope_scaling`` of type
        ``llama3`` becomes ``rope_freq_factors`` (adaspec's GGUF converter writes those factors as they are, under
        ``rope_freq_factors``)."""
        arch = cfg.get("model_type") or "llama"
        rope = _rope(cfg)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            factors = cfg.get("rope_freq_factors")
            if rope_type == "llama3":
                factors = llama3_freq_factors(head_dim, theta, rope)
            out = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=theta,
                max_context=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=head_dim,
                qkv_bias=arch == "qwen2",
                qk_norm=arch == "qwen3",
                rope_freq_factors=factors,
                architecture=arch,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.json has an invalid value: {e}") from None
        problems = []
        if arch not in ARCHITECTURES:
            problems.append(f"model type {arch!r} (only {', '.join(ARCHITECTURES)})")
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {cfg['hidden_act']!r} (only silu)")
        if (cfg.get("attention_bias") and arch != "qwen2") or cfg.get("mlp_bias"):
            problems.append("biases in the attention output or MLP")
        if rope_type not in ("default", "llama3"):
            problems.append(f"RoPE scaling {rope_type!r}")
        if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1.0:
            problems.append("partial RoPE")
        if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or ()):
            problems.append("sliding-window attention")
        if out.num_heads % out.num_kv_heads or out.head_dim % 2:
            problems.append("an odd head dimension, or kv heads not dividing heads")
        if problems:
            raise ValueError(f"unsupported {arch} variant: " + "; ".join(problems))
        return out


def llama3_freq_factors(head_dim: int, theta: float, scaling: Mapping) -> tuple[float, ...]:
    """Llama 3.x's RoPE scaling as divisors of the inverse frequencies (transformers'
    ``_compute_llama3_parameters``, llama.cpp's ``rope_freqs``): wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` stay, those longer than ``... / low_freq_factor``
    are stretched by ``factor``, and those between are interpolated smoothly.
    ``scaling`` holds ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``."""
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def _rope(cfg: dict) -> dict:
    """RoPE settings: transformers 5 nests them in ``rope_parameters``, older configs use ``rope_scaling``."""
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


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

    @torch.inference_mode()
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

    @torch.inference_mode()  # the tensors may have been (re)allocated inside a forward, i.e. in inference mode
    def commit(self, keep: Sequence[int]) -> None:
        keep = [int(i) for i in keep]
        m, start = len(keep), self._length
        if start + m > self.capacity:
            raise ValueError(f"commit of {m} rows after {start} exceeds the last forward")
        if keep != list(range(m)):  # a tree path: gather the kept rows down to the committed prefix
            idx = torch.tensor(keep, device=self.k.device) + start
            self.k[:, :, start : start + m] = self.k[:, :, idx]
            self.v[:, :, start : start + m] = self.v[:, :, idx]
        self._length = start + m

    def truncate(self, length: int) -> None:
        self._length = max(0, min(self._length, length))

    @torch.inference_mode()
    def fork(self) -> "LlamaCache":
        """A copy of this cache (same capacity and committed positions) that goes on on its own."""
        other = LlamaCache.__new__(LlamaCache)
        other.cfg, other.capacity, other._length = self.cfg, self.capacity, self._length
        other.k, other.v = self.k.clone(), self.v.clone()
        return other


def tree_layout(parents: Sequence[int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depth (0-based) of every new token, and its [n, n] ancestor-or-self mask (None for a chain)."""
    if parents is None or list(parents) == list(range(-1, n - 1)):
        return torch.arange(n), None
    if len(parents) != n:
        raise ValueError(f"{len(parents)} parents for {n} tokens")
    depth = torch.zeros(n, dtype=torch.long)
    anc = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            if p >= i:
                raise ValueError("tree parents must point to earlier tokens")
            depth[i] = depth[p] + 1
            anc[i] |= anc[p]
    return depth, anc


BULK_ROWS = 16  # prefill chunks of at least this many tokens use the projections' ``bulk`` form when they have one


def _call(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return lin(x)


def _bulk_call(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return getattr(lin, "bulk", lin)(x)


def _key_rows(anc: torch.Tensor | None, n: int, start: int, device: torch.device) -> list[slice | torch.Tensor]:
    """Cache slots each new token attends to, in the order a one-token-at-a-time decode holds them.

    The committed prefix, then the token's ancestors and itself root first (tree
    nodes come after their parents, so ascending indices are root-first). A
    chain, or a tree path that is the first nodes, is a contiguous slice (a view);
    other tree paths are gathered.
    """
    if anc is None:
        return [slice(0, start + i + 1) for i in range(n)]
    out: list[slice | torch.Tensor] = []
    prefix = torch.arange(start)
    for i in range(n):
        path = anc[i].nonzero().flatten()  # ancestors-or-self, root first
        if int(path[-1]) == len(path) - 1:  # exactly nodes 0..i-th: contiguous
            out.append(slice(0, start + len(path)))
        else:
            out.append(torch.cat([prefix, path + start]).to(device))
    return out


def _pair_rows(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns each head's halves ``[x_0..x_{h/2-1} | y_0..]`` into pairs ``x_0 y_0 x_1 y_1 ...``."""
    half = head_dim // 2
    within = torch.arange(head_dim).view(2, half).T.reshape(-1)  # [0, h/2, 1, h/2 + 1, ...]
    return (torch.arange(num_heads)[:, None] * head_dim + within[None]).reshape(-1)


@dataclass
class _Layer:
    attn_norm: torch.Tensor  # [d]
    mlp_norm: torch.Tensor  # [d]
    qkv: Linear  # [d] -> [(H + 2 KV) hd], q and k rows in RoPE pair order
    o: Linear  # [H hd] -> [d]
    gate_up: Linear  # [d] -> [2 I]
    down: Linear  # [I] -> [d]
    qkv_bias: torch.Tensor | None = None  # [(H + 2 KV) hd] fp32, in qkv's row order (q and k parts in pair order)
    q_norm: torch.Tensor | None = None  # [hd] fp32, per-head RMSNorm weight of q, in pair order
    k_norm: torch.Tensor | None = None  # [hd] fp32, the same for k


class LlamaModel:
    """Weights plus the forward pass. Stateless across sequences: state lives in ``LlamaCache``.

    ``weights`` are Hugging Face tensors by name; ``blocks`` optionally holds raw
    GGUF blocks for some of them (in Hugging Face row order), which the ``gguf``
    and ``int4`` precisions use as they are. ``precision`` picks the projection kernels
    (``model/quant.py``); ``dtype`` is the dtype of activations and KV cache.
    With ``int4`` the LM head stays exact fp32: it is the one projection where
    fp32 through oneDNN is faster than the int4 kernel for more than two rows.

    It works on token ids only, keeps its KV cache in one preallocated tensor per
    sequence, and runs a chain or a token tree of new tokens in one forward. That
    forward is row independent bit for bit: row i of a k-token (chain or tree)
    forward equals the one-token forward of that token after its path, because the
    projections are row independent and each row attends to its own keys, in
    decoding order, in its own attention call. Greedy speculation over this target
    therefore reproduces plain greedy decoding exactly, with no near-tie caveat.

    Weights come in the Hugging Face layout (``q_proj`` etc.) and are rearranged
    once at load:

    * the projections are fused (``qkv``, ``gate_up``), so a layer costs four
      matrix products, each a ``Linear`` from ``model/quant.py`` (fp32, int4 or
      half precision);
    * the rows of ``q_proj``/``k_proj`` are reordered so that the two halves that
      RoPE rotates together become adjacent pairs (llama.cpp's GGUF order for
      ``llama``). RoPE is then one complex multiplication, ``(a + ib) * e^{i pos theta_j}``,
      which is the same arithmetic as Hugging Face's ``q * cos + rotate_half(q) * sin``;
    * what q and k meet before RoPE is reordered with them: the q/k biases (Qwen2)
      with the rows, the per-head norm weights (Qwen3) with each head's entries (an
      RMS norm does not depend on the order of what it normalises).
    """

    backend = "torch"
    backend_reason = ""  # why the loader chose this backend

    def __init__(self, cfg: LlamaConfig, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, precision: str = "fp32",
                 blocks: Mapping[str, GGUFBlocks] | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.precision = precision
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.max_context = cfg.max_context
        # half precision on an accelerator may pick matmul kernels by batch size; every other scheme is row exact
        self.capabilities = Capabilities(trees=True, hidden_states=True, rows_exact=precision not in ("bf16", "fp16"))
        blocks = dict(blocks or {})

        def dense(name: str) -> torch.Tensor:
            if name in weights:
                return weights[name]
            if name in blocks:
                return blocks[name].dequantize()
            raise KeyError(f"missing weight {name}")

        def small(name: str) -> torch.Tensor:
            return dense(name).to(self.device, dtype)

        def fp32(name: str, order: torch.Tensor | None = None) -> torch.Tensor:
            t = dense(name).float()
            return (t if order is None else t[order]).to(self.device)

        self.embed = small("model.embed_tokens.weight")  # [vocab, d], dequantised once
        self.norm = small("model.norm.weight")
        H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_rows, k_rows, head_pairs = _pair_rows(H, hd), _pair_rows(KV, hd), _pair_rows(1, hd)

        def fused(names: Sequence[str], rows: Sequence[torch.Tensor | None]) -> Linear:
            if precision in ("int4", "gguf", "q8") and all(n in blocks for n in names):  # the file's blocks
                parts = [blocks[n] if r is None else blocks[n].rows(r) for n, r in zip(names, rows)]
                return make_linear(precision, blocks=parts, device=self.device)
            parts = [dense(n) if r is None else dense(n)[r] for n, r in zip(names, rows)]
            return make_linear(precision, weight=torch.cat(parts).float(), device=self.device)

        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(_Layer(
                attn_norm=small(p + "input_layernorm.weight"),
                mlp_norm=small(p + "post_attention_layernorm.weight"),
                qkv=fused([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], [q_rows, k_rows, None]),
                o=fused([a + "o_proj.weight"], [None]),
                gate_up=fused([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], [None, None]),
                down=fused([p + "mlp.down_proj.weight"], [None]),
                qkv_bias=torch.cat([fp32(a + "q_proj.bias", q_rows), fp32(a + "k_proj.bias", k_rows),
                                    fp32(a + "v_proj.bias")]) if cfg.qkv_bias else None,
                q_norm=fp32(a + "q_norm.weight", head_pairs) if cfg.qk_norm else None,
                k_norm=fp32(a + "k_norm.weight", head_pairs) if cfg.qk_norm else None,
            ))
        tied = cfg.tie_word_embeddings or ("lm_head.weight" not in weights and "lm_head.weight" not in blocks)
        head_blocks = blocks.get("model.embed_tokens.weight" if tied else "lm_head.weight")
        self.lm_head: Linear
        if kernels_take(head_blocks, precision, self.device):  # the file's blocks, no dense copy
            self.lm_head = QLinear(head_blocks, int8=precision == "q8")
        else:
            head = self.embed if tied else small("lm_head.weight")
            self.lm_head = make_linear("fp32" if precision == "int4" else precision, weight=head, device=self.device,
                                       keep_weight=True)  # .weight: a tied head shares the embedding
        self._decoder = self._compiled_decoder()
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # [hd / 2]
        if cfg.rope_freq_factors is not None:  # Llama 3.x: theta_j / factor_j, as llama.cpp applies rope_freqs
            inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64)
        self._inv_freq = inv_freq
        self._cis = torch.zeros(0, hd // 2, dtype=torch.complex64, device=self.device)  # [positions, hd / 2]

    def _compiled_decoder(self):
        """The layers as one compiled call (``adaspec/kernels/decoder.cpp``) when every projection runs on the
        compiled kernels, else ``None`` (the layers then run op by op in torch)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or \
                not all(isinstance(p, QLinear) for L in self.layers for p in (L.qkv, L.o, L.gate_up, L.down)):
            return None
        c = self.cfg
        dec = torch.classes.adaspec_kernels.Decoder(c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size,
                                                    c.intermediate_size, c.rms_norm_eps)
        none = torch.empty(0)
        for L in self.layers:
            dec.add_layer(L.attn_norm, L.mlp_norm, none if L.qkv_bias is None else L.qkv_bias,
                          none if L.q_norm is None else L.q_norm, none if L.k_norm is None else L.k_norm)
            for which, proj in enumerate((L.qkv, L.o, L.gate_up, L.down)):
                for code, data, rows in proj.parts:
                    dec.add_part(which, data, code, rows, proj.int8)
        return dec

    @classmethod
    def random(cls, cfg: LlamaConfig, seed: int = 0, device: str = "cpu", precision: str = "fp32") -> "LlamaModel":
        """A randomly initialised model, for tests (with q/k/v biases and q/k norms where ``cfg`` has them)."""
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
            if cfg.qkv_bias:
                for name, rows in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
                    w[p + f"self_attn.{name}_proj.bias"] = torch.randn(rows * hd, generator=g) / 2
            if cfg.qk_norm:
                for name in ("q", "k"):
                    w[p + f"self_attn.{name}_norm.weight"] = 0.5 + torch.rand(hd, generator=g)
        if not cfg.tie_word_embeddings:
            w["lm_head.weight"] = r(cfg.vocab_size, d)
        blocks: dict[str, GGUFBlocks] = {}
        if precision in ("gguf", "q8"):  # the layout of a GGUF file: 4/5-bit projections, 8-bit embedding and head
            for name in list(w):
                if name.endswith("proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight"):
                    kind = "Q8_0" if not name.endswith("proj.weight") else "Q4_1" if precision == "gguf" else \
                        "Q8_0" if name.endswith("v_proj.weight") else "Q5_0"  # q8: qkv in two parts, as in Q4_K_M
                    blocks[name] = GGUFBlocks.quantize(w[name], kind)
                    w[name] = blocks[name].dequantize()
        return cls(cfg, w, device=device, precision=precision, blocks=blocks)

    # -- weight updates -----------------------------------------------------------------------

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor :meth:`update_weights` takes: the Hugging Face names the constructor reads
        (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ..., ``lm_head.weight``
        for an untied head), in Hugging Face row order."""
        c = self.cfg
        d, hd, inter = c.hidden_size, c.head_dim, c.intermediate_size
        q, kv = c.num_heads * hd, c.num_kv_heads * hd
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                        a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
                        a + "o_proj.weight": (d, q), p + "mlp.gate_proj.weight": (inter, d),
                        p + "mlp.up_proj.weight": (inter, d), p + "mlp.down_proj.weight": (d, inter)})
            if c.qkv_bias:
                out.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
            if c.qk_norm:
                out.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
        if not self._tied():
            out["lm_head.weight"] = (c.vocab_size, d)
        return out

    @torch.no_grad()
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace every weight with ``state_dict``'s (same architecture, :meth:`weight_shapes` names and shapes).
        The model then computes bit for bit what the constructor builds from these tensors on its device, dtype
        and precision (from the blocks described below, where it runs on GGUF blocks).

        ``ValueError`` (nothing changed) lists every missing, unexpected, misshapen, non-float or non-finite
        tensor. A tied model also accepts ``lm_head.weight`` when it equals the embedding (Hugging Face state
        dicts of tied models carry both names). The tensors may live on any device and require grad; the model
        keeps copies, never the caller's tensors.

        Every precision accepts updates. The projections are rebuilt from the new weights as at load: fused,
        RoPE-reordered, prepacked for oneDNN (``fp32``), quantised (``int4``), and the compiled decoder is rebuilt.
        Where a projection or a head runs on GGUF blocks (``q8``, ``gguf``), the new weight is quantised into
        the block type it has now (``GGUFBlocks.quantize``; the K-quants by plain min/max recipes, not
        llama.cpp's search), and a tied embedding is the dequantised blocks of its head, as at load; an untied
        embedding (a table lookup) takes the new values as given. The embedding tensor is overwritten in place,
        so whatever shares it (a draft head reads the target's embedding) sees the new one. Building takes
        about what loading a converted model takes (re-quantising included: ~1.5 s for the bundled 135M model in
        ``q8`` on 2 cores) and holds a second copy of the projections until it is done. Run it between forwards:
        a KV cache filled before the update holds keys and values of the old weights.
        """
        weights = self._checked_weights(state_dict)
        blocks: dict[str, GGUFBlocks] = {}
        for name, kind in self._block_kinds().items():
            blocks[name] = GGUFBlocks.quantize(weights.pop(name).float().cpu(), kind)
        fresh = LlamaModel(self.cfg, weights, self.device, self.dtype, self.precision, blocks)
        with torch.inference_mode():  # the embedding may have been created in inference mode
            self.embed.copy_(fresh.embed)
        if fresh.lm_head.weight is fresh.embed:  # a tied dense head keeps sharing the one embedding
            fresh.lm_head.weight = self.embed
        self.norm, self.layers, self.lm_head, self._decoder = fresh.norm, fresh.layers, fresh.lm_head, fresh._decoder

    def _tied(self) -> bool:
        return self.cfg.tie_word_embeddings or getattr(self.lm_head, "weight", None) is self.embed

    def _checked_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` checked against :meth:`weight_shapes`, detached; ``ValueError`` listing what is wrong."""
        want = self.weight_shapes()
        given = dict(state_dict)
        tied_head = given.pop("lm_head.weight", None) if "lm_head.weight" not in want else None
        problems: list[str] = []

        def listed(what: str, names: list[str]) -> None:
            if names:
                more = f" and {len(names) - 8} more" if len(names) > 8 else ""
                problems.append(f"{len(names)} {what}: {', '.join(names[:8])}{more}")

        listed("missing", [n for n in want if n not in given])
        listed("unexpected", sorted(n for n in given if n not in want))
        bad = []
        for name, shape in want.items():
            if name not in given:
                continue
            t = given[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                bad.append(f"{name} is {type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}, "
                           "not a float tensor")
            elif tuple(t.shape) != shape:
                bad.append(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            elif not bool(torch.isfinite(t).all()):
                bad.append(f"{name} holds NaN or infinite values")
        listed("wrong", bad)
        if tied_head is not None and not problems:
            embed = given["model.embed_tokens.weight"]
            if not (isinstance(tied_head, torch.Tensor) and tied_head.shape == embed.shape
                    and torch.equal(tied_head.to(embed.device, embed.dtype), embed)):
                problems.append("lm_head.weight differs from model.embed_tokens.weight, but the model ties them")
        if problems:
            raise ValueError(f"the weights do not fit this {self.cfg.architecture} model (Hugging Face names, "
                             f"LlamaModel.weight_shapes()): " + "; ".join(problems))
        # projections are copied when they are fused; the others are copied here so none aliases the caller's
        return {n: given[n].detach() if n.endswith("proj.weight") else given[n].detach().clone() for n in want}

    def _block_kinds(self) -> dict[str, str]:
        """Name -> GGUF block type of every weight that runs on GGUF blocks now (the kernels' projections)."""
        from ..kernels import KINDS

        kind_of = {code: kind for kind, code in KINDS.items()}
        shapes = self.weight_shapes()
        out: dict[str, str] = {}

        def walk(lin: Linear, names: Sequence[str]) -> None:
            if not isinstance(lin, QLinear):
                return
            ends = list(itertools.accumulate(rows for _, _, rows in lin.parts))  # a part is whole weights
            at = 0
            for name in names:
                out[name] = kind_of[lin.parts[bisect.bisect_right(ends, at)][0]]
                at += shapes[name][0]

        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            walk(L.qkv, [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"])
            walk(L.o, [a + "o_proj.weight"])
            walk(L.gate_up, [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
            walk(L.down, [p + "mlp.down_proj.weight"])
        walk(self.lm_head, ["model.embed_tokens.weight" if self._tied() else "lm_head.weight"])
        return out

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
            out = self._run(cache, part, None, logits_rows=slice(-1, None) if last else slice(0, 0),
                            bulk=len(part) >= BULK_ROWS)
            cache.commit(range(len(part)))
        return out

    @torch.inference_mode()
    def forward(self, cache: LlamaCache, tokens: Sequence[int], parents: Sequence[int] | None = None) -> ForwardOutput:
        return self._rows([(cache, tokens, parents)])[0]

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[tuple[LlamaCache, Sequence[int], Sequence[int] | None]]
                      ) -> list[ForwardOutput]:
        """One forward over several sequences: item i is ``(cache, tokens, parents)`` as ``forward`` takes them, and
        output i is bit for bit what ``forward`` gives for it alone, whatever else is in the batch (each row is
        computed as in a one-sequence forward; the projections just take every sequence's rows at once)."""
        return self._rows(items)

    # -- the computation ----------------------------------------------------------------------

    def _rope_table(self, positions: int) -> torch.Tensor:
        """``e^{i pos theta_j}`` for ``pos < positions`` ([positions, hd / 2] complex64), grown by doubling."""
        if positions > self._cis.shape[0]:
            size = min(max(positions, 2 * self._cis.shape[0], 256), max(positions, self.cfg.max_context))
            angle = torch.arange(size, dtype=torch.float64)[:, None] * self._inv_freq[None]
            self._cis = torch.polar(torch.ones_like(angle), angle).to(self.device, torch.complex64)
        return self._cis

    def _run(self, cache: LlamaCache, tokens: Sequence[int], parents: Sequence[int] | None,
             logits_rows: slice, bulk: bool = False) -> ForwardOutput:
        """A prefill chunk: the row-exact forward (``_rows``), or with ``bulk`` one causal attention call and the
        projections' many-row form (prefill is shared by every decoding of the prompt, so it need not match a
        one-token forward, only be the same whenever the prompt is the same)."""
        if not bulk:
            out = self._rows([(cache, tokens, parents)])[0]
            return ForwardOutput(out.logits[logits_rows], out.hidden[logits_rows])
        cfg = self.cfg
        n, start = len(tokens), cache.length
        ids = self._ids(tokens)
        cache.reserve(n)
        depth, anc = tree_layout(parents, n)
        end = start + n
        cis = self._rope_table(end)[(depth + start).to(self.device)][:, None]  # [n, 1, hd / 2]
        mask = None
        if n > 1:
            causal = torch.ones(n, n, dtype=torch.bool).tril() if anc is None else anc
            mask = torch.cat([torch.ones(n, start, dtype=torch.bool), causal], dim=1).to(self.device)  # [n, end]

        def attention(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = cache.k[li], cache.v[li]  # [KV, capacity, hd]
            kc[:, start:end] = k.transpose(0, 1)
            vc[:, start:end] = v.transpose(0, 1)
            return F.scaled_dot_product_attention(q.transpose(0, 1)[None], kc[None, :, :end], vc[None, :, :end],
                                                  attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)  # [n, H, hd]

        x = self._layers(self.embed[ids.to(self.device)], cis, attention, _bulk_call)
        hidden = F.rms_norm(x, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps)[logits_rows]  # [rows, d]
        logits = self.lm_head(hidden).float() if hidden.shape[0] else hidden.new_zeros(0, cfg.vocab_size).float()
        return ForwardOutput(logits=logits, hidden=hidden)

    def _ids(self, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) == 0:
            raise ValueError("forward needs at least one token")
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size})")
        return ids

    def _rows(self, items: Sequence[tuple[LlamaCache, Sequence[int], Sequence[int] | None]]) -> list[ForwardOutput]:
        """The row-exact forward of one or more sequences.

        Every row is computed exactly (bit for bit) as a one-token forward after its
        ancestors would compute it, whatever else is in the call: the projections
        are row independent, and each row attends in its own call to its own
        sequence's keys, in decoding order (``_key_rows``). One masked attention
        call over all rows would be cheaper but reduces in a different order, and
        the int4 path's bf16 rounding turns those last-bit differences into logit
        differences of ~0.3.
        """
        cfg = self.cfg
        if not items:
            return []
        if len({id(c) for c, _, _ in items}) != len(items):
            raise ValueError("a cache appears twice in one batch")
        ids, starts, counts, ancs, pos = [], [], [], [], []
        for cache, tokens, parents in items:
            ids.append(self._ids(tokens))
            n = len(tokens)
            depth, anc = tree_layout(parents, n)
            cache.reserve(n)
            starts.append(cache.length)
            counts.append(n)
            ancs.append(anc)
            pos.append(depth + cache.length)
        pos_all = torch.cat(pos)
        cis = self._rope_table(int(pos_all.max()) + 1)[pos_all.to(self.device)][:, None]  # [N, 1, hd / 2]
        x = self.embed[torch.cat(ids).to(self.device)]  # [N, d]
        if self._decoder is not None:  # the compiled layers find each row's keys themselves
            rope = torch.view_as_real(cis[:, 0]).contiguous()  # [N, hd / 2, 2]: cos, sin
            none = torch.empty(0, dtype=torch.bool)
            x = self._decoder.forward_batch(x.contiguous(), rope, [c.k for c, _, _ in items], [c.v for c, _, _ in items],
                                            starts, counts, [none if a is None else a for a in ancs])
        else:
            seg = [(c, s, n, _key_rows(a, n, s, self.device)) for (c, _, _), s, n, a in zip(items, starts, counts, ancs)]

            def attention(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                out, at = [], 0
                for cache, start, n, rows in seg:
                    kc, vc = cache.k[li], cache.v[li]  # [KV, capacity, hd]
                    kc[:, start:start + n] = k[at:at + n].transpose(0, 1)
                    vc[:, start:start + n] = v[at:at + n].transpose(0, 1)
                    for i, r in enumerate(rows):
                        qi = q[at + i][:, None][None]  # [1, H, 1, hd]
                        out.append(F.scaled_dot_product_attention(qi, kc[None, :, r], vc[None, :, r],
                                                                  enable_gqa=True)[0].transpose(0, 1))  # [1, H, hd]
                    at += n
                return torch.cat(out)  # [N, H, hd]

            x = self._layers(x, cis, attention, _call)
        hidden = F.rms_norm(x, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps)  # [N, d]
        logits = self.lm_head(hidden).float()
        outs, at = [], 0
        for n in counts:
            outs.append(ForwardOutput(logits=logits[at:at + n], hidden=hidden[at:at + n]))
            at += n
        return outs

    def _layers(self, x: torch.Tensor, cis: torch.Tensor, attention, mm) -> torch.Tensor:
        """The decoder layers op by op in torch: ``attention(layer, q, k, v)`` writes the new keys and values to
        the caches and returns the attention output ([rows, H, hd]); ``mm`` applies a projection."""
        cfg = self.cfg
        H, KV, hd, d, dt = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, self.dtype
        nqk, inter, eps = (H + KV) * hd, cfg.intermediate_size, cfg.rms_norm_eps
        n = x.shape[0]
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (d,), L.attn_norm, eps)
            qkv = mm(L.qkv, h)  # [n, (H + 2 KV) hd]
            if L.qkv_bias is not None:
                qkv = qkv + L.qkv_bias
            qk = qkv[:, :nqk].float().reshape(n, H + KV, hd)
            if L.q_norm is not None:  # per head, before RoPE
                qk = torch.cat([F.rms_norm(qk[:, :H], (hd,), L.q_norm, eps),
                                F.rms_norm(qk[:, H:], (hd,), L.k_norm, eps)], dim=1)
            qk = torch.view_as_complex(qk.reshape(n, H + KV, hd // 2, 2))  # [n, H + KV, hd / 2]
            qk = torch.view_as_real(qk * cis).reshape(n, H + KV, hd).to(dt)  # RoPE
            att = attention(li, qk[:, :H], qk[:, H:], qkv[:, nqk:].reshape(n, KV, hd))  # [n, H, hd]
            x = x + mm(L.o, att.reshape(n, H * hd))
            h = F.rms_norm(x, (d,), L.mlp_norm, eps)
            gu = mm(L.gate_up, h)  # [n, 2 I]
            x = x + mm(L.down, F.silu(gu[:, :inter]) * gu[:, inter:])
        return x
