"""Read a GGUF's metadata keys without loading its arrays.

gguf's GGUFReader parses every array element into numpy objects: seconds on a model whose
tokenizer holds 100k strings. Deciding whether a file is an adapter needs only a few scalar
keys, so this scanner steps over arrays by their lengths.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
FIXED_SIZES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


class GGUFHeaderError(ValueError):
    """The file is not a GGUF this scanner can read."""


@dataclass(frozen=True)
class MetaValue:
    """A metadata entry: its type, and its value when it is a string."""

    type: GGUFValueType
    value: str | None = None


def read_metadata(path: Path) -> dict[str, MetaValue]:
    """Every metadata key of the GGUF at `path`; raise GGUFHeaderError when it is not one."""
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _Scanner(m).metadata()
    except GGUFHeaderError:
        raise
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise GGUFHeaderError(f"unreadable GGUF header ({exc})") from exc


class _Scanner:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def metadata(self) -> dict[str, MetaValue]:
        if self.data[:4] != GGUF_MAGIC:
            raise GGUFHeaderError("not a GGUF file (bad magic)")
        self.pos = 4
        version = self._unpack("<I")
        if version not in GGUF_VERSIONS:
            raise GGUFHeaderError(f"unsupported GGUF version {version}")
        self._unpack("<Q")  # tensor count
        entries: dict[str, MetaValue] = {}
        for _ in range(self._unpack("<Q")):
            key = self._string()
            kind = GGUFValueType(self._unpack("<I"))
            entries[key] = MetaValue(kind, self._value(kind))
        return entries

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def _string(self) -> str:
        length = self._unpack("<Q")
        end = self.pos + length
        if end > len(self.data):
            raise GGUFHeaderError("a string runs past the end of the file")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def _value(self, kind: GGUFValueType) -> str | None:
        """A string's text; other values are stepped over."""
        if kind is GGUFValueType.STRING:
            return self._string()
        if kind is GGUFValueType.ARRAY:
            self._skip_array()
        else:
            self.pos += FIXED_SIZES[kind]
        return None

    def _skip_array(self) -> None:
        kind = GGUFValueType(self._unpack("<I"))
        count = self._unpack("<Q")
        if kind in FIXED_SIZES:
            self.pos += count * FIXED_SIZES[kind]
            if self.pos > len(self.data):
                raise GGUFHeaderError("an array runs past the end of the file")
            return
        for _ in range(count):
            if kind is GGUFValueType.STRING:  # step over without decoding: tokenizers hold 100k
                self.pos += 8 + self._peek_length()
            else:
                self._value(kind)
        if self.pos > len(self.data):
            raise GGUFHeaderError("an array runs past the end of the file")

    def _peek_length(self) -> int:
        (length,) = struct.unpack_from("<Q", self.data, self.pos)
        return int(length)
