"""Teacher features by teacher forcing, cached on disk as safetensors shards.

For every training sequence the target runs one forward and we keep, per position, its last hidden state (which is
the teacher's next-token distribution, for a tied LM head), its greedy next token, the token and whether it is the
assistant's (:class:`TeacherData`). Shards are written atomically and listed in a manifest, so an interrupted run
resumes; the cache is keyed by the target fingerprint and the data config.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import load_file, save

from ..files import write_atomic
from ..speculators.head_model import target_fingerprint
from .data import DataConfig, Sequence_, iter_sequences


@dataclass
class TeacherData:
    """Concatenated teacher features of one split.

    For every training sequence the target runs one forward over the whole
    sequence (no generation) and we keep, per position ``i``:

    - ``hidden[i]`` [d] fp16: the last hidden state after the final norm. The
      teacher distribution over the next token is ``softmax(E h_i)``, so the
      hidden state *is* the distribution (for a tied LM head) and nothing else needs
      storing;
    - ``argmax[i]``: the target's greedy next token (draft-vocabulary counts and
      held-out acceptance);
    - ``tokens[i]`` and ``assistant[i]``.
    """

    hidden: torch.Tensor  # [N, d] fp16
    tokens: torch.Tensor  # [N] int64
    argmax: torch.Tensor  # [N] int64, target's greedy prediction for the token after position i
    assistant: torch.Tensor  # [N] bool
    offsets: torch.Tensor  # [S + 1] int64, sequence s spans offsets[s]:offsets[s + 1]
    conv_ids: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1


def cache_key(model: Any, data_cfg: DataConfig) -> str:
    fp = target_fingerprint(model)
    coarse = dict(fp, probe=[round(v, 2) for v in fp["probe"]], precision=getattr(model, "precision", "fp32"))
    return hashlib.sha256(json.dumps([coarse, asdict(data_cfg)], sort_keys=True).encode()).hexdigest()[:12]


@torch.inference_mode()
def teacher_forward(model: Any, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over ``tokens`` in a fresh cache -> (hidden [n, d] fp16, argmax [n])."""
    out = model.forward(model.new_cache(), tokens)
    if out.hidden is None:
        raise ValueError("the target does not expose hidden states; a draft head cannot be trained on it")
    return out.hidden.to(torch.float16).cpu(), out.logits.argmax(-1).cpu()


def _pack(seqs: list[Sequence_], feats: list[tuple[torch.Tensor, torch.Tensor]]) -> bytes:
    lens = [len(s.tokens) for s in seqs]
    offsets = torch.tensor([0] + lens).cumsum(0)
    tensors = {
        "hidden": torch.cat([h for h, _ in feats]).contiguous(),
        "argmax": torch.cat([a for _, a in feats]).to(torch.int64).contiguous(),
        "tokens": torch.tensor([t for s in seqs for t in s.tokens], dtype=torch.int64),
        "assistant": torch.tensor([m for s in seqs for m in s.assistant], dtype=torch.uint8),
        "offsets": offsets.to(torch.int64),
    }
    return save(tensors, metadata={"conv_ids": json.dumps([s.conv_id for s in seqs])})


def build_split(model: Any, sequences: Iterable[Sequence_], directory: Path, split: str, max_tokens: int,
                shard_tokens: int = 8192, progress: bool = True) -> dict:
    """Compute (or resume) one split's shards until ``max_tokens`` tokens; returns its manifest entry."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    man_path = directory / "manifest.json"
    manifest = json.loads(man_path.read_text()) if man_path.exists() else {}
    entry = manifest.get(split, {"shards": [], "sequences": 0, "tokens": 0, "seconds": 0.0})
    if entry["tokens"] >= max_tokens:
        return entry
    it: Iterator[Sequence_] = iter(sequences)
    for _ in range(entry["sequences"]):  # skip what complete shards already hold
        next(it)
    bar = tqdm(total=max_tokens, initial=entry["tokens"], unit="tok", desc=f"teacher {split}", disable=not progress)
    seqs: list[Sequence_] = []
    feats: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending = 0
    t0 = time.perf_counter()
    for seq in it:
        feats.append(teacher_forward(model, seq.tokens))
        seqs.append(seq)
        pending += len(seq.tokens)
        bar.update(len(seq.tokens))
        done = entry["tokens"] + pending >= max_tokens
        if pending >= shard_tokens or done:
            name = f"{split}-{len(entry['shards']):05d}.safetensors"
            write_atomic(directory / name, _pack(seqs, feats), world_readable=True)
            entry = {"shards": entry["shards"] + [name], "sequences": entry["sequences"] + len(seqs),
                     "tokens": entry["tokens"] + pending, "seconds": entry["seconds"] + time.perf_counter() - t0}
            manifest[split] = entry
            write_atomic(man_path, json.dumps(manifest, indent=1), world_readable=True)
            seqs, feats, pending, t0 = [], [], 0, time.perf_counter()
        if done:
            break
    bar.close()
    return entry


def load_split(directory: Path, split: str) -> TeacherData:
    manifest = json.loads((directory / "manifest.json").read_text())
    parts, ids = [], []
    for name in manifest[split]["shards"]:
        parts.append(load_file(directory / name))
        from safetensors import safe_open

        with safe_open(directory / name, "pt") as f:
            ids += json.loads(f.metadata()["conv_ids"])
    base, offsets = 0, [torch.zeros(1, dtype=torch.int64)]
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    return TeacherData(
        hidden=torch.cat([p["hidden"] for p in parts]),
        tokens=torch.cat([p["tokens"] for p in parts]),
        argmax=torch.cat([p["argmax"] for p in parts]),
        assistant=torch.cat([p["assistant"] for p in parts]).bool(),
        offsets=torch.cat(offsets),
        conv_ids=ids,
    )


def build_cache(model: Any, tokenizer: Any, data_cfg: DataConfig, root: Path, train_tokens: int, heldout_tokens: int,
                progress: bool = True, sharegpt: str | None = None) -> tuple[Path, dict]:
    """Both splits under ``root/<key>``; returns the directory and its manifest."""
    directory = Path(root) / cache_key(model, data_cfg)
    build_split(model, iter_sequences(tokenizer, data_cfg, True, sharegpt), directory, "heldout", heldout_tokens,
                progress=progress)
    build_split(model, iter_sequences(tokenizer, data_cfg, False, sharegpt), directory, "train", train_tokens,
                progress=progress)
    return directory, json.loads((directory / "manifest.json").read_text())


def from_sequences(model: Any, seqs: list[Sequence_]) -> TeacherData:
    """In-memory teacher data (tests, small runs): no cache."""
    feats = [teacher_forward(model, s.tokens) for s in seqs]
    lens = [len(s.tokens) for s in seqs]
    return TeacherData(
        hidden=torch.cat([h for h, _ in feats]), tokens=torch.tensor([t for s in seqs for t in s.tokens]),
        argmax=torch.cat([a for _, a in feats]), assistant=torch.tensor([m for s in seqs for m in s.assistant]),
        offsets=torch.tensor([0] + lens).cumsum(0), conv_ids=[s.conv_id for s in seqs])
