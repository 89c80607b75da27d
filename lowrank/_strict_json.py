"""Strict, bounded JSON for files lowrank reads (adapter_config.json, safetensors headers).

``json.loads`` alone accepts what a hostile or damaged file can use against a loader: duplicate keys (the last one
silently wins), nesting deep enough to raise ``RecursionError`` (about 1,000 levels for the C scanner: no file
name in the message), integers of thousands of digits (Python's own ``int`` limit message, or quadratic parsing
below it), ``NaN`` / ``Infinity`` (not JSON at all) and arbitrarily large inputs. ``loads`` refuses each of them
with a ``ValueError`` that names the file, after work linear in the (bounded) input size.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

MAX_BYTES = 1 << 20  # adapter_config.json: ~60 bytes per rank_pattern entry, so 1 MiB fits ~15,000 layers
MAX_DEPTH = 16  # PEFT configs nest 3 levels (config -> loftq_config / rank_pattern -> value)
MAX_NUMBER_CHARS = 40  # a float64 needs at most 24 characters ("-2.2250738585072014e-308"); ints stay below 10^39


class _Refused(ValueError):
    pass


def _depth(value) -> int:
    """Nesting of lists / objects in a parsed value, iteratively (no recursion limit of our own)."""
    depth, level = 0, [(value, 1)]
    while level:
        v, d = level.pop()
        if isinstance(v, (list, dict)):
            depth = max(depth, d)
            level.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return depth


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r} (JSON readers disagree on which value wins)")
        out[key] = value
    return out


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_NUMBER_CHARS:
        raise _Refused(f"integer with {len(s)} digits (at most {MAX_NUMBER_CHARS}): {s[:20]}...")
    return int(s)


def _float(s: str) -> float:
    if len(s) > MAX_NUMBER_CHARS:
        raise _Refused(f"number of {len(s)} characters (at most {MAX_NUMBER_CHARS}): {s[:20]}...")
    x = float(s)
    if not math.isfinite(x):
        raise _Refused(f"number {s[:20]} is beyond the float64 range")
    return x


def _constant(s: str):
    raise _Refused(f"{s} is not valid JSON (only finite numbers are)")


def loads(text: str | bytes, where: object, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """Parse ``text`` as strict JSON: no duplicate keys, no NaN/Infinity, bounded size, nesting and numbers.

    Args:
        text: UTF-8 bytes or a str.
        where: what the text is (a path, "the header of <file>"), named in every error.
        max_bytes: longest accepted input. max_depth: deepest accepted [] / {} nesting.

    Raises:
        ValueError: the text is not valid UTF-8 / JSON or breaks one of the bounds (the message names ``where``).
    """
    if len(text) > max_bytes:
        raise ValueError(f"{where} is {len(text)} bytes, more than the {max_bytes} accepted")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not valid UTF-8: {e}") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_int=_int, parse_float=_float, parse_constant=_constant
        )
    except _Refused as e:
        raise ValueError(f"{where}: {e}") from None
    except RecursionError:  # the C scanner counts its nesting against the interpreter's limit (1,000)
        raise ValueError(f"{where} nests deeper than Python's recursion limit (at most {max_depth} accepted)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON: {e}") from None
    depth = _depth(value)
    if depth > max_depth:
        raise ValueError(f"{where} nests {depth} levels deep, more than the {max_depth} accepted")
    return value


def load_file(path: str | os.PathLike, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH):
    """Read and parse a JSON file with ``loads``; reads at most ``max_bytes + 1`` bytes.

    Raises:
        FileNotFoundError / OSError: the file cannot be read. ValueError: see ``loads``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # one byte more tells "too large" from "exactly at the limit"
    return loads(data, path, max_bytes=max_bytes, max_depth=max_depth)
