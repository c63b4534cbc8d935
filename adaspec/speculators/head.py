"""Neural draft heads on the target's hidden state: a static one and its online-learning twin.

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
can never be proposed (``adaspec/checkpoints/README.md`` gives the figures).

Online learning (Online Speculative Decoding, Liu et al. 2024): every
verification step yields training pairs for free. With ``H_0`` the hidden state
that produced the pending token ``T_0`` and ``outcome.hidden[j] = H_{j+1}``,
``outcome.emitted[j] = T_{j+1}``, the pairs are ``(H_j, T_j) -> (H_{j+1}, T_{j+1})``
for ``j = 0 .. accepted``. A background thread distils the head on them (forward
KL to ``softmax(E_V H_{j+1})`` plus a feature regression), weighting pairs the
head got wrong, and publishes each new version by swapping one reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import threading
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import write_atomic
from .base import DecodeContext, Draft, SpeculatorBase, StepOutcome
from ..store import StoreCorruptError, arrays_from_bytes, arrays_to_bytes, restore, save_blob

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


def draft_with_head(head: DraftHead, lm: LMHead, vocab_ids: torch.Tensor | None, h: torch.Tensor, pending: int,
                    budget: int, cfg: DraftConfig, source: str) -> Draft:
    """Best-first draft tree (a chain when ``cfg.width == 1``) from hidden state ``h`` [d].

    Per depth: one batched head step over the frontier (at most ``width`` nodes),
    top-``width`` children of each, then the ``width`` children with the highest
    path probability become the next frontier. Every generated child is a
    candidate node; the ``budget`` candidates of highest path probability are
    kept. A child's path probability never exceeds its parent's, and ties go to
    the shallower node, so the kept set contains every kept node's ancestors.
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
    with torch.inference_mode():
        for depth in range(1, max_depth + 1):
            f = head(feats_in, toks_in)  # [m, d]
            probs = torch.softmax(lm(f), dim=-1)  # [m, V]
            k = min(cfg.width, probs.shape[1])
            top_p, top_i = probs.topk(k, dim=-1)  # [m, k]
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


# ---------------------------------------------------------------------------------------------
# Speculators
# ---------------------------------------------------------------------------------------------

class HeadSpeculator(SpeculatorBase):
    """The static draft head as a speculator: drafts from ``ctx.hidden``; learns nothing."""

    name = "head"

    def __init__(self, head: DraftHead, config: DraftConfig | None = None, info: dict | None = None):
        self.config = config or DraftConfig()
        self.info = info or {}
        head = head if not any(p.requires_grad for p in head.parameters()) else head.clone_frozen()
        self._lm = LMHead(head.lm_weight, self.config.quantize_lm_head)
        self._serving = head  # the published version; drafting reads this reference once per proposal
        self.proposals = 0

    @classmethod
    def for_target(cls, model: Any, directory: str | os.PathLike | None = None, name: str = SHIPPED_NAME,
                   config: DraftConfig | None = None, required: bool = False) -> "HeadSpeculator | None":
        """The trained head for ``model``: the shipped one for the bundled target, else None.

        ``required=True`` raises ``ValueError`` instead of returning None, naming
        what to do (train a head for this target with ``adaspec train-static``).
        """
        directory = Path(directory) if directory is not None else CHECKPOINT_DIR
        try:
            meta = json.loads((directory / f"{name}.json").read_text())
        except FileNotFoundError:
            if required:
                raise ValueError(f"no draft head checkpoint {directory / name}.json") from None
            return None
        want = meta.get("target", {}).get("fingerprint", {})
        if not model.capabilities.hidden_states:
            if required:
                raise ValueError("this target backend gives no hidden states; a draft head needs them")
            return None
        dims = {"vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
                "num_layers": getattr(getattr(model, "cfg", None), "num_layers", -1)}
        # dimensions first, decided without touching the weights; then a few embedding values
        same = not any(want.get(k) != v for k, v in dims.items())
        if same:
            try:
                same = fingerprint_matches(want, target_fingerprint(model))
            except ValueError:  # a backend without an exposed embedding cannot share it with a head
                if required:
                    raise
                return None
        if not same:
            msg = (f"the draft head {name} was trained for {meta.get('target', {}).get('name', 'another model')}, "
                   "not this target; train one with `adaspec train-static` or run without the head")
            if required:
                raise ValueError(msg)
            log.info(msg)
            return None
        head, info = load_checkpoint(directory, name, *shared_weights(model))
        return cls(head, config, info)

    @property
    def head(self) -> DraftHead:
        """The version drafts are made with now."""
        return self._serving

    def begin(self, ctx: DecodeContext) -> None:
        pass

    def propose(self, ctx: DecodeContext, budget: int) -> Draft:
        if ctx.hidden is None or budget <= 0:
            return Draft.empty(self.name)
        head = self._serving  # one consistent version for the whole draft
        self.proposals += 1
        return draft_with_head(head, self._lm, head.vocab_ids, ctx.hidden, ctx.tokens[-1], budget, self.config,
                               self.name)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        pass

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        pass


