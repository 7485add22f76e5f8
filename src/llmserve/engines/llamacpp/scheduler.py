"""Continuous batching: the waiting FIFO, running sequences, KV slots, prefix reuse, step plans.

Pure bookkeeping, no llama.cpp calls: KV cache edits go through the small `KvMemory`
interface, so the policy can be tested without a model.

A *slot* is one llama.cpp sequence id plus a record of the tokens whose KV it holds
(positions 0..len-1). A request with `n` choices takes `n` slots. When a sequence ends its
slot is released but keeps its KV: the next prompt sharing a prefix with it skips that part.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING, Protocol

from llmserve.core.request import Delta, GenerationRequest, TokenLogprob
from llmserve.core.stops import StopMatcher

if TYPE_CHECKING:
    from llmserve.engines.llamacpp.sampling import SamplerChain

# Prompt positions per step whose logits rows are scored (echo + logprobs). Scoring a row
# reads the whole vocabulary and an all-logits prefill also runs the output layer per token,
# so a long scored prompt is spread over steps to bound what every other stream waits for.
PROMPT_LOGITS_PER_STEP = 128
# A whole-stream KV copy is worth it only when it saves at least this many prompt tokens, and
# one token more per this many cells of the stream (see `prefix_copy_threshold`).
MIN_STREAM_COPY_GAIN = 16
STREAM_COPY_CELLS_PER_TOKEN = 128


class KvMemory(Protocol):
    """The two KV cache edits the scheduler makes."""

    def drop_from(self, seq_id: int, position: int) -> None:
        """Forget the KV of `seq_id` at `position` and after."""
        ...

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give `target` the KV of positions [0, length) of `source` (shared, not recomputed)."""
        ...

    def copy_all(self, source: int, target: int) -> None:
        """Give `target` all the KV of `source`."""
        ...


class SeqStatus(Enum):
    """Where a sequence is in its life."""

    WAITING = auto()  # its request is not admitted yet
    AWAITING_FORK = auto()  # choice > 0: gets choice 0's prompt KV once that is prefilled
    PREFILL = auto()
    DECODE = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence id and the tokens whose KV it holds, in position order."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    owner: Sequence | None = None
    last_used: int = 0  # scheduler step when it was last released; older caches go first
    reusable: bool = True  # False: part of its KV was computed under other weights (LoRA)

    @property
    def is_free(self) -> bool:
        """No running sequence owns it (its KV may still serve as prefix cache)."""
        return self.owner is None


@dataclass(eq=False)
class Sequence:
    """One choice of a request: its slot, progress and output state."""

    group: RequestGroup
    index: int
    status: SeqStatus = SeqStatus.WAITING
    slot: Slot | None = None
    n_prefilled: int = 0  # prompt tokens whose KV is in the slot
    pending_token: int | None = None  # sampled, not yet decoded into the KV cache
    generated: list[int] = field(default_factory=list)
    sampler: SamplerChain | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))

    @property
    def prompt(self) -> list[int]:
        """The request's prompt tokens."""
        return self.group.request.prompt_tokens

    @property
    def length(self) -> int:
        """Prompt plus generated tokens: what the sequence occupies of its context."""
        return len(self.prompt) + len(self.generated)


@dataclass(eq=False)
class RequestGroup:
    """A request and its `n` choices, admitted together and reported together."""

    request: GenerationRequest
    deliver: Callable[[Delta | Exception], None]
    max_new_tokens: int
    grammar: str | None = None  # the request's constraint compiled to GBNF
    sequences: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        # One sequence per choice, each with its own stop matcher and UTF-8 decoder.
        if not self.sequences:
            # An empty stop string would end every choice before its first token.
            stops = tuple(stop for stop in self.request.params.stop if stop)
            self.sequences = [
                Sequence(group=self, index=i, stops=StopMatcher(stops))
                for i in range(self.request.params.n)
            ]

    @property
    def n(self) -> int:
        """Number of choices, hence of slots it needs."""
        return len(self.sequences)

    @property
    def prompt(self) -> list[int]:
        """The prompt tokens shared by every choice."""
        return self.request.prompt_tokens

    @property
    def wants_prompt_logits(self) -> bool:
        """Prompt logprobs need a logits row at every prompt position (so no prefix reuse)."""
        return self.request.params.prompt_logprobs is not None

    @property
    def finished(self) -> bool:
        """Every choice has ended."""
        return all(seq.status is SeqStatus.FINISHED for seq in self.sequences)

    def completion_tokens(self) -> int:
        """Tokens generated over all choices."""
        return sum(len(seq.generated) for seq in self.sequences)


