"""Kobold requests → GenerationRequests; engine deltas → Kobold results and SSE events.

Generations started with a `genkey` are tracked while they run, so `/api/extra/generate/check`
can show their text so far and `/api/extra/abort` can stop exactly that one, however many others
are in flight.

Genkeys are chosen by clients (SillyTavern sends `KCPP` + 4 digits) and so are guessable: each
is scoped by the caller's API key, so one user's genkey is invisible to another and two users
may pick the same one. The scope is an HMAC of the presented key under a secret made at start;
the key itself is never kept. With Kobold auth off (`kobold_auth: false`, SillyTavern's usual
setup, or auth disabled) callers have no key to tell them apart: genkeys are then one scope
shared by everyone, as in KoboldCpp.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import secrets
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from llmserve.api.common import new_id
from llmserve.api.errors import retry_headers
from llmserve.api.kobold.protocol import (
    DEFAULT_MAX_LENGTH,
    KOBOLD_UNITED_VERSION,
    AbortResponse,
    ExtraVersion,
    FinishReason,
    IntValue,
    KoboldCheckResponse,
    KoboldError,
    KoboldErrorDetail,
    KoboldGenerateRequest,
    KoboldGenerateResponse,
    KoboldResult,
    KoboldStreamChunk,
    KoboldStreamError,
    KoboldText,
    Perf,
    ResultValue,
    TokenCountResponse,
)
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import dialect_params
from llmserve.core.constraints import Grammar
from llmserve.core.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    LLMServeError,
    QueueFullError,
)
from llmserve.core.limits import MAX_BANNED_TOKENS
from llmserve.core.params import SamplingParams
from llmserve.core.request import Delta, GenerationRequest
from llmserve.core.request import FinishReason as EngineFinish
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.engines.base import Engine
from llmserve.models.manager import LoadedModel, ModelManager

# Engine field names in errors, as Kobold requests spell them.
KOBOLD_PARAMS = {
    "max_tokens": "max_length",
    "banned_token_ids": "banned_tokens",
    "repetition_penalty_slope": "rep_pen_slope",
}

ERROR_TYPES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    503: "service_unavailable",
}  # other 4xx: "bad_input"; other 5xx: "server_error"


def error_detail(exc: LLMServeError) -> KoboldErrorDetail:
    """An LLMServeError in KoboldCpp's words."""
    status = kobold_status(exc)
    kind = ERROR_TYPES.get(status) or ("bad_input" if status < 500 else "server_error")
    return KoboldErrorDetail(msg=exc.message, type=kind)


def kobold_status(exc: LLMServeError) -> int:
    """KoboldCpp answers a full queue with 503 ("busy"), not 429."""
    return 503 if isinstance(exc, QueueFullError) else exc.status


def kobold_error_response(exc: LLMServeError) -> JSONResponse:
    """An error as KoboldCpp's {"detail": {"msg", "type"}} with its status."""
    body = KoboldError(detail=error_detail(exc))
    return JSONResponse(
        body.model_dump(), status_code=kobold_status(exc), headers=retry_headers(exc)
    )


@dataclass(frozen=True)
class GenkeyRef:
    """A genkey within its caller's scope (None: the one scope of an open Kobold API)."""

    scope: str | None
    genkey: str


@dataclass
class Generation:
    """A generation in flight: its engine request, its genkey and the text produced so far."""

    request_id: str
    engine: Engine
    genkey: GenkeyRef | None = None
    text: list[str] = field(default_factory=list)


@dataclass
class LastRun:
    """What /api/extra/perf reports about the most recent generation."""

    process: float = 0.0
    eval: float = 0.0
    tokens: int = 0
    seed: int = -1
    stop_reason: int = -1


