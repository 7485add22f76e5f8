"""Scheduler policy without a model: admission, slot choice, prefix reuse, chunked prefill."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from llmserve.core.params import SamplingParams
from llmserve.core.request import Delta, GenerationRequest
from llmserve.engines.llamacpp.scheduler import (
    RequestGroup,
    Scheduler,
    SeqStatus,
    common_prefix_length,
    prefix_copy_threshold,
)


@dataclass
class FakeMemory:
    """Tracks what llama.cpp's KV cache would hold per sequence id."""

    cells: dict[int, list[int]] = field(default_factory=dict)  # seq id -> positions held
    copies: list[tuple[int, int, int | None]] = field(default_factory=list)

    def drop_from(self, seq_id: int, position: int) -> None:
        self.cells[seq_id] = [p for p in self.cells.get(seq_id, []) if p < position]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        self.copies.append((source, target, length))
        kept = [p for p in self.cells.get(source, []) if p < length]
        self.cells[target] = sorted(set(self.cells.get(target, [])) | set(kept))

    def copy_all(self, source: int, target: int) -> None:
        self.copies.append((source, target, None))
        self.cells[target] = list(self.cells.get(source, []))


def make_group(prompt: list[int], **params: object) -> RequestGroup:
    def ignore(_: Delta | Exception) -> None:
        pass

    req = GenerationRequest("r", prompt, SamplingParams(**params))  # type: ignore[arg-type]
    return RequestGroup(request=req, deliver=ignore, max_new_tokens=8)


def make_scheduler(
    slots: int = 4, budget: int = 64, min_copy_gain: int = 1
) -> tuple[Scheduler, FakeMemory]:
    memory = FakeMemory()
    return Scheduler(slots, 256, budget, memory, min_copy_gain=min_copy_gain), memory


def run_prefill(scheduler: Scheduler, memory: FakeMemory) -> None:
    """Plan and commit steps until nothing prefills, mirroring decoded positions in memory."""
    while any(s.status is SeqStatus.PREFILL for s in scheduler.running):
        plan = scheduler.plan_step()
        for chunk in plan.chunks:
            slot = chunk.sequence.slot
            assert slot is not None
            positions = range(chunk.start, chunk.start + len(chunk.tokens))
            memory.cells.setdefault(slot.seq_id, []).extend(positions)
        for seq, _row in scheduler.commit(plan):
            seq.pending_token = 7  # what sampling would do


def admit(scheduler: Scheduler, prompt: list[int]) -> RequestGroup:
    """Queue a request for `prompt` and run admission."""
    group = make_group(prompt)
    scheduler.add(group)
    scheduler.admit()
    return group


def busy_then_newcomer(
    scheduler: Scheduler, memory: FakeMemory, busy_prompt: list[int], new_prompt: list[int]
) -> tuple[RequestGroup, RequestGroup]:
    """A request prefilled and still running, then a second one admitted beside it."""
    busy = admit(scheduler, busy_prompt)
    run_prefill(scheduler, memory)
    return busy, admit(scheduler, new_prompt)


def finish_all(scheduler: Scheduler) -> None:
    for seq in list(scheduler.running):
        scheduler.finish(seq)


def test_common_prefix_length_respects_limit() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix_length([], [1], 5) == 0


def test_admission_is_fifo_and_counts_slots_per_choice() -> None:
    scheduler, _ = make_scheduler(slots=3)
    big, small = make_group([1, 2, 3], n=3), make_group([4, 5])
    occupying = make_group([9, 9])
    scheduler.add(occupying)
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.admit() == [occupying]  # big needs 3 slots, small may not overtake it
    assert list(scheduler.waiting) == [big, small]
    finish_all(scheduler)
    assert scheduler.admit() == [big]
    assert len(scheduler.free_slots()) == 0


def test_prefill_is_chunked_by_budget_and_decode_tokens_come_first() -> None:
    scheduler, memory = make_scheduler(budget=10)
    decoding = make_group([1, 2])
    scheduler.add(decoding)
    scheduler.admit()
    run_prefill(scheduler, memory)
    long = make_group(list(range(100, 125)))
    scheduler.add(long)
    scheduler.admit()
    plan = scheduler.plan_step()
    assert [len(c.tokens) for c in plan.chunks] == [1, 10]
    assert plan.chunks[0].sequence is decoding.sequences[0]
    assert plan.chunks[1].batch_start == 1
    assert not plan.chunks[1].last_logits  # the prompt is not complete yet
    scheduler.commit(plan)
    assert long.sequences[0].n_prefilled == 10


def test_free_slot_with_longest_prefix_is_reused_but_last_token_prefilled() -> None:
    scheduler, memory = make_scheduler()
    first = make_group([1, 2, 3, 4, 5])
    scheduler.add(first)
    scheduler.admit()
    run_prefill(scheduler, memory)
    used = first.sequences[0].slot
    finish_all(scheduler)
    again = make_group([1, 2, 3, 4, 5])
    scheduler.add(again)
    scheduler.admit()
    seq = again.sequences[0]
    assert seq.slot is used
    assert again.cached_tokens == 4  # the last token is recomputed for its logits
    assert seq.slot is not None and seq.slot.tokens == [1, 2, 3, 4]
    assert memory.cells[seq.slot.seq_id] == [0, 1, 2, 3]
    assert scheduler.counters.cached_prompt_tokens == 4


