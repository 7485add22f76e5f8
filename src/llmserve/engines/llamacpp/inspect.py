"""Check a GGUF before llama.cpp sees it: a bad file must be a 4xx, not an abort or an OOM kill."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmserve.engines.base import InsufficientMemoryError, InvalidModelFileError
from llmserve.engines.llamacpp.gguf_header import GGUFHeaderError, MetaValue, read_header

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
        header = read_header(path)
    except GGUFHeaderError as exc:
        raise InvalidModelFileError(f"{path.name} is not a readable GGUF: {exc}") from exc
    size = path.stat().st_size
    for tensor in header.tensors:
        if tensor.end > size:
            raise InvalidModelFileError(
                f"{path.name} is truncated: tensor {tensor.name} ends past the file"
            )
    return _summary(path, header.metadata, size)


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


def _field(metadata: dict[str, MetaValue], key: str, default: Any = None) -> Any:
    """A key's text, number, or small array of numbers (`default` when absent or empty)."""
    entry = metadata.get(key)
    if entry is None:
        return default
    for value in (entry.value, entry.number, entry.numbers):
        if value is not None and value != ():
            return value
    return default


def _count(value: Any) -> int:
    """A count that may be given per layer (an array): its largest."""
    return int(max(value)) if isinstance(value, tuple) else int(value)


def _summary(path: Path, metadata: dict[str, MetaValue], size: int) -> GGUFSummary:
    arch = str(_field(metadata, "general.architecture", "unknown"))
    layers = _count(_field(metadata, f"{arch}.block_count", 0))
    embd = _count(_field(metadata, f"{arch}.embedding_length", 0))
    heads = _count(_field(metadata, f"{arch}.attention.head_count", 1)) or 1
    heads_kv = _count(_field(metadata, f"{arch}.attention.head_count_kv", heads)) or heads
    kv_width = embd // heads * heads_kv if heads else embd
    file_type = _field(metadata, "general.file_type")
    return GGUFSummary(
        path=path,
        kind=str(_field(metadata, "general.type", "model")),
        architecture=arch,
        name=str(_field(metadata, "general.name", path.stem)),
        file_type=int(file_type) if file_type is not None else None,
        size_bytes=size,
        block_count=layers,
        context_length=_count(_field(metadata, f"{arch}.context_length", 0)),
        kv_bytes_per_token=2 * layers * kv_width * F16_BYTES,
    )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    return _meminfo("MemAvailable:")


def machine_memory() -> int | None:
    """The memory this process may use: MemTotal, or a smaller cgroup (container) limit."""
    total = _meminfo("MemTotal:")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    if not limit.isdigit():  # "max": no limit
        return total
    return int(limit) if total is None else min(total, int(limit))


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key):
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
