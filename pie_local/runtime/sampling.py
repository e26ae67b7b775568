"""Sampling parameters and the stop logic of a generation (EOS tokens, stop strings, max tokens).

`SamplingParams` is defined with the driver's types (one sampler type from the inferlet down to
the C driver) and re-exported here, where inferlets look for it.
"""

from __future__ import annotations

from pie_local.driver.types import SamplingParams

__all__ = ["SamplingParams", "StopChecker"]


class StopChecker:
    """Feeds generated text through stop strings, holding back what may be the start of one.

    ``push(text)`` returns the text that is safe to show now; once a stop string is complete,
    ``stopped`` is True and everything from the stop string on is dropped. ``finish()`` returns
    what was held back when generation ends for another reason.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._held + text
        first = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.stopped, self.matched, self._held = True, first[1], ""
            return buf[: first[0]]
        keep = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
