"""One OpenAI request's generation on an engine, independent of HTTP.

A `Job` holds the prompt context(s) of a request. With ``n > 1`` each prompt context is forked
before anything is computed: the first fork computes the prompt's full pages and registers them in
the prefix index, the others adopt them (computed once), and all forks decode in the same batches.
`Job.events()` yields `Delta`s as text is decoded and one `Finished` per choice; leaving the
iteration early (a client that went away) cancels every fork and frees its pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from pie_local.runtime import ContextLengthError, OutOfPagesError, SamplingParams
from pie_local.server.errors import APIError, busy, invalid
from pie_local.server.schema import GenerationRequest, ToolSpec

_SEED_STRIDE = 1 << 32  # fork i samples step s with seed + i * stride + s: streams never overlap


# Pages promised to the requests running on each engine: a request is admitted only when the pages
# its prompt and max_tokens can take are free beyond those, so an admitted request never runs out
# of KV midway (and one that cannot fit gets its 503 at once).
_admitted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> its running Jobs


def pages_needed(n_prompt: int, max_tokens: int, n_choices: int, page_size: int) -> int:
    """Upper bound of the pages one prompt sampled ``n_choices`` times can hold: the prompt's full
    pages once (the forks share them), the rest once per choice."""
    shared = n_prompt // page_size
    return shared + n_choices * (math.ceil((n_prompt + max_tokens) / page_size) - shared)


def admit(engine: Any, holder: Any, need: int) -> None:
    """Admit a request that may take up to ``need`` pages (``holder`` has ``promised`` and
    ``pages_held()``), or 503 when they are not free beyond what running requests were promised.
    A request bigger than the pool runs alone (and a generation may stop early)."""
    pool = engine.pool
    need = min(need, pool.n_pages)
    running = _admitted.setdefault(engine, set())
    still_promised = sum(max(job.promised - job.pages_held(), 0) for job in running)
    room = pool.n_free - still_promised
    if need > room:
        raise busy(f"the KV cache is full: this request needs up to {need} pages, {max(room, 0)} are free; "
                   "retry shortly")
    holder.promised = need
    running.add(holder)


def withdraw(engine: Any, holder: Any) -> None:
    """The request admitted with ``holder`` is over: its pages are no longer promised."""
    _admitted.get(engine, set()).discard(holder)


def context_limit(engine: Any) -> int:
    """Tokens one sequence may hold: the model's training context, bounded by the KV pool."""
    info = engine.info
    pool = info.n_pages * info.page_size
    return min(info.n_ctx_train, pool) if info.n_ctx_train > 0 else pool


def sampling_for(req: GenerationRequest, fork: int) -> SamplingParams:
    seed = None if req.seed is None else (req.seed + fork * _SEED_STRIDE) & 0xFFFFFFFFFFFFFFFF
    return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, seed=seed)


