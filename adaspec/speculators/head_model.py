"""The draft head (the network, its drafting loop and its checkpoints), on the target's hidden state.

The head (EAGLE-style, Li et al. 2024) predicts the target's next hidden state from the current one and the token it
produced, and drafts through the target's own (tied) embedding restricted to a reduced draft vocabulary. It has no
attention, so a draft tree costs one batched head step per depth and a request needs no state of its own. The
network is described on :class:`DraftHead`; measured figures are in ``adaspec/checkpoints/README.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import write_atomic
from .base import DecodeContext, Draft

log = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED_NAME = "smollm2-135m-instruct-head"  # <name>.safetensors + <name>.json in CHECKPOINT_DIR


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

@dataclass
class HeadConfig:
    """Shape of a draft head."""

    hidden_size: int
    """d of the target (its hidden state and embedding width)."""
    intermediate_size: int = 1024
    """Width of each gated MLP block; 1024 keeps a block at ~1.8M parameters for d=576."""
    num_blocks: int = 1
    """Residual MLP blocks after the fusing projection. On the shipped data slice, one epoch: 2 blocks
    reach depth-1 acceptance 0.374 vs 0.363 for 1 block, for 1.7x the parameters and body time."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        return cls(**{k: d[k] for k in ("hidden_size", "intermediate_size", "num_blocks", "rms_norm_eps") if k in d})


