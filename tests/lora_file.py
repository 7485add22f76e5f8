"""Write small LoRA adapters for the bundled SmolLM2-135M model (no download needed): GGUF
files for llama.cpp, PEFT folders for vLLM.

llama.cpp adds `scale * alpha / rank * B @ A @ x` to a weight's output. In GGUF (and ggml)
dimensions are listed innermost first, the reverse of numpy's: for a weight W of ggml shape
[n_in, n_out], lora_a is [n_in, rank] (numpy (rank, n_in)) and lora_b is [rank, n_out]
(numpy (n_out, rank)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

N_EMBD = 576  # SmolLM2-135M: hidden size
N_KV = 192  # 3 KV heads x 64
TARGETS = {"attn_q": (N_EMBD, N_EMBD), "attn_v": (N_EMBD, N_KV)}  # weight: (n_in, n_out)

Tensors = dict[str, np.ndarray]


def smol_lora_tensors(
    layers: tuple[int, ...] = (0, 1, 2, 3),
    rank: int = 4,
    std: float = 0.3,
    seed: int = 0,
    n_in: int = N_EMBD,
) -> Tensors:
    """Random, non-zero A/B pairs for attn_q and attn_v of `layers` (`n_in` != 576: mismatch)."""
    rng = np.random.default_rng(seed)
    tensors: Tensors = {}
    for layer in layers:
        for name, (_, n_out) in TARGETS.items():
            base = f"blk.{layer}.{name}.weight"
            tensors[f"{base}.lora_a"] = rng.normal(0, std, (rank, n_in)).astype(np.float32)
            tensors[f"{base}.lora_b"] = rng.normal(0, std, (n_out, rank)).astype(np.float32)
    return tensors


def write_lora(
    path: Path,
    tensors: Tensors | None = None,
    *,
    arch: str = "llama",
    general_type: str = "adapter",
    alpha: float | str = 4.0,
) -> Path:
    """Write a LoRA adapter GGUF (by default the one `smol_lora_tensors()` describes).

    A string `alpha` is stored with the wrong GGUF type, as a damaged file would have it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, arch)  # also writes general.architecture
    writer.add_type(general_type)
    writer.add_string("adapter.type", "lora")
    if isinstance(alpha, str):
        writer.add_string("adapter.lora.alpha", alpha)
    else:
        writer.add_float32("adapter.lora.alpha", alpha)
    for name, array in (smol_lora_tensors() if tensors is None else tensors).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# PEFT's names for the same weights (Hugging Face module paths) and its layout: lora_A is
# (rank, n_in), lora_B (n_out, rank); PEFT adds alpha / rank * B @ A @ x.
PEFT_TARGETS = {"attn_q": "q_proj", "attn_v": "v_proj"}


def write_peft_lora(
    folder: Path,
    tensors: Tensors | None = None,
    *,
    rank: int = 4,
    alpha: float = 4.0,
    zero: bool = False,
) -> Path:
    """Write a PEFT LoRA folder for the converted SmolLM2 (`zero`: B = 0, a no-op adapter)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights: Tensors = {}
    for name, array in (smol_lora_tensors(rank=rank) if tensors is None else tensors).items():
        _, layer, target, _, part = name.split(".")
        module = f"base_model.model.model.layers.{layer}.self_attn.{PEFT_TARGETS[target]}"
        suffix = "lora_A" if part == "lora_a" else "lora_B"
        weights[f"{module}.{suffix}.weight"] = array * 0 if zero and suffix == "lora_B" else array
    save_file(weights, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(PEFT_TARGETS.values()),
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
