"""LoRA adapters for vLLM: PEFT folders, checked before vLLM's workers read them.

vLLM applies one adapter per request, at the strength it was trained with (alpha / r), and
reports a bad adapter only as a worker stack trace. `check_adapters` refuses what it would
refuse (or what it cannot express) as a 400 naming `loras`, before any request uses it.
Imports nothing of vLLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmserve.core.errors import InvalidRequestError
from llmserve.engines.base import ADAPTER_FOLDER_MARKER, AdapterSpec

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT saves


@dataclass(frozen=True)
class PeftAdapter:
    """A checked PEFT adapter folder and its identity on disk (a changed folder is new)."""

    name: str
    path: str
    rank: int
    signature: tuple[int, ...]


def check_adapters(specs: Sequence[AdapterSpec], max_rank: int) -> PeftAdapter | None:
    """The one adapter vLLM is to apply (None for none); raise InvalidRequestError if it can't.

    Each is checked first, so a bad folder is named for what is wrong with it.
    """
    adapters = [check_adapter(spec, max_rank) for spec in specs]
    if len(adapters) > 1:
        names = ", ".join(adapter.name for adapter in adapters)
        raise _refuse(
            f"the vLLM engine applies one LoRA adapter at a time (unload the other first), "
            f"got {names}"
        )
    return adapters[0] if adapters else None


def check_adapter(spec: AdapterSpec, max_rank: int) -> PeftAdapter:
    """Refuse a folder that is not a PEFT LoRA adapter vLLM can load at `spec.scale`."""
    path = Path(spec.path)
    if not math.isfinite(spec.scale) or spec.scale != 1.0:
        raise _refuse(
            f"the vLLM engine applies {path.name} at the strength it was trained with: its "
            f"scaling must be 1.0, got {spec.scale}"
        )
    if path.is_file():
        raise _refuse(
            f"{path.name} is a file; the vLLM engine takes PEFT adapter folders (holding "
            f"{ADAPTER_FOLDER_MARKER}), the llama.cpp engine takes GGUF adapter files"
        )
    config = _read_config(path)
    rank = _rank(config, path.name, max_rank)
    weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise _refuse(f"{path.name} holds no adapter weights ({' or '.join(WEIGHT_FILES)})")
    stats = [(path / ADAPTER_FOLDER_MARKER).stat(), weights[0].stat()]
    signature = tuple(value for st in stats for value in (st.st_ino, st.st_size, st.st_mtime_ns))
    return PeftAdapter(path.name, str(path.resolve()), rank, signature)


def _read_config(path: Path) -> dict[str, object]:
    config_file = path / ADAPTER_FOLDER_MARKER
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refuse(f"LoRA adapter not found: {path.name} (no {ADAPTER_FOLDER_MARKER})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(f"{path.name}: {ADAPTER_FOLDER_MARKER} is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise _refuse(f"{path.name}: {ADAPTER_FOLDER_MARKER} is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise _refuse(f"{path.name} is not a LoRA adapter (peft_type is {peft_type!r})")
    return config


def _rank(config: dict[str, object], name: str, max_rank: int) -> int:
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _refuse(f"{name}: {ADAPTER_FOLDER_MARKER} needs a positive integer rank r")
    if rank > max_rank:
        raise _refuse(
            f"{name} has rank {rank}, more than this model's max_lora_rank {max_rank} "
            f"(load the model with a larger --max-lora-rank)"
        )
    return rank


def _refuse(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param="loras")
