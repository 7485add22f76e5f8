"""The loaded GGUF model, its vocabulary and one llama.cpp context shared by all slots."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from llmserve.core.errors import EngineError
from llmserve.engines.base import InvalidEngineSettingError, InvalidModelFileError, ModelInfo
from llmserve.engines.llamacpp.adapters import AdapterTarget, LoraAdapters
from llmserve.engines.llamacpp.config import KV_CACHE_TYPE_NAMES, LlamaCppConfig
from llmserve.engines.llamacpp.sampling import FloatRow

DESC_BUFFER = 256
META_BUFFER = 128

GGML_TYPE_BF16 = 30  # ggml.h's value; llama-cpp-python does not export it
KV_CACHE_TYPES = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "bf16": GGML_TYPE_BF16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
    "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q5_1": llama_cpp.GGML_TYPE_Q5_1,
    "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL,
}
assert set(KV_CACHE_TYPES) == KV_CACHE_TYPE_NAMES  # the config checks names against these


@dataclass(frozen=True)
class ContextSettings:
    """How to size and run the llama.cpp context (already resolved: no None means 'auto')."""

    config: LlamaCppConfig  # flash attention, KV cache types and layout, RoPE: as configured
    n_ctx: int  # all slots together
    n_seq_max: int
    n_batch: int
    n_threads: int
    n_threads_batch: int


llama_logger = logging.getLogger("llmserve.llama_cpp")

# ggml.h's log levels (NONE, DEBUG, INFO, WARN, ERROR, CONT) as Python levels; llama.cpp's
# INFO chatter (model metadata, buffer sizes) becomes DEBUG so a server log stays readable.
GGML_TO_PYTHON_LEVEL = {
    0: logging.DEBUG,
    1: logging.DEBUG,
    2: logging.DEBUG,
    3: logging.WARNING,
    4: logging.ERROR,
    5: logging.DEBUG,
}


def _forward_llama_log(level: int, text: bytes | None, _user_data: object) -> None:
    message = (text or b"").decode("utf-8", errors="replace").rstrip()
    if message:
        llama_logger.log(GGML_TO_PYTHON_LEVEL.get(level, logging.DEBUG), "%s", message)


# Kept referenced for the life of the process: llama.cpp calls it from C.
LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_llama_log)


def route_llama_log() -> None:
    """Send llama.cpp's log to Python logging (llama_backend_init resets it to stderr)."""
    llama_cpp.llama_log_set(LOG_CALLBACK, ctypes.c_void_p(0))


