"""Stop-string matching over streamed text, holding back what might become a match."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    """Feed text pieces; get back what is safe to emit and the stop string that matched, if any.

    A suffix of the pending text that is a prefix of some stop string is held back until the
    next piece settles it, so a stop string split across tokens is never emitted.
    """

    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add `piece`; return (text to emit now, matched stop string or None)."""
        self._pending += piece
        if not self.stops:
            out, self._pending = self._pending, ""
            return out, None
        hit = self._earliest_match()
        if hit is not None:
            start, stop = hit
            out, self._pending = self._pending[:start], ""
            return out, stop
        keep = self._partial_suffix_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string completed)."""
        out, self._pending = self._pending, ""
        return out

    def _earliest_match(self) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = self._pending.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _partial_suffix_length(self) -> int:
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