def test_prefix_held_by_a_busy_slot_is_copied() -> None:
    scheduler, memory = make_scheduler()
    system = list(range(50, 80))
    busy, newcomer = busy_then_newcomer(scheduler, memory, [*system, 1, 2], [*system, 3, 4])
    source = busy.sequences[0].slot
    target = newcomer.sequences[0].slot
    assert source is not None and target is not None and source is not target
    assert newcomer.cached_tokens == len(system)
    assert memory.copies == [(source.seq_id, target.seq_id, len(system))]
    assert memory.cells[target.seq_id] == list(range(len(system)))


def test_a_busy_prefix_saving_less_than_the_threshold_is_prefilled_not_copied() -> None:
    """Chat prompts that share only a template header: a whole-stream copy would cost more."""
    scheduler, memory = make_scheduler(min_copy_gain=16)
    header = list(range(50, 60))  # 10 shared tokens, under the 16-token bar
    busy, newcomer = busy_then_newcomer(scheduler, memory, [*header, 1, 2], [*header, 3, 4])
    assert memory.copies == []
    assert newcomer.cached_tokens == 0
    assert newcomer.sequences[0].slot is not busy.sequences[0].slot
    longer = admit(scheduler, [*header, 1, 2, 5])  # also under the bar: busy's 12 tokens
    assert memory.copies == [] and longer.cached_tokens == 0


def test_a_busy_prefix_saving_at_least_the_threshold_is_copied() -> None:
    scheduler, memory = make_scheduler(min_copy_gain=16)
    system = list(range(50, 66))  # exactly 16 shared tokens
    _, newcomer = busy_then_newcomer(scheduler, memory, [*system, 1], [*system, 3])
    assert newcomer.cached_tokens == 16
    assert len(memory.copies) == 1


def test_prefix_copy_threshold_follows_the_kv_layout() -> None:
    assert prefix_copy_threshold(kv_unified=True, ctx_size=4096) == 1  # a copy is metadata
    assert prefix_copy_threshold(kv_unified=False, ctx_size=512) == 16
    assert prefix_copy_threshold(kv_unified=False, ctx_size=4096) == 32
    assert prefix_copy_threshold(kv_unified=False, ctx_size=32768) == 256
    with pytest.raises(ValueError):
        Scheduler(2, 256, 64, FakeMemory(), min_copy_gain=0)


def test_prompt_logprobs_disable_reuse() -> None:
    scheduler, memory = make_scheduler()
    scheduler.add(make_group([1, 2, 3, 4]))
    scheduler.admit()
    run_prefill(scheduler, memory)
    finish_all(scheduler)
    scored = make_group([1, 2, 3, 4], prompt_logprobs=1)
    scheduler.add(scored)
    scheduler.admit()
    assert scored.cached_tokens == 0
    plan = scheduler.plan_step()
    assert plan.chunks[0].all_logits and len(plan.chunks[0].tokens) == 4


def test_choices_fork_the_prompt_after_one_prefill() -> None:
    scheduler, memory = make_scheduler()
    group = make_group([1, 2, 3, 4, 5, 6], n=3)
    scheduler.add(group)
    scheduler.admit()
    assert [s.status for s in group.sequences] == [
        SeqStatus.PREFILL,
        SeqStatus.AWAITING_FORK,
        SeqStatus.AWAITING_FORK,
    ]
    plan = scheduler.plan_step()
    assert len(plan.chunks) == 1  # only choice 0 prefills
    for chunk in plan.chunks:
        slot = chunk.sequence.slot
        assert slot is not None
        memory.cells[slot.seq_id] = list(range(len(chunk.tokens)))
    ready = scheduler.commit(plan)
    assert [seq.index for seq, _ in ready] == [0, 1, 2]
    assert len({row for _, row in ready}) == 1  # all sample from the one prompt row
    assert all(s.status is SeqStatus.DECODE for s in group.sequences)
    slots = [s.slot for s in group.sequences]
    assert all(slot is not None and slot.tokens == [1, 2, 3, 4, 5, 6] for slot in slots)
    assert scheduler.counters.prompt_tokens == 6


def test_finished_sequences_release_slots_but_keep_their_cache() -> None:
    scheduler, memory = make_scheduler(slots=1)
    group = make_group([1, 2, 3])
    scheduler.add(group)
    scheduler.admit()
    run_prefill(scheduler, memory)
    scheduler.drop(group)
    assert scheduler.idle
    assert scheduler.free_slots()[0].tokens == [1, 2, 3]
    assert scheduler.evict_idle_caches() == 3
    assert scheduler.free_slots()[0].tokens == []


def test_too_many_choices_are_refused() -> None:
    scheduler, _ = make_scheduler(slots=2)
    with pytest.raises(ValueError):
        scheduler.add(make_group([1], n=3))
