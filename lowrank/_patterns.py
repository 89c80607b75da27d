"""Module-name patterns from files (PEFT's rank_pattern / alpha_pattern keys, target_modules), matched in bounded time.

Python's ``re`` backtracks: a pattern such as ``(.*)*!`` from a file takes exponential time on a module name and
cannot be interrupted (a timer does not stop it). So patterns read from files never reach ``re``'s matcher:

* plain names and ``.``-suffixes (letters, digits, ``_``, ``-`` and ``.``, what lowrank itself writes) are matched
  with string operations: O(len(name));
* any other pattern is parsed by Python's own regex parser (the same syntax and grouping as ``re``) and run as a
  Thompson NFA, determinised lazily with a bounded cache: O(len(name) * states) at worst and O(len(name)) once
  cached, whatever the pattern. Backreferences, lookarounds, word boundaries and flags (no regular language, or
  not needed for module names) are refused with a clear message, as are patterns over ``MAX_PATTERN_CHARS`` or
  ``MAX_STATES`` NFA states (``a{1000}`` expands to 1,000 states).

Whether a regex matches does not depend on how it backtracks, so the answers are exactly ``re``'s.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _sre

MAX_PATTERN_CHARS = 1000
MAX_NAME_CHARS = 1000
MAX_STATES = 4000  # NFA states after expanding counted repeats
MAX_DFA_STATES = 20000  # cached sets of NFA states per pattern (each a frozenset): bounds memory to a few MB

_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")  # fixed, linear: `.` is a regex wildcard, everything else literal
_CATEGORIES = {
    _c.CATEGORY_DIGIT: re.compile(r"\d"), _c.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
    _c.CATEGORY_WORD: re.compile(r"\w"), _c.CATEGORY_NOT_WORD: re.compile(r"\W"),
    _c.CATEGORY_SPACE: re.compile(r"\s"), _c.CATEGORY_NOT_SPACE: re.compile(r"\S"),
}  # fmt: skip
# (each of these matches one character: no backtracking)
_START, _END = "start", "end"


class PatternError(ValueError):
    """A pattern that lowrank will not run (the message says why)."""


def _wild_equal(key: str, text: str) -> bool:
    # A plain key as a regex: '.' matches any character but a newline (names have none), the rest is literal.
    return len(key) == len(text) and all(k == t or k == "." for k, t in zip(key, text, strict=True))


class _NFA:
    """Thompson NFA of a parsed regex. States: ("char", pred, out), ("split", outs), ("at", where, out), ("accept",)."""

    def __init__(self, pattern: str):
        try:
            parsed = _sre.parse(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise PatternError(f"{pattern!r} is not a valid regular expression: {e}") from None
        if parsed.state.flags & ~(_c.SRE_FLAG_UNICODE):
            raise PatternError(f"{pattern!r}: inline flags such as (?i) are not supported in patterns from files")
        self.states: list[tuple] = [("accept",)]
        self.pattern = pattern
        self.start = self._seq(list(parsed), 0)

    def _add(self, state: tuple) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"{self.pattern!r} expands to more than {MAX_STATES} states: too complex for a file")
        self.states.append(state)
        return len(self.states) - 1

    def _seq(self, items: list, out: int) -> int:
        for op, av in reversed(items):
            out = self._item(op, av, out)
        return out

    def _item(self, op, av, out: int) -> int:
        if op is _c.LITERAL:
            return self._add(("char", lambda ch, o=av: ord(ch) == o, out))
        if op is _c.NOT_LITERAL:
            return self._add(("char", lambda ch, o=av: ord(ch) != o, out))
        if op is _c.ANY:
            return self._add(("char", lambda ch: ch != "\n", out))
        if op is _c.IN:
            return self._add(("char", self._charset(av), out))
        if op is _c.SUBPATTERN:
            _, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise PatternError(f"{self.pattern!r}: scoped flags (?i:...) are not supported in patterns from files")
            return self._seq(list(body), out)
        if op is _c.BRANCH:
            return self._add(("split", tuple(self._seq(list(b), out) for b in av[1])))
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)) and op is not None:
            if op is getattr(_c, "POSSESSIVE_REPEAT", None):
                raise PatternError(f"{self.pattern!r}: possessive repeats are not supported in patterns from files")
            lo, hi, body = av
            body = list(body)
            if hi == _c.MAXREPEAT:  # body{lo,}: a loop after lo copies
                loop = self._add(("split", ()))
                self.states[loop] = ("split", (self._seq(body, loop), out))
                out, count = loop, lo
            else:  # body{lo,hi}: hi - lo optional copies, nested, after lo copies
                if hi - lo > MAX_STATES:
                    raise PatternError(f"{self.pattern!r}: a repeat of {hi} is too complex for a file")
                for _ in range(hi - lo):
                    out = self._add(("split", (self._seq(body, out), out)))
                count = lo
            if count > MAX_STATES:
                raise PatternError(f"{self.pattern!r}: a repeat of {count} is too complex for a file")
            for _ in range(count):
                out = self._seq(body, out)
            return out
        if op is _c.AT and av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
            return self._add(("at", _START, out))
        if op is _c.AT and av in (_c.AT_END, _c.AT_END_STRING):  # names hold no newline: $ is \Z
            return self._add(("at", _END, out))
        raise PatternError(
            f"{self.pattern!r} uses {str(op).lower()} {'' if av is None else av}, which lowrank does not run for "
            "patterns from files (supported: literals, '.', classes, groups, '|', repeats, '^', '$')"
        )

    def _charset(self, items):
        negate, tests = False, []
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                tests.append(lambda o, v=av: o == v)
            elif op is _c.RANGE:
                tests.append(lambda o, lo=av[0], hi=av[1]: lo <= o <= hi)
            elif op is _c.CATEGORY and av in _CATEGORIES:
                tests.append(lambda o, rx=_CATEGORIES[av]: rx.match(chr(o)) is not None)
            else:
                raise PatternError(f"{self.pattern!r}: {op} {av} in a character class is not supported")
        return lambda ch: any(t(ord(ch)) for t in tests) != negate


class _Matcher:
    """``re.match`` / ``re.fullmatch`` of one pattern by a lazily built DFA over sets of NFA states."""

    def __init__(self, pattern: str):
        self.nfa = _NFA(pattern)
        self._steps: dict[tuple, frozenset] = {}
        self._closures: dict[tuple, frozenset] = {}

    def _closure(self, states: Iterable[int], at_start: bool, at_end: bool) -> frozenset:
        key = (frozenset(states), at_start, at_end)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        if len(self._closures) + len(self._steps) > MAX_DFA_STATES:
            raise PatternError(f"{self.nfa.pattern!r} needs more than {MAX_DFA_STATES} DFA states: too complex")
        seen, todo = set(), list(key[0])
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            state = self.nfa.states[s]
            if state[0] == "split":
                todo.extend(state[1])
            elif state[0] == "at" and (at_start if state[1] == _START else at_end):
                todo.append(state[2])
        self._closures[key] = out = frozenset(seen)
        return out

    def run(self, name: str, full: bool) -> bool:
        if len(name) > MAX_NAME_CHARS or "\n" in name:
            raise PatternError(f"module name of {len(name)} characters (or with a newline) is not matched")
        n = len(name)
        current = self._closure((self.nfa.start,), True, n == 0)
        for i, ch in enumerate(name):
            if not full and 0 in current:  # re.match: a prefix reached the accepting state
                return True
            key = (current, ch, i + 1 == n)
            nxt = self._steps.get(key)
            if nxt is None:
                moved = [s[2] for s in map(self.nfa.states.__getitem__, current) if s[0] == "char" and s[1](ch)]
                nxt = self._closure(moved, False, i + 1 == n)
                self._steps[key] = nxt
            if not nxt:
                return False
            current = nxt
        return 0 in current


@functools.lru_cache(maxsize=256)
def _matcher(pattern: str) -> _Matcher:
    return _Matcher(pattern)


def _check(pattern: str, what: str) -> None:
    if not isinstance(pattern, str):
        raise PatternError(f"{what} {pattern!r} must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"{what} of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")


def check_pattern(pattern: str, what: str = "pattern") -> None:
    """Raise ``PatternError`` now if ``pattern`` (a rank_pattern key) would be refused when matched."""
    _check(pattern, what)
    key_matches(pattern, "")


def key_matches(key: str, name: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule, ``re.match(rf"(.*\\.)?({key})$", name)``, in bounded time."""
    _check(key, "pattern key")
    if _PLAIN.fullmatch(key):  # fixed length: it must end the name, after a '.' or as the whole name
        p = len(name) - len(key)
        return p >= 0 and (p == 0 or name[p - 1] == ".") and _wild_equal(key, name[p:]) and "\n" not in name
    try:
        _sre.parse(key)  # a syntax error is reported at its position in the key, not in PEFT's wrapper
        return _matcher(rf"(.*\.)?({key})$").run(name, full=False)
    except (re.error, RecursionError, OverflowError) as e:
        raise PatternError(f"key {key!r} is not a valid regular expression: {e}") from None
    except PatternError as e:  # name the key the file holds, not the pattern PEFT's rule builds around it
        raise PatternError(str(e).replace(repr(rf"(.*\.)?({key})$"), f"key {key!r}")) from None


def pattern_value(patterns: dict, name: str, default):
    """The value of the first key of ``patterns`` that ``key_matches`` ``name`` (PEFT's order), else ``default``."""
    for key, value in patterns.items():
        if key_matches(key, name):
            return value
    return default


def target_matches(targets: str | list[str], name: str) -> bool:
    """PEFT's target_modules rule: a string is ``re.fullmatch``-ed; a list entry equals or ``.``-ends the name."""
    if isinstance(targets, str):
        _check(targets, "target_modules")
        if _PLAIN.fullmatch(targets):
            return _wild_equal(targets, name)
        return _matcher(targets).run(name, full=True)
    return any(name == t or name.endswith("." + t) for t in targets)
