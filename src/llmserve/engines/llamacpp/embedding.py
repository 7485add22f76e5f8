"""Embeddings on the llama.cpp engine: a second context on the same weights, fed in bounded chunks.

The context is created on the first embed call with `embeddings` on and llama.cpp's pooling
off: llama.cpp pools each `llama_decode` on its own (its pooled vector covers only the tokens
of that call), so a prompt split over several steps could not be pooled there. Per-token
vectors come back instead and are pooled here, over every chunk of the prompt (mean, first
token, last token: what llama.cpp's MEAN, CLS and LAST compute over one call). That lets the
engine thread run at most `prefill_chunk` embedding tokens between two generation steps, so
streams keep flowing while a long batch of inputs is embedded.

Causal models (the default GGUF, any decoder) keep a prompt's KV between chunks; models with
non-causal attention (BERT-like encoders) need a whole prompt in one call, so for them a step
takes whole prompts (at least one, at most the context). Runs only on the engine thread.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from llmserve.core.errors import ContextLengthExceededError, EngineError, InvalidRequestError
from llmserve.engines.llamacpp.batch import TokenBatch
from llmserve.engines.llamacpp.config import LlamaCppConfig
from llmserve.engines.llamacpp.model import LlamaModel

logger = logging.getLogger(__name__)

# Prompts in one embedding step (llama.cpp allows 256, and no more than the batch's tokens).
MAX_STEP_SEQUENCES = 64
PROMPTS_PARAM = "prompts"  # dialects rename it to their field (OpenAI: `input`)

Vector = npt.NDArray[np.float64]


class Pooling(enum.Enum):
    """How a prompt's token vectors become one vector."""

    MEAN = "mean"
    CLS = "cls"  # the first token's vector
    LAST = "last"  # the last token's vector


# llama.cpp's enum llama_pooling_type, as `<arch>.pooling_type` stores it in a GGUF.
GGUF_POOLING = {
    int(llama_cpp.LLAMA_POOLING_TYPE_MEAN): Pooling.MEAN,
    int(llama_cpp.LLAMA_POOLING_TYPE_CLS): Pooling.CLS,
    int(llama_cpp.LLAMA_POOLING_TYPE_LAST): Pooling.LAST,
}
GGUF_RANK = int(llama_cpp.LLAMA_POOLING_TYPE_RANK)  # a reranker: scores, not embeddings


def resolve_pooling(setting: str | None, declared: str | None) -> Pooling | None:
    """The configured pooling, else the GGUF's, else MEAN; None for a reranker left as one."""
    if setting is not None:
        return Pooling(setting)
    if declared is None or not declared.lstrip("-").isdigit():
        return Pooling.MEAN  # no pooling declared (the default GGUF): mean, as issue 15 asks
    value = int(declared)
    if value == GGUF_RANK:
        return None
    return GGUF_POOLING.get(value, Pooling.MEAN)  # NONE (token vectors) has no single vector


@dataclass(eq=False)
class PromptState:
    """One prompt of a job: how much of it is decoded and what its pooling has gathered."""

    index: int  # in the job's prompts
    tokens: list[int]
    seq_id: int
    fed: int = 0
    total: Vector | None = None  # MEAN: sum of token vectors; CLS/LAST: the chosen vector

    @property
    def remaining(self) -> int:
        """Tokens not decoded yet."""
        return len(self.tokens) - self.fed


