"""Load a target model and its tokenizer: the bundled SmolLM2 GGUF, any GGUF file, a model name
(``files.MODEL_ALIASES``), or a Hugging Face directory.

A GGUF file is converted once into a cache directory laid out like a Hugging Face model directory (config,
tokenizer, the weights held as floats) plus the file's raw quantised blocks, keyed by the file's SHA-256 and
written atomically, so later starts only hash the file and map the weights (:func:`convert_gguf`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import files
from ..files import cache_root, publish_dir
from .gguf_header import GGUFHeaderError, read_header
from .llama import ARCHITECTURES, LlamaConfig, LlamaModel
from .quant import BLOCK_LAYOUT, PRECISIONS, GGUFBlocks, INT4_KINDS
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "load_target", "bundled_gguf_path", "cache_root", "convert_gguf", "resolve_precision",
           "choose_backend", "BACKENDS", "dense_weights"]

CONVERTER_VERSION = 2  # bump when the cache layout or the conversion changes
_FLOAT_KINDS = ("F32", "F16", "BF16")  # GGUF tensor types read as dense weights; BLOCK_LAYOUT's are kept as blocks
_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
_GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                     "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                     "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class ModelLoadError(ValueError):
    """The model path is missing, unreadable, or not a model this package can run."""


def bundled_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF (:func:`adaspec.files.bundled_gguf_path`); :class:`ModelLoadError` when
    it is missing."""
    try:
        return files.bundled_gguf_path()
    except FileNotFoundError as e:
        raise ModelLoadError(f"no model given and {e}; pass a GGUF file or a Hugging Face model directory") from None


def resolve_precision(precision: str, device: torch.device, block_kinds: frozenset[str]) -> str:
    """``auto``: on CPU, ``q8`` when the layer weights are GGUF blocks adaspec's compiled kernels compute: the
    file's own weights, each activation row quantised on its own to int8 (llama.cpp's function for these
    formats) and integer dot products, the fastest scheme measured (README). ``int4`` (torch's tinygemm kernel,
    bf16 activations) for 4-bit blocks where the kernels cannot be built; exact fp32 otherwise and on
    accelerators. ``gguf`` (fp32 activations, exact products with the file's weights) is a choice of its own.

    ``block_kinds``: the GGUF block types of the layer projections, empty when they are not all blocks. Every
    CPU scheme here is row independent, so speculation over it is exactly lossless with respect to plain
    decoding of the same model (tests/test_model.py, the bundled model included). Quantising weights that are
    not blocks would change the model, so ``int4`` is opt-in there. Half precision on GPUs can pick matmul
    kernels by batch size, which breaks that equality, so it is opt-in too (and named lossy)."""
    if precision == "auto":
        if device.type != "cpu" or not block_kinds:
            return "fp32"
        from .. import kernels

        if block_kinds <= set(kernels.KINDS) and kernels.available():
            return "q8"
        if block_kinds <= set(INT4_KINDS):
            log.warning("using torch's int4 kernel (bf16 activations) instead of adaspec's kernels")
            return "int4"
        return "fp32"
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    if precision in ("int4", "gguf", "q8") and device.type != "cpu":
        raise ModelLoadError(f"precision {precision} runs on CPU only; use bf16 or fp16 on an accelerator")
    return precision


BACKENDS = ("auto", "torch", "llamacpp")
"""auto: llama.cpp for GGUF architectures or weight types adaspec's kernels do not run, else adaspec's own torch
backend (see ``choose_backend``); torch: adaspec's backend (llama, qwen2, qwen3, bit-exact under speculation);
llamacpp: llama.cpp underneath (every architecture it runs; exact up to its batch noise)."""


