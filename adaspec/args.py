"""Command-line options shared by ``adaspec`` and ``adaspec serve``."""

from __future__ import annotations

import argparse


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "llamacpp"],
                   help="auto (default): adaspec's own kernels for Llama GGUFs they run, llama.cpp for every other "
                        "GGUF; torch: bit-exact under speculation; llamacpp: every architecture llama.cpp runs, "
                        "equal to its plain decoding up to its batch noise")
