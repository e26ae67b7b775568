"""Constrained decoding with llguidance: JSON schema, regex and Lark/GBNF grammars.

A `Constraint` is a description (cheap, reusable, checked when created). Binding it to a
tokenizer gives a `ConstraintState` that follows one generation:

    state = JsonSchema({"type": "object", ...}).bind(tokenizer)
    while not state.is_done():
        mask = state.mask()            # uint32[ceil(n_vocab / 32)], bit t%32 of word t//32 = allowed
        token = sample(logits, mask)   # the driver applies the mask as a logit bitmask
        state.advance(token)

When the output is complete the mask allows only the end-of-generation tokens; `is_done()` turns
true once one of them was advanced (or nothing but them can follow). Several constraints apply at
once with `AllOf(a, b)`: the masks are ANDed and every state advances.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class ConstraintError(ValueError):
    """A schema/regex/grammar that does not compile, or a token the constraint does not allow."""


def _llg_tokenizer(tokenizer: Any):
    """Accept a pie-local Tokenizer (or anything with llguidance_tokenizer()) or an LLTokenizer."""
    import llguidance

    if isinstance(tokenizer, llguidance.LLTokenizer):
        return tokenizer
    if hasattr(tokenizer, "llguidance_tokenizer"):
        return tokenizer.llguidance_tokenizer()
    raise TypeError(f"cannot constrain with {type(tokenizer).__name__}: it has no llguidance_tokenizer()")


def mask_words(n_vocab: int) -> int:
    """Words in a token bitmask: one bit per vocab entry, packed into uint32."""
    return (n_vocab + 31) // 32


def allowed_tokens(mask: np.ndarray) -> np.ndarray:
    """Token ids whose bit is set (for tests, logging and samplers written in Python)."""
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


# ---- states -------------------------------------------------------------------------------------


class ConstraintState(ABC):
    """One generation's progress through a constraint."""

    n_vocab: int

    @abstractmethod
    def mask(self) -> np.ndarray:
        """Allowed next tokens as uint32[ceil(n_vocab/32)]. Raises ConstraintError if none is."""

    @abstractmethod
    def advance(self, token_id: int) -> None:
        """Consume a sampled token. Raises ConstraintError if the constraint forbids it."""

    @abstractmethod
    def is_done(self) -> bool:
        """True when generation must stop: EOS consumed, or nothing but EOS may follow."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """True when the text so far is a complete match (stopping here would be valid)."""

    @abstractmethod
    def fork(self) -> ConstraintState:
        """An independent copy (for ctx.fork())."""

    @abstractmethod
    def rollback(self, n_tokens: int) -> None:
        """Undo the last n advanced tokens (speculative decoding, backtracking)."""

    def forced_tokens(self) -> list[int]:
        """Tokens that must come next whatever is sampled (not consumed): generation puts them
        into the KV in one pass instead of sampling each. None known: []."""
        return []


class MatcherState(ConstraintState):
    """A state backed by one llguidance LLMatcher."""

    def __init__(self, matcher: Any, n_vocab: int, owner: Any, description: str) -> None:
        self._matcher = matcher
        self.n_vocab = n_vocab
        self._owner = owner  # keeps the Tokenizer (whose vocab llguidance calls into) alive
        self._description = description

    def mask(self) -> np.ndarray:
        out = np.empty(mask_words(self.n_vocab), dtype=np.uint32)
        self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        if self._matcher.is_error():
            raise ConstraintError(f"{self._description}: {self._matcher.get_error()}")
        return out

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise ConstraintError(f"{self._description}: token {token_id} is not allowed here "
                                  f"({self._matcher.get_error()})")

    def is_done(self) -> bool:
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def forced_bytes(self) -> bytes:
        """Bytes that must come next whatever is sampled (e.g. '{"name": "' in a JSON schema)."""
        return self._matcher.compute_ff_bytes()

    def forced_tokens(self) -> list[int]:
        """llguidance's fast-forward tokens: the forced bytes, tokenized canonically, minus a last
        token that could still merge with what follows."""
        return list(self._matcher.compute_ff_tokens())

    def fork(self) -> MatcherState:
        return MatcherState(self._matcher.deep_copy(), self.n_vocab, self._owner, self._description)

    def rollback(self, n_tokens: int) -> None:
        if not self._matcher.rollback(n_tokens):
            raise ConstraintError(f"{self._description}: cannot roll back {n_tokens} tokens")


class AllOfState(ConstraintState):
    """Several states at once: a token is allowed only if every state allows it."""

    def __init__(self, states: list[ConstraintState]) -> None:
        self._states = states
        self.n_vocab = states[0].n_vocab

    def mask(self) -> np.ndarray:
        out = self._states[0].mask()
        for state in self._states[1:]:
            np.bitwise_and(out, state.mask(), out=out)
        if not out.any():
            raise ConstraintError("the combined constraints allow no token here (they contradict each other)")
        return out

    def advance(self, token_id: int) -> None:
        for state in self._states:
            state.advance(token_id)

    def is_done(self) -> bool:
        return any(state.is_done() for state in self._states)

    def is_accepting(self) -> bool:
        return all(state.is_accepting() for state in self._states)

    def forced_tokens(self) -> list[int]:
        """What every state forces: the common prefix of their forced tokens."""
        lists = [getattr(state, "forced_tokens", list)() for state in self._states]
        forced = lists[0]
        for other in lists[1:]:
            n = 0
            while n < min(len(forced), len(other)) and forced[n] == other[n]:
                n += 1
            forced = forced[:n]
        return forced

    def fork(self) -> AllOfState:
        return AllOfState([state.fork() for state in self._states])

    def rollback(self, n_tokens: int) -> None:
        for state in self._states:
            state.rollback(n_tokens)


# ---- constraints --------------------------------------------------------------------------------


class Constraint(ABC):
    """What the output must look like; `bind(tokenizer)` starts following one generation."""

    @abstractmethod
    def bind(self, tokenizer: Any) -> ConstraintState: ...

    def __and__(self, other: Constraint) -> AllOf:
        return AllOf(self, other)


class GrammarConstraint(Constraint):
    """A constraint compiled to an llguidance grammar (the base of JsonSchema, Regex, Grammar)."""

    kind = "grammar"

    def __init__(self, llg_grammar: str, source: str) -> None:
        import llguidance

        self.llg_grammar = llg_grammar
        self.source = source
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(llg_grammar)
        if is_error:
            raise ConstraintError(f"invalid {self.kind}: {messages[0]}")

    def bind(self, tokenizer: Any) -> MatcherState:
        import llguidance

        llg_tok = _llg_tokenizer(tokenizer)
        matcher = llguidance.LLMatcher(llg_tok, self.llg_grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {self.kind}: {matcher.get_error()}")
        for warning in matcher.get_grammar_warnings():
            log.warning("%s: %s", self.kind, warning)
        return MatcherState(matcher, llg_tok.vocab_size, tokenizer, self.kind)

    def __repr__(self) -> str:
        text = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"{type(self).__name__}({text!r})"


class JsonSchema(GrammarConstraint):
    """Output is one JSON value valid under `schema` (a dict or its JSON text)."""

    kind = "JSON schema"

    def __init__(self, schema: dict | str, *, whitespace_flexible: bool = False) -> None:
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"invalid JSON schema: not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
        self.schema = schema
        try:
            # Compact separators unless asked: fewer tokens, and small models do not ramble in spaces.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides={"whitespace_flexible": whitespace_flexible})
        except ValueError as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        super().__init__(grammar, json.dumps(schema))


class Regex(GrammarConstraint):
    """Output fully matches `pattern` (Rust regex syntax; no look-around or back-references)."""

    kind = "regex"

    def __init__(self, pattern: str) -> None:
        import llguidance

        self.pattern = pattern
        super().__init__(llguidance.LLMatcher.grammar_from_regex(pattern), pattern)


class Grammar(GrammarConstraint):
    """Output is a sentence of a context-free grammar in Lark syntax (llguidance's dialect, with
    a `start:` rule) or llama.cpp's GBNF (with a `root ::=` rule), which is converted to Lark."""

    kind = "grammar"

    def __init__(self, text: str) -> None:
        import llguidance

        self.text = text
        try:
            grammar = llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise ConstraintError(f"invalid grammar: {e}") from None
        super().__init__(grammar, text)


