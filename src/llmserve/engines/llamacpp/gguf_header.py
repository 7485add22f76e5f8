"""Read a GGUF's metadata and tensor extents without loading its arrays.

gguf's GGUFReader parses every array element into numpy objects: seconds on a model whose
tokenizer holds 100k strings (6-7 s for the bundled model's 49k on a 2-core AVX2 host), paid at
every load. Checking a file and estimating its memory needs only scalar keys, small integer
arrays (per-layer head counts) and where each tensor ends, so this scanner steps over the rest
by their lengths.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
SMALL_ARRAY = 4096  # integer arrays up to this length are read (per-layer values), not skipped
DEFAULT_ALIGNMENT = 32
UNPACK = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
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


Number = int | float | bool


@dataclass(frozen=True)
class MetaValue:
    """A metadata entry: its type, its text (strings), number, or numbers (small arrays)."""

    type: GGUFValueType
    value: str | None = None
    number: Number | None = None
    numbers: tuple[Number, ...] | None = None


@dataclass(frozen=True)
class TensorExtent:
    """Where a tensor's data lies in the file."""

    name: str
    start: int
    n_bytes: int

    @property
    def end(self) -> int:
        """The offset just past its data."""
        return self.start + self.n_bytes


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's metadata and its tensors' extents."""

    metadata: dict[str, MetaValue]
    tensors: list[TensorExtent]


def read_metadata(path: Path) -> dict[str, MetaValue]:
    """Every metadata key of the GGUF at `path`; raise GGUFHeaderError when it is not one."""
    return read_header(path).metadata


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor extents of the GGUF at `path` (GGUFHeaderError if it is not one)."""
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            scanner = _Scanner(m)
            metadata = scanner.metadata()
            return GGUFHeader(metadata, scanner.tensors(metadata))
    except GGUFHeaderError:
        raise
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:
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
        self.tensor_count = self._unpack("<Q")
        entries: dict[str, MetaValue] = {}
        for _ in range(self._unpack("<Q")):
            key = self._string()
            kind = GGUFValueType(self._unpack("<I"))
            entries[key] = self._entry(kind)
        return entries

    def tensors(self, metadata: dict[str, MetaValue]) -> list[TensorExtent]:
        """The tensor infos that follow the metadata, as extents in the file."""
        infos = []
        for _ in range(self.tensor_count):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            kind = GGMLQuantizationType(self._unpack("<I"))
            offset = self._unpack("<Q")
            infos.append((name, dims, kind, offset))
        alignment = metadata.get("general.alignment")
        align = int(alignment.number) if alignment and alignment.number else DEFAULT_ALIGNMENT
        data_start = -(-self.pos // align) * align
        extents = []
        for name, dims, kind, offset in infos:
            block, type_size = GGML_QUANT_SIZES[kind]
            elements = 1
            for dim in dims:
                elements *= dim
            extents.append(TensorExtent(name, data_start + offset, elements // block * type_size))
        return extents

    def _entry(self, kind: GGUFValueType) -> MetaValue:
        if kind is GGUFValueType.STRING:
            return MetaValue(kind, value=self._string())
        if kind is GGUFValueType.ARRAY:
            return MetaValue(kind, numbers=self._array())
        return MetaValue(kind, number=self._number(kind))

    def _number(self, kind: GGUFValueType) -> Number:
        (value,) = struct.unpack_from(UNPACK[kind], self.data, self.pos)
        self.pos += FIXED_SIZES[kind]
        return value  # type: ignore[no-any-return]

    def _array(self) -> tuple[Number, ...] | None:
        """A small array of numbers; other arrays are stepped over (None)."""
        start = self.pos
        kind = GGUFValueType(self._unpack("<I"))
        count = self._unpack("<Q")
        if kind in FIXED_SIZES and count <= SMALL_ARRAY:
            return tuple(self._number(kind) for _ in range(count))
        self.pos = start
        self._skip_array()
        return None

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
