"""Context: the object inferlets program against — text and chat messages in, generations out,
forks, truncation and named snapshots.

A context is a `Sequence` (tokens, positions and KV pages: `runtime/sequence.py`) plus the chat
conversation rendered into it by the model's chat template. Generation lives in
`runtime/generation.py`; the low-level pass builder in `runtime/forward.py`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

from pie_local.runtime import generation, scoring
from pie_local.runtime.forward import Forward, ForwardOutput
from pie_local.runtime.generation import Generation, GenerationResult
from pie_local.runtime.reasoning import Reasoning
from pie_local.runtime.sampling import SamplingParams
from pie_local.runtime.scoring import Score, Selection
from pie_local.runtime.sequence import Sequence as TokenSequence

if TYPE_CHECKING:
    from pie_local.runtime.engine import Engine

__all__ = ["Context", "Generation", "GenerationResult"]


class Context:
    """Create with ``rt.context()`` (inside an inferlet) or ``engine.context()``; ``async with``
    releases its pages at the end of the block."""

    def __init__(self, engine: Engine, owner: Any = None, sequence: TokenSequence | None = None) -> None:
        self._engine = engine
        self._owner = owner
        self.sequence = sequence or TokenSequence(engine, owner)
        self._messages: list[dict] = []
        self._message_ends: list[int] = []  # len(self) after each message was filled
        self._rendered = ""  # the chat template's text of _messages (no generation prompt)
        self._chat_start = 0  # len(self) before the first message
        self._tools: list[dict] | None = None  # tool schemas the template renders
        self.last: Generation = Generation()
        if owner is not None:
            owner.contexts.add(self)

    # ---- views ---------------------------------------------------------------------------------

    @property
    def token_ids(self) -> list[int]:
        return self.sequence.tokens

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def kv_len(self) -> int:
        """Tokens whose KV is computed."""
        return self.sequence.kv_len

    @property
    def n_pending(self) -> int:
        return len(self.sequence.pending)

    @property
    def n_pages(self) -> int:
        return len(self.sequence.pages)

    @property
    def page_ids(self) -> list[int]:
        return [p.id for p in self.sequence.pages]

    @property
    def next_position(self) -> int:
        return self.sequence.next_position

    @property
    def max_position(self) -> int | None:
        """The last position a token may take: the model's trained context - 1 by default. Set it
        to None when the program keeps attention in range itself (attention sink, sliding window)."""
        return self.sequence.max_position

    @max_position.setter
    def max_position(self, value: int | None) -> None:
        self.sequence.max_position = None if value is None else int(value)

    @property
    def messages(self) -> list[dict]:
        return list(self._messages)

    @property
    def text(self) -> str:
        return self._engine.tokenizer.decode(self.token_ids)

    @property
    def engine_info(self):
        return self._engine.info

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def chat_template(self):
        return self._engine.chat_template

    @property
    def chat_stop_strings(self) -> list[str]:
        return list(self._engine.chat_template.stop_strings)

    def __repr__(self) -> str:
        return f"Context(tokens={len(self)}, pending={self.n_pending}, pages={self.n_pages})"

    # ---- filling -------------------------------------------------------------------------------

    def fill(self, text: str) -> Context:
        """Append text (special tokens such as <start_of_turn> are parsed). Computed at the next pass."""
        tok = self._engine.tokenizer
        ids = tok.encode(text, add_special=False, parse_special=True)
        if len(self) == 0 and tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
        return self.fill_tokens(ids)

    def fill_tokens(self, ids: Sequence[int]) -> Context:
        self.sequence.check_alive()
        n_vocab = self._engine.info.n_vocab
        ids = [int(t) for t in ids]
        for t in ids:
            if not 0 <= t < n_vocab:
                raise ValueError(f"token id {t} out of range [0, {n_vocab})")
        self.sequence.append(ids)
        return self

    # ---- chat ------------------------------------------------------------------------------------

    def system(self, text: str) -> Context:
        return self.add_message({"role": "system", "content": text})

    def user(self, text: str) -> Context:
        return self.add_message({"role": "user", "content": text})

    def assistant(self, text: str) -> Context:
        return self.add_message({"role": "assistant", "content": text})

    def add_message(self, message: dict) -> Context:
        """Append a chat message of any role (e.g. a "tool" result) through the chat template."""
        if not self._messages:
            self._chat_start = len(self)
        messages = self._messages + [message]
        self._sync_chat(self._render(messages), messages)
        return self

    def replace_last_message(self, message: dict) -> None:
        """Rewrite how the last message is recorded (e.g. a reply that turned out to be a tool call)
        without touching the KV: its tokens are already there."""
        if not self._messages:
            raise ValueError("there is no message to replace")
        self._messages[-1] = message
        self._rendered = self._render(self._messages)

    def set_tools(self, tools: list[dict] | None) -> None:
        """The tool schemas the chat template offers the model. Changing them after messages were
        filled re-renders the conversation (full pages that still match come from the prefix cache)."""
        tools = tools or None
        if tools == self._tools:
            return
        self._tools = tools
        if self._messages:
            self._sync_chat(self._render(self._messages), list(self._messages))

    def begin_assistant_turn(self) -> str | None:
        """When the conversation awaits a reply, fill the template's generation prompt and return
        the conversation's text up to the reply; None when this is not a chat turn."""
        if not self._messages or self._messages[-1]["role"] == "assistant":
            return None
        prompt_text = self._render(self._messages, add_generation_prompt=True)
        self.fill(prompt_text[len(self._rendered):])
        return prompt_text

    def end_assistant_turn(self, prompt_text: str, text: str) -> None:
        """Record the reply as an assistant message and fill the template's end of turn. When the
        template renders the reply differently from what was generated (stripped whitespace,
        dropped reasoning), the conversation is refilled as the template has it."""
        messages = self._messages + [{"role": "assistant", "content": text}]
        rendered = self._render(messages)
        in_kv = prompt_text + text
        if rendered.startswith(in_kv):
            self.fill(rendered[len(in_kv):])
            self._message_ends.append(len(self))
            self._messages, self._rendered = messages, rendered
        else:
            self._sync_chat(rendered, messages, refill=True)

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._engine.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                                 tools=self._tools)

    def _sync_chat(self, rendered: str, messages: list[dict], refill: bool = False) -> None:
        """Make the context hold ``rendered`` (the template's text of ``messages``) after its chat start:
        append the new part, or, when the template rewrote earlier turns, refill the conversation."""
        if not refill and rendered.startswith(self._rendered):
            self.fill(rendered[len(self._rendered):])
            self._message_ends += [len(self)] * (len(messages) - len(self._messages))
        else:
            self.sequence.check_idle("re-render the conversation")
            self.sequence.truncate(self._chat_start)
            self.fill(rendered)
            self._message_ends = [len(self)] * len(messages)
        self._messages, self._rendered = messages, rendered

    # ---- forward passes --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Compute the KV of every pending token."""
        if self.sequence.pending:
            await self.sequence.submit([], None, None, rows=[], samplers=[])

    def forward(self) -> Forward:
        """A low-level forward pass over this context (pending tokens are computed first)."""
        self.sequence.check_alive()
        return Forward(self)

    async def run_forward(self, tokens: list[int], positions: list[int] | None, masks, rows: list[int],
                          samplers: list[SamplingParams], *, logit_masks=None, top_k: int = 0,
                          want_logits: bool = False) -> ForwardOutput:
        """What Forward.execute() runs: ``rows`` index ``tokens``; pending tokens go first in the same pass."""
        offset = self.n_pending
        out = await self.sequence.submit(tokens, positions, masks, [offset + r for r in rows], samplers,
                                         logit_masks=logit_masks, top_k=top_k, want_logits=want_logits)
        out.rows = [r - offset for r in out.rows]
        return out

    # ---- generation ------------------------------------------------------------------------------

    async def generate(self, sampling: SamplingParams | None = None, max_tokens: int = 256,
                       stop: Sequence[str] | None = None, constrain: Any = None, tools: Any = None,
                       max_tool_calls: int = 8, top_logprobs: int = 0, *,
                       fast_forward: bool = True, heal: bool = False,
                       reasoning: Reasoning | int | None = None, speculator: Any = None,
                       draft_tokens: int = 8) -> GenerationResult:
        """Generate text. Stops at an end-of-generation token, a stop string, when a constraint is
        complete, or after ``max_tokens``. Returns the text as a `GenerationResult` (a ``str``) that
        also carries what ``ctx.last`` holds: why it stopped, the token ids, their log-probabilities
        and (with ``top_logprobs=k``) the k most probable tokens of each step.

        ``fast_forward``: tokens a constraint forces (a JSON key, a closing brace) go into the KV
        in the pass of the next sampled token instead of one pass each; they are not sampled, so
        their raw log-probability is nan (False: sample every token, one pass each).

        ``heal``: token healing. The context's last token is taken back and the output must begin
        with its bytes, so a prompt that stops mid-token ("http:") lets the model choose the token
        it would have written ("://"); the returned text is what follows the prompt's text.

        ``reasoning``: a `Reasoning` (or a token budget, with ``<think>``/``</think>`` tags). The
        reasoning block may take that many tokens; then its closing tag is forced and the answer
        generated. The text (and the stream) is the answer; ``result.reasoning`` the block's text.

        ``speculator``: a drafter (`NgramDrafter`, `ModelDrafter`, `GuessDrafter`, anything with
        ``async propose(tokens, k)``, or a function) proposes up to ``draft_tokens`` tokens; one
        pass verifies them. Greedy output is exactly greedy decoding's; sampled output has the
        distribution of sampling without a drafter. ``result.drafted_tokens``/``accepted_tokens``
        count them."""
        parts = [piece async for piece in self.stream(sampling, max_tokens, stop, constrain, tools, max_tool_calls,
                                                      top_logprobs, fast_forward=fast_forward, heal=heal,
                                                      reasoning=reasoning, speculator=speculator,
                                                      draft_tokens=draft_tokens)]
        return GenerationResult("".join(parts), self.last)

    async def stream(self, sampling: SamplingParams | None = None, max_tokens: int = 256,
                     stop: Sequence[str] | None = None, constrain: Any = None, tools: Any = None,
                     max_tool_calls: int = 8, top_logprobs: int = 0, *,
                     fast_forward: bool = True, heal: bool = False,
                     reasoning: Reasoning | int | None = None, speculator: Any = None,
                     draft_tokens: int = 8) -> AsyncIterator[str]:
        """Like generate(), yielding text pieces as they are decoded (stop strings held back)."""
        if isinstance(reasoning, int) and not isinstance(reasoning, bool):
            reasoning = Reasoning(budget=reasoning)
        opts = generation.GenerateOptions(
            sampling=sampling, max_tokens=max_tokens, stop=stop, constrain=constrain, tools=tools,
            max_tool_calls=max_tool_calls, top_logprobs=top_logprobs, fast_forward=fast_forward, heal=heal,
            reasoning=reasoning, speculator=speculator, draft_tokens=draft_tokens)
        pieces = generation.stream(self, opts)
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                yield piece

    # ---- scoring ---------------------------------------------------------------------------------

    async def score(self, continuation: str | Sequence[int], *, constrain: Any = None) -> Score:
        """The log-probability of each token of ``continuation`` (text or token ids) after this
        context, in one forward pass (teacher forcing). The context is unchanged afterwards. With
        ``constrain=`` the scores are also given renormalised over the tokens it allows."""
        return await scoring.score(self, continuation, constrain)

    async def select(self, options: Sequence[str | Sequence[int]], *, normalize: bool = True) -> Selection:
        """Score every option from forks of this context in one batch and append the best one.
        ``normalize``: rank by mean log-probability per token (SGLang's default) or by the total."""
        return await scoring.select(self, options, normalize)

    # ---- structure -------------------------------------------------------------------------------

    def fork(self, n: int) -> list[Context]:
        """``n`` independent copies sharing this context's pages (copy-on-write), always as a list
        (``fork1()`` gives one). O(pages)."""
        self.sequence.check_alive()
        self.sequence.check_idle("fork")
        if n < 1:
            raise ValueError(f"fork(n) needs n >= 1, got {n}")
        if self._owner is not None:
            self._owner.charge(tokens=0, new_pages=n * self.n_pages)
        children = []
        for _ in range(n):
            child = Context(self._engine, self._owner, self.sequence.fork(self._owner))
            child._messages, child._message_ends = list(self._messages), list(self._message_ends)
            child._rendered, child._chat_start, child._tools = self._rendered, self._chat_start, self._tools
            children.append(child)
        return children

    def fork1(self) -> Context:
        """One independent copy sharing this context's pages: ``fork(1)[0]``."""
        return self.fork(1)[0]

    def truncate(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` tokens."""
        self.sequence.check_alive()
        self.sequence.check_idle("truncate")
        if not 0 <= n_tokens <= len(self):
            raise ValueError(f"truncate({n_tokens}) outside 0..{len(self)}")
        self.sequence.truncate(n_tokens)
        while self._message_ends and self._message_ends[-1] > n_tokens:
            self._message_ends.pop()
            self._messages.pop()
        if self._messages or self._rendered:
            self._rendered = self._render(self._messages) if self._messages else ""

    def drop_pages(self, indices: Sequence[int]) -> None:
        """Remove whole full pages (by index in this context) from the KV: their tokens are gone,
        later tokens keep their positions (attention sinks, windowed attention). The chat history
        no longer matches the KV afterwards, so it is forgotten."""
        self.sequence.check_alive()
        self.sequence.check_idle("drop pages")
        if self.sequence.drop_pages(indices):
            self._messages, self._message_ends, self._rendered = [], [], ""

    # ---- snapshots -------------------------------------------------------------------------------

    def chat_state(self) -> dict:
        """The conversation as a snapshot stores it."""
        return {"messages": self._messages, "message_ends": self._message_ends, "chat_start": self._chat_start,
                "tools": self._tools}

    def restore_chat_state(self, state: dict) -> None:
        self._messages, self._message_ends = list(state["messages"]), list(state["message_ends"])
        self._chat_start, self._tools = state["chat_start"], state["tools"]
        self._rendered = self._render(self._messages) if self._messages else ""

    async def save(self, name: str) -> Any:
        """Write this context (tokens + KV pages) as the named snapshot; survives restarts."""
        from pie_local.runtime import snapshots

        return await snapshots.save(self, name)

    @classmethod
    async def open(cls, rt: Any, name: str) -> Context:
        """Load a named snapshot into a new context of ``rt`` (a Runtime or an Engine)."""
        from pie_local.runtime import snapshots

        return await snapshots.load(rt, name)

    # ---- lifetime --------------------------------------------------------------------------------

    async def __aenter__(self) -> Context:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Give back this context's pages (also happens when its inferlet ends)."""
        if self.sequence.released:
            return
        self.sequence.release()
        if self._owner is not None:
            self._owner.contexts.discard(self)