class Triggered(GrammarConstraint):
    """Free text until ``trigger`` appears, then ``constraint`` until it is complete: a tool call
    after its tag, an answer after the end of a reasoning block.

    ``trigger`` is text (matched across token boundaries; the first token of the constrained part
    may even share a token with the end of the trigger) or a token id (a special token such as a
    model's tool-call token). ``repeat=False``: the generation ends when the constraint is
    complete; ``repeat=True``: free text again afterwards, and the trigger may come again. It
    compiles to one llguidance grammar whose free-text part ends lazily at the trigger, so
    tokens the constrained part forces are fast-forwarded like any other."""

    kind = "triggered grammar"

    def __init__(self, trigger: str | int, constraint: GrammarConstraint, *, repeat: bool = False) -> None:
        if not isinstance(constraint, GrammarConstraint):
            raise TypeError(f"Triggered(...) takes a JsonSchema, Regex, Grammar or Triggered, "
                            f"got {type(constraint).__name__}")
        if isinstance(trigger, str):
            if not trigger:
                raise ConstraintError("the trigger of a triggered grammar is empty")
            # the free text up to the first occurrence of the trigger (lazy: it stops there)
            head, rules = "pie_head", f"pie_head[lazy]: TEXT {json.dumps(trigger, ensure_ascii=False)}\n"
        elif isinstance(trigger, int) and not isinstance(trigger, bool) and trigger >= 0:
            head, rules = f"TEXT <[{trigger}]>", ""
        else:
            raise TypeError(f"the trigger is text or a token id, got {trigger!r}")
        self.trigger, self.constraint, self.repeat = trigger, constraint, repeat
        body, grammars = _named_grammars(constraint)
        start = f"start: ({head} @{body})* TEXT\n" if repeat else f"start: TEXT | {head} @{body}\n"
        outer = {"lark_grammar": start + rules + "TEXT: /(.|\\n)*/\n"}
        super().__init__(json.dumps({"grammars": [outer] + grammars}), f"{trigger!r} -> {constraint!r}")


