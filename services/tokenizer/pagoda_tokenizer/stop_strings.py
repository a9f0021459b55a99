"""StopStringMatcher: finds stop strings in streamed text, however the text is split into pieces.

Text that could be the start of a stop string is held back until the next pieces show whether it is one;
otherwise a client would receive "Obs" and then learn that "Observation:" stops the output. When several
stop strings match, the one that is complete first in the stream wins (the earliest end; on a tie, the
earliest start), so the result does not depend on how the text was split.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stop_strings: Sequence[str], include_in_output: bool = False):
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stop_strings)
        self._include = include_in_output
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def push(self, text: str, can_stop: bool = True) -> tuple[str, str | None]:
        """Feed the next piece of text. Returns the text now safe to emit and the stop string that matched
        (None while none has). After a match the output is complete: push no more. With ``can_stop``
        false no match may end in this piece (vLLM's min_tokens), though a later one may start in it."""
        buffer = self._held + text
        match = self._first_match(buffer, len(self._held)) if can_stop else None
        if match is not None:
            start, stop = match
            self._held = ""
            return buffer[: start + len(stop) if self._include else start], stop
        keep = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """The text held back: the stream ended, so it can no longer become a stop string."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str, held: int) -> tuple[int, str] | None:
        """The first match ending past the held-back text (one ending in it was refused by ``can_stop``)."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop, max(0, held - len(stop) + 1))
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_match_length(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that begins some stop string."""
        for start in range(max(0, len(buffer) - self._longest + 1), len(buffer)):
            tail = buffer[start:]
            if any(stop.startswith(tail) for stop in self._stops):
                return len(buffer) - start
        return 0
