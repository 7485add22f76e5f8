"""LoRA adapters: check a file before llama.cpp sees it, load it once, apply a set with scales.

llama.cpp validates an adapter's architecture, tensor names and the two matrix dimensions it
multiplies, and returns NULL when they do not fit. A few defects it does not check would only
surface while decoding, as a failed ggml assertion that aborts the whole process: metadata of
the wrong GGUF type, extra tensor dimensions, a rank mismatch in an embedding adapter, tensor
types without matrix kernels. `check_adapter` refuses those first.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderTensor

from llmserve.core.errors import InvalidRequestError
from llmserve.engines.base import AdapterSpec
from llmserve.engines.llamacpp.gguf_header import GGUFHeaderError, MetaValue, read_metadata

GGML_MAX_DIMS = 4
# What llama.cpp's convert_lora_to_gguf.py writes; each has CPU matmul and get_rows kernels.
ADAPTER_TENSOR_TYPES = frozenset(
    {
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q8_0,
    }
)
# Keys llama.cpp reads with getters that assert the value's type (a mismatch aborts).
KEY_TYPES = {
    "general.type": GGUFValueType.STRING,
    "general.architecture": GGUFValueType.STRING,
    "adapter.type": GGUFValueType.STRING,
    "adapter.lora.alpha": GGUFValueType.FLOAT32,
}
TOKEN_EMBEDDING = "token_embd.weight"  # its adapter pair is laid out differently (A is gathered)
EXPERTS_MARK = "_exps."  # MoE expert stacks: 3-D, one matrix per expert


@dataclass(frozen=True)
class AdapterTarget:
    """What adapter checks need to know about the loaded model."""

    architecture: str
    n_expert: int


@dataclass(frozen=True)
class AdapterFile:
    """A checked adapter file, the scale to apply it at, and its identity on disk."""

    path: str
    scale: float
    signature: tuple[int, int, int]  # (inode, size, mtime_ns): a changed file is loaded again

    @property
    def name(self) -> str:
        """The file name, for messages."""
        return Path(self.path).name


def check_adapters(specs: Sequence[AdapterSpec], target: AdapterTarget) -> list[AdapterFile]:
    """Check every adapter file (blocking I/O); raise InvalidRequestError for the first bad one."""
    files = [check_adapter(spec, target) for spec in specs]
    paths = [file.path for file in files]
    for path in paths:
        if paths.count(path) > 1:
            raise _refuse(f"the LoRA adapter {Path(path).name} is given more than once")
    return files


def check_adapter(spec: AdapterSpec, target: AdapterTarget) -> AdapterFile:
    """Refuse a file that is not a LoRA adapter for `target`, before llama.cpp reads it."""
    path = Path(spec.path)
    if not math.isfinite(spec.scale):
        raise _refuse(f"the scale of {path.name} must be a finite number, got {spec.scale}")
    stat = _stat(path)
    try:
        metadata = read_metadata(path)
    except GGUFHeaderError as exc:
        raise _refuse(f"{path.name}: {exc}") from exc
    _check_metadata(metadata, path.name, target.architecture)
    try:  # only now: the reader is slow on files with big arrays, such as models
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises many kinds on damaged files
        raise _refuse(f"{path.name} is not a readable GGUF: {exc}") from exc
    _check_tensors(reader, path.name, target.n_expert, stat.st_size)
    signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return AdapterFile(str(path.resolve()), spec.scale, signature)


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="loras")


def _stat(path: Path) -> os.stat_result:
    try:
        stat = path.stat()
    except OSError as exc:
        raise _refuse(f"LoRA adapter file not found: {path.name}") from exc
    if path.is_dir():
        raise _refuse(
            f"{path.name} is a folder (a PEFT adapter?); the llama.cpp engine takes LoRA GGUF "
            "files (llama.cpp's convert_lora_to_gguf.py makes one from a PEFT folder)"
        )
    if not path.is_file():
        raise _refuse(f"{path.name} is not a file")
    return stat


def _check_metadata(metadata: dict[str, MetaValue], name: str, architecture: str) -> None:
    for key, value_type in KEY_TYPES.items():
        entry = metadata.get(key)
        if entry is not None and entry.type is not value_type:
            raise _refuse(f"{name}: metadata {key} must be a {value_type.name.lower()}")
    kind = _string(metadata, "general.type")
    if kind != "adapter":
        raise _refuse(f"{name} is not an adapter (general.type is {kind or 'missing'})")
    adapter_type = _string(metadata, "adapter.type")
    if adapter_type != "lora":
        raise _refuse(f"{name} is not a LoRA adapter (adapter.type is {adapter_type or 'missing'})")
    arch = _string(metadata, "general.architecture")
    if arch != architecture:
        raise _refuse(f"{name} adapts a {arch or 'unknown'} model, this model is {architecture}")


def _string(metadata: dict[str, MetaValue], key: str) -> str | None:
    entry = metadata.get(key)
    return None if entry is None else entry.value


def _check_tensors(reader: GGUFReader, name: str, n_expert: int, size: int) -> None:
    pairs: dict[str, dict[str, list[int]]] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith("_norm.weight"):
            continue  # llama.cpp ignores norm vectors in adapters
        weight, _, part = tensor.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise _refuse(f"{name}: tensor {tensor.name} is not a LoRA A or B matrix")
        pairs.setdefault(weight, {})[part] = _tensor_dims(tensor, name, size)
    if not pairs:
        raise _refuse(f"{name} holds no LoRA tensors")
    for weight, pair in pairs.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise _refuse(f"{name}: {weight} needs both lora_a and lora_b")
        _check_pair(name, weight, pair["lora_a"], pair["lora_b"], n_expert)


def _tensor_dims(tensor: ReaderTensor, name: str, size: int) -> list[int]:
    """ggml's four dimensions (ne) of a LoRA tensor whose type and extent are usable."""
    if tensor.tensor_type not in ADAPTER_TENSOR_TYPES:
        kind = tensor.tensor_type.name
        raise _refuse(f"{name}: tensor {tensor.name} has unsupported type {kind}")
    if int(tensor.data_offset) + int(tensor.n_bytes) > size:
        raise _refuse(f"{name} is truncated: tensor {tensor.name} ends past the file")
    ne = [int(d) for d in tensor.shape]
    return ne + [1] * (GGML_MAX_DIMS - len(ne))


