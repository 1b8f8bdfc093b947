"""Request ids: one per call (``x-request-id``), whichever front door it came in by."""

from __future__ import annotations

import os


def new_request_id() -> str:
    """A random 128-bit id as 32 hex digits (saying that one exists tells nothing about another): the OS's random
    bytes, without ``uuid4``'s object and version bits (a fifth of the cost, on every request)."""
    return os.urandom(16).hex()


def text_request_ids(request_id: str, n: int) -> list[str]:
    """The ids of the texts of a call with ``n`` texts: the call's own id for one text, else ``<id>-<i>``."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]
