"""llama-server requests → GenerationRequests; engine deltas → llama-server responses and events."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from llmserve import __version__
from llmserve.api.common import (
    chat_turns,
    continues_final_message,
    error_body,
    new_id,
)
from llmserve.api.llamacpp.protocol import (
    LLAMA_SERVER_DEFAULTS,
    RANDOM_SEED,
    UNLIMITED,
    ApplyTemplateRequest,
    ApplyTemplateResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DefaultGenerationSettings,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationSettings,
    InfillRequest,
    OnePrompt,
    Probabilities,
    PromptObject,
    PropsResponse,
    Slot,
    SlotNextToken,
    StopType,
    Timings,
    TokenPostProb,
    TokenProb,
    TopPostProb,
    TopProb,
)
from llmserve.api.overrides import SamplingOverrides
from llmserve.api.sampling import dialect_params
from llmserve.core import limits
from llmserve.core import tools as toolcalls
from llmserve.core.continuation import render_continuation
from llmserve.core.errors import InvalidRequestError, LLMServeError
from llmserve.core.params import DrySettings, SamplingParams
from llmserve.core.request import (
    Delta,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llmserve.core.streams import IndexedDelta, open_streams
from llmserve.engines.base import ModelInfo
from llmserve.models.manager import LoadedModel, ModelManager

R = TypeVar("R", bound=CompletionRequest)

# Engine field names in errors, as llama-server's request spells them.
LLAMA_PARAMS = {
    "max_tokens": "n_predict",
    "repetition_penalty": "repeat_penalty",
    "penalty_range": "repeat_last_n",
    "logprobs": "n_probs",
    "banned_token_ids": "logit_bias",
}
# How much of the context /infill keeps for the output when `n_predict` does not say.
INFILL_OUTPUT_SHARE = 4  # a quarter
EXTRA_CHUNK_HEADER = "\n\n--- {filename} ---\n\n"  # between /infill's extra files (no FIM sep)


def with_server_defaults(body: R) -> R:
    """`body` with llama-server's sampler defaults where neither it nor a preset set a field."""
    update = {name: v for name, v in LLAMA_SERVER_DEFAULTS.items() if getattr(body, name) is None}
    return body.model_copy(update=update) if update else body


