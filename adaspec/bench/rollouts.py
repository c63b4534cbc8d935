"""RL rollouts under a moving policy: a few GRPO steps on exact arithmetic, rollout time with and without speculation.

Each policy step samples ``--group`` answers to each of ``--prompts`` arithmetic questions (seeded, temperature 1)
twice through :class:`~adaspec.rollout.Rollouts` over the same target: once with plain batched sampling and once
with the full adaptive system (suffix index over earlier steps' rollouts, prompt lookup, live siblings, the draft
head, the confidence-aware controller), in alternating order. Seeded sampling gives the same tokens with and
without speculation, which the run checks. The rewards (1 when the worked answer ends on the right number, 0.1 for
a number at all) give each group's advantages; one GRPO policy-gradient step on a trainable copy of the policy
(Hugging Face transformers, fp32, its last ``--train-layers`` layers) changes the weights, which go into the engine
with ``Engine.update_weights`` before the next step (re-quantised to the target's blocks). The same questions come
back every step, as epochs over a small data set do.

    adaspec bench-rollouts --steps 3 --prompts 4 --group 8 --max-tokens 128 --json runs/rollouts.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from .. import files
from ..model.loader import bundled_gguf_path, load_target
from ..rollout import Rollouts, Sample
from ..system import build_engine

_NUMBER = re.compile(r"-?\d+")


def arithmetic(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` questions of adding or subtracting two numbers below 50, asking for the working, with their answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        if rng.random() < 0.5:
            out.append((f"What is {a} + {b}? Work it out step by step, then give the answer.", a + b))
        else:
            out.append((f"What is {a} - {b}? Work it out step by step, then give the answer.", a - b))
    return out


def reward(text: str, answer: int) -> float:
    """1 when the last number in ``text`` is ``answer`` (the worked answer ends with it), 0.1 for another number,
    0 for none."""
    found = _NUMBER.findall(text)
    if not found:
        return 0.0
    return 1.0 if int(found[-1]) == answer else 0.1


class Policy:
    """A trainable fp32 copy of the target (transformers), updated by GRPO's policy gradient."""

    def __init__(self, gguf: Path, train_layers: int, lr: float):
        from transformers import AutoModelForCausalLM

        self.net = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        self.net.train()
        for p in self.net.parameters():
            p.requires_grad_(False)
        layers = self.net.model.layers
        trained = [*layers[len(layers) - train_layers:].parameters(), *self.net.model.norm.parameters()]
        for p in trained:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(trained, lr=lr)

    def step(self, prompts: Sequence[list[int]], groups: Sequence[Sequence[Sample]], rewards: Sequence[Sequence[float]]
             ) -> dict:
        """One GRPO step: advantages normalised within each group, the loss the advantage-weighted mean
        log-probability of each response (on-policy, so the ratio is 1). Returns the step's numbers."""
        self.opt.zero_grad()
        n_seq = sum(len(g) for g in groups)
        loss_sum = 0.0
        for prompt, group, rs in zip(prompts, groups, rewards):
            mean = statistics.fmean(rs)
            std = statistics.pstdev(rs)
            for s, r in zip(group, rs):
                adv = (r - mean) / (std + 1e-4)
                if adv == 0 or not s.response_tokens:
                    continue
                ids = torch.tensor([prompt + s.response_tokens])
                logits = self.net(ids).logits[0, len(prompt) - 1: -1].float()
                logp = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0]
                loss = -adv * logp.mean() / n_seq
                loss.backward()
                loss_sum += float(loss.detach())
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grad = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
        before = [p.detach().clone() for p in params]
        self.opt.step()
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(params, before))
        return {"loss": loss_sum, "grad_l1": grad, "update_l1": moved}

    def weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        sd = self.net.state_dict()
        return {n: sd[n].detach() for n in names if n in sd}


def _probe(target, prompt: list[int]) -> torch.Tensor:
    """The target's logits after ``prompt`` (to see the weights move)."""
    with torch.inference_mode():
        return target.prefill(target.new_cache(), prompt).logits[-1].float().clone()


