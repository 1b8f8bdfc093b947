"""The traffic class a request asks for, and what named it (its ``x-traffic-class``, or its API key's default)."""

from __future__ import annotations

from meter.auth import Principal


class RequestedClass(str):
    """A traffic class name as a request asked for it, with ``origin``: what named it (the ``x-traffic-class``
    header, or the API key's default class). Shaping resolves the name; if the model has no such class, its error
    names the origin, so a client is never told it sent a header it did not send."""

    origin: str

    def __new__(cls, name: str, origin: str) -> RequestedClass:
        out = super().__new__(cls, name)
        out.origin = origin
        return out


def requested_class(header: str | None, principal: Principal) -> str:
    """The class a request runs in: its ``x-traffic-class``, else its key's default class, else ``default`` (the
    model's default class)."""
    if header:
        return RequestedClass(header, "x-traffic-class")
    if principal.default_class:
        return RequestedClass(
            principal.default_class,
            f"default traffic class of API key {principal.key_id} (`joulegate keys create --class`; a request can "
            "name another with x-traffic-class)",
        )
    return "default"