class LlamaModel:
    """Model weights, vocabulary and context; the engine thread is the only caller after load."""

    def __init__(self, path: Path, model: Any) -> None:
        self.path = path
        self.model = model
        self.vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.ctx: Any = None
        self.memory: Any = None
        self.kv_unified = True  # set by create_context
        self.loras = LoraAdapters(model)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def load(cls, path: str, n_gpu_layers: int, use_mmap: bool, cpu_repack: bool) -> LlamaModel:
        """Load the GGUF weights (no context yet)."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        llama_cpp.llama_backend_init()
        route_llama_log()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = (
            llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        )
        params.use_extra_bufts = cpu_repack
        model = llama_cpp.llama_model_load_from_file(str(file).encode(), params)
        if not model:
            # The file passed the GGUF checks, so what llama.cpp refuses is its content
            # (no model, unknown architecture, bad tensors): the caller's file, a 400.
            raise InvalidModelFileError(
                f"llama.cpp could not load {file.name} (see the server log for its reason)"
            )
        return cls(file, model)

    def create_context(self, settings: ContextSettings) -> None:
        """Create the one context every slot decodes in."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_seq_max = settings.n_seq_max
        params.n_batch = settings.n_batch
        # One step is one physical batch: split at 512, a full step (512 prompt tokens + one
        # per decoding sequence) would run the weights twice, the second time for a handful.
        params.n_ubatch = settings.n_batch
        # Prompt logprobs need a logits row for every token of a sequence in the batch.
        params.n_outputs_max = settings.n_batch
        params.n_outputs_max_per_seq = settings.n_batch
        params.n_threads = settings.n_threads
        params.n_threads_batch = settings.n_threads_batch
        config = settings.config
        params.flash_attn_type = _flash_attn_type(config.flash_attn)
        if config.cache_type_k is not None:
            params.type_k = KV_CACHE_TYPES[config.cache_type_k]
        if config.cache_type_v is not None:
            params.type_v = KV_CACHE_TYPES[config.cache_type_v]
        params.kv_unified = config.kv_unified
        if config.rope_freq_base is not None:
            params.rope_freq_base = config.rope_freq_base
        if config.rope_freq_scale is not None:
            params.rope_freq_scale = config.rope_freq_scale
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise _context_error(settings)
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.kv_unified = config.kv_unified

    # -- KvMemory --------------------------------------------------------------------------

    def drop_from(self, seq_id: int, position: int) -> None:
        """Forget the KV of `seq_id` at `position` and after."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq_id, position, -1):
            raise EngineError(f"llama.cpp refused to trim sequence {seq_id} at {position}")

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give `target` the KV of positions [0, length) of `source`."""
        if self.kv_unified:  # one buffer: the cells just gain a sequence id
            llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, length)
            return
        # Separate streams: llama.cpp aborts on a partial copy between streams, so copy the
        # whole stream (a buffer copy at the next decode, far cheaper than a prefill) and trim.
        self.copy_all(source, target)
        self.drop_from(target, length)

    def copy_all(self, source: int, target: int) -> None:
        """Give `target` all the KV of `source` (works with a per-sequence KV cache too)."""
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids, parsing special-token text such as `<|im_end|>`."""
        data = text.encode()
        capacity = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * capacity)()
            count = int(
                llama_cpp.llama_tokenize(
                    self.vocab, data, len(data), buffer, capacity, add_special, True
                )
            )
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def detokenize(self, ids: list[int]) -> str:
        """Token ids to text, special tokens rendered as their text."""
        if not ids:
            return ""
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        capacity = max(64, len(ids) * 8)
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = int(
                llama_cpp.llama_detokenize(
                    self.vocab, tokens, len(ids), buffer, capacity, False, True
                )
            )
            if count >= 0:
                return buffer.raw[:count].decode("utf-8", errors="replace")
            capacity = -count

    def piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token; control tokens render only when `special`."""
        key = (token, special)
        cached = self._pieces.get(key)
        if cached is None:
            cached = self._piece_uncached(token, special)
            self._pieces[key] = cached
        return cached

    def _piece_uncached(self, token: int, special: bool) -> bytes:
        capacity = 32
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = int(
                llama_cpp.llama_token_to_piece(self.vocab, token, buffer, capacity, 0, special)
            )
            if count >= 0:
                return buffer.raw[:count]
            capacity = -count

    def is_eog(self, token: int) -> bool:
        """End-of-generation token (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # -- logits ----------------------------------------------------------------------------

    def logits_row(self, batch_index: int) -> FloatRow:
        """A writable view of the logits llama.cpp computed for batch entry `batch_index`."""
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, batch_index)
        if not pointer:
            raise EngineError(f"no logits for batch entry {batch_index}")
        row: FloatRow = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        return row

    # -- description -----------------------------------------------------------------------

    def describe(self, model_id: str, ctx_size: int) -> ModelInfo:
        """What the API layer needs to know, read from the GGUF."""
        bos = _token_or_none(llama_cpp.llama_vocab_bos(self.vocab))
        eos = _token_or_none(llama_cpp.llama_vocab_eos(self.vocab))
        template = llama_cpp.llama_model_chat_template(self.model, None)
        desc = ctypes.create_string_buffer(DESC_BUFFER)
        llama_cpp.llama_model_desc(self.model, desc, DESC_BUFFER)
        return ModelInfo(
            id=model_id,
            path=str(self.path),
            context_length=ctx_size,
            train_context_length=self.n_ctx_train,
            vocab_size=self.n_vocab,
            bos_token_id=bos,
            eos_token_id=eos,
            bos_token=self._special_text(bos),
            eos_token=self._special_text(eos),
            eog_token_ids=frozenset(t for t in range(self.n_vocab) if self.is_eog(t)),
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)),
            n_params=int(llama_cpp.llama_model_n_params(self.model)),
            size_bytes=int(llama_cpp.llama_model_size(self.model)),
            description=desc.value.decode("utf-8", errors="replace"),
            fim_prefix=_token_or_none(llama_cpp.llama_vocab_fim_pre(self.vocab)),
            fim_suffix=_token_or_none(llama_cpp.llama_vocab_fim_suf(self.vocab)),
            fim_middle=_token_or_none(llama_cpp.llama_vocab_fim_mid(self.vocab)),
        )

    def adapter_target(self) -> AdapterTarget:
        """The architecture and expert count a LoRA adapter must match."""
        arch = self.meta("general.architecture") or ""
        experts = self.meta(f"{arch}.expert_count")
        return AdapterTarget(arch, int(experts) if experts and experts.isdigit() else 0)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value of the model as text (None when absent)."""
        buffer = ctypes.create_string_buffer(META_BUFFER)
        if llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, META_BUFFER) < 0:
            return None
        return buffer.value.decode("utf-8", errors="replace")

    def _special_text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def free(self) -> None:
        """Free the context, the LoRA adapters and the weights; safe to call twice."""
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            self.memory = None
        self.loras.free()  # the context that applied them is gone; the model is still here
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None


def _context_error(settings: ContextSettings) -> Exception:
    """Why llama.cpp refused the context: a KV cache type it cannot combine, or no memory."""
    message = f"llama.cpp could not create a context of {settings.n_ctx} tokens"
    # Quantized caches need kernels (flash attention for V) the backend may not have.
    for name in ("cache_type_v", "cache_type_k"):
        value = getattr(settings.config, name)
        if value is not None:
            return InvalidEngineSettingError(
                f"{message} with {name}={value!r}; try another cache type or flash_attn",
                param=name,
            )
    return EngineError(message)


def _token_or_none(token: int) -> int | None:
    return None if token < 0 else int(token)  # llama.cpp's LLAMA_TOKEN_NULL is -1


def _flash_attn_type(flash_attn: bool | None) -> int:
    if flash_attn is None:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
    if flash_attn:
        return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED)
    return int(llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
