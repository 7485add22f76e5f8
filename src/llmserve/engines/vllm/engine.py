"""VllmEngine: vLLM's in-process AsyncLLM (V1) behind the Engine contract.

vLLM schedules, batches, samples, detokenizes and matches stop strings itself (its engine core
runs in a child process); this class translates requests and deltas, checks what vLLM would
only refuse later (context, vocabulary, n), and maps vLLM's errors onto llmserve's.
Importing this module imports vLLM: the factory does it only when a model is loaded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from transformers import AutoTokenizer
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.sampling_params import SamplingParams as VllmSamplingParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from llmserve.core.errors import (
    EngineError,
    InvalidRequestError,
    QueueFullError,
    ServiceUnavailableError,
)
from llmserve.core.params import SamplingParams
from llmserve.core.request import (
    Delta,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llmserve.engines.base import (
    AdapterSpec,
    EngineStats,
    InvalidEngineSettingError,
    ModelInfo,
)
from llmserve.engines.validation import check_token_ids, validate_request
from llmserve.engines.vllm.adapters import PeftAdapter, check_adapters
from llmserve.engines.vllm.args import check_platform, engine_args, offline_environment
from llmserve.engines.vllm.params import CAPABILITIES, sampling_kwargs, structured_kwargs
from llmserve.engines.vllm.settings import VllmSettings
from llmserve.engines.vllm.stats import SchedulerCounters, recorder_factory

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
}


@dataclass
class Totals:
    """Token counters over the engine's life, for EngineStats."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class RequestState:
    """One request on its way through vLLM: ids and what its deltas added up to."""

    engine_id: str  # unique per submission (clients may reuse request ids)
    prompt_tokens: int
    copies: int  # greedy choices are computed once and sent `copies` times (n)
    constraint_param: str | None = None  # the request field its output constraint came from
    top_logprobs: int = 0  # alternatives asked for per generated token
    top_prompt_logprobs: int = 0  # and per prompt token
    completion_tokens: int = 0
    cached_tokens: int = 0


