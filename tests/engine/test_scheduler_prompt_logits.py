"""The per-step budget of prompt positions whose logits rows are scored (issue 11 item 8)."""

from __future__ import annotations

import pytest

from llmserve.core.params import SamplingParams
from llmserve.core.request import Delta, GenerationRequest
from llmserve.engines.llamacpp.scheduler import (
    PROMPT_LOGITS_PER_STEP,
    RequestGroup,
    Scheduler,
    SeqStatus,
)


class NoMemory:
    """A KV cache that holds nothing: these tests only look at step plans."""

    def drop_from(self, seq_id: int, position: int) -> None:
        pass

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        pass

    def copy_all(self, source: int, target: int) -> None:
        pass


def make_group(prompt: list[int], **params: object) -> RequestGroup:
    def ignore(_: Delta | Exception) -> None:
        pass

    req = GenerationRequest("r", prompt, SamplingParams(**params))  # type: ignore[arg-type]
    return RequestGroup(request=req, deliver=ignore, max_new_tokens=8)


def scheduler_with(logits_budget: int, prefill_budget: int = 512) -> Scheduler:
    return Scheduler(4, 2048, prefill_budget, NoMemory(), prompt_logits_budget=logits_budget)


def scored_rows_per_step(scheduler: Scheduler) -> list[int]:
    """Plan and commit until nothing prefills; the all-logits tokens of each step."""
    rows: list[int] = []
    while any(s.status is SeqStatus.PREFILL for s in scheduler.running):
        plan = scheduler.plan_step()
        rows.append(sum(len(c.tokens) for c in plan.chunks if c.all_logits))
        scheduler.commit(plan)
        for seq in scheduler.running:
            seq.pending_token = None  # nothing decodes in these tests
    return rows


def test_the_default_budget_is_below_the_default_prefill_chunk() -> None:
    assert 0 < PROMPT_LOGITS_PER_STEP < 512


def test_a_long_scored_prompt_is_spread_over_steps() -> None:
    scheduler = scheduler_with(logits_budget=100)
    scheduler.add(make_group(list(range(1, 1501)), prompt_logprobs=5))
    scheduler.admit()
    rows = scored_rows_per_step(scheduler)
    assert rows == [100] * 15


def test_the_budget_is_shared_by_every_scored_prompt_of_a_step() -> None:
    scheduler = scheduler_with(logits_budget=100)
    for offset in (0, 1000):
        scheduler.add(make_group(list(range(offset + 1, offset + 151)), prompt_logprobs=1))
    scheduler.admit()
    rows = scored_rows_per_step(scheduler)
    assert max(rows) <= 100
    assert sum(rows) == 300


def test_unscored_prompts_still_use_the_rest_of_the_prefill_budget() -> None:
    scheduler = scheduler_with(logits_budget=100, prefill_budget=512)
    scored = make_group(list(range(1, 1001)), prompt_logprobs=1)
    plain = make_group(list(range(2001, 2401)))
    scheduler.add(scored)
    scheduler.add(plain)
    scheduler.admit()
    plan = scheduler.plan_step()
    sizes = {id(c.sequence.group): (len(c.tokens), c.all_logits) for c in plan.chunks}
    assert sizes[id(scored)] == (100, True)
    assert sizes[id(plain)] == (400, False)


def test_the_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        scheduler_with(logits_budget=0)