class KoboldServing:
    """Serves the KoboldAI dialect over the model manager; owns the genkey registry."""

    def __init__(self, models: ModelManager, protected: bool, overrides: SamplingOverrides):
        self.models = models
        self.protected = protected
        self.overrides = overrides
        self.generations: dict[GenkeyRef, Generation] = {}
        self._scope_secret = secrets.token_bytes(32)
        self.last = LastRun()
        self.total_gens = 0
        self.started = time.monotonic()
        self.last_request = self.started

    # ---- generation ----

    async def generate(
        self, body: KoboldGenerateRequest, caller_key: str | None = None
    ) -> KoboldGenerateResponse:
        """POST /api/v1/generate (`caller_key`: the API key presented, scoping the genkey)."""
        run = await self._start(body, caller_key)
        return KoboldGenerateResponse(results=[await run.collect()])

    async def stream(
        self, body: KoboldGenerateRequest, caller_key: str | None = None
    ) -> AsyncIterator[ServerSentEvent]:
        """POST /api/extra/generate/stream: SSE events (errors before the first one raise)."""
        run = await self._start(body, caller_key)
        return run.events()

    async def _start(self, body: KoboldGenerateRequest, caller_key: str | None) -> KoboldRun:
        body.log_unknown_fields("kobold generate")
        body = self.overrides.apply(body)
        self.last_request = time.monotonic()
        model = self.models.resolve(None)
        with dialect_params(KOBOLD_PARAMS):
            prompt_ids, params = await asyncio.to_thread(_prepare, model, body)
        generation = Generation(new_id("kai"), model.engine, self._ref(caller_key, body.genkey))
        self._register(generation)
        started = time.monotonic()
        try:
            request = GenerationRequest(generation.request_id, prompt_ids, params)
            with dialect_params(KOBOLD_PARAMS):
                deltas = await open_streams([model.engine.generate(request)])
        except BaseException:
            self._unregister(generation)
            raise
        run = KoboldRun(self, body, generation, deltas, started)
        # A stream whose client left before its first byte is never iterated, so its own
        # cleanup never runs; forgetting the genkey when the run is collected covers that.
        weakref.finalize(run, self._unregister, generation)
        return run

    def _scope(self, caller_key: str | None) -> str | None:
        """The caller's genkey scope: an HMAC of its key, or None when Kobold is open."""
        if not self.protected or not caller_key:
            return None
        return hmac.new(self._scope_secret, caller_key.encode(), hashlib.sha256).hexdigest()

    def _ref(self, caller_key: str | None, genkey: str | None) -> GenkeyRef | None:
        return GenkeyRef(self._scope(caller_key), genkey) if genkey else None

    def _register(self, generation: Generation) -> None:
        ref = generation.genkey
        if ref is None:
            return
        if ref in self.generations:
            raise InvalidRequestError(
                f"genkey {ref.genkey!r} is already generating", param="genkey"
            )
        self.generations[ref] = generation

    def _unregister(self, generation: Generation) -> None:
        ref = generation.genkey
        if ref is not None and self.generations.get(ref) is generation:
            del self.generations[ref]

    def finished(self, run: KoboldRun) -> None:
        """Forget a finished generation's genkey and remember its numbers for /perf."""
        self._unregister(run.generation)
        self.total_gens += 1
        self.last = run.summary()
        self.last_request = time.monotonic()

    # ---- genkey ----

    def _running(self, genkey: str | None, caller_key: str | None) -> Generation | None:
        ref = self._ref(caller_key, genkey)
        return self.generations.get(ref) if ref is not None else None

    def check(self, genkey: str | None, caller_key: str | None = None) -> KoboldCheckResponse:
        """/api/extra/generate/check: the text the caller's generation has produced so far."""
        generation = self._running(genkey, caller_key)
        text = "".join(generation.text) if generation else ""
        return KoboldCheckResponse(results=[KoboldText(text=text)])

    def abort(self, genkey: str | None, caller_key: str | None = None) -> AbortResponse:
        """/api/extra/abort: stop the caller's generation with this genkey (others run on)."""
        generation = self._running(genkey, caller_key)
        if generation is None:
            return AbortResponse(success="false", done="false")
        generation.engine.abort(generation.request_id)
        return AbortResponse(success="true", done="true")

    # ---- model information ----

    async def tokencount(self, prompt: str, special: bool) -> TokenCountResponse:
        """/api/extra/tokencount."""
        engine = self.models.resolve(None).engine
        ids = await asyncio.to_thread(engine.tokenize, prompt, special)
        return TokenCountResponse(value=len(ids), ids=ids)

    def model_name(self) -> ResultValue:
        """/api/v1/model."""
        return ResultValue(result=self.models.resolve(None).id)

    def context_length(self) -> IntValue:
        """/api/v1/config/max_context_length and /api/extra/true_max_context_length."""
        return IntValue(value=self.models.resolve(None).engine.info.context_length)

    @staticmethod
    def max_length() -> IntValue:
        """/api/v1/config/max_length: what a request without `max_length` generates."""
        return IntValue(value=DEFAULT_MAX_LENGTH)

    @staticmethod
    def united_version() -> ResultValue:
        """/api/v1/info/version: the KoboldAI United API version clients check for."""
        return ResultValue(result=KOBOLD_UNITED_VERSION)

    def extra_version(self) -> ExtraVersion:
        """/api/extra/version."""
        return ExtraVersion(protected=self.protected)

    def perf(self) -> Perf:
        """/api/extra/perf."""
        now = time.monotonic()
        stats = [m.engine.stats() for m in self.models.loaded()]
        running = sum(s.running for s in stats)
        return Perf(
            last_process=self.last.process,
            last_eval=self.last.eval,
            last_token_count=self.last.tokens,
            last_seed=self.last.seed,
            total_gens=self.total_gens,
            stop_reason=self.last.stop_reason,
            queue=sum(s.waiting for s in stats),
            idle=int(running == 0 and not self.generations),
            uptime=now - self.started,
            idletime=now - self.last_request,
        )