def choose_backend(src: Path, device: torch.device, precision: str = "auto", backend: str = "auto") -> tuple[str, str]:
    """(backend, why) for a model path. ``auto`` prefers adaspec's torch backend wherever it runs the file itself:
    on the machines measured (docs/bench/README.md) its kernels verify k tokens faster than llama.cpp and plain
    decoding is on par, so speculation gains more on it. Everything else goes to llama.cpp."""
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    is_gguf = src.is_file() and (src.suffix.lower() == ".gguf" or _has_gguf_magic(src))
    if backend == "llamacpp":
        if not is_gguf:
            raise ModelLoadError(f"the llamacpp backend needs a .gguf file, not {str(src)!r}")
        if device.type != "cpu":
            raise ModelLoadError("the llamacpp backend runs on CPU here; use --backend torch on an accelerator")
        if precision != "auto":
            raise ModelLoadError("--precision applies to the torch backend; llama.cpp runs the file's own weights")
        return "llamacpp", "asked for"
    if backend == "torch":
        return "torch", "asked for"
    if not is_gguf:
        return "torch", "a Hugging Face directory"
    if device.type != "cpu":
        return "torch", f"device {device.type}"
    arch, kinds = _gguf_summary(src)
    if arch not in ARCHITECTURES:
        return "llamacpp", f"architecture {arch!r} is not implemented by the torch backend"
    if precision != "auto":
        return "torch", f"precision {precision} asked for"
    from .. import kernels

    if not kinds or not kinds <= set(kernels.KINDS):
        odd = ", ".join(sorted(kinds - set(kernels.KINDS))) or "non-block"
        return "llamacpp", f"{odd} weights have no adaspec kernel"
    if not kernels.available():
        return "llamacpp", f"adaspec's kernels cannot be built here ({kernels.unavailable_reason()})"
    name = "Llama" if arch == "llama" else arch.capitalize()
    return "torch", f"{name} architecture with weights adaspec's kernels run (faster verification than llama.cpp)"


def _gguf_summary(path: Path) -> tuple[str, frozenset[str]]:
    """(architecture, types of the layer projections' weights: biases and norms left out) from a GGUF header."""
    try:
        header = read_header(path)
    except GGUFHeaderError as e:
        raise ModelLoadError(str(e)) from None
    kinds = frozenset(kind for name, kind in header.tensor_types.items()
                      if name.startswith("blk.") and name.count(".") == 3 and name.endswith(".weight")
                      and name.split(".")[2] in _PROJECTIONS)
    return header.architecture, kinds


def load_target(path: str | os.PathLike | None = None, device: str | None = None, precision: str = "auto",
                backend: str = "auto", threads: int | None = None) -> tuple[Any, Tokenizer]:
    """Load a target and its tokenizer.

    ``path``: ``None`` for the bundled SmolLM2 GGUF, a ``.gguf`` file, a model name
    (``files.MODEL_ALIASES``, e.g. ``qwen2.5-coder-0.5b``), or a Hugging Face directory
    (``config.json`` + ``*.safetensors`` + tokenizer files).
    ``device``: ``None`` picks ``cuda`` when available, else ``cpu``.
    ``precision`` (torch backend): ``auto`` (see ``resolve_precision``), ``gguf``, ``fp32`` (exact),
    ``int4``, ``bf16`` or ``fp16``. ``backend``: see ``BACKENDS`` and ``choose_backend``; the choice
    and its reason are logged and kept in ``model.backend`` and ``model.backend_reason``.
    ``threads``: llama.cpp's threads (torch's are set by torch). Raises ``ModelLoadError`` with a readable message.
    """
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ModelLoadError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    try:
        src = bundled_gguf_path() if path is None else files.resolve_model(path)
    except (FileNotFoundError, ValueError, OSError) as e:  # a named model whose packages are missing or damaged
        raise ModelLoadError(str(e)) from None
    if not src.exists():
        raise ModelLoadError(f"model path {str(src)!r} does not exist")
    chosen, why = choose_backend(src, dev, precision, backend)
    log.info("backend %s: %s", chosen, why)
    if chosen == "llamacpp":
        model, tok = _load_llamacpp(src, threads)
    elif src.is_dir():
        model, tok = _load_dir(src, dev, precision)
    elif src.suffix.lower() == ".gguf" or _has_gguf_magic(src):
        model, tok = _load_dir(convert_gguf(src), dev, precision)
    else:
        raise ModelLoadError(f"{str(src)!r} is neither a .gguf file nor a Hugging Face model directory")
    model.backend_reason = why
    return model, tok


