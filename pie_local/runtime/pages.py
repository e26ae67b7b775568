"""KV pages: the allocator and the prefix index (automatic prefix caching).

The runtime owns page ids; the driver only sees them in page tables. A *full* page of a context
whose tokens sit at their natural positions with plain causal attention is content-addressed by
the hash of its token chain (the tokens of every page before it and its own, plus the model id),
registered in the index and shared: a context that is about to compute the same tokens adopts
the page instead. A page is matched only once its KV is computed (``ready``); a page still being
computed can be waited for (`PagePool.wait_change`). Pages are refcounted; an unreferenced indexed
page stays in an LRU and is reclaimed only when an allocation needs it. A page is written in place
only by its single owner and only while it is not indexed (copy-on-write otherwise).

Placement: the driver reads a request's KV as one slice of its pool when the request's page ids
are consecutive, joins a few runs of consecutive ids with one copy per layer (a shared prefix,
then a fork's own pages), and gathers row by row (slowest) otherwise. So a sequence's growth takes
the ids right after its last page when they are free, and anything else is placed where it has
room to grow (see `PagePool.allocate`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class OutOfPagesError(RuntimeError):
    """No KV page is free for this request (the pool is full, or the inferlet's page limit is reached)."""


@dataclass(eq=False)
class Page:
    id: int
    refs: int = 0
    hash: bytes | None = None  # content address while registered in the index
    ready: bool = True  # False while the pass that computes its KV has not finished

    @property
    def writable(self) -> bool:
        """Only an unshared, unindexed page may have tokens written into it in place."""
        return self.refs == 1 and self.hash is None


class PagePool:
    def __init__(self, n_pages: int, page_size: int, model_id: str) -> None:
        self.n_pages = n_pages
        self.page_size = page_size
        self._seed = hashlib.blake2b(model_id.encode(), digest_size=16).digest()
        self.pages = [Page(i) for i in range(n_pages)]
        self._free = np.ones(n_pages, dtype=bool)  # never used or released, not cached
        self._n_free = n_pages
        self._index: dict[bytes, Page] = {}
        self._lru: OrderedDict[int, Page] = OrderedDict()  # unreferenced, indexed, ready
        self._changed: asyncio.Event | None = None
        self.evictions = 0

    # ---- allocation and refcounts -----------------------------------------------------------------

    def allocate(self, n: int, after: Page | None = None) -> list[Page]:
        """``n`` fresh private pages (refs=1), reclaiming least-recently-used cached pages if needed.

        Placement (see the module docstring): ``after`` is the last page of the sequence these
        pages extend (None for a new sequence). They take the ids right after it when those are
        free; otherwise one run in the largest free run, at its start when it starts the pool,
        else in its middle, so that both the new run and the sequence that may end just before
        it have room to grow. When no free run holds them all, the lowest free ids.
        """
        if n <= 0:
            return []
        if n > self._n_free + len(self._lru):
            raise OutOfPagesError(
                f"out of KV pages: need {n}, {self._n_free + len(self._lru)} free of {self.n_pages} "
                f"(release contexts or start the engine with more pages)"
            )
        while self._n_free < n:
            _, page = self._lru.popitem(last=False)
            del self._index[page.hash]
            page.hash = None
            self._free[page.id] = True
            self._n_free += 1
            self.evictions += 1
        out = []
        for i in self._place(n, after):
            page = self.pages[i]
            page.refs, page.hash, page.ready = 1, None, True
            self._free[i] = False
            out.append(page)
        self._n_free -= n
        return out

    def _place(self, n: int, after: Page | None) -> list[int]:
        """Ids of ``n`` free pages (at least ``n`` are free)."""
        if after is not None and after.id + n < self.n_pages and self._free[after.id + 1 : after.id + 1 + n].all():
            return list(range(after.id + 1, after.id + 1 + n))
        # free runs [start, start + length): edges of the free mask padded with used pages
        edges = np.diff(np.concatenate(([0], self._free.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        lengths = np.flatnonzero(edges == -1) - starts
        big = int(np.argmax(lengths))
        if lengths[big] < n:  # fragmented: no run holds them all, take the lowest ids
            return np.flatnonzero(self._free)[:n].tolist()
        first = int(starts[big])
        if first > 0:  # a sequence may end just before the run: leave it half the room
            first += (int(lengths[big]) - n) // 2
        return list(range(first, first + n))

    def incref(self, page: Page) -> None:
        if page.refs == 0:
            self._lru.pop(page.id, None)
        page.refs += 1

    def decref(self, page: Page) -> None:
        assert page.refs > 0, f"page {page.id} released twice"
        page.refs -= 1
        if page.refs:
            return
        if page.hash is not None and page.ready:
            self._lru[page.id] = page  # keep its KV for a later prefix hit
            return
        if page.hash is not None:  # never finished computing: forget it
            self.fail(page)
        self._free[page.id] = True
        self._n_free += 1

    def release(self, pages: Sequence[Page]) -> None:
        for page in pages:
            self.decref(page)

    # ---- the prefix index -------------------------------------------------------------------------

    def chain_hash(self, prev: bytes | None, tokens: Sequence[int]) -> bytes:
        h = hashlib.blake2b(prev or self._seed, digest_size=16)
        h.update(np.asarray(tokens, dtype=np.int32).tobytes())
        return h.digest()

    def lookup(self, key: bytes) -> Page | None:
        return self._index.get(key)

    def register(self, page: Page, key: bytes, ready: bool) -> bool:
        """Index ``page`` under ``key`` unless another page already holds that content."""
        if key in self._index:
            return False
        page.hash, page.ready = key, ready
        self._index[key] = page
        return True

    def mark_ready(self, page: Page) -> None:
        page.ready = True

    def fail(self, page: Page) -> None:
        """A registered page will not be computed after all: unindex it so waiters compute their own."""
        if page.hash is not None and self._index.get(page.hash) is page:
            del self._index[page.hash]
        page.hash = None
        page.ready = True
        self.notify()

    def notify(self) -> None:
        """Wake everything waiting on in-flight pages (called after every batch)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    # ---- counts -------------------------------------------------------------------------------------

    @property
    def n_free(self) -> int:
        """Pages an allocation can get: never used plus cached (reclaimable)."""
        return self._n_free + len(self._lru)

    @property
    def n_cached(self) -> int:
        return len(self._lru)

    @property
    def n_used(self) -> int:
        return self.n_pages - self.n_free

    @property
    def n_shared(self) -> int:
        return sum(1 for p in self.pages if p.refs > 1)