class LlamaCppServing:
    """Serves llama.cpp's native server API over the model manager."""

    def __init__(self, models: ModelManager, overrides: SamplingOverrides):
        self.models = models
        self.overrides = overrides

    # ---- generation ----

    async def completion(self, body: CompletionRequest) -> Completed | AsyncIterator[str]:
        """POST /completion: the result(s), or an iterator of SSE data lines when streaming."""
        body.log_unknown_fields("completion")
        body = with_server_defaults(self.overrides.apply(body))
        model = await self.models.acquire(body.model)
        prompts = body.prompts()
        ids = await asyncio.to_thread(lambda: [_prompt_ids(model, p, "prompt") for p in prompts])
        if not ids or not all(ids):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return await self._generate(model, body, ids)

    async def infill(self, body: InfillRequest) -> Completed | AsyncIterator[str]:
        """POST /infill: fill in the middle between `input_prefix` and `input_suffix`."""
        body.log_unknown_fields("infill")
        body = with_server_defaults(self.overrides.apply(body))
        model = await self.models.acquire(body.model)
        fim = fim_tokens(model.engine.info)
        prompt_ids = await asyncio.to_thread(_infill_ids, model, body, fim)
        return await self._generate(model, body, [prompt_ids])

    async def _generate(
        self, model: LoadedModel, body: CompletionRequest, prompts: list[list[int]]
    ) -> Completed | AsyncIterator[str]:
        started = time.monotonic()
        params = await asyncio.to_thread(_sampling_params, model, body)
        ctx = model.engine.info.context_length
        writers = [
            CompletionWriter(model, body, ids, fit_context(params, len(ids), ctx), started, i)
            for i, ids in enumerate(prompts)
        ]
        if body.generates_nothing():
            empty = Completed([w.empty() for w in writers], body.response_fields)
            return empty.stream() if body.stream else empty
        requests = [GenerationRequest(new_id("cmpl"), w.prompt_ids, w.params) for w in writers]
        with dialect_params(LLAMA_PARAMS):
            deltas = await open_streams([model.engine.generate(r) for r in requests])
        if body.stream:
            return stream_events(writers, deltas)
        return await collect(writers, deltas)

    # ---- server and model info ----

    def props(self) -> PropsResponse:
        """GET /props."""
        model = self.models.resolve(None)
        info = model.engine.info
        # What a request that sets nothing gets: the sampling preset, then llama-server's defaults.
        empty = CompletionRequest.model_validate({"prompt": ""})
        defaults = with_server_defaults(self.overrides.apply(empty))
        params = defaults.sampling_params(n=1)
        return PropsResponse(
            default_generation_settings=DefaultGenerationSettings(
                params=generation_settings(params, defaults, info.context_length),
                n_ctx=info.context_length,
            ),
            total_slots=model.engine.stats().total_slots,
            model_alias=model.id,
            model_path=info.path,
            chat_template=model.template.source,
            bos_token=info.bos_token,
            eos_token=info.eos_token,
            build_info=f"llmserve {__version__}",
        )

    def slots(self) -> list[Slot]:
        """GET /slots: one entry per engine slot; the engine counts busy slots, not which."""
        model = self.models.resolve(None)
        stats = model.engine.stats()
        return [
            Slot(
                id=index,
                n_ctx=model.engine.info.context_length,
                is_processing=index < stats.running,
                next_token=[SlotNextToken(has_next_token=index < stats.running)],
            )
            for index in range(stats.total_slots)
        ]

    async def embedding(self, body: EmbeddingRequest) -> list[EmbeddingResult]:
        """POST /embedding: llama-server's embedding route, one pooled vector per prompt."""
        model = await self.models.acquire(body.model)
        prompts = [_prompt_ids(model, p, "content") for p in body.prompts()]
        if not all(prompts):
            raise InvalidRequestError("content must not be empty", param="content")
        with dialect_params({"prompts": "content"}):
            vectors = await model.engine.embed(prompts, normalize=body.embd_normalize == 2)
        return [EmbeddingResult(index=i, embedding=[v]) for i, v in enumerate(vectors)]

    async def apply_template(self, body: ApplyTemplateRequest) -> ApplyTemplateResponse:
        """POST /apply-template: the prompt text a chat completion would render."""
        continues = continues_final_message(
            body.messages,
            body.continue_final_message,
            body.add_generation_prompt,
            explicit_prompt="add_generation_prompt" in body.model_fields_set,
        )
        model = await self.models.acquire(body.model)
        text = await asyncio.to_thread(_render_chat, model, body, continues)
        return ApplyTemplateResponse(prompt=text)


# ---- prompts ----


def _prompt_ids(
    model: LoadedModel, prompt: OnePrompt, param: str, add_special: bool = True
) -> list[int]:
    """A string, token ids or a mix as token ids; special tokens only before the first text."""
    if isinstance(prompt, PromptObject):
        if prompt.multimodal_data:
            raise InvalidRequestError(
                f"model {model.id!r} takes text only: `multimodal_data` cannot be used",
                param=param,
                code="unsupported_modality",
            )
        prompt = prompt.prompt_string
    parts = [prompt] if isinstance(prompt, str) else prompt
    ids: list[int] = []
    for part in parts:
        if isinstance(part, str):
            ids += model.engine.tokenize(part, add_special and not ids)
        else:
            ids.append(part)
    _check_vocab(model.engine.info, ids, param)
    return ids


def _check_vocab(info: ModelInfo, ids: Sequence[int], param: str) -> None:
    bad = [t for t in ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token ids outside the vocabulary (0..{info.vocab_size - 1}): {bad[:5]}", param=param
        )


@dataclass(frozen=True)
class FimTokens:
    """A model's fill-in-the-middle tokens."""

    prefix: int
    suffix: int
    middle: int


def fim_tokens(info: ModelInfo) -> FimTokens:
    """The model's FIM tokens; 400 naming those it lacks."""
    named = {"prefix": info.fim_prefix, "suffix": info.fim_suffix, "middle": info.fim_middle}
    missing = [name for name, token in named.items() if token is None]
    if info.fim_prefix is None or info.fim_suffix is None or info.fim_middle is None:
        raise InvalidRequestError(
            f"infill is not supported by model {info.id!r}: it has no fill-in-the-middle "
            f"{', '.join(missing)} token{'s' if len(missing) > 1 else ''} "
            f"(missing: {', '.join(f'fim_{name}' for name in missing)})",
            param="input_prefix",
            code="infill_not_supported",
        )
    return FimTokens(info.fim_prefix, info.fim_suffix, info.fim_middle)


