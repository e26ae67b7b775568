"""Reasoning blocks: a token budget for the model's reasoning, then the answer.

Models that reason write ``<think> ... </think>`` before their answer (or their chat template opens
the block in the generation prompt). With ``generate(reasoning=Reasoning(budget=256))`` the
reasoning may take ``budget`` tokens; if the model has not closed the block by then, the closing
tag is forced into the KV (in the pass of the next sampled token) and the answer follows. The
reasoning is returned apart: ``result.reasoning``, while the text is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reasoning:
    """At most ``budget`` tokens between ``open`` and ``close``, then the answer."""

    budget: int
    open: str = "<think>"
    close: str = "</think>"

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"the reasoning budget must be >= 0, got {self.budget}")
        if not self.open or not self.close:
            raise ValueError("a reasoning block needs an opening and a closing tag")


class ReasoningSplitter:
    """Splits generated text into reasoning and answer as it arrives.

    Phases: ``start`` (the output may open a block: leading whitespace, then the opening tag or
    not), ``thinking`` (inside the block; tokens are counted) and ``answer``. Text that may be the
    beginning of a tag is held back until it is known.
    """

    def __init__(self, config: Reasoning, prompt_tail: str) -> None:
        self.config = config
        # the template opened the block already (e.g. a generation prompt ending in "<think>\n")
        self.phase = "thinking" if prompt_tail.rstrip().endswith(config.open) else "start"
        self.tokens = 0  # tokens generated inside the block
        self.reasoning = ""
        self._held = ""
        self._after_block = False  # the block just closed: whitespace before the answer is dropped

    @property
    def thinking(self) -> bool:
        return self.phase == "thinking"

    @property
    def over_budget(self) -> bool:
        """The block is still open and its budget is spent: time to close it."""
        return self.thinking and self.tokens >= self.config.budget

    def count(self) -> None:
        """A token was generated (before its text is pushed)."""
        if self.thinking:
            self.tokens += 1

    def push(self, text: str) -> str:
        """Add generated text; return the answer text that became certain."""
        buf = self._held + text
        self._held = ""
        if self.phase == "start":
            stripped = buf.lstrip()
            if stripped.startswith(self.config.open):
                self.phase, buf = "thinking", stripped[len(self.config.open):]
            elif self.config.open.startswith(stripped):  # may still become the tag
                self._held = buf
                return ""
            else:
                self.phase = "answer"
        if self.phase == "thinking":
            at = buf.find(self.config.close)
            if at < 0:
                keep = _partial_suffix(buf, self.config.close)
                self.reasoning += buf[: len(buf) - keep]
                self._held = buf[len(buf) - keep:]
                return ""
            self.reasoning += buf[:at]
            self.phase, self._after_block, buf = "answer", True, buf[at + len(self.config.close):]
        if self._after_block:  # the whitespace between the block and the answer is neither
            buf = buf.lstrip()
            self._after_block = not buf
        return buf

    def finish(self) -> str:
        """The end of the output: what was held back goes where it belongs."""
        held, self._held = self._held, ""
        if self.phase == "thinking":
            self.reasoning += held
            return ""
        return held


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