@dataclass(frozen=True)
class Chunk:
    """Consecutive tokens of one sequence placed in this step's batch."""

    sequence: Sequence
    start: int  # position of the first token in the sequence
    tokens: tuple[int, ...]
    batch_start: int  # index of the first token in the batch
    all_logits: bool  # a logits row for every token (prompt logprobs)
    last_logits: bool  # a logits row for the last token (to sample the next one)

    def wants_logits(self, offset: int) -> bool:
        """Whether the token at `offset` in this chunk needs its logits row."""
        return self.all_logits or (self.last_logits and offset == len(self.tokens) - 1)

    @property
    def last_row(self) -> int:
        """Batch index of the chunk's last token."""
        return self.batch_start + len(self.tokens) - 1


@dataclass(frozen=True)
class StepPlan:
    """What one llama_decode will process."""

    chunks: tuple[Chunk, ...]

    @property
    def n_tokens(self) -> int:
        """Tokens in the batch."""
        return sum(len(chunk.tokens) for chunk in self.chunks)

    @property
    def groups(self) -> list[RequestGroup]:
        """The requests with tokens in this step, each once, in plan order."""
        seen: dict[int, RequestGroup] = {}
        for chunk in self.chunks:
            seen.setdefault(id(chunk.sequence.group), chunk.sequence.group)
        return list(seen.values())


@dataclass
class Counters:
    """Monotonic totals for stats()."""

    prompt_tokens: int = 0  # prompt tokens placed in the KV cache: prefilled + reused
    cached_prompt_tokens: int = 0  # of those, reused from the prefix cache
    generated_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # engine loop time spent on steps (not idle waiting)
    decode_seconds: float = 0.0  # of that, time inside llama_decode


