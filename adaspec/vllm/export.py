"""A GGUF that adaspec loads, as a Hugging Face directory vLLM loads (fp32 safetensors, config, tokenizer).

GGUFs of the architectures the torch backend runs go through adaspec's own converter (the cached conversion the
torch backend uses, its blocks dequantised to fp32); other architectures through transformers' GGUF reader.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ..files import cache_root, publish_dir, resolve_model
from ..model.gguf_header import read_header
from ..model.llama import ARCHITECTURES
from ..model.loader import ModelLoadError, bundled_gguf_path, convert_gguf, dense_weights

HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "special_tokens_map.json", "generation_config.json")
"""What vLLM reads from a converted directory besides the weights (written dense, as ``model.safetensors``)."""


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def export(model: str | os.PathLike | None, out: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory for ``model`` (a GGUF file, default the bundled model; a directory is returned
    as it is). ``out`` defaults to a folder of the cache keyed by the GGUF's digest; an existing export is reused."""
    try:
        src = resolve_model(model) if model else bundled_gguf_path()
    except (FileNotFoundError, ValueError) as e:
        raise ModelLoadError(str(e)) from None
    if is_hf_dir(src):
        return src
    if not src.is_file():
        raise ModelLoadError(f"{str(src)!r} is neither a GGUF file nor a Hugging Face model directory")
    try:
        arch = read_header(src).architecture
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if arch in ARCHITECTURES:
        converted = convert_gguf(src)
        name, fill = f"vllm-{converted.name}", lambda tmp: _copy_converted(converted, tmp)
    else:
        name = f"vllm-{src.stem}-{src.stat().st_size}-{int(src.stat().st_mtime)}"
        fill = lambda tmp: _convert_with_transformers(src, tmp)  # noqa: E731
    dest = Path(out) if out else cache_root() / name
    if (dest / "config.json").is_file():
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise ModelLoadError(f"{str(dest)!r} exists and holds no exported model; choose an empty or new folder")
    return publish_dir(dest, fill, "config.json")


def _copy_converted(converted: Path, tmp: Path) -> None:
    from safetensors.torch import save_file

    cfg = json.loads((converted / "config.json").read_text())
    if cfg.get("rope_freq_factors"):
        raise ModelLoadError("Llama 3.x RoPE frequency factors (rope_freqs.weight) have no Hugging Face config "
                             "field; this GGUF cannot be exported for vLLM")
    for name in HF_FILES:
        if (converted / name).is_file():
            shutil.copyfile(converted / name, tmp / name)
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in dense_weights(converted).items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})


def _convert_with_transformers(src: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # transformers raises assorted errors for architectures its GGUF reader lacks
        raise ModelLoadError(f"{str(src)!r}: cannot convert to a Hugging Face directory: {e}") from None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaspec vllm-export",
                                 description="Write a GGUF as a Hugging Face directory that vLLM loads.")
    ap.add_argument("model", nargs="?", default=None, help="GGUF file (default: the bundled model)")
    ap.add_argument("--out", default=None, help="directory to write (default: a folder of adaspec's cache)")
    args = ap.parse_args(argv)

    try:
        print(export(args.model, args.out))
    except ModelLoadError as e:
        print(f"adaspec: error: {e}", file=sys.stderr)
        return 2
    return 0
