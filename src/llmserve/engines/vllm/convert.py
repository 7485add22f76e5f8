"""The bundled GGUF as a Hugging Face folder, which vLLM loads (its GGUF path is experimental).

transformers' GGUF loader dequantizes the Q4_1 weights to bfloat16 (about 270 MB for
SmolLM2-135M) in seconds; the folder is written once under `data_dir/converted/` and reused.
Needs transformers, gguf and accelerate, which the `vllm` extras install.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from llmserve.engines.base import MODEL_FOLDER_MARKER
from llmserve.models.defaults import default_model_path

log = logging.getLogger(__name__)

CONVERTED_DIR = "converted"


def default_hf_model(data_dir: Path) -> Path:
    """Where the bundled model's HF folder lives (converted or not yet)."""
    return data_dir / CONVERTED_DIR / default_model_path().stem


def ensure_default_hf_model(data_dir: Path) -> Path:
    """The bundled model's HF folder, converted from its GGUF on first use."""
    target = default_hf_model(data_dir)
    if not (target / MODEL_FOLDER_MARKER).is_file():
        convert_gguf(default_model_path(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Write `gguf` as an HF folder (bfloat16 safetensors, tokenizer, chat template) at `target`.

    Written into a temporary sibling and renamed, so an interrupted conversion leaves no
    half folder that a later start would take for a model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: nothing to fetch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to an HF folder at %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = str(gguf.parent), gguf.name
        log.info("converting, step 1 of 3: the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        log.info("converting, step 2 of 3: dequantizing the weights to bfloat16")
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        # Dequantized weights are plain tensors: the folder must not claim to be GGUF.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        log.info("converting, step 3 of 3: writing safetensors and the tokenizer")
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("converted %s", target)
    return target
