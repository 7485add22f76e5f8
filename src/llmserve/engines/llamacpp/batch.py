"""A reusable llama_batch: refilled every step, one sequence id per token."""

from __future__ import annotations

from typing import Any

import llama_cpp


class TokenBatch:
    """A fixed-capacity llama_batch that the engine refills and decodes once per step."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a batch needs room for at least one token")
        self.capacity = capacity
        self.size = 0
        # Each token belongs to exactly one sequence: n>1 choices share a prompt by copying
        # KV after prefill, not by tagging prompt tokens with several sequence ids.
        self._raw: Any = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._freed = False

    @property
    def room(self) -> int:
        """How many more tokens fit."""
        return self.capacity - self.size

    def clear(self) -> None:
        """Forget the tokens of the previous step."""
        self.size = 0

    def add(self, token: int, position: int, seq_id: int, want_logits: bool) -> int:
        """Append one token of `seq_id` at `position`; return its index in the batch."""
        if self.size >= self.capacity:
            raise OverflowError(f"batch is full ({self.capacity} tokens)")
        index = self.size
        raw = self._raw
        raw.token[index] = token
        raw.pos[index] = position
        raw.n_seq_id[index] = 1
        raw.seq_id[index][0] = seq_id
        raw.logits[index] = 1 if want_logits else 0
        self.size += 1
        return index

    def decode(self, ctx: Any) -> int:
        """Run llama_decode over the batch; llama.cpp's status code (0 is success)."""
        self._raw.n_tokens = self.size
        return int(llama_cpp.llama_decode(ctx, self._raw))

    def free(self) -> None:
        """Release the C arrays; safe to call twice."""
        if not self._freed:
            llama_cpp.llama_batch_free(self._raw)
            self._freed = True