def _load_llamacpp(src: Path, threads: int | None):
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelLoadError("the llamacpp backend needs llama-cpp-python (`make setup` builds it)")
    from .llamacpp import GGUFTokenizer, LlamaCppError, LlamaCppModel

    if not _has_gguf_magic(src):
        raise ModelLoadError(f"{str(src)!r} is not a GGUF file")
    try:
        model = LlamaCppModel(src, threads=threads)
        return model, GGUFTokenizer(model)
    except LlamaCppError as e:
        raise ModelLoadError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Hugging Face directories (and converted GGUF caches)
# ---------------------------------------------------------------------------------------------


class _LazyTensors(Mapping):
    """Tensors of one or more safetensors files, read on access (memory-mapped)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _load_dir(folder: Path, device: torch.device, precision: str) -> tuple[LlamaModel, Tokenizer]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{str(folder)!r} is not a model directory: no config.json")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from None
    arch = hf_cfg.get("model_type") or next(
        (a for a, c in _HF_CLASSES.items() if c in (hf_cfg.get("architectures") or [])), None)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"{str(folder)!r}: model type {arch!r} is not supported "
                             f"(architectures {', '.join(ARCHITECTURES)})")
    hf_cfg["model_type"] = arch
    try:
        cfg = LlamaConfig.from_hf(hf_cfg)
    except ValueError as e:
        raise ModelLoadError(f"{str(folder)!r}: {e}") from None
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "gguf_blocks.safetensors")
    if not files:
        raise ModelLoadError(f"{str(folder)!r} has no *.safetensors weights")
    try:
        weights = _LazyTensors(files)
        blocks = _read_blocks(folder / "gguf_blocks.safetensors")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelLoadError(f"cannot read the weights in {str(folder)!r}: {e}") from None
    meta = _read_json(folder / "adaspec.json")
    layer_blocks = [b for k, b in blocks.items() if k.startswith("model.layers.") and k.endswith("proj.weight")]
    kinds = frozenset(b.kind for b in layer_blocks) if len(layer_blocks) == 7 * cfg.num_layers else frozenset()
    prec = resolve_precision(precision, device, kinds)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    try:
        model = LlamaModel(cfg, weights, device=device, dtype=dtype, precision=prec, blocks=blocks)
    except KeyError as e:
        raise ModelLoadError(f"{str(folder)!r}: {e.args[0]}") from None
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{str(folder)!r}: cannot build the model: {e}") from None
    eos = hf_cfg.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    gen_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos_ids += list(gen_eos) if isinstance(gen_eos, list) else ([gen_eos] if isinstance(gen_eos, int) else [])
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{str(folder)!r} has no tokenizer files (tokenizer.json)")
    try:
        tok = Tokenizer.from_dir(folder, name=meta.get("name") or folder.name, eos_token_ids=eos_ids)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{str(folder)!r}: cannot load the tokenizer: {e}") from None
    return model, tok


def dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a model directory (a converted GGUF's included) by Hugging Face name, quantised blocks
    dequantised to fp32: the state dict transformers or vLLM would load."""
    dense = _LazyTensors(sorted(p for p in folder.glob("*.safetensors") if p.name != "gguf_blocks.safetensors"))
    blocks = _read_blocks(folder / "gguf_blocks.safetensors")
    return {k: dense[k] for k in dense} | {k: b.dequantize() for k, b in blocks.items()}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_blocks(path: Path) -> dict[str, GGUFBlocks]:
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        kinds = f.metadata() or {}
        return {k: GGUFBlocks(kinds[k], f.get_tensor(k)) for k in f.keys()}


