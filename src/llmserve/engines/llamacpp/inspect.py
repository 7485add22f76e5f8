"""Check a GGUF before llama.cpp sees it: a bad file must be a 4xx, not an abort or an OOM kill."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader

from llmserve.engines.base import InsufficientMemoryError, InvalidModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
F16_BYTES = 2


@dataclass(frozen=True)
class GGUFSummary:
    """What llmserve needs to know about a GGUF file before loading it."""

    path: Path
    kind: str  # "model" or "adapter"
    architecture: str
    name: str
    file_type: int | None
    size_bytes: int
    block_count: int
    context_length: int
    kv_bytes_per_token: int  # f16 K and V over all layers

    def kv_bytes(self, tokens: int) -> int:
        """KV cache size for `tokens` cells at f16."""
        return self.kv_bytes_per_token * tokens


def inspect_gguf(path: Path) -> GGUFSummary:
    """Validate header, version and tensor extents; summarize the metadata."""
    _check_header(path)
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises many kinds on damaged files
        raise InvalidModelFileError(f"{path.name} is not a readable GGUF: {exc}") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InvalidModelFileError(
                f"{path.name} is truncated: tensor {tensor.name} ends past the file"
            )
    return _summary(path, reader, size)


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {path.name}: {exc.strerror}") from exc
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise InvalidModelFileError(f"{path.name} is not a GGUF file (bad magic)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in SUPPORTED_VERSIONS:
        raise InvalidModelFileError(f"{path.name}: unsupported GGUF version {version}")


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    return field.contents()


def _summary(path: Path, reader: GGUFReader, size: int) -> GGUFSummary:
    arch = str(_field(reader, "general.architecture", "unknown"))
    layers = int(_field(reader, f"{arch}.block_count", 0))
    embd = int(_field(reader, f"{arch}.embedding_length", 0))
    heads = _field(reader, f"{arch}.attention.head_count", 1) or 1
    heads_kv = _field(reader, f"{arch}.attention.head_count_kv", heads) or heads
    heads = heads if isinstance(heads, int) else max(heads)
    heads_kv = heads_kv if isinstance(heads_kv, int) else max(heads_kv)
    kv_width = embd // heads * heads_kv if heads else embd
    file_type = _field(reader, "general.file_type")
    return GGUFSummary(
        path=path,
        kind=str(_field(reader, "general.type", "model")),
        architecture=arch,
        name=str(_field(reader, "general.name", path.stem)),
        file_type=int(file_type) if file_type is not None else None,
        size_bytes=size,
        block_count=layers,
        context_length=int(_field(reader, f"{arch}.context_length", 0)),
        kv_bytes_per_token=2 * layers * kv_width * F16_BYTES,
    )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(summary: GGUFSummary, kv_tokens: int, headroom: float = 0.9) -> int:
    """The bytes weights plus KV cache need; refused when that exceeds the memory free now."""
    available = available_memory()
    need = summary.size_bytes + summary.kv_bytes(kv_tokens)
    if available is not None and need > available * headroom:
        raise InsufficientMemoryError(
            f"{summary.path.name} needs about {need >> 20} MiB (weights + KV cache for "
            f"{kv_tokens} tokens) but only {available >> 20} MiB is available; "
            "lower max_seq_len or parallel"
        )
    return need
