"""Together /inference requests → GenerationRequests; engine deltas → Together responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmserve.api.common import error_response, new_id
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import dialect_params
from llmserve.api.together.protocol import (
    Choice,
    InferenceRequest,
    InferenceResponse,
    Output,
    StreamChoice,
    StreamChunk,
    StreamError,
    StreamErrorInfo,
    TogetherFinishReason,
    Usage,
)
from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.request import Delta, FinishReason, GenerationRequest
from llmserve.core.request import Usage as EngineUsage
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.models.manager import LoadedModel, ModelManager

DONE = "[DONE]"
# Engine field names in errors, as Together's request spells them.
TOGETHER_PARAMS = {"banned_token_ids": "banned_tokens"}


# Together's API answers errors in OpenAI's {"error": {...}} shape, statuses included.
together_error_response = error_response


def finish_reason(delta: Delta) -> TogetherFinishReason | None:
    """The engine's finish reason in Together's words."""
    if delta.finish_reason is FinishReason.LENGTH:
        return "length"
    if delta.finish_reason is FinishReason.STOP:
        return "eos_token" if delta.stop_reason is None else "stop_sequence"
    return None  # aborted (shutdown, admin): Together has no word for it


def usage(engine_usage: EngineUsage | None) -> Usage:
    """Engine usage in Together's shape."""
    u = engine_usage or EngineUsage(0, 0)
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


class TogetherServing:
    """Serves Together's legacy /inference over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides):
        self.models = models
        self.overrides = overrides

    async def inference(self, body: InferenceRequest) -> InferenceResponse | AsyncIterator[str]:
        """POST /inference: a response, or SSE data lines with `stream_tokens`."""
        body.log_unknown_fields("inference")
        body = self.overrides.apply(body)
        started = time.monotonic()
        model = self.models.resolve(body.model)
        prompt_ids = await asyncio.to_thread(model.engine.tokenize, body.prompt, True)
        if not prompt_ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        n = body.n or 1
        # Together returns the chosen tokens' logprobs; no alternatives needed for that.
        logprobs = 0 if body.logprobs is not None else None
        params = body.sampling_params(n=n, logprobs=logprobs)
        request_id = new_id("inference")
        request = GenerationRequest(request_id, prompt_ids, params)
        with dialect_params(TOGETHER_PARAMS):
            deltas = await open_streams([model.engine.generate(request)])
        writer = InferenceWriter(model, body, request_id, n, started)
        if body.stream_tokens:
            return writer.stream(deltas)
        return await writer.collect(deltas)


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: TogetherFinishReason | None = None

    def add(self, delta: Delta) -> None:
        """Fold a delta in."""
        self.text.append(delta.text)
        self.logprobs.extend(entry.logprob for entry in delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = finish_reason(delta)


class InferenceWriter:
    """Turns deltas into a Together response or stream events."""

    def __init__(
        self,
        model: LoadedModel,
        body: InferenceRequest,
        request_id: str,
        n: int,
        started: float,
    ):
        self.model = model
        self.body = body
        self.request_id = request_id
        self.n = n
        self.started = started

    async def collect(self, deltas: AsyncIterator[IndexedDelta]) -> InferenceResponse:
        """The whole response, `choices` both in `output` and at the top level."""
        states = {i: ChoiceState() for i in range(self.n)}
        engine_usage: EngineUsage | None = None
        async for item in deltas:
            engine_usage = item.delta.usage or engine_usage
            states[item.delta.index].add(item.delta)
        choices = [self._choice(i, state) for i, state in states.items()]
        output = Output(choices=choices, raw_compute_time=time.monotonic() - self.started)
        return InferenceResponse(
            id=self.request_id,
            prompt=[self.body.prompt],
            # Together's clients expect the name they sent back, whatever model answered.
            model=self.body.model or self.model.id,
            num_returns=self.n,
            args=self.body,
            output=output,
            choices=choices,
            usage=usage(engine_usage),
        )

    def _choice(self, index: int, state: ChoiceState) -> Choice:
        return Choice(
            text="".join(state.text),
            finish_reason=state.finish_reason,
            index=index,
            logprobs=state.logprobs if self.body.logprobs is not None else None,
        )

    async def stream(self, deltas: AsyncIterator[IndexedDelta]) -> AsyncIterator[str]:
        """`data: {"choices": [{"text"}]}` per delta, then `data: [DONE]`."""
        try:
            async for item in deltas:
                yield self._chunk(item.delta).model_dump_json()
        except LLMServeError as exc:
            info = StreamErrorInfo(
                message=exc.message,
                type=exc.type,
                param=exc.param,
                code=exc.code,
                request_id=self.request_id,
            )
            yield StreamError(error=info).model_dump_json()
        yield DONE

    def _chunk(self, delta: Delta) -> StreamChunk:
        choice = StreamChoice(text=delta.text, index=delta.index)
        if delta.finish_reason is not None:
            choice.finish_reason = finish_reason(delta)
        return StreamChunk(
            id=self.request_id,
            choices=[choice],
            usage=usage(delta.usage) if delta.usage else None,
        )
