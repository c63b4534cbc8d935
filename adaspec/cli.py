"""The ``adaspec`` command line.

Every subcommand reports bad arguments and unusable model paths with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .args import add_backend_arg


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="HF model directory, .gguf file or qwen2.5-coder-0.5b (default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_backend_arg(p)
    p.add_argument("--precision", default="auto", choices=["auto", "q8", "gguf", "fp32", "int4", "bf16", "fp16"],
                   help="auto (default): on CPU the GGUF's own blocks through adaspec's kernels (q8: int8 "
                        "activations per row, as llama.cpp computes; gguf: fp32 activations), else fp32; q8, "
                        "gguf, fp32 and int4 are lossless under speculation. bf16 / fp16 are LOSSY under "
                        "speculation (kernels chosen by batch size)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace):
    from .verify import SamplingParams

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    except ValueError as e:
        raise CliError(str(e)) from None


def _load(args: argparse.Namespace):
    from .model.loader import ModelLoadError, load_target

    try:
        model, tok = load_target(args.model, device=args.device, precision=args.precision, backend=args.backend)
    except ModelLoadError as e:
        raise CliError(str(e)) from None
    print(f"adaspec: backend {model.backend} ({model.backend_reason})", file=sys.stderr)
    return model, tok


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import stable_text
    from .system import build_engine

    params = _sampling(args)
    model, tok = _load(args)
    engine = build_engine(model, tok, "plain" if args.no_spec else args.mode, state_dir=args.state_dir)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    raw = args.raw
    if not raw and not tok.chat_template:
        print("adaspec: the model has no chat template; the prompt is used as raw text", file=sys.stderr)
        raw = True
    try:
        prompt_ids = tok.encode(args.prompt) if raw else tok.apply_chat_template(messages)
    except ValueError as e:
        raise CliError(str(e)) from None
    shown = 0
    for req, _ in engine.stream(prompt_ids, params):
        if args.stream:
            text = stable_text(req)
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    if args.stream:
        sys.stdout.write(req.text[shown:] + "\n")
    else:
        print(req.text)
    if args.stats:
        _print_stats(req.stats, req.finish_reason)
    engine.close()
    return 0


def _print_stats(st, finish_reason) -> None:
    chosen = ", ".join(f"{k}={v}" for k, v in st.chosen.most_common())
    print(f"[{st.output_tokens} tokens in {st.wall_s:.2f} s: {st.tok_s:.1f} tok/s; "
          f"{st.forwards} target forwards, {st.mean_accepted:.2f} tokens/forward; "
          f"drafted {st.drafted}, accepted {st.accepted} ({st.acceptance_rate:.0%}); "
          f"steps by speculator: {chosen}; finish: {finish_reason}]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from .system import MODES

    ap = argparse.ArgumentParser(prog="adaspec", description="Adaptive speculative decoding.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a reply to one prompt")
    g.add_argument("prompt")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--mode", choices=MODES, default="adaptive", help="speculation setup (default: adaptive)")
    g.add_argument("--no-spec", action="store_true", help="plain decoding (same as --mode plain)")
    g.add_argument("--system", default=None, help="system message")
    g.add_argument("--raw", action="store_true", help="no chat template: the prompt is raw text")
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--stats", action="store_true", help="print speculation statistics to stderr")
    g.add_argument("--state-dir", default=None, help="learned state to load and update (default: none kept)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="answer a few prompts with and without speculation, and compare speed")
    _add_model_args(d)
    d.add_argument("--max-tokens", type=int, default=128)
    d.set_defaults(func=_run_demo)

    from .serve.__main__ import add_serve_parser
    from .sim.simulate import add_parser as add_simulate_parser

    add_serve_parser(sub)
    add_simulate_parser(sub)

    b = sub.add_parser("bench", help="the drift benchmark: every configuration and peer over a real request stream")
    from .bench.drift import add_arguments as add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=_run_bench)

    # subcommands whose modules parse their own arguments
    for name, module, text in (("bench-costs", "adaspec.bench.cost_curve", "time target forwards of k tokens, c(k)"),
                               ("bench-load", "adaspec.bench.load", "load a running server with concurrent clients"),
                               ("bench-rollouts", "adaspec.bench.rollouts",
                                "GRPO steps on arithmetic: rollout time with and without speculation"),
                               ("train-static", "adaspec.train.static", "train the static draft head"),
                               ("vllm-serve", "adaspec.vllm.serve", "vLLM's OpenAI server with adaspec as its proposer"),
                               ("vllm-export", "adaspec.vllm.export", "a GGUF as a Hugging Face directory for vLLM")):
        x = sub.add_parser(name, help=text, add_help=False)
        x.set_defaults(func=_passthrough(module))
    return ap


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args, load=_load)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench.drift import run

    try:
        return run(args)
    except ValueError as e:
        raise CliError(str(e)) from None


def _passthrough(module: str):
    def call(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module).main(args.rest) or 0)

    return call


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest and not getattr(args, "func", None).__qualname__.startswith("_passthrough"):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"adaspec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
