"""What a client sends, checked before the gateway keeps it, echoes it or forwards it. Pure functions, no I/O.

Three rules, because each of them once let one client's bytes hurt everyone:

- **Header values** the gateway reads (ids, the traffic class, the API key, the model) must be printable ASCII
  (0x20-0x7E), as RFC 9110 asks of new fields and gRPC requires of ASCII metadata, and at most
  ``MAX_HEADER_CHARS`` long. Anything else is refused (HTTP 400 / INVALID_ARGUMENT naming the header), never
  escaped or stored: a byte that is not valid UTF-8 reaches Python as a lone surrogate, which neither SQLite nor
  PostgreSQL can encode, so a single ``x-correlation-id: \\xff`` used to stop every later ledger write.
- **JSON** the gateway forwards must be what TGI's parser (serde_json) accepts: no ``NaN``/``Infinity`` (Python's
  ``json`` reads them), no lone UTF-16 surrogate escape (``"\\ud800"``: Python reads it, no encoder can write it),
  at most ``MAX_JSON_DEPTH`` nested arrays/objects (serde's recursion limit; Python's own limit raised
  RecursionError, a 500). ``check_json`` names the offending field.
- **Echoes** of client input in error messages are clipped (``clip``): an error never carries megabytes back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

from common.errors import JoulegateError, clip

MAX_HEADER_CHARS = 256  # ids and names; an API key or a correlation id fits easily
MAX_JSON_DEPTH = 127  # serde_json refuses the 128th nested array/object ("recursion limit exceeded")

# A JSON string escape that may encode a UTF-16 surrogate; only bodies that contain one need the string walk.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


class InputRefused(JoulegateError, ValueError):
    """A value the gateway will not take; ``where`` names it (a header, a JSON path), ``reason`` says why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where = where
        self.reason = reason


def printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()


def header_value(name: str, value: str | None, *, max_chars: int = MAX_HEADER_CHARS) -> str | None:
    """``value`` if it is fit to keep (see the module docstring), None when absent; else InputRefused naming it."""
    if value is None:
        return None
    if not printable_ascii(value):
        raise InputRefused(name, "the header value must be printable ASCII (0x20-0x7E)")
    if len(value) > max_chars:
        raise InputRefused(name, f"the header value is longer than {max_chars} characters")
    return value


def headers_of_interest(headers: Mapping[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The named headers (lower-case names) that are present, each checked with ``header_value``."""
    out: dict[str, str] = {}
    for name in names:
        value = header_value(name, headers.get(name))
        if value is not None:
            out[name] = value
    return out


def may_hold_surrogates(raw: bytes | str) -> bool:
    """Whether JSON text contains an escape that could decode to a UTF-16 surrogate (a quick scan of the raw text)."""
    if isinstance(raw, bytes):
        return _SURROGATE_ESCAPE_BYTES.search(raw) is not None
    return _SURROGATE_ESCAPE.search(raw) is not None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _walk(doc: Any) -> Iterator[tuple[tuple[str | int, ...], int, Any]]:
    """Every value of a parsed JSON document with its path and nesting depth (containers entered), depth first."""
    stack: list[tuple[tuple[str | int, ...], int, Any]] = [((), 0, doc)]
    while stack:
        path, depth, value = stack.pop()
        yield path, depth, value
        if isinstance(value, dict):
            stack.extend(((*path, k), depth + 1, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), depth + 1, v) for i, v in enumerate(value))


def check_json(doc: Any, *, surrogates: bool = True, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise InputRefused (``where`` = the JSON path) for what serde_json would not accept in a parsed document.

    ``surrogates``: also look for lone surrogates in strings and keys (pass ``may_hold_surrogates(raw)`` to skip
    that walk for the common body without a ``\\uD8xx``-``\\uDFxx`` escape).
    """
    for path, depth, value in _walk(doc):
        if isinstance(value, dict | list):
            if depth + 1 > max_depth:
                raise InputRefused(_path(path), f"nested deeper than {max_depth} arrays/objects")
            if surrogates and isinstance(value, dict):
                for key in value:
                    if _has_surrogate(key):
                        raise InputRefused(_path(path), f"key {clip(ascii(key))} holds a lone UTF-16 surrogate")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InputRefused(_path(path), "must be a finite number (NaN, Infinity and overflows are not JSON)")
        elif surrogates and isinstance(value, str) and _has_surrogate(value):
            raise InputRefused(_path(path), "holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair)")
