"""One engine step on llama.cpp: admit, build the batch, decode once, sample, hand out deltas.

Runs only on the engine thread, which owns every llama.cpp object used here.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import replace

import numpy as np

from llmserve.core.errors import EngineError, LLMServeError
from llmserve.core.request import Delta, FinishReason, TokenLogprob, Usage
from llmserve.engines.base import EngineStats
from llmserve.engines.llamacpp.batch import TokenBatch
from llmserve.engines.llamacpp.model import LlamaModel
from llmserve.engines.llamacpp.sampling import (
    FloatRows,
    ScoredRows,
    build_sampler_chain,
    choice_seed,
    mask_tokens,
    score_rows,
    token_logprobs,
)
from llmserve.engines.llamacpp.scheduler import (
    RequestGroup,
    Scheduler,
    SeqStatus,
    Sequence,
    StepPlan,
)

DECODE_NO_KV_ROOM = 1  # llama_decode: no KV slot for the batch; the cache is left unchanged


class StepRunner:
    """Executes the scheduler's plans on the model and turns sampled tokens into deltas."""

    def __init__(
        self, model: LlamaModel, scheduler: Scheduler, batch: TokenBatch, eog_ids: frozenset[int]
    ) -> None:
        self.model = model
        self.scheduler = scheduler
        self.batch = batch
        self.eog_ids = tuple(sorted(eog_ids))
        self._eog_set = eog_ids
        # Output is handed over after the step's stats are published, so a consumer that
        # sees its last delta also sees stats that include its request.
        self._outbox: list[tuple[RequestGroup, Delta | Exception]] = []

    # -- requests in and out ---------------------------------------------------------------

    def submit(self, group: RequestGroup) -> None:
        """Queue a request for admission."""
        self.scheduler.add(group)

    def abort(self, group: RequestGroup) -> None:
        """End every unfinished choice with ABORT; the last delta carries the usage."""
        unfinished = [s for s in group.sequences if s.status is not SeqStatus.FINISHED]
        for seq in unfinished:
            self._end_sequence(seq)
            self._emit(seq, Delta(index=seq.index, finish_reason=FinishReason.ABORT))

    def fail(self, group: RequestGroup, error: Exception) -> None:
        """End the request with an error its generator raises."""
        for seq in group.sequences:
            self._end_sequence(seq)
        self.scheduler.drop(group)
        self._outbox.append((group, error))

    def flush_outbox(self) -> None:
        """Hand this step's deltas and errors to their consumers."""
        outbox, self._outbox = self._outbox, []
        for group, item in outbox:
            group.deliver(item)

    def groups(self) -> list[RequestGroup]:
        """Every request not yet finished."""
        return self.scheduler.groups()

    @property
    def idle(self) -> bool:
        """No request waits or runs."""
        return self.scheduler.idle

    def free(self) -> None:
        """Free every sampler chain, the batch and the model (engine shutdown)."""
        for group in self.groups():
            for seq in group.sequences:
                if seq.sampler is not None:
                    seq.sampler.free()
                    seq.sampler = None
        self.batch.free()
        self.model.free()

    # -- one step --------------------------------------------------------------------------

    def step(self) -> None:
        """Admit, decode one batch, sample every sequence that has fresh logits."""
        for group in self.scheduler.admit():
            self._prepare(group)
        plan = self.scheduler.plan_step()
        if not plan.chunks:
            return
        status = self._decode(plan)
        if status != 0:
            for group in self.scheduler.forget_kv(plan):
                self.fail(group, EngineError(f"llama_decode failed with status {status}"))
            return
        ready = self.scheduler.commit(plan)
        self._collect_prompt_logprobs(plan)
        self._sample(ready)

    def _prepare(self, group: RequestGroup) -> None:
        """Give each admitted choice its sampler chain."""
        params = group.request.params
        try:
            for seq in group.sequences:
                seq.sampler = build_sampler_chain(
                    params,
                    group.grammar,
                    self.model.vocab,
                    self.model.n_vocab,
                    self.scheduler.ctx_size,
                    choice_seed(params.seed, seq.index),
                )
                seq.sampler.accept_history(group.prompt)
        except LLMServeError as error:
            self.fail(group, error)
            return
        if group.wants_prompt_logits:
            group.prompt_logprobs = [None]  # the first token has no context to predict it

    def _decode(self, plan: StepPlan) -> int:
        self.batch.clear()
        for chunk in plan.chunks:
            slot = chunk.sequence.slot
            assert slot is not None
            for offset, token in enumerate(chunk.tokens):
                index = self.batch.add(
                    token, chunk.start + offset, slot.seq_id, chunk.wants_logits(offset)
                )
                assert index == chunk.batch_start + offset
        status = self._timed_decode()
        if status == DECODE_NO_KV_ROOM and self.scheduler.evict_idle_caches() > 0:
            status = self._timed_decode()
        return status

    def _timed_decode(self) -> int:
        started = time.perf_counter()
        status = self.batch.decode(self.model.ctx)
        self.scheduler.counters.decode_seconds += time.perf_counter() - started
        return status

    # -- prompt logprobs -------------------------------------------------------------------

    def _collect_prompt_logprobs(self, plan: StepPlan) -> None:
        """Row at position p predicts prompt token p + 1; a chunk's rows are scored at once.

        The scheduler caps all-logits chunks per step (`Scheduler.prompt_logits_budget`), so
        this work per step is bounded however long the prompt is.
        """
        for chunk in plan.chunks:
            group = chunk.sequence.group
            if not chunk.all_logits or group.prompt_logprobs is None:
                continue
            # The last prompt token's row predicts the first generated token, not a prompt one.
            count = min(len(chunk.tokens), len(group.prompt) - 1 - chunk.start)
            if count <= 0:
                continue
            top_n = group.request.params.prompt_logprobs or 0
            targets = group.prompt[chunk.start + 1 : chunk.start + 1 + count]
            rows = self._logits_block(chunk.batch_start, count)
            group.prompt_logprobs.extend(token_logprobs(rows, targets, top_n, self._special_piece))

    def _logits_block(self, start: int, count: int) -> FloatRows:
        """Batch entries start..start+count-1's logits rows as one 2-D array.

        A view of llama.cpp's buffer when it stores the rows one after another (it does for
        consecutive entries that all want logits); a copy otherwise.
        """
        rows = [self.model.logits_row(start + offset) for offset in range(count)]
        row_bytes = rows[0].nbytes
        base = rows[0].ctypes.data
        if all(row.ctypes.data == base + i * row_bytes for i, row in enumerate(rows)):
            pointer = ctypes.cast(base, ctypes.POINTER(ctypes.c_float))
            block: FloatRows = np.ctypeslib.as_array(pointer, shape=(count, rows[0].shape[0]))
            return block
        return np.stack(rows)

    # -- sampling --------------------------------------------------------------------------

    def _sample(self, ready: list[tuple[Sequence, int]]) -> None:
        scored, positions = self._score_sampled_rows(ready)
        for seq, row in ready:
            if seq.status is SeqStatus.FINISHED:
                continue  # its request was ended earlier in this loop
            if seq.group.max_new_tokens == 0:
                self._finish(seq, None, FinishReason.LENGTH, None, "")
                continue
            banned = self._banned_now(seq)
            if banned:
                mask_tokens(self.model.logits_row(row), banned)
            assert seq.sampler is not None
            try:
                token = seq.sampler.sample(self.model.ctx, row)
            except LLMServeError as error:  # e.g. the grammar allows nothing the bias leaves
                self.fail(seq.group, error)
                continue
            position = positions.get(row)
            where = None if scored is None or position is None else (scored, position)
            self._accept(seq, token, where)

    def _score_sampled_rows(
        self, ready: list[tuple[Sequence, int]]
    ) -> tuple[ScoredRows | None, dict[int, int]]:
        """Score the rows whose sampled token wants logprobs; map batch row -> scored row."""
        positions: dict[int, int] = {}
        top_n = 0
        for seq, row in ready:
            wanted = seq.group.request.params.logprobs
            if wanted is not None:
                positions.setdefault(row, len(positions))  # forked choices share a row
                top_n = max(top_n, wanted)
        if not positions:
            return None, positions
        # A copy (one row per sequence, so bounded by the slots): sampling masks banned
        # tokens in llama.cpp's rows, and logprobs are of the raw distribution.
        block = np.stack([self.model.logits_row(row) for row in positions])
        return score_rows(block, top_n), positions

    def _banned_now(self, seq: Sequence) -> list[int]:
        """Tokens that may not be sampled yet: EOG (ignore_eos, min_tokens), stop tokens."""
        params = seq.group.request.params
        early = len(seq.generated) < params.min_tokens
        banned: list[int] = []
        # A grammar decides itself when it may end; forbidding EOG there would break it.
        if (params.ignore_eos or early) and seq.group.grammar is None:
            banned.extend(self.eog_ids)
        if early:
            banned.extend(params.stop_token_ids)
        return banned

    def _accept(self, seq: Sequence, token: int, logprobs: tuple[ScoredRows, int] | None) -> None:
        """Record a sampled token, then either stream it or end the choice."""
        seq.generated.append(token)
        self.scheduler.counters.generated_tokens += 1
        token_info: TokenLogprob | None = None
        if logprobs is not None:
            scored, position = logprobs
            top_n = seq.group.request.params.logprobs or 0
            token_info = scored.token_entry(position, token, top_n, self._special_piece)
        text, reason, stop_reason = self._check_stop(seq, token)
        if reason is None and self._out_of_room(seq):
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, token, reason, stop_reason, text, token_info)
            return
        seq.pending_token = token
        delta = Delta(index=seq.index, text=text, token_ids=(token,), logprobs=_one(token_info))
        self._emit(seq, delta)

    def _check_stop(
        self, seq: Sequence, token: int
    ) -> tuple[str, FinishReason | None, str | int | None]:
        """The token's text that may be shown now, and why the choice stops (if it does)."""
        params = seq.group.request.params
        if token in params.stop_token_ids:
            return "", FinishReason.STOP, token
        if token in self._eog_set and not params.ignore_eos:
            return "", FinishReason.STOP, None
        text, matched = seq.stops.feed(seq.decoder.decode(self.model.piece(token)))
        if matched is not None:
            return text, FinishReason.STOP, matched
        return text, None, None

    def _out_of_room(self, seq: Sequence) -> bool:
        return (
            len(seq.generated) >= seq.group.max_new_tokens or seq.length >= self.scheduler.ctx_size
        )

    def _finish(
        self,
        seq: Sequence,
        token: int | None,
        reason: FinishReason,
        stop_reason: str | int | None,
        text: str,
        token_info: TokenLogprob | None = None,
    ) -> None:
        if not isinstance(stop_reason, str):  # after a stop string, held-back text is dropped
            tail, matched = self._release_held_back(seq)
            text += tail
            if matched is not None:
                reason, stop_reason = FinishReason.STOP, matched
        self._end_sequence(seq)
        delta = Delta(
            index=seq.index,
            text=text,
            token_ids=() if token is None else (token,),
            logprobs=_one(token_info),
            finish_reason=reason,
            stop_reason=stop_reason,
        )
        self._emit(seq, delta)

    def _release_held_back(self, seq: Sequence) -> tuple[str, str | None]:
        """Flush incomplete UTF-8 and a partial stop-string match at the end of a choice."""
        tail, matched = seq.stops.feed(seq.decoder.decode(b"", final=True))
        if matched is None:
            tail += seq.stops.flush()
        return tail, matched

    def _end_sequence(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.sampler is not None:
            seq.sampler.free()
            seq.sampler = None

    def _emit(self, seq: Sequence, delta: Delta) -> None:
        """Attach prompt logprobs (first delta) and usage (last delta); queue for delivery."""
        group = seq.group
        if group.prompt_logprobs is not None and not group.prompt_logprobs_sent:
            delta = replace(delta, prompt_logprobs=tuple(group.prompt_logprobs))
            group.prompt_logprobs_sent = True
        if group.finished:
            self.scheduler.drop(group)
            usage = Usage(
                prompt_tokens=len(group.prompt),
                completion_tokens=group.completion_tokens(),
                cached_tokens=group.cached_tokens,
            )
            delta = replace(delta, usage=usage)
        self._outbox.append((group, delta))

    def _special_piece(self, token: int) -> bytes:
        return self.model.piece(token, special=True)

    # -- state -----------------------------------------------------------------------------

    def stats(self, alive: bool, error: str | None) -> EngineStats:
        """A snapshot of the scheduler and counters."""
        scheduler = self.scheduler
        counters = scheduler.counters
        return EngineStats(
            running=len(scheduler.running),
            waiting=scheduler.waiting_sequences(),
            free_slots=len(scheduler.free_slots()),
            total_slots=len(scheduler.slots),
            kv_cells_used=scheduler.kv_cells_used(),
            kv_cells_total=len(scheduler.slots) * scheduler.ctx_size,
            prompt_tokens_total=counters.prompt_tokens,
            cached_prompt_tokens_total=counters.cached_prompt_tokens,
            generated_tokens_total=counters.generated_tokens,
            steps_total=counters.steps,
            alive=alive,
            error=error,
            busy_seconds_total=counters.busy_seconds,
            decode_seconds_total=counters.decode_seconds,
        )


def _one(info: TokenLogprob | None) -> tuple[TokenLogprob, ...]:
    return () if info is None else (info,)
