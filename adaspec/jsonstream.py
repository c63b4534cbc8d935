"""Reading a large, possibly truncated JSON array (the ShareGPT dump) element by element, in bounded memory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterator, TextIO

log = logging.getLogger(__name__)


@dataclass
class ArrayScan:
    """What ``iter_json_array`` saw; filled in while iterating."""

    elements: int = 0
    truncated: bool = False  # the input ended inside an element (or before the closing bracket)
    dropped_chars: int = 0  # characters of the incomplete last element that were discarded


class _Stream:
    """A text buffer over a file that grows on demand; ``pos`` is the read position in ``buf``."""

    def __init__(self, fp: TextIO, chunk_chars: int):
        self.fp, self.chunk, self.buf, self.pos, self.eof = fp, chunk_chars, "", 0, False

    def more(self) -> bool:
        """Append the next chunk (drops consumed text). The chunk grows with the buffer, so an
        element larger than one chunk costs a logarithmic number of re-parses, not a linear one."""
        if self.eof:
            return False
        data = self.fp.read(max(self.chunk, len(self.buf) - self.pos))
        if not data:
            self.eof = True
            return False
        self.buf, self.pos = self.buf[self.pos:] + data, 0
        return True

    def peek(self) -> str | None:
        """The next non-whitespace character (position left on it), or None at the end of input."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return None


def iter_json_array(fp: TextIO, scan: ArrayScan | None = None, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, tolerating a cut-off end.

    Elements are decoded with ``json.JSONDecoder.raw_decode`` straight from a
    growing buffer. If the input ends inside an element, that element is dropped
    and iteration stops (``scan.truncated``); malformed JSON followed by more data
    raises ``ValueError``.
    """
    scan = scan if scan is not None else ArrayScan()
    dec = json.JSONDecoder()
    s = _Stream(fp, chunk_chars)
    if s.peek() != "[":
        raise ValueError("expected a JSON array (the input does not start with '[')")
    s.pos += 1
    first = True
    while True:
        c = s.peek()
        if c is None:
            scan.truncated = True
            return
        if c == "]":
            return
        if not first:
            if c != ",":
                raise ValueError(f"malformed JSON array: expected ',' or ']' but found {c!r}")
            s.pos += 1
            if s.peek() is None:
                scan.truncated = True
                return
        while True:
            try:
                obj, end = dec.raw_decode(s.buf, s.pos)
            except json.JSONDecodeError as e:
                if s.more():
                    continue
                scan.truncated, scan.dropped_chars = True, len(s.buf) - s.pos
                log.debug("JSON array ends inside an element (%s); %d characters dropped", e.msg, scan.dropped_chars)
                return
            if end == len(s.buf):
                if s.more():  # a bare number may continue in the next chunk
                    continue
                if isinstance(obj, (int, float)) and not isinstance(obj, bool):  # cut-off digits look complete
                    scan.truncated, scan.dropped_chars = True, len(s.buf) - s.pos
                    return
            break
        s.pos = end
        first = False
        scan.elements += 1
        yield obj