class VllmEngine:
    """Serves one model through vLLM's AsyncLLM."""

    def __init__(
        self,
        settings: VllmSettings,
        info: ModelInfo,
        llm: Any,
        tokenizer: Any,
        counters: SchedulerCounters,
    ) -> None:
        """Use `VllmEngine.load`; this wires already-built parts."""
        self.settings = settings
        self.info = info
        self._llm = llm
        self._tokenizer = tokenizer
        self._counters = counters
        self._totals = Totals()
        self._parallel = int(llm.vllm_config.scheduler_config.max_num_seqs)
        self._ids = itertools.count()
        self._requests: dict[str, list[str]] = {}  # client request id -> engine ids
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop vLLM's outputs run on
        self._tasks: set[asyncio.Task[None]] = set()  # aborts in flight (kept referenced)
        self._lora: LoRARequest | None = None  # the adapter new requests run with
        self._lora_ids: dict[tuple[str, tuple[int, ...]], int] = {}  # (folder, identity) -> id

    @classmethod
    def load(cls, settings: VllmSettings, path: Path, model_id: str) -> VllmEngine:
        """Start vLLM's engine for the HF folder at `path` (blocking: minutes on a CPU)."""
        check_platform(settings)
        offline_environment(settings)
        kwargs = engine_args(settings, path, model_id)
        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **kwargs["structured_outputs_config"]
        )
        args = AsyncEngineArgs(**kwargs)
        counters = SchedulerCounters()
        llm = AsyncLLM.from_vllm_config(
            engine_config(args),
            stat_loggers=[recorder_factory(counters)],
            disable_log_stats=args.disable_log_stats,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            info = model_info(model_id, path, tokenizer, llm)
        except BaseException:
            llm.shutdown()
            raise
        logger.info(
            "loaded %s on vLLM (%s): %d sequences x %d tokens",
            model_id,
            info.description,
            llm.vllm_config.scheduler_config.max_num_seqs,
            info.context_length,
        )
        return cls(settings, info, llm, tokenizer, counters)

    # -- the Engine protocol ---------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """Validate now (raising before any delta), then stream the request's deltas."""
        self._ensure_running()
        max_new_tokens = validate_request(req, self.info, self._parallel)
        self._ensure_queue_room()
        params = self._vllm_params(req.params, max_new_tokens)
        return self._stream(req, params)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids; special-token text (e.g. `<|im_end|>`) is parsed as such."""
        self._ensure_running()
        try:
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special)
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(f"the text is not valid Unicode: {exc.reason}") from None
        return ids

    def detokenize(self, ids: list[int]) -> str:
        """Token ids back to text (special tokens rendered)."""
        self._ensure_running()
        check_token_ids(ids, self.info.vocab_size, "tokens")
        text: str = self._tokenizer.decode(ids, skip_special_tokens=False)
        return text

    def abort(self, request_id: str) -> None:
        """Stop a request at vLLM's next step; its stream ends with FinishReason.ABORT."""
        engine_ids = self._requests.get(request_id)
        if engine_ids and self._loop is not None:
            # Callable from any thread: vLLM's abort is a coroutine of the serving loop.
            ids = list(engine_ids)
            self._loop.call_soon_threadsafe(lambda: self._tasks.add(self._abort_task(ids)))

    def _abort_task(self, engine_ids: list[str]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(self._llm.abort(engine_ids))
        task.add_done_callback(self._tasks.discard)
        return task

    def stats(self) -> EngineStats:
        """vLLM's latest scheduler state and this engine's token counters."""
        counters, totals = self._counters, self._totals
        cells = self._kv_cells()
        return EngineStats(
            running=counters.running,
            waiting=counters.waiting,
            free_slots=max(self._parallel - counters.running, 0),
            total_slots=self._parallel,
            kv_cells_used=round(counters.kv_usage * cells),
            kv_cells_total=cells,
            prompt_tokens_total=totals.prompt_tokens,
            cached_prompt_tokens_total=totals.cached_prompt_tokens,
            generated_tokens_total=totals.generated_tokens,
            steps_total=counters.steps_total,
            alive=not self._closed and not self._llm.errored,
            error=None if not self._llm.errored else "vLLM's engine core died",
        )

    async def set_adapters(self, adapters: Sequence[AdapterSpec]) -> None:
        """Run every new request with this one PEFT adapter (empty: none).

        Requests already running keep the adapter they started with. vLLM reads the folder
        now (add_lora), so a bad adapter is a 400 here rather than a failure of the next request.
        """
        if adapters and not self.settings.enable_lora:
            raise InvalidRequestError(
                f"{self.info.id} runs on vLLM without LoRA support: load it with enable_lora "
                "(--enable-lora) to apply adapters",
                param="loras",
            )
        adapter = await asyncio.to_thread(check_adapters, adapters, self.settings.max_lora_rank)
        self._lora = None if adapter is None else await self._add_lora(adapter)

    async def _add_lora(self, adapter: PeftAdapter) -> LoRARequest:
        """Have vLLM read `adapter`: one id per folder and contents (a changed folder is new)."""
        key = (adapter.path, adapter.signature)
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        request = LoRARequest(f"{adapter.name}-{lora_id}", lora_id, adapter.path)
        try:
            await self._llm.add_lora(request)
        except EngineDeadError:
            raise self._died() from None
        except Exception as exc:  # vLLM relays a worker's failure to load as a bare Exception
            raise InvalidRequestError(
                f"vLLM could not load the LoRA adapter {adapter.name}: {exc}", param="loras"
            ) from None
        return request

    async def embed(
        self, prompts: Sequence[list[int]], normalize: bool = True
    ) -> list[list[float]]:
        """Not supported here (capabilities say so; the capability check refuses first)."""
        raise InvalidRequestError("the vLLM engine computes no embeddings", param="model")

    async def close(self) -> None:
        """Abort everything and stop vLLM's engine core and workers."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._llm.shutdown)

    # -- checks ----------------------------------------------------------------------------

    def _died(self) -> EngineError:
        return EngineError(f"vLLM's engine core for {self.info.id} died")

    def _ensure_running(self) -> None:
        if self._closed or self._llm.errored:
            raise ServiceUnavailableError(f"the engine for {self.info.id} is not running")

    def _ensure_queue_room(self) -> None:
        limit = self.settings.max_queue
        if limit is not None and self._counters.waiting >= limit:
            raise QueueFullError(f"{self._counters.waiting} requests wait for {self.info.id}")

    def _vllm_params(self, params: SamplingParams, max_new_tokens: int) -> Any:
        kwargs = sampling_kwargs(params, max_new_tokens, self.info.vocab_size)
        if params.greedy:  # vLLM refuses n > 1 without sampling: one choice, copied
            kwargs["n"] = 1
        if params.constraint is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(
                **structured_kwargs(params.constraint)
            )
        try:
            return VllmSamplingParams(output_kind=RequestOutputKind.DELTA, **kwargs)
        except (ValueError, VLLMClientError) as exc:
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None

    # -- streaming -------------------------------------------------------------------------

    async def _stream(self, req: GenerationRequest, params: Any) -> AsyncIterator[Delta]:
        state = RequestState(
            engine_id=f"{req.request_id}-{next(self._ids)}",
            prompt_tokens=len(req.prompt_tokens),
            copies=req.params.n if req.params.greedy else 1,
            top_logprobs=req.params.logprobs or 0,
            top_prompt_logprobs=req.params.prompt_logprobs or 0,
            constraint_param=constraint.param if (constraint := req.params.constraint) else None,
        )
        self._loop = asyncio.get_running_loop()
        self._requests.setdefault(req.request_id, []).append(state.engine_id)
        prompt = {"prompt_token_ids": list(req.prompt_tokens)}
        outputs = self._llm.generate(
            prompt, params, request_id=state.engine_id, lora_request=self._lora
        )
        try:
            first = True
            async for output in self._guarded(outputs, req.params):
                for delta in self._deltas(state, output, first):
                    yield delta
                first = False
        finally:
            await outputs.aclose()
            self._forget(req.request_id, state.engine_id)

    async def _guarded(self, outputs: Any, params: SamplingParams) -> AsyncIterator[Any]:
        """vLLM's outputs, with its errors as llmserve's (a refused request is a 400)."""
        try:
            async for output in outputs:
                yield output
        except (VLLMClientError, ValueError) as exc:
            param = params.constraint.param if params.constraint is not None else None
            raise InvalidRequestError(str(exc), param=param) from None
        except EngineDeadError:
            raise self._died() from None

    def _deltas(self, state: RequestState, output: Any, first: bool) -> list[Delta]:
        """llmserve's deltas for one vLLM RequestOutput; usage rides on the request's last."""
        if first:
            state.cached_tokens = int(getattr(output, "num_cached_tokens", 0) or 0)
        prompt_logprobs = self._prompt_logprobs(state, output) if first else None
        deltas = []
        for choice in output.outputs:
            delta = self._delta(state, choice, prompt_logprobs)
            deltas += (
                [replace(delta, index=i) for i in range(state.copies)]
                if state.copies > 1
                else [delta]
            )
            prompt_logprobs = None
        if prompt_logprobs is not None:  # the first output carried no tokens
            deltas.append(Delta(prompt_logprobs=prompt_logprobs))
        if output.finished:
            usage = self._usage(state)
            deltas[-1:] = [replace(deltas[-1] if deltas else Delta(), usage=usage)]
        return deltas

    def _delta(self, state: RequestState, choice: Any, prompt_logprobs: Any) -> Delta:
        token_ids = tuple(choice.token_ids)
        state.completion_tokens += len(token_ids) * state.copies
        reason = None
        if choice.finish_reason is not None:
            reason = FINISH_REASONS.get(str(choice.finish_reason))
            if reason is None:
                raise self._failure(state, choice.finish_reason)
        return Delta(
            index=choice.index,
            text=choice.text,
            token_ids=token_ids,
            logprobs=self._token_logprobs(token_ids, choice.logprobs, state.top_logprobs),
            prompt_logprobs=prompt_logprobs,
            finish_reason=reason,
            stop_reason=choice.stop_reason if reason is FinishReason.STOP else None,
        )

    def _failure(self, state: RequestState, finish_reason: Any) -> Exception:
        """What a choice vLLM ended in error means: with a constraint, one that left the model
        no token it may produce (llama.cpp's engine says the same as a 400)."""
        if state.constraint_param is not None:
            return InvalidRequestError(
                "the output constraint left no token the model may produce",
                param=state.constraint_param,
            )
        return EngineError(f"vLLM ended a choice with {finish_reason}")

    def _usage(self, state: RequestState) -> Usage:
        totals = self._totals
        totals.prompt_tokens += state.prompt_tokens
        totals.cached_prompt_tokens += state.cached_tokens
        totals.generated_tokens += state.completion_tokens
        return Usage(state.prompt_tokens, state.completion_tokens, state.cached_tokens)

    def _token_logprobs(
        self, token_ids: tuple[int, ...], rows: Any, top_n: int
    ) -> tuple[TokenLogprob, ...]:
        if not rows:
            return ()
        return tuple(_entry(token, row, top_n) for token, row in zip(token_ids, rows, strict=False))

    def _prompt_logprobs(self, state: RequestState, output: Any) -> Any:
        rows = getattr(output, "prompt_logprobs", None)
        if rows is None:
            return None
        tokens = output.prompt_token_ids or []
        return tuple(
            None if row is None else _entry(token, row, state.top_prompt_logprobs)
            for token, row in zip(tokens, rows, strict=False)
        )

    def _forget(self, request_id: str, engine_id: str) -> None:
        engine_ids = self._requests.get(request_id, [])
        if engine_id in engine_ids:
            engine_ids.remove(engine_id)
        if not engine_ids:
            self._requests.pop(request_id, None)

    def _kv_cells(self) -> int:
        """The KV cache's size in tokens (blocks times tokens per block)."""
        cache = self._llm.vllm_config.cache_config
        return int(getattr(cache, "num_gpu_blocks", 0) or 0) * int(cache.block_size)


def engine_config(args: AsyncEngineArgs) -> Any:
    """vLLM's whole configuration for `args`, before any process starts; what vLLM refuses
    (say, heads not divisible by tensor_parallel_size) is a 400 in vLLM's words."""
    try:
        return args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    except ValidationError as exc:  # vLLM's configs are pydantic dataclasses
        reasons = "; ".join(
            str(error["msg"]).removeprefix("Value error, ") for error in exc.errors()
        )
        raise InvalidEngineSettingError(f"vLLM refused the engine settings: {reasons}") from None
    except ValueError as exc:
        raise InvalidEngineSettingError(f"vLLM refused the engine settings: {exc}") from None


def _entry(token: int, row: dict[int, Any], top_n: int) -> TokenLogprob:
    """The chosen token and the `top_n` most likely ones from one vLLM logprobs row.

    vLLM's row holds the top `top_n` by rank and the chosen token whatever its rank.
    """
    chosen = row.get(token)
    ranked = sorted(
        (item for item in row.items() if 1 <= (item[1].rank or 0) <= top_n),
        key=lambda item: item[1].rank,
    )
    top = tuple(TopLogprob(tid, _text(lp), float(lp.logprob), _bytes(lp)) for tid, lp in ranked)
    if chosen is None:
        return TokenLogprob(token, "", float("-inf"), top)
    return TokenLogprob(token, _text(chosen), float(chosen.logprob), top, _bytes(chosen))


def _text(logprob: Any) -> str:
    return str(logprob.decoded_token or "")


def _bytes(logprob: Any) -> tuple[int, ...]:
    return tuple(_text(logprob).encode("utf-8"))


def model_info(model_id: str, path: Path, tokenizer: Any, llm: Any) -> ModelInfo:
    """What the API layer needs to know, from vLLM's model config and the HF tokenizer."""
    model_config = llm.vllm_config.model_config
    hf_config = model_config.hf_config
    eos = tokenizer.eos_token_id
    eog = {eos} if eos is not None else set()
    eog |= set(_generation_eos(path))
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    dtype = str(model_config.dtype).removeprefix("torch.")
    n_params = weights // _dtype_bytes(dtype)
    probe = tokenizer.encode("a", add_special_tokens=True)
    return ModelInfo(
        id=model_id,
        path=str(path),
        context_length=int(model_config.max_model_len),
        train_context_length=int(getattr(hf_config, "max_position_embeddings", 0) or 0),
        vocab_size=int(model_config.get_vocab_size()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        eog_token_ids=frozenset(eog),
        chat_template=tokenizer.chat_template,
        add_bos=bool(probe) and probe[0] == tokenizer.bos_token_id,
        n_params=n_params,
        size_bytes=weights,
        # llama.cpp's spelling (architecture, size, type), which the dialects read.
        description=" ".join(
            (hf_config.model_type, _size_label(n_params), DTYPE_LABELS.get(dtype, dtype))
        ),
        capabilities=CAPABILITIES,
    )


def _generation_eos(path: Path) -> list[int]:
    """End-of-generation ids that generation_config.json adds to the tokenizer's EOS."""
    config = path / "generation_config.json"
    if not config.is_file():
        return []
    value = json.loads(config.read_text()).get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


DTYPE_LABELS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _size_label(n_params: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if n_params >= scale:
            return f"{n_params / scale:.0f}{unit}"
    return str(n_params)


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 2)