class _Block(nn.Module):
    """Pre-norm SiLU-gated MLP with a residual: x + down(silu(gate(n(x))) * up(n(x)))."""

    def __init__(self, d: int, inter: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=eps)
        self.gate_up = nn.Linear(d, 2 * inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)
        nn.init.zeros_(self.down.weight)  # starts as the identity map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class DraftHead(nn.Module):
    """Predicts the target's next hidden state from its current one and a token.

    The target's embedding ``embed`` ([vocab, d]) and LM head ``output``
    ([vocab, d]; ``None`` = tied to the embedding) are referenced, not copied and
    not parameters, so ``state_dict()`` holds the head's own weights only.
    ``vocab_ids`` ([V] int64, sorted) are the full-vocabulary ids of the draft
    vocabulary; ``None`` means the full vocabulary.

    The head (EAGLE-style, Li et al. 2024) predicts the target's *next hidden state*
    from the current one and the token that hidden state produced::

        h_t      target's last hidden state (after the final norm) at position t; its logits gave x_{t+1}
        f_{t+1} = head(h_t, emb(x_{t+1}))          # ≈ h_{t+1}
        q(x_{t+2}) = softmax(E_V f_{t+1})          # E_V: the target's (tied) embedding rows of the draft vocabulary

    Within one draft the head runs on its own predictions: ``f_{t+2} = head(f_{t+1},
    emb(x̂_{t+2}))`` and so on. It has no attention, so a draft *tree* costs one
    batched head step per depth and a request needs no per-request state: the
    engine's ``ctx.hidden`` is all a proposal starts from.

    Body: input RMSNorms on both halves, a fusing projection ``2d -> d``, ``num_blocks``
    pre-norm SiLU-gated MLP blocks with a residual, and an output RMSNorm. The LM head
    is the target's (tied) embedding restricted to a reduced draft vocabulary (the
    tokens the target predicts most often on the training data) with an int8 kernel,
    which makes a head step a fraction of a target forward on CPU; tokens outside it
    can never be proposed.
    """

    def __init__(self, cfg: HeadConfig, embed: torch.Tensor, vocab_ids: torch.Tensor | None = None,
                 output: torch.Tensor | None = None):
        super().__init__()
        if embed.dim() != 2 or embed.shape[1] != cfg.hidden_size:
            raise ValueError(f"embedding of shape {tuple(embed.shape)} does not match hidden_size {cfg.hidden_size}")
        d = cfg.hidden_size
        self.cfg = cfg
        self.norm_h = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.norm_e = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.fuse = nn.Linear(2 * d, d, bias=False)
        self.blocks = nn.ModuleList(_Block(d, cfg.intermediate_size, cfg.rms_norm_eps) for _ in range(cfg.num_blocks))
        self.norm_out = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        with torch.no_grad():  # start near "the next feature is the current one"
            self.fuse.weight.zero_()
            self.fuse.weight[:, :d] += torch.eye(d)
            self.fuse.weight[:, d:] += torch.randn(d, d) * 0.02
        self._shared: dict[str, torch.Tensor | None] = {}
        self.set_shared(embed, vocab_ids, output)

    def set_shared(self, embed: torch.Tensor, vocab_ids: torch.Tensor | None, output: torch.Tensor | None = None) -> None:
        """Point the head at the target's embedding, LM head and a draft vocabulary (none of them is saved)."""
        out = embed if output is None else output
        if out.shape != embed.shape:
            raise ValueError(f"LM head of shape {tuple(out.shape)} does not match the embedding {tuple(embed.shape)}")
        if vocab_ids is not None:
            vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).to(embed.device)
            if vocab_ids.numel() == 0 or int(vocab_ids.max()) >= embed.shape[0] or int(vocab_ids.min()) < 0:
                raise ValueError("draft vocabulary ids must be non-empty and inside the target vocabulary")
        # Plain dict: modules would otherwise register or deep-copy the 113 MB embedding.
        self._shared = {"embed": embed, "vocab_ids": vocab_ids, "output": out,
                        "lm": out if vocab_ids is None else out[vocab_ids].contiguous()}  # lm: [V, d]

    @property
    def embed(self) -> torch.Tensor:
        return self._shared["embed"]  # [vocab, d]

    @property
    def vocab_ids(self) -> torch.Tensor | None:
        return self._shared["vocab_ids"]

    @property
    def output(self) -> torch.Tensor:
        return self._shared["output"]  # [vocab, d], the target's full LM head

    @property
    def lm_weight(self) -> torch.Tensor:
        return self._shared["lm"]  # [V, d]

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """h [n, d] hidden states, tokens [n] ids each produced -> predicted next hidden states [n, d]."""
        e = self.embed[tokens].to(h.dtype)  # [n, d]
        x = self.fuse(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))
        for b in self.blocks:
            x = b(x)
        return self.norm_out(x)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """Features [..., d] -> draft-vocabulary logits [..., V] (fp32 shared weights, for training)."""
        return F.linear(f, self.lm_weight)

    def unroll(self, h0: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Autoregressive features: h0 [n, d], tokens [n, k] -> [n, k, d].

        Step j consumes the previous step's *predicted* feature and token
        ``tokens[:, j]``, as drafting does (training-time test of EAGLE-3/HASS).
        """
        feats, f = [], h0
        for j in range(tokens.shape[1]):
            f = self(f, tokens[:, j])
            feats.append(f)
        return torch.stack(feats, dim=1)

    def clone_frozen(self) -> "DraftHead":
        """An independent, gradient-free copy sharing the embedding (a publishable version)."""
        twin = DraftHead(self.cfg, self.embed, None)
        twin._shared = self._shared
        twin.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        twin.requires_grad_(False).eval()
        return twin

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def distill_loss(head: DraftHead, f: torch.Tensor, h_next: torch.Tensor, weight: torch.Tensor | None = None,
                 feature_coef: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward KL to the target plus a feature regression.

    ``f``: predicted features [n, d]; ``h_next``: the target's hidden states there
    [n, d], whose logits restricted to the draft vocabulary are the teacher
    ``p = softmax(E_V h_next)``. Loss per row: ``KL(p || softmax(E_V f)) +
    feature_coef * smoothL1(f, h_next)``, averaged with ``weight`` [n].
    """
    with torch.no_grad():
        logp = F.log_softmax(head.logits(h_next.float()), dim=-1)  # [n, V]
    logq = F.log_softmax(head.logits(f), dim=-1)  # [n, V]
    kl = (logp.exp() * (logp - logq)).sum(-1)  # [n]
    reg = F.smooth_l1_loss(f, h_next.float(), reduction="none").mean(-1)  # [n]
    per_row = kl + feature_coef * reg
    w = torch.ones_like(per_row) if weight is None else weight
    loss = (per_row * w).sum() / w.sum().clamp_min(1e-8)
    with torch.no_grad():
        agree = (logq.argmax(-1) == logp.argmax(-1)).float().mean().item()
    return loss, {"kl": kl.mean().item(), "reg": reg.mean().item(), "top1": agree}


# ---------------------------------------------------------------------------------------------
# Fast inference pieces
# ---------------------------------------------------------------------------------------------

class LMHead:
    """The draft-vocabulary LM head for drafting: int8 (fbgemm dynamic quantisation) when available.

    fp32 GEMM with a handful of rows is slow on this CPU (6 ms for 8192 x 576,
    1 row); the int8 kernel takes 0.3-0.5 ms. Only argmax/top-k and a
    confidence come out of it, so its rounding cannot affect losslessness.
    """

    def __init__(self, weight: torch.Tensor, quantize: bool = True):
        self.weight = weight  # [V, d] fp32
        self._q: Callable[[torch.Tensor], torch.Tensor] | None = None
        if quantize and weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lin = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
                    w = weight.float()
                    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-8).double()
                    qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
                    lin.set_weight_bias(qw, None)
                self._q = lin
            except (RuntimeError, AttributeError) as e:  # no quantized engine in this torch build
                log.info("int8 draft LM head unavailable (%s); using fp32", e)

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        """f [n, d] -> logits [n, V]."""
        if self._q is not None:
            return self._q(f.float().contiguous())
        return F.linear(f.to(self.weight.dtype), self.weight).float()