@dataclass
class OnlineConfig:
    """How the online head learns from verification steps."""

    lr: float = 3e-4
    """Adam learning rate of the online copy."""
    batch_size: int = 64
    """Training pairs per update step."""
    min_new_pairs: int = 16
    """Learning waits for this many pairs observed since it last ran."""
    passes: float = 2.0
    """Expected times each new pair is trained on: ceil(passes * new / batch_size) update steps per digest."""
    buffer_size: int = 8192
    """Most recent training pairs kept (FIFO)."""
    recent_fraction: float = 0.5
    """Share of each batch drawn from the newest pairs, the rest uniformly from the buffer."""
    wrong_weight: float = 1.0
    """Loss weight of pairs whose head top-1 disagreed with the target (OSD trains on these)."""
    right_weight: float = 0.1
    """Loss weight of pairs the head already got right (keeps it from forgetting them)."""
    feature_coef: float = 0.1
    """Weight of the feature regression term."""
    publish_every: int = 4
    """Update steps between publications of a new serving version."""
    max_share: float = 0.04
    """Fraction of wall time the learner may compute while requests are decoding, on a core decoding does not
    use; with no spare core (decoding's threads cover every core) it learns only while idle, since a learner
    sharing a core with decoding slows every step it overlaps."""
    idle_share: float = 0.5
    """Fraction it may use when nothing was observed for ``idle_after_s``."""
    idle_after_s: float = 2.0
    """Idle = no request between begin and end, and nothing observed for this many seconds."""
    guard_window: int = 512
    """Pairs in the sliding window that compares online vs static top-1 agreement."""
    guard_margin: float = 0.02
    """Reset to the static weights when online agreement < static - margin over a full window."""
    background: bool = True
    """Learn in a daemon thread; False learns only when ``learn_now`` is called (tests, replay)."""


