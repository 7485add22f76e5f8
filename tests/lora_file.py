"""Write small LoRA adapter GGUFs for the bundled SmolLM2-135M model (no download needed).

llama.cpp adds `scale * alpha / rank * B @ A @ x` to a weight's output. In GGUF (and ggml)
dimensions are listed innermost first, the reverse of numpy's: for a weight W of ggml shape
[n_in, n_out], lora_a is [n_in, rank] (numpy (rank, n_in)) and lora_b is [rank, n_out]
(numpy (n_out, rank)).
"""

from __future__ import annotations

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