# ---------------------------------------------------------------------------------------------
# GGUF conversion
# ---------------------------------------------------------------------------------------------


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_gguf(path: Path, root: Path | None = None) -> Path:
    """The cache directory for the GGUF file ``path``, converting it first if needed.

    A GGUF file (architecture ``llama``, ``qwen2`` or ``qwen3``) is converted once
    into a cache directory laid out like a Hugging Face model directory
    (``config.json`` for the architecture, tokenizer files, ``model.safetensors``
    with the tensors the file holds as floats: norms, biases, float weights) plus
    ``gguf_blocks.safetensors``, the file's quantised weights as raw blocks (every
    type in ``BLOCK_LAYOUT``; their types in its metadata), which the model uses as
    they are or dequantises exactly at load. No dense copy of a block-held weight
    is written. The directory is keyed by the file's SHA-256 and written atomically
    (temporary directory, fsync, rename), so later starts only hash the file and
    map the weights.

    Conversion notes: every tensor's shape is checked against the metadata.
    llama.cpp stores the rows of ``attn_q``/``attn_k`` permuted for the RoPE of its
    ``llama`` architecture (adjacent pairs), which is undone here (the permutation
    transformers undoes; the result is bit-identical to
    ``LlamaForCausalLM.from_pretrained(..., gguf_file=...)``); ``qwen2``/``qwen3``
    files keep Hugging Face's row order (RoPE over halves), biases included.
    Llama 3.x's ``rope_freqs.weight`` becomes the config's ``rope_freq_factors``.
    """
    try:
        digest = _sha256(path)
    except OSError as e:
        raise ModelLoadError(f"cannot read {str(path)!r}: {e}") from None
    root = root or cache_root()
    final = root / f"gguf-v{CONVERTER_VERSION}-{digest[:24]}"
    if (final / "adaspec.json").is_file():
        return final
    return publish_dir(final, lambda tmp: _convert_into(path, tmp, digest), "adaspec.json")


