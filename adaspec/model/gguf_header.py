"""The metadata and tensor list of a GGUF file, read from its header without touching the weights.

``gguf.GGUFReader`` builds a numpy view of every value, which takes tens of seconds for a 262k-token
vocabulary; deciding which backend runs a file needs a few scalars and the tensor types, so this reader keeps
scalars and skips arrays (string arrays element by element, the others by size).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = ["GGUFHeader", "read_header", "GGUFHeaderError"]

_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class GGUFHeader:
    fields: dict[str, object]  # scalar and string metadata; arrays are left out
    tensor_types: dict[str, str]  # tensor name -> GGML type name (e.g. "Q4_1")
    data_end: int = 0  # the file size the tensors need (end of the last tensor's data); 0 when a type is unknown

    @property
    def architecture(self) -> str:
        return str(self.fields.get("general.architecture", "unknown"))


def read_header(path: str | os.PathLike) -> GGUFHeader:
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _parse(m)
    except (OSError, ValueError, struct.error, IndexError) as e:
        raise GGUFHeaderError(f"{str(path)!r} is not a readable GGUF file: {e}") from None


def _parse(m: mmap.mmap) -> GGUFHeader:
    if m[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", m, p)
        return m[p + 8:p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

    def skip(kind: GGUFValueType, p: int) -> int:
        if kind == GGUFValueType.STRING:
            return p + 8 + struct.unpack_from("<Q", m, p)[0]
        return p + struct.calcsize(_SCALARS[kind])

    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind = GGUFValueType(struct.unpack_from("<I", m, pos)[0])
        pos += 4
        if kind == GGUFValueType.ARRAY:
            elem = GGUFValueType(struct.unpack_from("<I", m, pos)[0])
            (count,) = struct.unpack_from("<Q", m, pos + 4)
            pos += 12
            if elem == GGUFValueType.STRING:
                for _ in range(count):
                    pos = skip(elem, pos)
            else:
                pos += count * struct.calcsize(_SCALARS[elem])
        elif kind == GGUFValueType.STRING:
            fields[key], pos = string(pos)
        else:
            (fields[key],) = struct.unpack_from(_SCALARS[kind], m, pos)
            pos = skip(kind, pos)
    tensors: dict[str, str] = {}
    end: int | None = 0  # of the tensor data, relative to its start
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", m, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
        pos += 4 + 8 * n_dims
        kind, offset = struct.unpack_from("<IQ", m, pos)
        pos += 12  # type, offset
        try:
            qtype = GGMLQuantizationType(kind)
            tensors[name] = qtype.name
            weights, size = GGML_QUANT_SIZES[qtype]
            count = 1
            for n in dims:
                count *= n
            end = None if end is None else max(end, offset + count // weights * size)
        except (ValueError, KeyError):
            tensors[name] = f"type{kind}"
            end = None
    alignment = int(fields.get("general.alignment", 32))  # type: ignore[call-overload]
    data_start = (pos + alignment - 1) // alignment * alignment
    return GGUFHeader(fields, tensors, 0 if end is None else data_start + end)