def prefix_copy_threshold(kv_unified: bool, ctx_size: int) -> int:
    """Least prompt tokens a copied prefix must save to be worth the copy.

    In one unified buffer a copy only tags cells with another sequence id: any gain pays. With
    a stream per slot llama.cpp copies the whole stream (all layers, `ctx_size` cells); measured
    on 2-core hosts that costs what prefilling 1-4 tokens does at 512-4096 cells per slot, more
    where prefill is faster, so the bar is set well above it and grows with the stream.
    """
    if kv_unified:
        return 1
    return max(MIN_STREAM_COPY_GAIN, ctx_size // STREAM_COPY_CELLS_PER_TOKEN)


def common_prefix_length(a: SequenceOf[int], b: SequenceOf[int], limit: int) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit`."""
    bound = min(len(a), len(b), limit)
    length = 0
    while length < bound and a[length] == b[length]:
        length += 1
    return length


class Scheduler:
    """Admission, slot choice and step plans for continuous batching."""

    def __init__(
        self,
        n_slots: int,
        ctx_size: int,
        prefill_budget: int,
        memory: KvMemory,
        prompt_logits_budget: int = PROMPT_LOGITS_PER_STEP,
        min_copy_gain: int = 1,
    ) -> None:
        if n_slots < 1 or ctx_size < 1 or prefill_budget < 1 or prompt_logits_budget < 1:
            raise ValueError("slots, context size and prefill budgets must be positive")
        if min_copy_gain < 1:
            raise ValueError("the least gain worth a prefix copy must be at least one token")
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self.ctx_size = ctx_size
        self.prefill_budget = prefill_budget
        # Of the prefill budget, at most this many tokens per step may need every logits row.
        self.prompt_logits_budget = prompt_logits_budget
        # Prompt tokens a busy slot's prefix must save over the best free slot's before its KV
        # is copied: with one KV stream per slot a copy moves the whole stream, which costs as
        # much as prefilling several tokens (`prefix_copy_threshold`).
        self.min_copy_gain = min_copy_gain
        self.waiting: deque[RequestGroup] = deque()
        self.running: list[Sequence] = []  # admission order: FIFO for prefill budget
        self.counters = Counters()
        self._memory = memory

    # -- queue -----------------------------------------------------------------------------

    def add(self, group: RequestGroup) -> None:
        """Queue a request; it is admitted when enough slots are free."""
        if group.n > len(self.slots):
            raise ValueError(f"{group.n} choices cannot fit {len(self.slots)} slots")
        self.waiting.append(group)

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing runs."""
        return not self.waiting and not self.running

    def free_slots(self) -> list[Slot]:
        """Slots no running sequence owns."""
        return [slot for slot in self.slots if slot.is_free]

    def waiting_sequences(self) -> int:
        """Choices of the queued requests."""
        return sum(group.n for group in self.waiting)

    def kv_cells_used(self) -> int:
        """KV cells the slots' records account for (a prefix shared by copy counts per slot)."""
        return sum(len(slot.tokens) for slot in self.slots)

    # -- admission -------------------------------------------------------------------------

    def can_allocate(self, group: RequestGroup) -> bool:
        """Enough free slots for every choice (KV room follows: each slot owns ctx_size cells)."""
        return len(self.free_slots()) >= group.n

    def allocate(self, group: RequestGroup) -> None:
        """Give each choice a slot; choice 0 reuses the longest cached prefix of the prompt."""
        first, *forks = group.sequences
        reused = self._place_prompt(first)
        group.cached_tokens = reused
        first.n_prefilled = reused
        first.status = SeqStatus.PREFILL
        self.counters.prompt_tokens += reused
        self.counters.cached_prompt_tokens += reused
        self.running.append(first)
        for seq in forks:
            slot = self._least_recent(self.free_slots())
            self._clear(slot)
            self._assign(slot, seq)
            seq.status = SeqStatus.AWAITING_FORK
            self.running.append(seq)

    def admit(self) -> list[RequestGroup]:
        """Admit waiting requests in FIFO order while their choices fit; return them."""
        admitted: list[RequestGroup] = []
        # Strict FIFO: a large request at the head is not overtaken, so it cannot starve.
        while self.waiting and self.can_allocate(self.waiting[0]):
            group = self.waiting.popleft()
            self.allocate(group)
            admitted.append(group)
        return admitted

    def _place_prompt(self, seq: Sequence) -> int:
        """Pick choice 0's slot and prepare its KV; return how many prompt tokens it reuses."""
        free = self.free_slots()
        prompt = seq.prompt
        if seq.group.wants_prompt_logits:
            target = self._least_recent(free)
            self._clear(target)
            self._assign(target, seq)
            return 0
        # The last prompt token is always prefilled: its logits pick the first new token.
        limit = len(prompt) - 1
        shared = {
            slot.seq_id: common_prefix_length(slot.tokens, prompt, limit) if slot.reusable else 0
            for slot in self.slots
        }
        own = max(free, key=lambda s: (shared[s.seq_id], -s.last_used))
        own_length = shared[own.seq_id]
        donor = max(self.slots, key=lambda s: shared[s.seq_id])
        donor_length = shared[donor.seq_id]
        if donor_length - own_length >= self.min_copy_gain:
            # A busy slot holds a longer prefix (e.g. a shared system prompt): share its KV
            # with the least recently used free slot rather than recompute it.
            target = self._least_recent(free)
            self._copy_prefix(donor, target, donor_length)
            reused = donor_length
        else:
            target = own
            self._trim(own, own_length)
            reused = own_length
        self._assign(target, seq)
        return reused

    def _least_recent(self, free: list[Slot]) -> Slot:
        return min(free, key=lambda s: s.last_used)

    def _clear(self, slot: Slot) -> None:
        self._trim(slot, 0)

    def _trim(self, slot: Slot, length: int) -> None:
        """Keep only the first `length` tokens of the slot's KV."""
        self._memory.drop_from(slot.seq_id, length)
        del slot.tokens[length:]
        if length == 0:
            slot.reusable = True

    def _copy_prefix(self, source: Slot, target: Slot, length: int) -> None:
        """Replace `target`'s KV with the first `length` tokens of `source`'s."""
        self._clear(target)
        self._memory.copy_prefix(source.seq_id, target.seq_id, length)
        target.tokens = source.tokens[:length]

    def _assign(self, slot: Slot, seq: Sequence) -> None:
        slot.owner = seq
        seq.slot = slot

    # -- one step --------------------------------------------------------------------------

    def plan_step(self) -> StepPlan:
        """Every decoding sequence's next token, then prefill chunks up to the budgets."""
        chunks: list[Chunk] = []
        row = 0
        for seq in self.running:
            if seq.status is SeqStatus.DECODE and seq.pending_token is not None:
                chunk = Chunk(
                    sequence=seq,
                    start=seq.length - 1,
                    tokens=(seq.pending_token,),
                    batch_start=row,
                    all_logits=False,
                    last_logits=True,
                )
                chunks.append(chunk)
                row += 1
        budget = self.prefill_budget
        logits_budget = self.prompt_logits_budget
        for seq in self.running:
            if seq.status is not SeqStatus.PREFILL or budget == 0:
                continue
            remaining = len(seq.prompt) - seq.n_prefilled
            take = min(remaining, budget)
            if seq.group.wants_prompt_logits:
                take = min(take, logits_budget)
                if take == 0:
                    continue  # next step; prompts without prompt logprobs may still prefill
                logits_budget -= take
            chunk = Chunk(
                sequence=seq,
                start=seq.n_prefilled,
                tokens=tuple(seq.prompt[seq.n_prefilled : seq.n_prefilled + take]),
                batch_start=row,
                all_logits=seq.group.wants_prompt_logits,
                last_logits=take == remaining,
            )
            chunks.append(chunk)
            row += take
            budget -= take
        if chunks:
            self.counters.steps += 1
        return StepPlan(tuple(chunks))

    def commit(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        """Record a successful decode; return (sequence, logits row) pairs to sample now."""
        ready: list[tuple[Sequence, int]] = []
        for chunk in plan.chunks:
            seq = chunk.sequence
            assert seq.slot is not None
            seq.slot.tokens.extend(chunk.tokens)
            if seq.status is SeqStatus.DECODE:
                seq.pending_token = None
                ready.append((seq, chunk.last_row))
                continue
            seq.n_prefilled += len(chunk.tokens)
            self.counters.prompt_tokens += len(chunk.tokens)
            if seq.n_prefilled == len(seq.prompt):
                seq.status = SeqStatus.DECODE
                ready.append((seq, chunk.last_row))
                ready.extend((fork, chunk.last_row) for fork in self._fork(seq))
        return ready

    def _fork(self, source: Sequence) -> list[Sequence]:
        """Share the prefilled prompt's KV with the request's other choices."""
        assert source.slot is not None
        forks = [s for s in source.group.sequences if s.status is SeqStatus.AWAITING_FORK]
        for seq in forks:
            assert seq.slot is not None
            # The source holds exactly the prompt now, so a whole-sequence copy is that prefix.
            self._memory.copy_all(source.slot.seq_id, seq.slot.seq_id)
            seq.slot.tokens = list(seq.prompt)
            seq.slot.reusable = source.slot.reusable
            seq.n_prefilled = len(seq.prompt)
            seq.status = SeqStatus.DECODE
        return forks

    def forget_kv(self, plan: StepPlan) -> list[RequestGroup]:
        """After a failed decode: wipe the KV of every request in the plan; return them."""
        groups = plan.groups
        for group in groups:
            for seq in group.sequences:
                if seq.slot is not None:
                    self._clear(seq.slot)
        return groups

    def evict_idle_caches(self) -> int:
        """Drop the KV that free slots keep as prefix cache; return the cells freed."""
        freed = 0
        for slot in self.free_slots():
            freed += len(slot.tokens)
            self._clear(slot)
        return freed

    def invalidate_prefix_cache(self) -> None:
        """The weights changed (LoRA): KV computed so far must not serve new prompts.

        Free slots are cleared now; running sequences keep their KV and go on, but their slots
        are never shared from again and are cleared when next assigned.
        """
        for slot in self.slots:
            if slot.is_free:
                self._clear(slot)
            else:
                slot.reusable = False

    # -- ending ----------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        """End a sequence: release its slot, keeping the KV as prefix cache."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.slot is not None:
            seq.slot.owner = None
            seq.slot.last_used = self.counters.steps
            seq.slot = None
        if seq.status is not SeqStatus.WAITING:
            self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.pending_token = None

    def drop(self, group: RequestGroup) -> None:
        """Remove a request wherever it is (queue or running) and finish all its choices."""
        if group in self.waiting:
            self.waiting.remove(group)
        for seq in group.sequences:
            self.finish(seq)

    def groups(self) -> list[RequestGroup]:
        """Every request the scheduler holds: queued first, then running."""
        found: dict[int, RequestGroup] = {id(g): g for g in self.waiting}
        for seq in self.running:
            found.setdefault(id(seq.group), seq.group)
        return list(found.values())