@dataclass
class DraftConfig:
    """How a head drafts."""

    width: int = 1
    """Children expanded per node and nodes kept per depth; 1 drafts a chain, >1 a best-first tree."""
    max_depth: int = 8
    """Deepest draft node (a chain stops at min(budget, max_depth))."""
    min_path_prob: float = 0.02
    """Stop growing a path once the head's own probability of reaching it falls below this."""
    quantize_lm_head: bool = True
    """int8 LM head for drafting (see ``LMHead``)."""


COUPLED_CANDIDATES = 64
"""For a sampled request, the head's most likely tokens among which a node's first child is guessed."""


def _coupled_children(logits: torch.Tensor, vocab_ids: torch.Tensor | None, k: int, depth: int,
                      ctx: DecodeContext) -> tuple[list[list[float]], list[list[int]]]:
    """Per frontier row, ``k`` children: the coupled guess first, then the most likely others (see
    ``draft_with_head``); their confidences at the request's temperature."""
    tempered = torch.softmax(logits.float() / ctx.temperature, dim=-1)  # [m, V]
    c = min(COUPLED_CANDIDATES, tempered.shape[1])
    cand_p, cand_i = tempered.topk(c, dim=-1)  # [m, c], most likely first
    if vocab_ids is not None:
        cand_i = vocab_ids[cand_i]
    cand_p, cand_i = cand_p.double().cpu().numpy(), cand_i.cpu().numpy()
    probs, ids = [], []
    for p, i in zip(cand_p, cand_i):
        g = ctx.guess(i, np.log(np.maximum(p, 1e-300)), depth)
        order = [g] + [j for j in range(c) if j != g][: k - 1]
        probs.append([float(p[0])] + [float(p[j]) for j in order[1:]])
        ids.append([int(i[j]) for j in order])
    return probs, ids


def draft_with_head(head: DraftHead, lm: LMHead, vocab_ids: torch.Tensor | None, h: torch.Tensor, pending: int,
                    budget: int, cfg: DraftConfig, source: str, ctx: DecodeContext | None = None) -> Draft:
    """Best-first draft tree (a chain when ``cfg.width == 1``) from hidden state ``h`` [d].

    Per depth: one batched head step over the frontier (at most ``width`` nodes),
    top-``width`` children of each, then the ``width`` children with the highest
    path probability become the next frontier. Every generated child is a
    candidate node; the ``budget`` candidates of highest path probability are
    kept. A child's path probability never exceeds its parent's, and ties go to
    the shallower node, so the kept set contains every kept node's ancestors.

    For a sampled request (``ctx.coupled``) a node's first child is instead the head's guess of the target's
    sample there, made with the sampler's own noise over the head's ``COUPLED_CANDIDATES`` most likely tokens at
    the request's temperature (``DecodeContext.guess``), with the head's top probability at that temperature as
    its confidence; the other children are the head's most likely tokens.
    """
    if budget <= 0:
        return Draft.empty(source)
    cand_tok: list[int] = []
    cand_parent: list[int] = []  # candidate index of the parent, -1 for the pending token
    cand_p: list[float] = []  # conditional probability
    cand_path: list[float] = []
    cand_depth: list[int] = []
    frontier = [-1]  # candidate indices whose children get expanded next (-1 = the pending token)
    feats_in = h.reshape(1, -1).float()  # [m, d] hidden state that produced each frontier token
    dev = h.device
    toks_in = torch.tensor([pending], dtype=torch.long, device=dev)  # [m]
    max_depth = min(cfg.max_depth, budget)
    coupled = ctx is not None and ctx.coupled
    with torch.inference_mode():
        for depth in range(1, max_depth + 1):
            f = head(feats_in, toks_in)  # [m, d]
            logits = lm(f)  # [m, V]
            k = min(cfg.width, logits.shape[1])
            if coupled:
                top_p, top_i = _coupled_children(logits, vocab_ids, k, depth, ctx)
            else:
                top_p, top_i = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [m, k]
                if vocab_ids is not None:
                    top_i = vocab_ids[top_i]
                top_p, top_i = top_p.tolist(), top_i.tolist()
            new: list[int] = []
            for r, parent in enumerate(frontier):
                base = 1.0 if parent < 0 else cand_path[parent]
                for c in range(k):
                    p = top_p[r][c]
                    if base * p < cfg.min_path_prob:
                        break
                    cand_tok.append(top_i[r][c])
                    cand_parent.append(parent)
                    cand_p.append(p)
                    cand_path.append(base * p)
                    cand_depth.append(depth)
                    new.append(len(cand_tok) - 1)
            if not new or depth == max_depth:
                break
            new.sort(key=lambda i: -cand_path[i])
            nxt = new[: cfg.width]
            rows = {parent: r for r, parent in enumerate(frontier)}
            feats_in = f[[rows[cand_parent[i]] for i in nxt]]
            toks_in = torch.tensor([cand_tok[i] for i in nxt], dtype=torch.long, device=dev)
            frontier = nxt
    if not cand_tok:
        return Draft.empty(source)
    keep = sorted(range(len(cand_tok)), key=lambda i: (-cand_path[i], cand_depth[i], i))[:budget]
    keep.sort(key=lambda i: (cand_depth[i], i))  # parents before children
    pos = {c: j for j, c in enumerate(keep)}
    parents = [-1 if cand_parent[c] < 0 else pos[cand_parent[c]] for c in keep]
    return Draft(np.array([cand_tok[c] for c in keep], dtype=np.int64), np.array(parents, dtype=np.int64),
                 np.array([cand_p[c] for c in keep], dtype=np.float64), source)