@dataclass
class Delta:
    """Text decoded for choice ``index``, with the tokens that produced it since the last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str  # "stop" or "length" (a route may turn it into "tool_calls")
    cached_tokens: int = 0


@dataclass
class Finished:
    choice: Choice


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class _Prompt:
    forks: list[Any]  # Contexts, one per choice
    n_tokens: int
    choices: list[Choice] = field(default_factory=list)


class Job:
    """Prompts (text or token ids) of one request, each sampled ``req.n`` times."""

    def __init__(self, engine: Any, prompts: Sequence[str | list[int]], req: GenerationRequest,
                 stop: Sequence[str] = (), constraint: Any = None, param: str = "prompt") -> None:
        self.engine = engine
        self.req = req
        self.stop = list(stop)
        self.constraint = constraint
        self._prompts: list[_Prompt] = []
        self.promised = 0  # KV pages this request may still take (see _admitted)
        if engine.info.embedding_only:
            raise invalid("model", f"this model ({engine.info.arch}) is an embedding model: it has no LM head and "
                                   "cannot generate text; use /v1/embeddings", "unsupported_model")
        limit = context_limit(engine)
        try:
            for p in prompts:
                ctx = engine.context()
                self._prompts.append(_Prompt([ctx], 0))
                try:
                    ctx.fill_tokens(p) if isinstance(p, list) else ctx.fill(p)
                except ContextLengthError as exc:
                    raise _too_long(param, str(exc)) from None
                except ValueError as exc:
                    raise invalid(param, str(exc)) from None
                n = len(ctx)
                want = req.max_tokens or 1
                if n + want > limit:
                    raise _too_long(param, f"this model's context is {limit} tokens; the prompt has {n} and "
                                           f"{want} more were asked for (max_tokens)")
                self._prompts[-1].n_tokens = n
            self.max_tokens = [req.max_tokens or limit - p.n_tokens for p in self._prompts]
            self._promise_pages()
        except BaseException:
            self.release()
            raise

    def _promise_pages(self) -> None:
        page_size = self.engine.pool.page_size
        admit(self.engine, self, sum(pages_needed(p.n_tokens, m, self.req.n, page_size)
                                     for p, m in zip(self._prompts, self.max_tokens)))

    def pages_held(self) -> int:
        return sum(ctx.n_pages for p in self._prompts for ctx in p.forks)

    def release(self) -> None:
        withdraw(self.engine, self)
        for p in self._prompts:
            for ctx in p.forks:
                ctx.release()

    def _fork(self) -> None:
        n = self.req.n
        if n > 1:
            for p in self._prompts:
                parent = p.forks[0]
                p.forks = parent.fork(n)
                parent.release()  # nothing computed yet: the forks hold all it had

    # ---- running -----------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Delta | Finished]:
        """Deltas as text arrives and one Finished per choice, in the order they happen."""
        self._fork()
        queue: asyncio.Queue = asyncio.Queue()
        tasks = []
        for pi, prompt in enumerate(self._prompts):
            for fi, ctx in enumerate(prompt.forks):
                index = pi * self.req.n + fi
                coro = self._choice(ctx, index, fi, self.max_tokens[pi], queue)
                tasks.append(asyncio.get_running_loop().create_task(coro, name=f"choice-{index}"))
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finished):
                    remaining -= 1
                    self._prompts[item.choice.index // self.req.n].choices.append(item.choice)
                yield item
        finally:
            # Release first: a context released mid-pass cancels its forward request in the
            # scheduler, so the batch in flight gives its pages back when it ends.
            self.release()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self) -> list[Choice]:
        """Every choice, ordered by index."""
        choices = [e.choice async for e in self.events() if isinstance(e, Finished)]
        return sorted(choices, key=lambda c: c.index)

    async def _choice(self, ctx: Any, index: int, fork: int, max_tokens: int, queue: asyncio.Queue) -> None:
        try:
            sent = 0
            pieces = ctx.stream(sampling_for(self.req, fork), max_tokens=max_tokens, stop=self.stop,
                                constrain=self.constraint, top_logprobs=self.req.top_logprobs,
                                # tokens a constraint forces are not sampled and have no log-probability:
                                # a client that asked for log-probabilities gets every token sampled
                                fast_forward=not self.req.logprobs)
            async with contextlib.aclosing(pieces):
                async for piece in pieces:
                    last = ctx.last
                    n = len(last.token_ids)
                    queue.put_nowait(Delta(index, piece, last.token_ids[sent:n], last.logprobs[sent:n],
                                           last.top_logprobs[sent:n]))
                    sent = n
            last = ctx.last
            queue.put_nowait(Finished(Choice(index, last.text, list(last.token_ids), list(last.logprobs),
                                             list(last.top_logprobs), last.finish_reason, last.cached_tokens)))
        except asyncio.CancelledError:
            raise
        except OutOfPagesError as exc:
            queue.put_nowait(busy(f"the KV cache is full ({exc}); retry shortly"))
        except Exception as exc:  # noqa: BLE001 — reported to the client, the server carries on
            queue.put_nowait(exc if isinstance(exc, APIError) else APIError(500, f"generation failed: {exc}",
                                                                              code="generation_failed"))

    def usage(self) -> Usage:
        usage = Usage()
        for p in self._prompts:
            usage.prompt_tokens += p.n_tokens
            usage.completion_tokens += sum(len(c.token_ids) for c in p.choices)
            usage.cached_tokens += min((c.cached_tokens for c in p.choices), default=0)
        return usage


def _too_long(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}. Shorten the prompt or lower max_tokens.", param=param,
                    code="context_length_exceeded")


def finite(x: float) -> float | None:
    """JSON has no NaN: a log-probability that was not sampled (re-encoded text) becomes null."""
    return None if math.isnan(x) else x