def _convert_into(path: Path, out: Path, digest: str) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    def fail(message: str) -> ModelLoadError:
        return ModelLoadError(f"{str(path)!r}: {message}")

    try:
        header = read_header(path)
        size = path.stat().st_size
    except (GGUFHeaderError, OSError) as e:
        raise ModelLoadError(str(e)) from None
    if header.data_end and size < header.data_end:
        raise fail(f"the file is truncated: {size:,} bytes, its tensors need {header.data_end:,}")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/... on a malformed file
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    fields = {k: f for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}

    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch not in ARCHITECTURES:
        raise fail(f"GGUF architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")

    def field(key: str, default: Any = None) -> Any:  # architecture keys without their prefix: "block_count"
        f = fields.get(f"{arch}.{key}" if not key.startswith(("general.", "tokenizer.")) else key)
        return default if f is None else f.contents()

    if field("rope.scaling.type") not in (None, "none"):
        raise fail(f"RoPE scaling {field('rope.scaling.type')!r} is not supported")
    try:
        hf_cfg = _hf_config(arch, field, tensors)
        cfg = LlamaConfig.from_hf(hf_cfg)
    except KeyError as e:
        raise fail(f"the metadata lacks {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise fail(f"metadata the torch backend cannot use: {e}") from None
    rot = field("rope.dimension_count")
    if rot is not None and int(rot) != cfg.head_dim:
        raise fail(f"partial RoPE ({rot} of {cfg.head_dim} dims) is not supported")
    expected = _expected_shapes(cfg)
    for name in tensors:
        if name not in expected:
            raise fail(f"unexpected tensor {name!r} for a {arch} model")
    for name in expected:
        if name not in tensors:
            raise fail(f"the tensor {name!r} is missing")
    dense: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for name, shape in expected.items():
        t = tensors[name]
        kind = t.tensor_type.name
        if kind not in BLOCK_LAYOUT and kind not in _FLOAT_KINDS:
            raise fail(f"tensor {name!r} is of type {kind}, which the torch backend does not read (it reads "
                       f"{', '.join(_FLOAT_KINDS + tuple(BLOCK_LAYOUT))}); --backend llamacpp runs the file")
        got = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the innermost dimension first
        if got != shape:
            raise fail(f"tensor {name!r} has shape {got}, the metadata implies {shape}")
        if name == "rope_freqs.weight":
            continue  # in the config (rope_freq_factors)
        hf = _hf_name(name)
        order = None
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            order = _gguf_to_hf_rows(shape[0], cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        if kind in BLOCK_LAYOUT and len(shape) == 2:
            data = np.asarray(t.data).reshape(shape[0], -1)
            raw[hf] = torch.from_numpy(np.array(data if order is None else data[order], dtype=np.uint8,
                                                order="C", copy=True))
            kinds[hf] = kind
        else:
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            dense[hf] = torch.from_numpy(np.array(values if order is None else values[order], order="C", copy=True))
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    if raw:
        save_file(raw, str(out / "gguf_blocks.safetensors"), metadata=kinds)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    _convert_tokenizer(path, out, field("tokenizer.chat_template"))
    meta = {"name": path.stem, "source": str(path), "sha256": digest, "converter_version": CONVERTER_VERSION,
            "architecture": arch, "tensor_types": {k: v for k, v in sorted(kinds.items())}}
    (out / "adaspec.json").write_text(json.dumps(meta, indent=2))


def _hf_config(arch: str, field, tensors: Mapping) -> dict:
    """The Hugging Face ``config.json`` of a GGUF's metadata (``field`` reads keys without the architecture
    prefix); ``rope_freq_factors`` carries Llama 3.x's ``rope_freqs.weight`` (adaspec's key: the file holds the
    factors, not the scaling parameters they were computed from)."""

    def need(key: str) -> int:
        value = field(key)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return int(value)

    heads = need("attention.head_count")
    hidden = need("embedding_length")
    embedding = tensors.get("token_embd.weight")
    n_vocab = field("vocab_size") or (int(embedding.shape[-1]) if embedding is not None else 0)
    cfg = {
        "architectures": [_HF_CLASSES[arch]], "model_type": arch, "hidden_act": "silu",
        "vocab_size": int(n_vocab),
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(field("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(field("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    value_length = field("attention.value_length")
    if value_length is not None and int(value_length) != cfg["head_dim"]:
        raise ValueError(f"value heads of {value_length} beside key heads of {cfg['head_dim']}")
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    else:
        cfg["attention_bias"] = False
    if "rope_freqs.weight" in tensors:
        cfg["rope_freq_factors"] = [float(f) for f in tensors["rope_freqs.weight"].data]
    return cfg


def _expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GGUF of this config holds, by GGUF name, with its shape ([out, in] for matrices)."""
    d, inter, H, KV, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["output.weight"] = (c.vocab_size, d)
    if c.rope_freq_factors is not None:
        shapes["rope_freqs.weight"] = (hd // 2,)
    for i in range(c.num_layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (d,), b + "ffn_norm.weight": (d,),
                   b + "attn_q.weight": (H * hd, d), b + "attn_k.weight": (KV * hd, d),
                   b + "attn_v.weight": (KV * hd, d), b + "attn_output.weight": (d, H * hd),
                   b + "ffn_gate.weight": (inter, d), b + "ffn_up.weight": (inter, d), b + "ffn_down.weight": (d, inter)}
        if c.qkv_bias:
            shapes |= {b + "attn_q.bias": (H * hd,), b + "attn_k.bias": (KV * hd,), b + "attn_v.bias": (KV * hd,)}
        if c.qk_norm:
            shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)}
    return shapes


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    _, layer, part, suffix = gguf_name.split(".")  # blk.N.part.weight|bias
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{suffix}"


def _gguf_to_hf_rows(rows: int, heads: int):
    """Row order that undoes llama.cpp's Q/K permutation: HF row (h, half j, i) is GGUF row (h, i, j)."""
    import numpy as np

    return np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def _convert_tokenizer(path: Path, out: Path, chat_template: str | None) -> None:
    """Build the fast tokenizer from the GGUF vocabulary (transformers' converter) and save its files."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # the converter raises assorted errors for unknown vocabularies
        raise ModelLoadError(f"{str(path)!r}: cannot build a tokenizer from the GGUF vocabulary: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