@dataclass(eq=False)
class EmbedJob:
    """One embed call: its prompts, progress and vectors. `cancelled` may be set from any thread."""

    prompts: list[PromptState]
    normalize: bool
    vectors: list[list[float] | None] = field(default_factory=list)
    next: int = 0  # the first prompt not finished
    cancelled: bool = False

    @classmethod
    def of(cls, prompts: Sequence[list[int]], normalize: bool, seq_ids: int) -> EmbedJob:
        """A job for these (already checked) prompts, cycling through `seq_ids` sequence ids.

        A step holds at most `seq_ids` prompts and only its first can come from an earlier
        step, so consecutive prompts never share an id while both are in the KV cache.
        """
        states = [PromptState(i, list(p), i % seq_ids) for i, p in enumerate(prompts)]
        return cls(states, normalize, [None] * len(states))

    def results(self) -> list[list[float]]:
        """The vectors, once the job has finished."""
        out = [v for v in self.vectors if v is not None]
        if len(out) != len(self.vectors):
            raise EngineError("the embedding job ended before every input was embedded")
        return out


@dataclass(frozen=True)
class Piece:
    """The part of a prompt one step decodes: batch rows [row, row + count)."""

    state: PromptState
    row: int
    count: int


class Embedder:
    """The embedding context of one model and the job running in it (one job at a time)."""

    def __init__(self, model: LlamaModel, config: LlamaCppConfig, ctx_size: int) -> None:
        self.model = model
        self.config = config
        self.ctx_size = ctx_size
        self.pooling = resolve_pooling(config.pooling, model.meta(_pooling_key(model)))
        self.dim = int(llama_cpp.llama_model_n_embd_out(model.model))
        self.seq_ids = min(MAX_STEP_SEQUENCES, config.prefill_chunk)  # llama.cpp: <= n_batch
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: TokenBatch | None = None
        self._causal = True
        self._active: EmbedJob | None = None

    @property
    def available(self) -> bool:
        """Whether this model gives embeddings (a reranker's rank pooling does not)."""
        return self.pooling is not None

    # -- caller's thread -------------------------------------------------------------------

    def check(self, prompts: Sequence[list[int]], vocab_size: int) -> None:
        """Refuse (400 naming `prompts`) empty prompts, unknown ids and prompts over the context."""
        if not prompts:
            raise InvalidRequestError("no input to embed", param=PROMPTS_PARAM)
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise InvalidRequestError(f"input {index} is empty", param=PROMPTS_PARAM)
            bad = [t for t in prompt if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"input {index} has token ids out of the vocabulary "
                    f"(0..{vocab_size - 1}): {bad[:5]}",
                    param=PROMPTS_PARAM,
                )
            if len(prompt) > self.ctx_size:
                raise ContextLengthExceededError(
                    f"input {index} has {len(prompt)} tokens; this model's context holds "
                    f"{self.ctx_size}",
                    param=PROMPTS_PARAM,
                )

    def job(self, prompts: Sequence[list[int]], normalize: bool) -> EmbedJob:
        """A job for `prompts` (already checked) to `advance` on the engine thread."""
        return EmbedJob.of(prompts, normalize, self.seq_ids)

    # -- engine thread ---------------------------------------------------------------------

    def advance(self, job: EmbedJob) -> bool:
        """Run one bounded chunk of `job`; True while it has more to do or waits its turn."""
        if job.cancelled:
            if self._active is job:
                self._release()
            return False
        if self._active is None:
            self._ensure_context()
            self._active = job
        elif self._active is not job:
            return True  # another call is embedding: this one goes on after it
        try:
            self._step(job)
        except BaseException:
            self._release()
            raise
        if job.next < len(job.prompts):
            return True
        self._release()
        return False

    def free(self) -> None:
        """Free the context and its batch (before the model); safe to call twice."""
        self._active = None
        if self._batch is not None:
            self._batch.free()
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
            self._memory = None

    def _release(self) -> None:
        """The active job is over: forget its KV so the next job starts empty."""
        self._active = None
        if self._memory:
            llama_cpp.llama_memory_clear(self._memory, True)

    def _ensure_context(self) -> None:
        if self._ctx is not None:
            return
        budget = self.config.prefill_chunk
        self._create(budget, n_ctx=self.ctx_size + budget)
        if not llama_cpp.llama_get_causal_attn(self._ctx):
            # Non-causal attention sees a whole prompt at once: one call must hold it.
            self.free()
            self._create(max(budget, self.ctx_size), n_ctx=self.ctx_size)
            self._causal = False
        logger.info(
            "embedding context for %s: %s pooling, %d dimensions, %s attention",
            self.config.model_id,
            self.pooling.value if self.pooling else "no",
            self.dim,
            "causal" if self._causal else "non-causal",
        )

    def _create(self, n_batch: int, n_ctx: int) -> None:
        cpus = os.cpu_count() or 1
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch  # one step is one physical batch, as in the main context
        params.n_seq_max = self.seq_ids
        params.n_outputs_max = n_batch  # every token's vector is pooled
        params.n_outputs_max_per_seq = n_batch
        params.kv_unified = True  # the sequences of a step share the cells, none is sized apart
        params.n_threads = self.config.n_threads or cpus
        params.n_threads_batch = self.config.n_threads_batch or cpus
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE  # pooled here, across chunks
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not ctx:
            raise EngineError(f"llama.cpp could not create an embedding context of {n_ctx} tokens")
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = TokenBatch(n_batch)

    def _step(self, job: EmbedJob) -> None:
        """Decode the next chunk of `job`'s prompts and pool what it produced."""
        batch = self._batch
        assert batch is not None
        pieces = self._fill(job, batch)
        status = batch.decode(self._ctx)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} while embedding")
        pointer = llama_cpp.llama_get_embeddings(self._ctx)
        if not pointer:
            raise EngineError("llama.cpp returned no embeddings")
        rows = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(batch.size, self.dim)
        )
        for piece in pieces:
            self._pool(piece, rows)
            state = piece.state
            if state.remaining == 0:
                job.vectors[state.index] = self._finish(state, job.normalize)

    def _fill(self, job: EmbedJob, batch: TokenBatch) -> list[Piece]:
        """Put up to a batch of tokens from the unfinished prompts, in order, into `batch`."""
        batch.clear()
        pieces: list[Piece] = []
        index = job.next
        while index < len(job.prompts) and len(pieces) < self.seq_ids:
            state = job.prompts[index]
            take = min(batch.room, state.remaining)
            if not self._causal and take < state.remaining:
                break  # a non-causal prompt goes in whole, in the next step
            if take == 0:
                break
            row = batch.size
            for offset in range(take):
                position = state.fed + offset
                batch.add(state.tokens[position], position, state.seq_id, True)
            pieces.append(Piece(state, row, take))
            if take < state.remaining:
                break  # the budget is spent: the prompt goes on in the next step
            index += 1
        job.next = index
        return pieces

    def _pool(self, piece: Piece, rows: npt.NDArray[np.float32]) -> None:
        state = piece.state
        block = rows[piece.row : piece.row + piece.count]
        if self.pooling is Pooling.MEAN:
            chunk_sum = block.sum(axis=0, dtype=np.float64)
            state.total = chunk_sum if state.total is None else state.total + chunk_sum
        elif self.pooling is Pooling.CLS:
            if state.fed == 0:
                state.total = block[0].astype(np.float64)
        else:  # LAST: the final chunk's last row
            state.total = block[-1].astype(np.float64)
        state.fed += piece.count

    def _finish(self, state: PromptState, normalize: bool) -> list[float]:
        """The prompt's vector; its KV cells are freed for the prompts after it."""
        if self._memory:
            llama_cpp.llama_memory_seq_rm(self._memory, state.seq_id, -1, -1)
        assert state.total is not None
        vector = state.total / len(state.tokens) if self.pooling is Pooling.MEAN else state.total
        if normalize:
            norm = float(np.linalg.norm(vector))
            if norm > 0:
                vector = vector / norm
        return [float(x) for x in vector.astype(np.float32)]


def _pooling_key(model: LlamaModel) -> str:
    return f"{model.meta('general.architecture') or ''}.pooling_type"