class KoboldRun:
    """One generation's deltas, folded into Kobold text (kept where /check can read it)."""

    def __init__(
        self,
        serving: KoboldServing,
        body: KoboldGenerateRequest,
        generation: Generation,
        deltas: AsyncIterator[IndexedDelta],
        started: float,
    ):
        self.serving = serving
        self.body = body
        self.generation = generation
        self.deltas = deltas
        self.started = started
        self.first_at: float | None = None
        self.ended_at: float | None = None
        self.last: Delta | None = None
        self.completion_tokens = 0

    async def collect(self) -> KoboldResult:
        """The whole result."""
        async with aclosing(self._pieces()) as pieces:
            async for _ in pieces:
                pass
        return self.result()

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """`event: message` per piece of text, then one carrying `finish_reason`."""
        try:
            async with aclosing(self._pieces()) as pieces:
                async for text in pieces:
                    yield _event(KoboldStreamChunk(token=text))
        except LLMServeError as exc:
            yield _event(KoboldStreamError(detail=error_detail(exc)))
            return
        yield _event(KoboldStreamChunk(token="", finish_reason=self.finish_reason()))

    async def _pieces(self) -> AsyncGenerator[str, None]:
        try:
            async for item in self.deltas:
                delta = item.delta
                self.first_at = self.first_at or time.monotonic()
                self.completion_tokens += len(delta.token_ids)
                self.last = delta
                text = delta.text + self._kept_stop(delta)
                if text:
                    self.generation.text.append(text)
                    yield text
        finally:
            self.ended_at = time.monotonic()
            self.serving.finished(self)
            # Closing the engine stream now (not at garbage collection) frees its slot at once.
            aclose = getattr(self.deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    def _kept_stop(self, delta: Delta) -> str:
        # The engine always cuts the stop string; `trim_stop: false` asks for it back.
        if self.body.trim_stop is False and isinstance(delta.stop_reason, str):
            return delta.stop_reason
        return ""

    def finish_reason(self) -> FinishReason | None:
        """`length` when the token budget ran out, else `stop` (EOS, stop string, abort)."""
        if self.last is None or self.last.finish_reason is None:
            return None
        return "length" if self.last.finish_reason is EngineFinish.LENGTH else "stop"

    def result(self) -> KoboldResult:
        """The text so far with its finish reason and token counts."""
        usage = self.last.usage if self.last else None
        return KoboldResult(
            text="".join(self.generation.text),
            finish_reason=self.finish_reason(),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else self.completion_tokens,
        )

    def summary(self) -> LastRun:
        """This run's numbers for /api/extra/perf."""
        first = self.first_at or self.started
        end = self.ended_at or first
        seed = self.body.seed
        return LastRun(
            process=first - self.started,
            eval=end - first,
            tokens=self.completion_tokens,
            seed=-1 if seed is None else seed,
            stop_reason=_stop_code(self.last),
        )


def _stop_code(last: Delta | None) -> int:
    """KoboldCpp's stop reason codes: 0 length, 1 EOS, 2 stop sequence, -1 none."""
    if last is None or last.finish_reason in (None, EngineFinish.ABORT):
        return -1
    if last.finish_reason is EngineFinish.LENGTH:
        return 0
    return 1 if last.stop_reason is None else 2


def _event(chunk: KoboldStreamChunk | KoboldStreamError) -> ServerSentEvent:
    return ServerSentEvent(data=chunk.model_dump_json(), event="message", sep="\n")


def _prepare(model: LoadedModel, body: KoboldGenerateRequest) -> tuple[list[int], SamplingParams]:
    """Tokenize and translate a request (in a worker thread: tokenizing takes time)."""
    engine = model.engine
    context = engine.info.context_length
    max_length = body.output_limit() or DEFAULT_MAX_LENGTH
    prompt_ids = _prompt_ids(engine, body, context, max_length)
    banned = _banned_ids(engine, body.banned_tokens)
    params = body.sampling_params(n=1, banned_ids=banned)
    return prompt_ids, dataclasses.replace(params, constraint=Grammar.of(body.grammar))


def _prompt_ids(
    engine: Engine, body: KoboldGenerateRequest, context: int, max_length: int
) -> list[int]:
    """Memory plus as much of the prompt's end as fits `max_context_length - max_length`."""
    limit = min(body.max_context_length or context, context)
    room = limit - max_length
    if room < 1:
        raise ContextLengthExceededError(
            f"max_length {max_length} leaves no room for the prompt in a context of {limit} tokens",
            param="max_length",
        )
    memory = engine.tokenize(body.memory, True) if body.memory else []
    prompt = engine.tokenize(body.prompt, not memory)
    if len(memory) > room:
        raise ContextLengthExceededError(
            f"memory alone has {len(memory)} tokens; only {room} fit", param="memory"
        )
    ids = memory + _last_tokens(prompt, room - len(memory), engine.info.bos_token_id)
    if not ids:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    return ids


def _last_tokens(ids: list[int], room: int, bos: int | None) -> list[int]:
    """The last `room` tokens of `ids`, keeping a leading BOS the tokenizer put there."""
    if len(ids) <= room:
        return ids
    if room <= 0:
        return []
    if bos is not None and ids[0] == bos and room > 1:
        return [bos, *ids[len(ids) - room + 1 :]]
    return ids[len(ids) - room :]


def _banned_ids(engine: Engine, banned: list[str | int] | None) -> list[int]:
    """Token ids as given; strings ban every token they tokenize to.

    The bound is checked while tokenizing, so a huge list costs at most the bound's worth of
    tokenizer calls before the 400 (SamplingParams checks the same bound on the result).
    """
    ids: list[int] = []
    for item in banned or ():
        if isinstance(item, int):
            ids.append(item)
        elif item:
            ids.extend(engine.tokenize(item, False))
        if len(ids) > MAX_BANNED_TOKENS:
            raise InvalidRequestError(
                f"banned_tokens come to more than {MAX_BANNED_TOKENS} token ids",
                param="banned_tokens",
            )
    return ids
