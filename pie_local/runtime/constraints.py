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
import re
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from pie_local.runtime.json_keys import KeyTracker, VocabQuotes, clear, vocab_quotes

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
        self.warnings: list[str] = list(messages)  # what llguidance ignored or approximated
        for warning in self.warnings:
            log.debug("%s: %s", self.kind, warning)

    def bind(self, tokenizer: Any) -> MatcherState:
        import llguidance

        llg_tok = _llg_tokenizer(tokenizer)
        matcher = llguidance.LLMatcher(llg_tok, self.llg_grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"invalid {self.kind}: {matcher.get_error()}")
        return MatcherState(matcher, llg_tok.vocab_size, tokenizer, self.kind)

    def __repr__(self) -> str:
        text = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"{type(self).__name__}({text!r})"


class JsonSchema(GrammarConstraint):
    """Output is one JSON value valid under `schema` (a dict or its JSON text).

    The options are llguidance's JSON compile options (they override the schema's own
    "x-guidance"), with defaults under which most real-world schemas compile:

    - `lenient`: keywords llguidance does not implement (`uniqueItems`, `dependencies`, `not`,
      `if`/`then`/`else`, `propertyNames`, `contains`, unknown `format`s, look-around regexes)
      are ignored instead of failing the schema. `relaxed` names the ones this schema used, and
      `warnings` has llguidance's messages: output may break only those keywords.
    - `coerce_one_of`: `oneOf` is enforced as `anyOf` where llguidance cannot prove them equal
      (then "oneOf" is in `relaxed`: a value may match more than one branch).
    - `unique_keys`: no object repeats a key. The grammar alone repeats none of `properties`,
      but keys allowed by `additionalProperties`/`patternProperties` could repeat.
    - `whitespace_flexible` (compact JSON unless set), `whitespace_pattern`, `item_separator`,
      `key_separator` (regexes): the layout between tokens.
    """

    kind = "JSON schema"

    def __init__(self, schema: dict | str, *, lenient: bool = True, coerce_one_of: bool = True,
                 unique_keys: bool = True, whitespace_flexible: bool = False, whitespace_pattern: str | None = None,
                 item_separator: str | None = None, key_separator: str | None = None) -> None:
        import llguidance

        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"invalid JSON schema: not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
        self.schema = schema
        self.unique_keys = unique_keys
        # Compact separators unless asked: fewer tokens, and small models do not ramble in spaces.
        options: dict[str, Any] = {"lenient": lenient, "coerce_one_of": coerce_one_of,
                                   "whitespace_flexible": whitespace_flexible}
        for name, value in (("whitespace_pattern", whitespace_pattern), ("item_separator", item_separator),
                            ("key_separator", key_separator)):
            if value is not None:
                options[name] = value
        dropped: list[str] = []
        compiled = _without_lookaround(schema, dropped) if lenient else schema
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(compiled, overrides=options)
        except ValueError as e:
            raise ConstraintError(f"invalid JSON schema: {e}") from None
        super().__init__(grammar, json.dumps(schema))
        self.warnings = dropped + self.warnings
        self.relaxed: tuple[str, ...] = _relaxed_keywords(self.warnings)

    def bind(self, tokenizer: Any) -> MatcherState:
        state = super().bind(tokenizer)
        if not self.unique_keys:
            return state
        return JsonState(state, vocab_quotes(_llg_tokenizer(tokenizer)))