class OnlineHeadSpeculator(HeadSpeculator):
    """A copy of the static head that keeps training on live traffic.

    ``observe`` only queues the step's training pairs (a few tensor copies); the
    learner thread evaluates each new pair with both heads *before* training on
    it (prequential top-1 agreement, the drift guard's measure), trains the
    private copy, and publishes a frozen clone by replacing one reference. A
    proposal reads that reference once, so every draft comes from one version.
    """

    name = "head_online"

    def __init__(self, head: DraftHead, config: DraftConfig | None = None, online: OnlineConfig | None = None,
                 info: dict | None = None):
        super().__init__(head, config, info)
        self.online = online or OnlineConfig()
        self.static = self._serving  # frozen static weights (the drift guard's reference and reset point)
        self._train = self._fresh_trainable()
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self.version = 0
        self.updates = 0
        self.resets = 0
        self.compute_s = 0.0  # learner time spent on evaluation + updates
        self.compute_busy_s = 0.0  # ... of which while requests were decoding
        self._owed = 0  # update steps the buffered pairs still call for
        self._recent = 0  # size of the newest digested group of pairs (drawn from first in each batch)
        self._active: set[str] = set()  # requests between begin and end
        # whether a core is left over by decoding's threads (read here, on the thread that decodes)
        self._spare_core = len(os.sched_getaffinity(0)) > torch.get_num_threads() \
            if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) > torch.get_num_threads()
        self._pending: deque = deque()  # new pairs not yet evaluated: (h_in [d], tok_in, h_out [d], tok_out)
        self._buffer: deque = deque(maxlen=self.online.buffer_size)
        self._guard: deque = deque(maxlen=self.online.guard_window)  # (online_right, static_right) per pair
        self._prev_hidden: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._running = threading.Event()  # cleared by pause()
        self._running.set()
        self._step_lock = threading.Lock()  # held by the learner thread during one unit of work
        self._last_observe = 0.0
        self._thread: threading.Thread | None = None
        if self.online.background:
            self._thread = threading.Thread(target=self._loop, name="adaspec-head-online", daemon=True)
            self._thread.start()

    @classmethod
    def for_target(cls, model: Any, directory: str | os.PathLike | None = None, name: str = SHIPPED_NAME,
                   config: DraftConfig | None = None, required: bool = False,
                   online: OnlineConfig | None = None) -> "OnlineHeadSpeculator | None":
        static = HeadSpeculator.for_target(model, directory, name, config, required)
        return None if static is None else cls(static.head, config, online, static.info)

    def _fresh_trainable(self) -> DraftHead:
        twin = self.static.clone_frozen()
        twin.requires_grad_(True).train()
        return twin

    # -- speculator hooks (decode thread) -------------------------------------------------------

    def begin(self, ctx: DecodeContext) -> None:
        self._active.add(ctx.request_id)
        self._last_observe = time.monotonic()
        if ctx.hidden is not None:
            self._prev_hidden[ctx.request_id] = _plain(ctx.hidden)

    def observe(self, ctx: DecodeContext, outcome: StepOutcome) -> None:
        prev = self._prev_hidden.get(ctx.request_id)
        if outcome.hidden is None or prev is None:
            return
        rows = _plain(outcome.hidden).float()  # [1 + accepted, d]
        toks = ctx.tokens[len(ctx.tokens) - len(outcome.emitted) - 1:]  # pending, then emitted
        h_in = torch.cat([prev.reshape(1, -1).float(), rows[:-1]])  # [1 + accepted, d]
        pairs = [(h_in[j], toks[j], rows[j], toks[j + 1]) for j in range(rows.shape[0])]
        self._prev_hidden[ctx.request_id] = rows[-1]
        with self._lock:
            self._pending.extend(pairs)
        self._last_observe = time.monotonic()
        self._wake.set()

    def end(self, ctx: DecodeContext, finished: bool) -> None:
        self._prev_hidden.pop(ctx.request_id, None)
        self._active.discard(ctx.request_id)

    # -- learning ----------------------------------------------------------------------------

    def learn_now(self) -> int:
        """Digest the queued pairs and run every update step they call for, in the calling thread; returns the steps run."""
        before = self.updates
        while self._step_once():
            pass
        return self.updates - before

    def _step_once(self) -> bool:
        """One short unit of learner work: digest the queued pairs (if enough) and run at most one update step.

        New pairs are first scored by both heads (the drift guard), then buffered;
        they owe ``ceil(passes * new / batch_size)`` update steps, paid one per
        call so that a learner burst stays short. False when there was nothing to do.
        """
        new = []
        with self._lock:
            if len(self._pending) >= self.online.min_new_pairs:
                new = list(self._pending)
                self._pending.clear()
        if not new and self._owed == 0:
            return False
        t0 = time.perf_counter()
        if new:
            h_in = torch.stack([p[0] for p in new])  # [m, d]
            t_in = torch.tensor([p[1] for p in new], dtype=torch.long)
            t_out = torch.tensor([p[3] for p in new], dtype=torch.long)
            self._evaluate(h_in, t_in, t_out)
            self._buffer.extend(new)
            self._recent = len(new)
            self._owed += max(1, math.ceil(self.online.passes * len(new) / self.online.batch_size))
        if self._owed > 0:
            self._owed -= 1
            self._update(self._recent)
        self.compute_s += time.perf_counter() - t0
        return True

    def _evaluate(self, h_in: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor) -> None:
        """Prequential top-1 agreement of the serving online head and the static head; the drift guard."""
        with torch.inference_mode():
            on = self._top1(self._serving, h_in, t_in) == t_out
            st = self._top1(self.static, h_in, t_in) == t_out
        self._guard.extend(zip(on.tolist(), st.tolist()))
        if self.updates and len(self._guard) == self._guard.maxlen:
            g = np.asarray(self._guard, dtype=np.float64)
            if g[:, 0].mean() < g[:, 1].mean() - self.online.guard_margin:
                log.warning("online head agreement %.3f fell below the static head's %.3f: reset to static",
                            g[:, 0].mean(), g[:, 1].mean())
                self.reset_to_static()

    def _top1(self, head: DraftHead, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = self._lm(head(h, t)).argmax(-1)
        return idx if head.vocab_ids is None else head.vocab_ids[idx]

    def _update(self, n_new: int) -> None:
        cfg = self.online
        buf = list(self._buffer)
        n_recent = min(n_new, int(cfg.batch_size * cfg.recent_fraction))
        idx = list(range(len(buf) - n_recent, len(buf)))
        idx += random.choices(range(len(buf)), k=max(0, min(cfg.batch_size, len(buf)) - n_recent))
        h_in = torch.stack([buf[i][0] for i in idx])
        t_in = torch.tensor([buf[i][1] for i in idx], dtype=torch.long)
        h_out = torch.stack([buf[i][2] for i in idx])
        head = self._train
        f = head(h_in, t_in)  # [b, d]
        with torch.no_grad():
            wrong = head.logits(f).argmax(-1) != head.logits(h_out).argmax(-1)
            w = torch.where(wrong, cfg.wrong_weight, cfg.right_weight)
        loss, _ = distill_loss(head, f, h_out, w, cfg.feature_coef)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        self._opt.step()
        self.updates += 1
        if self.updates % cfg.publish_every == 0:
            self.publish()

    def publish(self) -> None:
        """Replace the serving version by a frozen clone of the trained copy (one reference swap)."""
        self.version += 1
        self._serving = self._train.clone_frozen()

    def reset_to_static(self) -> None:
        """Forget online learning: serve and train from the static weights again."""
        self._train = self._fresh_trainable()
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self._serving = self.static
        self._guard.clear()
        self.resets += 1
        self.version += 1

    def guard_stats(self) -> dict[str, float]:
        """Prequential top-1 agreement over the guard window (online, static) and counters."""
        g = np.asarray(self._guard, dtype=np.float64).reshape(-1, 2)
        return {"online_top1": float(g[:, 0].mean()) if len(g) else float("nan"),
                "static_top1": float(g[:, 1].mean()) if len(g) else float("nan"),
                "window": len(g), "updates": self.updates, "version": self.version, "resets": self.resets,
                "compute_s": self.compute_s, "compute_busy_s": self.compute_busy_s}

    def _loop(self) -> None:
        """Background learner: bounded duty cycle, more of it when the server is idle."""
        from ..kernels import limit_this_thread

        limit_this_thread(1)  # no OpenMP team of its own beside decoding's (see there)
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while not self._stop.is_set() and self._running.is_set():
                if not self._spare_core and not self._idle():  # wait for the engine to go idle
                    if self._stop.wait(0.1):
                        return
                    continue
                t0 = time.perf_counter()
                try:
                    with self._step_lock:
                        if not self._running.is_set() or not self._step_once():
                            break
                except Exception:  # a learner failure must never reach decoding
                    log.exception("online head update failed; resetting to the static weights")
                    self.reset_to_static()
                    break
                dt = time.perf_counter() - t0
                idle = self._idle()
                if not idle:
                    self.compute_busy_s += dt
                share = self.online.idle_share if idle else self.online.max_share
                if self._stop.wait(dt * (1.0 / share - 1.0)):
                    return

    def _idle(self) -> bool:
        return not self._active and time.monotonic() - self._last_observe > self.online.idle_after_s

    def pause(self) -> None:
        """Hold the background learner (after its unit of work in flight) until ``resume``; pairs keep queueing.

        For side-by-side measurements on one machine: the learner of one configuration must not take CPU time
        while another configuration is being timed.
        """
        self._running.clear()
        with self._step_lock:
            pass

    def resume(self) -> None:
        """Let the background learner run again; a resumed configuration is about to decode, so it counts as
        busy from here (not idle because nothing was observed while it was held)."""
        self._last_observe = time.monotonic()
        self._running.set()
        self._wake.set()

    def close(self) -> None:
        """Stop the learner thread (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- persistence -------------------------------------------------------------------------

    STATE_KIND = "adaspec.head_online"

    def save(self, path: str | os.PathLike) -> None:
        """Write the serving weights atomically to ``path`` (a checksummed container around an ``.npz``)."""
        head = self._serving
        arrays = {k: v.detach().float().numpy() for k, v in head.state_dict().items()}
        meta = {"kind": self.STATE_KIND, "config": asdict(head.cfg), "version": self.version,
                "updates": self.updates, "resets": self.resets, "static_sha256": self.info.get("weights_sha256"),
                "draft_vocab_sha256": _vocab_hash(head.vocab_ids)}
        save_blob(path, arrays_to_bytes(arrays), meta)

    def load(self, path: str | os.PathLike, vocab_size: int | None = None) -> bool:
        """Resume from ``save``; False (and the static weights) when nothing matching is stored. A file of another
        static head is left alone; a damaged one (wrong arrays, shapes or non-finite weights) is moved aside."""
        matched: list[bool] = []
        restore(path, lambda payload, meta: matched.append(self._load_payload(payload, meta)), "online head")
        return bool(matched and matched[0])

    def _load_payload(self, payload: bytes, meta: dict) -> bool:
        if meta.get("kind") != self.STATE_KIND:
            raise StoreCorruptError(f"not an online head state: {meta.get('kind')!r}")
        if (meta.get("config") != asdict(self.static.cfg)
                or meta.get("draft_vocab_sha256") != _vocab_hash(self.static.vocab_ids)
                or meta.get("static_sha256") != self.info.get("weights_sha256")):
            log.warning("stored online head belongs to another static head; starting from static")
            return False
        counters = [meta.get(k, 0) for k in ("version", "updates", "resets")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counters):
            raise StoreCorruptError("version, updates and resets must be non-negative integers")
        arrays = arrays_from_bytes(payload)
        expected = self._train.state_dict()
        if set(arrays) != set(expected):
            raise StoreCorruptError(f"weights {sorted(arrays)} do not match the head's {sorted(expected)}")
        state = {}
        for k, v in arrays.items():
            if v.shape != tuple(expected[k].shape) or not np.issubdtype(v.dtype, np.floating):
                raise StoreCorruptError(f"weight {k!r} has shape {v.shape} and type {v.dtype}, expected "
                                        f"{tuple(expected[k].shape)} floats")
            if not np.all(np.isfinite(v)):
                raise StoreCorruptError(f"weight {k!r} holds non-finite numbers")
            state[k] = torch.from_numpy(np.array(v, dtype=np.float32))
        self._train.load_state_dict(state)
        self._opt = torch.optim.Adam(self._train.parameters(), lr=self.online.lr)
        self.version, self.updates, self.resets = counters
        self._serving = self._train.clone_frozen()
        return True


def _vocab_hash(vocab_ids: torch.Tensor | None) -> str | None:
    if vocab_ids is None:
        return None
    return hashlib.sha256(vocab_ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _plain(t: Any) -> torch.Tensor:
    """A normal fp32 copy of a tensor the engine produced under inference mode (autograd may use it)."""
    with torch.inference_mode(False):
        return torch.as_tensor(t).detach().float().clone()