@dataclass(frozen=True)
class InfillParts:
    """The tokenized pieces of an /infill request."""

    extra: list[int]  # the extra files, each after its header
    prefix: list[int]
    suffix: list[int]
    typed: list[int]  # `prompt`: what is typed at the cursor


def infill_prompt(fim: FimTokens, parts: InfillParts, bos: int | None, budget: int) -> list[int]:
    """`[BOS] extra <PRE> prefix typed <SUF> suffix <MID>`, cut to `budget` tokens.

    What is cut first: the extra files (their start), then the prefix (its start, farthest
    from the cursor) and the suffix (its end), keeping about three prefix tokens per suffix one.
    """
    head = [bos] if bos is not None else []
    fixed = len(head) + 3 + len(parts.typed)
    room = budget - fixed
    if room < 0:
        raise InvalidRequestError(
            f"the infill prompt needs {fixed} tokens but only {budget} fit beside the output",
            param="prompt",
            code="context_length_exceeded",
        )
    n_suffix = min(len(parts.suffix), room // 4)
    n_prefix = min(len(parts.prefix), room - n_suffix)
    n_suffix = min(len(parts.suffix), room - n_prefix)  # what the prefix left over
    n_extra = min(len(parts.extra), room - n_prefix - n_suffix)
    prefix = parts.prefix[len(parts.prefix) - n_prefix :]
    extra = parts.extra[len(parts.extra) - n_extra :]
    return [
        *head,
        *extra,
        fim.prefix,
        *prefix,
        *parts.typed,
        fim.suffix,
        *parts.suffix[:n_suffix],
        fim.middle,
    ]


def _infill_ids(model: LoadedModel, body: InfillRequest, fim: FimTokens) -> list[int]:
    info = model.engine.info
    extra: list[int] = []
    for chunk in body.input_extra:
        header = EXTRA_CHUNK_HEADER.format(filename=chunk.filename)
        extra += model.engine.tokenize(header + chunk.text, False)
    parts = InfillParts(
        extra=extra,
        prefix=_prompt_ids(model, body.input_prefix, "input_prefix", add_special=False),
        suffix=_prompt_ids(model, body.input_suffix, "input_suffix", add_special=False),
        typed=_prompt_ids(model, body.prompt, "prompt", add_special=False),
    )
    context = info.context_length
    reserve = min(body.output_limit() or context // INFILL_OUTPUT_SHARE, context // 2)
    bos = info.bos_token_id if info.add_bos else None
    return infill_prompt(fim, parts, bos, context - reserve)


# ---- sampling ----


def _sampling_params(model: LoadedModel, body: CompletionRequest) -> SamplingParams:
    biases, banned = _logit_bias(model, body)
    plain = body.model_copy(update={"logit_bias": None})  # resolved above, by llama.cpp's rules
    with dialect_params(LLAMA_PARAMS):
        params = plain.sampling_params(
            n=1,
            # Post-sampling probabilities are rebuilt from as many raw candidates as allowed.
            logprobs=limits.MAX_LOGPROBS
            if body.post_sampling_probs and body.n_probs
            else body.n_probs or None,
            banned_ids=[*(body.banned_tokens or ()), *banned],
        )
        return replace(params, logit_bias=biases, constraint=body.output_constraint())


def _logit_bias(model: LoadedModel, body: CompletionRequest) -> tuple[dict[int, float], list[int]]:
    """llama.cpp's logit_bias: token ids or text (each of its tokens), `false` bans."""
    biases: dict[int, float] = {}
    banned: list[int] = []
    for key, value in (body.logit_bias or {}).items():
        ids = _bias_ids(model, key)
        _check_vocab(model.engine.info, ids, "logit_bias")
        if value is True:
            raise InvalidRequestError(
                f"logit_bias for {key!r} is true; give a number, or false to ban the token",
                param="logit_bias",
            )
        if value is False:
            banned += ids
        else:
            biases.update(dict.fromkeys(ids, float(value)))
    return biases, banned


def _bias_ids(model: LoadedModel, key: str) -> list[int]:
    """A logit_bias key: a token id, else text whose every token is biased."""
    try:
        return [int(key)]
    except ValueError:
        return model.engine.tokenize(key, False)


def generation_settings(
    params: SamplingParams, body: CompletionRequest, n_ctx: int
) -> GenerationSettings:
    """The sampling in force, in llama-server's words (its -1/whole-context values included)."""
    dry = params.dry or DrySettings(multiplier=0.0)
    limit = UNLIMITED if params.max_tokens is None else params.max_tokens
    return GenerationSettings(
        seed=RANDOM_SEED if params.seed is None else params.seed,
        temperature=params.temperature,
        top_k=params.top_k or 0,
        top_p=params.top_p,
        min_p=params.min_p,
        typical_p=params.typical_p,
        top_n_sigma=params.top_n_sigma,
        repeat_last_n=n_ctx if params.penalty_range is None else params.penalty_range,
        repeat_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        dry_multiplier=dry.multiplier,
        dry_base=dry.base,
        dry_allowed_length=dry.allowed_length,
        dry_penalty_last_n=n_ctx if dry.penalty_last_n is None else dry.penalty_last_n,
        xtc_probability=params.xtc_probability,
        xtc_threshold=params.xtc_threshold,
        mirostat=int(params.mirostat),
        mirostat_tau=params.mirostat_tau,
        mirostat_eta=params.mirostat_eta,
        stop=list(params.stop),
        n_predict=limit,
        max_tokens=limit,
        ignore_eos=params.ignore_eos,
        stream=body.stream,
        n_probs=body.n_probs or 0,
        logit_bias=sorted(params.logit_bias.items()),
        grammar=body.grammar or "",
        post_sampling_probs=body.post_sampling_probs,
    )


# ---- chat templates ----


def _render_chat(model: LoadedModel, body: ApplyTemplateRequest, continues: bool) -> str:
    """The chat as the OpenAI chat route renders it: same tool folding, same continuation."""
    plan = None
    if body.tools:
        functions = tuple(
            toolcalls.ToolFunction(t.function.name, t.function.description, t.function.parameters)
            for t in body.tools
        )
        plan = toolcalls.ToolPlan(functions)
    native = model.template.supports_tools
    messages = toolcalls.template_messages(chat_turns(body.messages), plan, native)
    tools = toolcalls.template_tools(plan) if native else None
    extra = body.chat_template_kwargs
    if continues:
        return render_continuation(model.template, messages, tools=tools, extra=extra)
    return model.template.render(
        messages, add_generation_prompt=body.add_generation_prompt, tools=tools, extra=extra
    )


# ---- responses ----


def stop_type(delta: Delta | None) -> tuple[StopType, str]:
    """Why generation ended in llama-server's words, and the stop string that matched."""
    if delta is None or delta.finish_reason is FinishReason.LENGTH:
        return "limit", ""
    if delta.finish_reason is FinishReason.STOP:
        if isinstance(delta.stop_reason, str):
            return "word", delta.stop_reason
        return "eos", ""
    return "none", ""  # aborted (shutdown, admin)


def _token_prob(entry: TokenLogprob) -> TokenProb:
    return TokenProb(
        id=entry.token_id,
        token=entry.token,
        bytes=list(entry.bytes),
        logprob=entry.logprob,
        top_logprobs=[
            TopProb(id=t.token_id, token=t.token, bytes=list(t.bytes), logprob=t.logprob)
            for t in entry.top
        ],
    )


def post_sampling_prob(entry: TokenLogprob, params: SamplingParams, n: int) -> TokenPostProb:
    """The sampled token and the candidates the samplers keep, as probabilities among those.

    Rebuilt from the raw top candidates the engine reports (up to MAX_LOGPROBS): top-k, top-p
    and min-p cut them as llama.cpp's chain does, then the temperature reshapes the rest.
    Greedy decoding keeps the sampled token alone.
    """
    chosen = TopLogprob(entry.token_id, entry.token, entry.logprob, entry.bytes)
    kept = _kept_candidates(entry, chosen, params)
    top = [_post(c, p) for c, p in kept[:n]]
    prob = next((p for c, p in kept if c.token_id == chosen.token_id), kept[-1][1])
    return TokenPostProb(**_post(chosen, prob).model_dump(), top_probs=top)


def _post(candidate: TopLogprob, prob: float) -> TopPostProb:
    return TopPostProb(
        id=candidate.token_id, token=candidate.token, bytes=list(candidate.bytes), prob=prob
    )


def _kept_candidates(
    entry: TokenLogprob, chosen: TopLogprob, params: SamplingParams
) -> list[tuple[TopLogprob, float]]:
    """(candidate, probability) after the truncation samplers and temperature, best first."""
    if params.greedy:
        return [(chosen, 1.0)]
    candidates = sorted(entry.top, key=lambda c: -c.logprob)
    if all(c.token_id != chosen.token_id for c in candidates):
        candidates.append(chosen)
    if params.top_k:
        candidates = candidates[: max(params.top_k, 1)]
    raw = _normalized([math.exp(c.logprob) for c in candidates])
    keep = len(candidates)
    if params.top_p < 1.0:
        total = 0.0
        for i, p in enumerate(raw):
            total += p
            if total >= params.top_p:
                keep = i + 1
                break
    keep = max(1, sum(1 for p in raw[:keep] if p >= params.min_p * raw[0]))
    kept = candidates[:keep]
    if all(c.token_id != chosen.token_id for c in kept):
        kept.append(chosen)  # the sampler took it, so it was among the candidates
    scaled = _normalized([math.exp(c.logprob / params.temperature) for c in kept])
    return sorted(zip(kept, scaled, strict=True), key=lambda pair: -pair[1])


def _normalized(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0 / len(weights)] * len(weights)


def fit_context(params: SamplingParams, prompt_tokens: int, ctx: int) -> SamplingParams:
    """`n_predict` past the context is cut to what fits, as llama-server does (no error)."""
    room = ctx - prompt_tokens
    if params.max_tokens is not None and 0 < room < params.max_tokens:
        return replace(params, max_tokens=room)
    return params


def _timings(usage: Usage, predicted: int, prompt_s: float, predicted_s: float) -> Timings:
    prompt_n = usage.prompt_tokens - usage.cached_tokens
    prompt_ms, predicted_ms = prompt_s * 1000, predicted_s * 1000
    return Timings(
        cache_n=usage.cached_tokens,
        prompt_n=prompt_n,
        prompt_ms=prompt_ms,
        prompt_per_token_ms=prompt_ms / prompt_n if prompt_n else 0.0,
        prompt_per_second=1000 * prompt_n / prompt_ms if prompt_ms > 0 else 0.0,
        predicted_n=predicted,
        predicted_ms=predicted_ms,
        predicted_per_token_ms=predicted_ms / predicted if predicted else 0.0,
        predicted_per_second=1000 * predicted / predicted_ms if predicted_ms > 0 else 0.0,
    )


@dataclass
class Progress:
    """What one prompt's completion has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    probs: list[TokenLogprob] = field(default_factory=list)
    last: Delta | None = None
    usage: Usage | None = None
    first_at: float | None = None
    done: bool = False  # its final event was sent

    def add(self, delta: Delta) -> None:
        """Fold a delta in."""
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.text.append(delta.text)
        self.tokens.extend(delta.token_ids)
        self.probs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.last = delta
        self.usage = delta.usage or self.usage


class CompletionWriter:
    """Turns one prompt's deltas into llama-server's result or its stream events."""

    def __init__(
        self,
        model: LoadedModel,
        body: CompletionRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        started: float,
        index: int = 0,
    ):
        self.model = model
        self.body = body
        self.prompt_ids = prompt_ids
        self.params = params
        self.started = started
        self.index = index

    def probabilities(self, entries: Sequence[TokenLogprob]) -> Probabilities | None:
        """`completion_probabilities` as asked: log-probabilities, or post-sampling ones."""
        n = self.body.n_probs
        if not n:
            return None
        if self.body.post_sampling_probs:
            return [post_sampling_prob(e, self.params, n) for e in entries]
        return [_token_prob(e) for e in entries]

    def timings(self, progress: Progress) -> Timings:
        """Counts and durations so far (all of them, once the last delta is in)."""
        now = time.monotonic()
        first = progress.first_at or now
        predicted = len(progress.tokens)
        usage = progress.usage or Usage(len(self.prompt_ids), predicted)
        return _timings(usage, predicted, first - self.started, now - first)

    def final(self, progress: Progress, content: str, tokens: list[int]) -> CompletionResponse:
        """The whole result, or the closing `stop: true` event of a stream."""
        usage = progress.usage or Usage(len(self.prompt_ids), len(progress.tokens))
        kind, word = stop_type(progress.last)
        info = self.model.engine.info
        return CompletionResponse(
            index=self.index,
            content=content,
            tokens=tokens,
            model=self.model.id,
            tokens_predicted=len(progress.tokens),
            tokens_evaluated=len(self.prompt_ids),
            generation_settings=generation_settings(self.params, self.body, info.context_length),
            prompt=self.model.engine.detokenize(self.prompt_ids),
            has_new_line="\n" in "".join(progress.text),
            stop_type=kind,
            stopping_word=word,
            tokens_cached=usage.cached_tokens,
            timings=self.timings(progress),
            completion_probabilities=self.probabilities(progress.probs),
        )

    def whole(self, progress: Progress) -> CompletionResponse:
        """The non-streaming result."""
        tokens = progress.tokens if self.body.return_tokens else []
        return self.final(progress, "".join(progress.text), tokens)

    def chunk(self, d: Delta, progress: Progress) -> CompletionChunk:
        """A `stop: false` event for a delta with output."""
        return CompletionChunk(
            index=self.index,
            content=d.text,
            tokens=list(d.token_ids),
            tokens_predicted=len(progress.tokens),
            tokens_evaluated=len(self.prompt_ids),
            completion_probabilities=self.probabilities(d.logprobs),
            timings=self.timings(progress) if self.body.timings_per_token else None,
        )

    def empty(self) -> CompletionResponse:
        """`n_predict: 0`: the prompt is evaluated, nothing is generated."""
        return self.final(Progress(), "", [])


@dataclass(frozen=True)
class Completed:
    """Finished results: one JSON object, or an array for several prompts."""

    results: list[CompletionResponse]
    fields: list[str] | None = None  # `response_fields`

    def json(self) -> str:
        """The response body."""
        if len(self.results) == 1:
            return event_json(self.results[0], self.fields)
        return "[" + ",".join(event_json(r, self.fields) for r in self.results) + "]"

    async def stream(self) -> AsyncIterator[str]:
        """`n_predict: 0` while streaming: the final events alone."""
        for result in self.results:
            yield event_json(result, self.fields)


async def collect(
    writers: list[CompletionWriter], deltas: AsyncIterator[IndexedDelta]
) -> Completed:
    """Every prompt's whole result."""
    progress = [Progress() for _ in writers]
    async for item in deltas:
        progress[item.prompt_index].add(item.delta)
    results = [w.whole(p) for w, p in zip(writers, progress, strict=True)]
    return Completed(results, writers[0].body.response_fields)


async def stream_events(
    writers: list[CompletionWriter], deltas: AsyncIterator[IndexedDelta]
) -> AsyncIterator[str]:
    """SSE data lines: `stop: false` events per delta with output, a `stop: true` per prompt."""
    fields = writers[0].body.response_fields
    progress = [Progress() for _ in writers]
    try:
        async for item in deltas:
            writer, state, d = writers[item.prompt_index], progress[item.prompt_index], item.delta
            state.add(d)
            if d.text or d.token_ids:
                yield event_json(writer.chunk(d, state))
            if d.finish_reason is not None:
                state.done = True
                yield event_json(writer.final(state, "", []), fields)
    except LLMServeError as exc:  # after the first byte: the error is the last event
        yield error_body(exc).model_dump_json()
        return
    for writer, state in zip(writers, progress, strict=True):
        if not state.done:  # ended without a finish reason (aborted)
            yield event_json(writer.final(state, "", []), fields)


def event_json(event: CompletionChunk | CompletionResponse, fields: list[str] | None = None) -> str:
    """An event as compact JSON: optional parts only when asked for, `response_fields` only."""
    data = event.model_dump(mode="json")
    for key in ("completion_probabilities", "timings"):
        if data.get(key) is None:
            data.pop(key, None)
    if fields:
        data = select_fields(data, fields)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def select_fields(data: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama-server's `response_fields`: each path (`a/b` is nested) that exists, by its path."""
    selected: dict[str, Any] = {}
    for path in fields:
        value: Any = data
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            selected[path] = value
    return selected