class JsonState(MatcherState):
    """A JSON schema's state that also keeps each object's keys unique (`runtime/json_keys.py`).

    When an object's schema allows only a few keys and the grammar would let one be written
    again, a key could start that can only end as a repeat; a short look-ahead through the
    grammar drops such tokens too, so a step never finds every token forbidden. Every token must
    come through advance(): the key tracker reads the text from them.
    """

    many = 64  # more tokens than this may start a key: the object allows too many keys to run out
    lookahead = 64  # grammar states one step may try before assuming an unused key can follow

    def __init__(self, base: MatcherState, vocab: VocabQuotes, tracker: KeyTracker | None = None,
                 pieces: list[bytes] | None = None) -> None:
        super().__init__(base._matcher, base.n_vocab, base._owner, base._description)
        self._vocab = vocab
        self._tracker = tracker or KeyTracker()
        self._pieces = pieces or []  # the bytes of each advanced token, to replay after a rollback

    def mask(self) -> np.ndarray:
        out = self._mask_without_repeats()
        tracker = self._tracker
        obj = tracker.current_object()
        if tracker.choosing_key() and obj.bounded is not False:
            # Named keys come first, free ones may follow: once many tokens could start a key, the
            # object's keys cannot run out.
            obj.bounded = _count(out) <= self.many
        if tracker.may_run_out():
            budget = [self.lookahead]
            for token in self._key_starts(out):
                if self._may_repeat_after(token) and not self._unused_key_after(token, budget):
                    clear(out, token)
        if not out.any():
            raise ConstraintError(f"{self._description}: every token allowed here would repeat a key of its object")
        return out

    def advance(self, token_id: int) -> None:
        token_id = int(token_id)
        piece = self._vocab.pieces[token_id] if 0 <= token_id < len(self._vocab.pieces) else b""
        if self._tracker.repeats_key(piece):
            raise ConstraintError(f"{self._description}: token {token_id} would repeat a key of its object")
        super().advance(token_id)
        self._tracker.feed(piece)
        self._pieces.append(piece)

    def fork(self) -> JsonState:
        return JsonState(super().fork(), self._vocab, self._tracker.copy(), list(self._pieces))

    def rollback(self, n_tokens: int) -> None:
        super().rollback(n_tokens)
        del self._pieces[len(self._pieces) - n_tokens:]
        self._tracker = KeyTracker()
        self._tracker.feed(b"".join(self._pieces))

    def _mask_without_repeats(self) -> np.ndarray:
        out = super().mask()
        self._tracker.drop_repeats(out, self._vocab)
        return out

    def _key_starts(self, mask: np.ndarray) -> list[int]:
        """Allowed tokens after which a new key of an object that may run out of keys is chosen."""
        tracker, vocab = self._tracker, self._vocab
        if tracker.choosing_key():
            candidates = allowed_tokens(mask).tolist() if _count(mask) <= self.many else []
        else:  # a comma starts the next member (from inside a string value, after its closing quote)
            candidates = (vocab.commas_after_quote if tracker.in_string else vocab.commas).allowed(mask)
        starts = []
        for token in candidates:
            after = tracker.after(vocab.pieces[token])
            if after.choosing_key() and after.object_has_keys() and after.current_object().bounded is not False:
                starts.append(token)
        return starts

    def _may_repeat_after(self, token: int) -> bool:
        """Would the grammar accept, after `token`, a key its object already has? (Else nothing
        after it is dropped for repeating, and the grammar alone never leads nowhere.) Learned
        once per object and key where the token leaves the key's start."""
        after = self._tracker.after(self._vocab.pieces[token])
        written = after.key_so_far()
        obj = after.current_object()
        known = self._tracker.object_at(after.depth) if written in (b"", b'"') else None
        for key in obj.keys:
            if known is not None and key in known.repeatable:
                if known.repeatable[key]:
                    return True
                continue
            whole = json.dumps(key, ensure_ascii=False).encode()
            if not whole.startswith(written):
                continue
            rest = self._vocab.tokenize(whole[len(written):])
            accepted = self._matcher.validate_tokens([token] + rest) == 1 + len(rest)
            if known is not None:
                known.repeatable[key] = accepted
            if accepted:
                return True
        return False

    def _unused_key_after(self, token: int, budget: list[int]) -> bool:
        """Can the key being chosen still end as one its object does not have, after `token`?"""
        child = self.fork()
        child.advance(token)
        out = child._mask_without_repeats()
        if _count(out) > self.many:
            return True
        tokens = allowed_tokens(out).tolist()
        if any(not child._tracker.after(self._vocab.pieces[t]).choosing_key() for t in tokens):
            return True  # one ends the key (repeats were dropped)
        for t in tokens:
            if budget[0] <= 0:
                return True  # out of look-ahead: assume so
            budget[0] -= 1
            if child._unused_key_after(t, budget):
                return True
        return False


def _count(mask: np.ndarray) -> int:
    """Allowed tokens in a mask (exactly up to a few hundred; at least that many otherwise)."""
    words = np.flatnonzero(mask)
    if len(words) > 256:
        return len(words)
    return int(np.unpackbits(mask[words].view(np.uint8)).sum())


_LOOKAROUND = re.compile(r"\(\?<?[=!]")
_VALUES = frozenset({"enum", "const", "default", "examples"})  # data, not schemas: never rewritten


def _without_lookaround(node: Any, dropped: list[str]) -> Any:
    """The schema without the look-around regexes llguidance cannot compile (lenient mode): such a
    `pattern` is ignored, and such a `patternProperties` entry too (its keys then fall under
    `additionalProperties`). Each one dropped is described in `dropped`."""
    if isinstance(node, list):
        return [_without_lookaround(item, dropped) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _VALUES:
            out[key] = value
        elif key == "pattern" and isinstance(value, str) and _LOOKAROUND.search(value):
            dropped.append(f"pattern: {value!r} uses look-around, which cannot be enforced; ignored")
        elif key == "patternProperties" and isinstance(value, dict):
            out[key] = {}
            for regex, sub in value.items():
                if _LOOKAROUND.search(regex):
                    dropped.append(f"patternProperties: {regex!r} uses look-around, which cannot be enforced; ignored")
                else:
                    out[key][regex] = _without_lookaround(sub, dropped)
        else:
            out[key] = _without_lookaround(value, dropped)
    return out


def _relaxed_keywords(warnings: list[str]) -> tuple[str, ...]:
    """The schema keywords named by llguidance's lenient-mode warnings (and our own), sorted."""
    names: set[str] = set()
    for warning in warnings:
        if match := re.match(r"Unimplemented keys: (\[[^\]]*\])", warning):
            names.update(json.loads(match.group(1)))
        elif warning.startswith("oneOf "):
            names.add("oneOf")
        elif warning.startswith("Unknown format"):
            names.add("format")
        elif match := re.match(r"(pattern|patternProperties): ", warning):
            names.add(match.group(1))
    return tuple(sorted(names))


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