def _stats(groups: Sequence[Sequence[Sample]]) -> dict:
    drafted = sum(s.stats.drafted for g in groups for s in g)
    accepted = sum(s.stats.accepted for g in groups for s in g)
    forwards = sum(s.stats.forwards for g in groups for s in g)
    tokens = sum(len(s.tokens) + (s.stop_token is not None) for g in groups for s in g)
    chosen = Counter()
    for g in groups:
        for s in g:
            chosen.update(s.stats.chosen)
    return {"tokens": tokens, "drafted": drafted, "accepted": accepted, "steps_by_source": dict(chosen),
            "acceptance": accepted / drafted if drafted else None, "tokens_per_forward": tokens / max(forwards, 1)}


def run(args: argparse.Namespace) -> dict:
    gguf = files.resolve_model(args.model) if args.model else bundled_gguf_path()
    if gguf.suffix != ".gguf":
        raise SystemExit(f"bench-rollouts trains a copy of a GGUF model; {gguf} is not one")
    target, tok = load_target(str(gguf), backend="torch")
    plain, full = build_engine(target, tok, "plain"), build_engine(target, tok, "adaptive")
    policy = Policy(gguf, args.train_layers, args.lr)
    names = list(target.weight_shapes())
    questions = arithmetic(args.prompts, args.seed)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q, _ in questions]
    for engine in (plain, full):  # warm both paths up (kernels, caches) on a prompt of another kind, untimed
        Rollouts(engine, max_batch=args.max_batch).generate(
            [tok.apply_chat_template([{"role": "user", "content": "Say hello."}])], n=2, max_tokens=8, seed=0)
    steps = []
    for step in range(args.steps):
        seed = args.seed * 1000 + step
        timed = {}
        order = [("plain", plain), ("adaptive", full)] if step % 2 == 0 else [("adaptive", full), ("plain", plain)]
        for name, engine in order:
            t0 = time.perf_counter()
            groups = Rollouts(engine, max_batch=args.max_batch).generate(
                prompts, n=args.group, temperature=args.temperature, max_tokens=args.max_tokens, seed=seed)
            timed[name] = (time.perf_counter() - t0, groups)
        (t_plain, g_plain), (t_full, g_full) = timed["plain"], timed["adaptive"]
        same = all(a.tokens == b.tokens for ga, gb in zip(g_plain, g_full) for a, b in zip(ga, gb))
        rewards = [[reward(s.text or "", ans) for s in g] for g, (_, ans) in zip(g_full, questions)]
        t0 = time.perf_counter()
        update = policy.step(prompts, g_full, rewards)
        train_s = time.perf_counter() - t0
        probe_before = _probe(target, prompts[0])
        t0 = time.perf_counter()
        full.update_weights(policy.weights(names))
        update_s = time.perf_counter() - t0
        update["target_logit_change"] = float((_probe(target, prompts[0]) - probe_before).abs().max())
        row = {"step": step, "plain_s": t_plain, "adaptive_s": t_full, "speedup": t_plain / t_full,
               "identical_samples": same, "mean_reward": statistics.fmean(r for rs in rewards for r in rs),
               "train_s": train_s, "update_weights_s": update_s, **update,
               "plain": _stats(g_plain), "adaptive": _stats(g_full),
               "guard": full.guard.stats() if full.guard is not None else None}
        steps.append(row)
        a = row["adaptive"]
        print(f"step {step}: plain {t_plain:.1f} s, adaptive {t_full:.1f} s ({row['speedup']:.2f}x), "
              f"acceptance {a['acceptance'] if a['acceptance'] is not None else float('nan'):.0%}, "
              f"{a['tokens_per_forward']:.2f} tokens per forward, reward {row['mean_reward']:.2f}, "
              f"samples identical: {same}, update {update_s:.1f} s", flush=True)
    total_plain, total_full = sum(r["plain_s"] for r in steps), sum(r["adaptive_s"] for r in steps)
    summary = {"model": gguf.name, "config": vars(args) | {"model": str(gguf)}, "steps": steps,
               "rollout_speedup": total_plain / total_full}
    print(f"rollout phase over {args.steps} steps: plain {total_plain:.1f} s, adaptive {total_full:.1f} s, "
          f"{summary['rollout_speedup']:.2f}x")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaspec bench-rollouts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file or model name, e.g. qwen2.5-coder-0.5b (default: the "
                    "bundled model)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's G)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=8, help="samples in flight")
    ap.add_argument("--train-layers", type=int, default=2, help="last layers the policy step trains")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the per-step numbers here")
    args = ap.parse_args(argv)
    for name in ("steps", "prompts", "group", "max_tokens", "max_batch", "train_layers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    summary = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