# ---------------------------------------------------------------------------------------------
# Target fingerprint and checkpoints
# ---------------------------------------------------------------------------------------------

_PROBE_ROWS = (0, 1, 2, 17, 100, 1000, 4096, 12345, 30000, 49151)


def shared_weights(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The target's embedding [vocab, d] and, if untied, its LM head weight [vocab, d] (fp32 tensors)."""
    embed = getattr(model, "embed", None)
    if embed is None:
        raise ValueError("the target exposes no embedding (model.embed); a draft head needs one")
    w = getattr(getattr(model, "lm_head", None), "weight", None)
    if w is None or w is embed or (w.shape == embed.shape and w.data_ptr() == embed.data_ptr()):
        return embed, None
    if w.shape != embed.shape or not w.is_floating_point():
        raise ValueError("the target's LM head is not a dense [vocab, d] matrix; a draft head cannot share it")
    return embed, w


def target_fingerprint(model: Any) -> dict:
    """Dimensions plus a few embedding values: identifies a target across loaders and dequantisers."""
    embed = getattr(model, "embed", None)
    if embed is None:
        raise ValueError("the target exposes no embedding (model.embed); a draft head needs one")
    rows = [r for r in _PROBE_ROWS if r < embed.shape[0]]
    probe = embed[rows, :8].float().flatten().tolist()
    return {"vocab_size": int(embed.shape[0]), "hidden_size": int(embed.shape[1]),
            "num_layers": int(getattr(getattr(model, "cfg", None), "num_layers", -1)),
            "probe": [round(v, 5) for v in probe]}


def fingerprint_matches(a: dict, b: dict, tol: float = 2e-2) -> bool:
    """Same dimensions and embedding probes within ``tol`` (dequantisation may differ in rounding)."""
    if any(a.get(k) != b.get(k) for k in ("vocab_size", "hidden_size", "num_layers")):
        return False
    pa, pb = np.asarray(a.get("probe", [])), np.asarray(b.get("probe", []))
    return pa.shape == pb.shape and pa.size > 0 and bool(np.allclose(pa, pb, atol=tol, rtol=0.0))


def save_checkpoint(directory: str | os.PathLike, name: str, head: DraftHead, meta: dict) -> None:
    """``<name>.safetensors`` (head weights in fp16 + the draft vocabulary) and ``<name>.json``, both atomic."""
    from safetensors.torch import save

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()}
    if head.vocab_ids is not None:
        tensors["draft_vocab"] = head.vocab_ids.to(torch.int64).contiguous()
    blob = save(tensors)
    d = Path(directory)
    write_atomic(d / f"{name}.safetensors", blob, world_readable=True)
    info = {"config": asdict(head.cfg), "weights_sha256": hashlib.sha256(blob).hexdigest(),
            "draft_vocab_size": None if head.vocab_ids is None else int(head.vocab_ids.numel()), **meta}
    write_atomic(d / f"{name}.json", json.dumps(info, indent=1) + "\n", world_readable=True)


def load_checkpoint(directory: str | os.PathLike, name: str, embed: torch.Tensor,
                    output: torch.Tensor | None = None) -> tuple[DraftHead, dict]:
    """Inverse of ``save_checkpoint``; the head shares ``embed``. Raises ``FileNotFoundError``/``ValueError``."""
    from safetensors.torch import load

    d = Path(directory)
    info = json.loads((d / f"{name}.json").read_text())
    blob = (d / f"{name}.safetensors").read_bytes()
    if info.get("weights_sha256") not in (None, hashlib.sha256(blob).hexdigest()):
        raise ValueError(f"{d / name}.safetensors does not match the checksum in its JSON")
    tensors = load(blob)
    vocab = tensors.pop("draft_vocab", None)
    head = DraftHead(HeadConfig.from_dict(info["config"]), embed, vocab, output)
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    head.to(embed.device).requires_grad_(False).eval()
    return head, info