def _named_grammars(constraint: GrammarConstraint) -> tuple[str, list[dict]]:
    """A constraint's llguidance grammars, its top one given a name no other has, for an ``@name``
    reference (a constraint's grammar is either Lark text or llguidance's JSON list of grammars)."""
    text = constraint.llg_grammar
    grammars = json.loads(text)["grammars"] if text.lstrip().startswith("{") else [{"lark_grammar": text}]
    grammars = [dict(g) for g in grammars]
    taken = {g.get("name") for g in grammars[1:]}
    name = next(f"pie_body{i}" for i in range(len(grammars) + 1) if f"pie_body{i}" not in taken)
    grammars[0]["name"] = name
    return name, grammars


class AllOf(Constraint):
    """Every constraint holds at once (masks ANDed)."""

    def __init__(self, *constraints: Constraint) -> None:
        if not constraints:
            raise ConstraintError("AllOf needs at least one constraint")
        flat: list[Constraint] = []
        for c in constraints:
            if not isinstance(c, Constraint):
                raise TypeError(f"AllOf takes constraints, got {type(c).__name__}")
            flat.extend(c.constraints if isinstance(c, AllOf) else [c])
        self.constraints = flat

    def bind(self, tokenizer: Any) -> ConstraintState:
        states = [c.bind(tokenizer) for c in self.constraints]
        return states[0] if len(states) == 1 else AllOfState(states)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.constraints))})"


def as_constraint(constrain: Constraint | list[Constraint] | tuple[Constraint, ...] | None) -> Constraint | None:
    """Normalise the `constrain=` argument of generate(): None, one constraint, or a list (AND)."""
    if constrain is None or isinstance(constrain, Constraint):
        return constrain
    if isinstance(constrain, (list, tuple)):
        return AllOf(*constrain) if constrain else None
    raise TypeError(f"constrain= takes a Constraint or a list of them, got {type(constrain).__name__}")
