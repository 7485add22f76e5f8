"""Stop-string matching over streamed text, holding back what might become a match."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


def _failure(pattern: str) -> list[int]:
    """KMP failure function: for each prefix, the longest proper prefix that is also its suffix."""
    table = [0] * len(pattern)
    matched = 0
    for i in range(1, len(pattern)):
        while matched and pattern[i] != pattern[matched]:
            matched = table[matched - 1]
        if pattern[i] == pattern[matched]:
            matched += 1
        table[i] = matched
    return table


@dataclass
class _StopState:
    """One stop string and how much of it the text seen so far ends with."""

    text: str
    matched: int = 0  # length of the longest suffix of the text that is a prefix of `text`
    _failure: list[int] | None = None  # built on the first mismatch after a partial match

    def advance(self, char: str) -> bool:
        """Take one more character of output; True when the stop string is now complete."""
        text, matched = self.text, self.matched
        while matched and char != text[matched]:
            if self._failure is None:
                self._failure = _failure(text)
            matched = self._failure[matched - 1]
        if char == text[matched]:
            matched += 1
        self.matched = matched
        return matched == len(text)


@dataclass
class StopMatcher:
    """Feed text pieces; get back what is safe to emit and the stop string that matched, if any.

    A suffix of the pending text that is a prefix of some stop string is held back until the
    next piece settles it, so a stop string split across tokens is never emitted. Each stop
    string keeps its match state (KMP); a character only touches the stop strings partly
    matched so far and those it starts, so a piece costs O(its length), never a rescan of the
    held-back text. The first stop string to complete wins (the longest of those completing at
    the same character), however the text was split into pieces.
    """

    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)
    _starting: dict[str, list[_StopState]] = field(default_factory=dict, init=False)
    _active: list[_StopState] = field(default_factory=list, init=False)  # matched > 0

    def __post_init__(self) -> None:
        starting: defaultdict[str, list[_StopState]] = defaultdict(list)
        for stop in dict.fromkeys(self.stops):
            if stop:
                starting[stop[0]].append(_StopState(stop))
        self._starting = dict(starting)

    def feed(self, piece: str) -> tuple[str, str | None]:
        """Add `piece`; return (text to emit now, matched stop string or None)."""
        if not self._starting:
            out, self._pending = self._pending + piece, ""
            return out, None
        for end, char in enumerate(piece, start=1):
            completed = self._advance(char)
            if completed:
                stop = max(completed, key=len)
                text = self._pending + piece[:end]
                self._reset()
                return text[: len(text) - len(stop)], stop
        text = self._pending + piece
        keep = max((state.matched for state in self._active), default=0)
        cut = len(text) - keep
        out, self._pending = text[:cut], text[cut:]
        return out, None

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string completed)."""
        out = self._pending
        self._reset()
        return out

    def _advance(self, char: str) -> list[str]:
        """Move every affected stop string past `char`; the ones it completes."""
        completed: list[str] = []
        active: list[_StopState] = []
        for state in self._active:
            if state.advance(char):
                completed.append(state.text)
            if state.matched:
                active.append(state)
        for state in self._starting.get(char, ()):
            if state.matched == 0:  # not partly matched before (those advanced above)
                if state.advance(char):
                    completed.append(state.text)
                active.append(state)
        self._active = active  # completed ones too, so that _reset clears them
        return completed

    def _reset(self) -> None:
        self._pending = ""
        for state in self._active:
            state.matched = 0
        self._active = []