def _check_pair(name: str, weight: str, a: list[int], b: list[int], n_expert: int) -> None:
    """The dimensions ggml asserts on at decode time and llama.cpp does not check at load."""
    depth = n_expert if EXPERTS_MARK in weight else 1
    if a[2:] != [depth, 1] or b[2:] != [depth, 1]:
        expected = f"3-D with {n_expert} experts" if depth > 1 else "2-D"
        raise _refuse(f"{name}: the LoRA tensors of {weight} must be {expected}")
    # llama.cpp checks the rank of ordinary pairs (A's rows = B's columns) but not this one.
    if weight == TOKEN_EMBEDDING and a[0] != b[0]:
        raise _refuse(f"{name}: lora_a and lora_b of {weight} have different ranks")


@dataclass
class _Loaded:
    signature: tuple[int, int, int]
    handle: Any  # llama_adapter_lora *


class LoraAdapters:
    """Adapter handles loaded into one model, by file, and the set applied to its context.

    Engine thread only. llama.cpp frees adapters still registered with a model when the model
    is freed; `free` releases them first (which unregisters them), so nothing is freed twice.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self._loaded: dict[str, _Loaded] = {}
        self._retired: list[Any] = []  # replaced by a newer file, maybe still applied
        self._applied: tuple[AdapterFile, ...] = ()

    def apply(self, ctx: Any, files: Sequence[AdapterFile]) -> bool:
        """Apply exactly `files` with their scales to `ctx`; return whether anything changed."""
        wanted = tuple(files)
        if wanted == self._applied:
            return False
        handles = [self._handle(file) for file in files]  # raises before anything changes
        count = len(handles)
        if count:
            array = (llama_cpp.llama_adapter_lora_p_ctypes * count)(*handles)
            scales = (ctypes.c_float * count)(*(file.scale for file in files))
            llama_cpp.llama_set_adapters_lora(ctx, array, count, scales)
        else:
            llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        self._applied = wanted
        self._free_retired()  # the context now holds only current handles
        return True

    def _handle(self, file: AdapterFile) -> Any:
        loaded = self._loaded.get(file.path)
        if loaded is not None and loaded.signature == file.signature:
            return loaded.handle
        handle = llama_cpp.llama_adapter_lora_init(self._model, os.fsencode(file.path))
        if not handle:
            raise _refuse(
                f"llama.cpp could not load the LoRA adapter {file.name}: it does not fit this "
                "model (see the server log for the tensor at fault)"
            )
        if loaded is not None:
            self._retired.append(loaded.handle)
        self._loaded[file.path] = _Loaded(file.signature, handle)
        return handle

    def _free_retired(self) -> None:
        retired, self._retired = self._retired, []
        for handle in retired:
            llama_cpp.llama_adapter_lora_free(handle)

    def free(self) -> None:
        """Free every handle; call after the context is freed, before the model is."""
        self._free_retired()
        loaded, self._loaded = self._loaded, {}
        for entry in loaded.values():
            llama_cpp.llama_adapter_lora_free(entry.handle)
        self._applied = ()
