"""Crash-safe persistence of learned state (suffix indexes, head weights, calibration tables).

Every blob is one self-checking file (:func:`pack`), written atomically (:func:`adaspec.files.write_atomic`), and
restored only through :func:`restore`: a damaged or mis-shaped file is moved aside with a warning and its component
starts clean, so a damaged file costs the learned state, never the server. Arrays are ``.npz`` read without pickle,
so loading a file never executes code from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np

from .files import fsync_dir
from .files import remove_temporaries, write_atomic  # noqa: F401  (re-exported: the store's write path)

log = logging.getLogger(__name__)

MAGIC = b"ADASPEC\0"
CONTAINER_VERSION = 1
_LEN = struct.Struct("<I")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreCorruptError(ValueError):
    """A stored blob is truncated, damaged or of an unknown version."""


@runtime_checkable
class Persistent(Protocol):
    """A component with learned state kept in one file of the state directory."""

    def save(self, path: str | os.PathLike) -> None:
        """Write the learned state atomically (:func:`save_blob`)."""

    def load(self, path: str | os.PathLike, vocab_size: int | None = None) -> bool:
        """Restore from ``save`` through :func:`restore` (True); a missing or damaged file leaves the component
        clean (False). ``vocab_size`` bounds the token ids a state file may hold."""


def restore_components(directory: str | os.PathLike, speculators, controller,
                       vocab_size: int | None = None) -> list[tuple[Persistent, Path]]:
    """Restore every persistent component's learned state from ``directory`` (one file each: ``<name>.state``
    per speculator, ``controller.state``) and return the (component, file) pairs that a snapshot saves.

    Temporary files of a snapshot that a crash interrupted are deleted first (with a warning); a damaged or
    mis-shaped file is moved aside and its component starts clean (:func:`restore`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for p in remove_temporaries(directory):
        log.warning("removed %s, left by an interrupted snapshot", p.name)
    files = [(s, directory / f"{s.name}.state") for s in speculators if isinstance(s, Persistent)]
    if isinstance(controller, Persistent):
        files.append((controller, directory / "controller.state"))
    for obj, path in files:
        obj.load(path, vocab_size)
    return files


def quarantine(path: str | os.PathLike) -> Path | None:
    """Move a damaged state file aside to ``<name>.bad-<UTC time>`` (kept for inspection, never read again);
    the new path, or None when there was nothing to move."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.bad-{stamp}")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"{path.name}.bad-{stamp}-{n}"), n + 1
    try:
        os.replace(path, dest)
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    return dest


def restore(path: str | os.PathLike, apply: Callable[[bytes, dict], None], what: str) -> bool:
    """Hand the checksummed state file at ``path`` to ``apply(payload, meta)``; True if it was applied.

    ``apply`` should validate everything before it changes anything and raise :class:`StoreCorruptError` for
    content of the wrong shape. A missing file is False. A damaged one (container or schema, or anything
    ``apply`` raises) is moved aside with a ``RuntimeWarning`` naming ``what``, the file and the reason, and is
    False: the caller resets the component to a clean state.

    This is the one way learned state comes back: the
    container is checked, then the component's own loader validates the schema
    (shapes, ranges, finite numbers) before it changes anything. A file that fails
    either check is moved aside (:func:`quarantine`, kept for inspection, never
    read again) with a warning, and the component starts clean.
    """
    try:
        got = load_blob(path)
        if got is None:
            return False
        apply(*got)
        return True
    except Exception as e:  # whatever a damaged file makes a loader raise, it must not stop the server
        try:
            moved = quarantine(path)
        except OSError:  # unreadable and immovable (permissions): left in place, still not loaded
            moved = None
        kept = f"; moved to {moved.name}" if moved is not None else ""
        warnings.warn(f"{what}: ignoring damaged learned state {path}: {e}{kept}; starting clean", RuntimeWarning,
                      stacklevel=2)
        return False


def pack(payload: bytes, meta: Mapping[str, Any] | None = None) -> bytes:
    """Wrap ``payload`` in the checksummed container; ``meta`` must be JSON-serialisable.

    Every blob is written as one self-checking file::

        b"ADASPEC\\0"  | uint32 little-endian header length | header (UTF-8 JSON) | payload bytes

    The header records the container version, the payload length and its SHA-256,
    plus free-form metadata of the writer. A reader that finds a wrong magic, a
    short file, an unparsable header, a length or a checksum mismatch raises
    :class:`StoreCorruptError`; :class:`AtomicStore` turns that into a warning and
    "nothing stored", so a damaged file costs the learned state, never the server.
    """
    header = {"version": CONTAINER_VERSION, "length": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(), "meta": dict(meta or {})}
    h = json.dumps(header, sort_keys=True).encode()
    return MAGIC + _LEN.pack(len(h)) + h + payload


def unpack(blob: bytes) -> tuple[bytes, dict]:
    """Inverse of :func:`pack`: ``(payload, meta)``; raises :class:`StoreCorruptError` on any damage."""
    if len(blob) < len(MAGIC) + _LEN.size or blob[: len(MAGIC)] != MAGIC:
        raise StoreCorruptError("not an adaspec store file (bad magic or too short)")
    (hlen,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if start + hlen > len(blob):
        raise StoreCorruptError("truncated header")
    try:
        header = json.loads(blob[start : start + hlen].decode())
        version, length, digest = header["version"], int(header["length"]), str(header["sha256"])
        meta = dict(header.get("meta", {}))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"unreadable header: {e}") from e
    if version != CONTAINER_VERSION:
        raise StoreCorruptError(f"container version {version} is not supported (expected {CONTAINER_VERSION})")
    payload = blob[start + hlen :]
    if len(payload) != length:
        raise StoreCorruptError(f"payload is {len(payload)} bytes, header says {length} (truncated file?)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise StoreCorruptError("payload checksum mismatch")
    return payload, meta


def arrays_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Numeric arrays -> ``.npz`` bytes (object arrays are refused)."""
    for k, a in arrays.items():
        if np.asarray(a).dtype == object:
            raise TypeError(f"array {k!r} has dtype object; only numeric arrays can be stored")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(a) for k, a in arrays.items()})
    return buf.getvalue()


