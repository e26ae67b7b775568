"""Per-inferlet limits and the errors an inferlet sees when it crosses one."""

from __future__ import annotations

from dataclasses import dataclass

from pie_local.runtime.pages import OutOfPagesError


@dataclass(frozen=True)
class Limits:
    """None = unlimited. ``max_pages``: KV pages its contexts may hold at once (a page shared by
    two of its contexts counts twice); ``max_tokens``: tokens it may send through the model in all;
    ``wall_time``: seconds before it is stopped."""

    max_pages: int | None = None
    max_tokens: int | None = None
    wall_time: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_pages", "max_tokens", "wall_time"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {value}")


class LimitExceeded(RuntimeError):
    """An inferlet crossed one of its limits."""


class PageLimitError(OutOfPagesError, LimitExceeded):
    """The inferlet's own page limit, not the pool, refused the allocation."""


class TokenLimitError(LimitExceeded):
    pass


class WallTimeExceeded(LimitExceeded, TimeoutError):
    pass


class ContextBusyError(RuntimeError):
    """A context was used by two operations at once (one forward pass per context at a time)."""


class ContextLengthError(ValueError):
    """A token would sit at a position past the model's trained context."""
