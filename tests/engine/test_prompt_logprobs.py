"""Prompt logprobs (echo + logprobs) on the real engine: exact, and spread over steps.

Issue 11 item 8: a long scored prompt used to be scored in one float64 pass per token inside
a few big prefill steps, stalling every other stream. Now rows are scored a block at a time
in float32 and at most `PROMPT_LOGITS_PER_STEP` prompt rows are scored per step.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from llmserve.core.request import TokenLogprob
from llmserve.engines.llamacpp import runner
from llmserve.engines.llamacpp.sampling import FloatRows, ScoredRows
from llmserve.engines.llamacpp.scheduler import PROMPT_LOGITS_PER_STEP
from tests.engine.helpers import Driver, idle, request, wait_for

TOLERANCE = 1e-4  # against float64 on the same logits (the old implementation's precision)


@dataclass
class Captured:
    """Copies of the logits blocks the engine scored, with what it scored them for."""

    prompt_blocks: list[tuple[npt.NDArray[np.float32], list[int]]] = field(default_factory=list)
    sampled_blocks: list[npt.NDArray[np.float32]] = field(default_factory=list)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Captured]:
    """Record (on the engine thread) every block of logits rows the runner scores."""
    seen = Captured()
    score_prompt = runner.token_logprobs
    score_sampled = runner.score_rows

    def spy_prompt(
        rows: FloatRows, targets: Sequence[int], top_n: int, piece: Callable[[int], bytes]
    ) -> list[TokenLogprob]:
        seen.prompt_blocks.append((rows.copy(), list(targets)))
        return score_prompt(rows, targets, top_n, piece)

    def spy_sampled(rows: FloatRows, top_n: int) -> ScoredRows:
        seen.sampled_blocks.append(rows.copy())
        return score_sampled(rows, top_n)

    monkeypatch.setattr(runner, "token_logprobs", spy_prompt)
    monkeypatch.setattr(runner, "score_rows", spy_sampled)
    yield seen


def long_prompt(llm: Driver, length: int, nonce: str) -> list[int]:
    """Exactly `length` token ids of varied text (unique per `nonce`, so nothing is cached)."""
    words = " ".join(f"{nonce} harbour {i} tide {i * 7 % 13} rope" for i in range(length))
    ids = llm.engine.tokenize(words, add_special=False)
    assert len(ids) >= length
    return ids[:length]


def reference_log_softmax(rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """The old implementation's math: float64 log-softmax of every row."""
    wide = rows.astype(np.float64)
    shifted = wide - wide.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def reference_top(logprobs: npt.NDArray[np.float64], top_n: int) -> list[int]:
    """The `top_n` likeliest token ids, most likely first, ties by token id."""
    order = np.lexsort((np.arange(logprobs.shape[0]), -logprobs))
    return [int(token) for token in order[:top_n]]


def assert_matches_reference(
    entry: TokenLogprob, logprobs: npt.NDArray[np.float64], token: int, top_n: int
) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(logprobs[token], abs=TOLERANCE)
    assert [t.token_id for t in entry.top] == reference_top(logprobs, top_n)
    for top in entry.top:
        assert top.logprob == pytest.approx(logprobs[top.token_id], abs=TOLERANCE)


def test_prompt_logprobs_equal_float64_reference(llm: Driver, captured: Captured) -> None:
    """Every prompt token's logprob and top 5 match float64 on the very logits scored."""
    prompt = long_prompt(llm, 2 * PROMPT_LOGITS_PER_STEP + 40, "ref")
    result = llm.run(prompt, temperature=0.0, max_tokens=1, prompt_logprobs=5)
    entries = result.deltas[0].prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    rows = np.concatenate([block for block, _ in captured.prompt_blocks])
    targets = [token for _, block_targets in captured.prompt_blocks for token in block_targets]
    assert targets == prompt[1:]
    reference = reference_log_softmax(rows)
    for position, entry in enumerate(entries[1:]):
        assert entry is not None
        assert_matches_reference(entry, reference[position], prompt[position + 1], 5)


def test_generated_logprobs_equal_float64_reference(llm: Driver, captured: Captured) -> None:
    """The sampled tokens' logprobs (scored from a copy of the raw rows) match float64 too."""
    prompt = llm.prompt("Name three colours of boats.")
    result = llm.run(prompt, temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    entries = [entry for delta in result.deltas for entry in delta.logprobs]
    assert len(entries) == 6 == len(captured.sampled_blocks)
    for entry, block in zip(entries, captured.sampled_blocks, strict=True):
        assert block.shape[0] == 1
        reference = reference_log_softmax(block)[0]
        assert_matches_reference(entry, reference, entry.token_id, 3)
        assert entry.token_id == entry.top[0].token_id  # greedy picks the top-1 token


def test_prompt_rows_scored_per_step_are_bounded(llm: Driver, captured: Captured) -> None:
    """A 900-token scored prompt is scored in blocks of at most PROMPT_LOGITS_PER_STEP rows."""
    prompt = long_prompt(llm, 900, "bound")
    before = llm.stats().steps_total
    result = llm.run(prompt, temperature=0.0, max_tokens=1, prompt_logprobs=1)
    steps = llm.stats().steps_total - before
    sizes = [len(targets) for _, targets in captured.prompt_blocks]
    assert max(sizes) <= PROMPT_LOGITS_PER_STEP
    assert sum(sizes) == len(prompt) - 1
    assert steps >= math.ceil(len(prompt) / PROMPT_LOGITS_PER_STEP)
    assert result.usage.prompt_tokens == len(prompt)


def test_other_streams_keep_decoding_while_a_long_prompt_is_scored(llm: Driver) -> None:
    """A running stream gets a token in every step of the scored prompt's prefill.

    Before, the 900 prompt rows were scored in two steps (prefill_chunk 512): the other
    stream got about two tokens during the whole scored prefill.
    """
    plain = llm.prompt("Tell me a long story about the harbour.")
    scored = long_prompt(llm, 900, "stall")
    during: list[int] = []

    async def main() -> None:
        assert await wait_for(lambda: idle(llm.stats()))
        tokens = 0
        scoring = False
        scored_done = asyncio.Event()

        async def score() -> None:
            nonlocal scoring
            scoring = True
            req = request(scored, temperature=0.0, max_tokens=1, prompt_logprobs=5)
            async for _ in llm.engine.generate(req):
                scoring = False  # its first delta comes after the whole prompt is scored
                scored_done.set()

        task: asyncio.Task[None] | None = None
        long_run = request(plain, temperature=0.0, max_tokens=400, ignore_eos=True)
        async for delta in llm.engine.generate(long_run):
            tokens += len(delta.token_ids)
            if scoring:
                during.append(tokens)
            if task is None and tokens >= 2:
                task = asyncio.create_task(score())
            if scored_done.is_set():
                break
        assert task is not None
        await task

    asyncio.run(main())
    steps_needed = math.ceil(len(scored) / PROMPT_LOGITS_PER_STEP)
    assert len(during) >= steps_needed - 2