def arrays_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """``.npz`` bytes -> arrays, never unpickling; raises :class:`StoreCorruptError` if unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled content), EOFError, ...
        raise StoreCorruptError(f"unreadable array payload: {e}") from e


def save_blob(path: str | os.PathLike, payload: bytes, meta: Mapping[str, Any] | None = None) -> None:
    """Atomically write one checksummed blob to ``path``.

    The bytes go to a temporary file in the destination directory, are flushed and fsync'ed, ``os.replace``d over
    the destination and the directory is fsync'ed, so a crash leaves either the old or the new file. A crash between
    the temporary file's creation and the rename leaves the temporary file behind; :func:`remove_temporaries`
    deletes those at start-up."""
    write_atomic(path, pack(payload, meta))


def load_blob(path: str | os.PathLike) -> tuple[bytes, dict] | None:
    """Read a blob written by :func:`save_blob`: None if the file does not exist.

    Raises :class:`StoreCorruptError` if it exists but is damaged.
    """
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return unpack(blob)


class AtomicStore:
    """A directory of named, checksummed, atomically written blobs.

    One store holds every kind of learned state side by side, e.g.
    ``suffix`` (the suffix index), ``head`` (a neural head's weights) and
    ``calibration`` (the controller's tables). A damaged entry reads as
    missing, with a warning naming the file and the reason.
    """

    SUFFIX = ".blob"

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid store entry name {name!r}: use letters, digits, '.', '_' or '-'")
        return self.directory / (name + self.SUFFIX)

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name[: -len(self.SUFFIX)] for p in self.directory.glob("*" + self.SUFFIX)
                      if not p.name.startswith("."))

    def write_bytes(self, name: str, data: bytes, meta: Mapping[str, Any] | None = None) -> None:
        save_blob(self.path(name), data, meta)

    def read_bytes(self, name: str) -> bytes | None:
        got = self.read_with_meta(name)
        return None if got is None else got[0]

    def read_with_meta(self, name: str) -> tuple[bytes, dict] | None:
        path = self.path(name)
        try:
            return load_blob(path)
        except StoreCorruptError as e:
            warnings.warn(f"ignoring damaged learned state {path}: {e}", RuntimeWarning, stacklevel=2)
            return None

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, sort_keys=True).encode(), {"format": "json"})

    def read_json(self, name: str) -> Any | None:
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data.decode())
        except (ValueError, UnicodeDecodeError) as e:
            warnings.warn(f"ignoring damaged learned state {self.path(name)}: {e}", RuntimeWarning, stacklevel=2)
            return None

    def write_arrays(self, name: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> None:
        self.write_bytes(name, arrays_to_bytes(arrays), {"format": "npz", **dict(meta or {})})

    def read_arrays(self, name: str) -> dict[str, np.ndarray] | None:
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            return arrays_from_bytes(data)
        except StoreCorruptError as e:
            warnings.warn(f"ignoring damaged learned state {self.path(name)}: {e}", RuntimeWarning, stacklevel=2)
            return None

    def delete(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass
