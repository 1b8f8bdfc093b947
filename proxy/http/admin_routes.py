"""Operator calls on the HTTP front door (admin keys only): the backends, and draining one for scale-in.

- ``GET /admin/backends``: per model, each backend's name, URL, health, whether it drains, requests in flight, and
  the model's ``backends_needed`` (the parking signal, ``common.parking``).
- ``POST /admin/backends/{name}/drain`` / ``.../undrain``: stop (or resume) placing new requests on a backend; the
  requests it holds finish. An autoscaler drains a backend, waits for ``in_flight`` 0, then scales it in.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from common.errors import NotFound, PermissionDenied
from proxy.backends import Backend, BackendPool
from proxy.http import wire
from proxy.http.context import Services, call_of


class AdminRoutes:
    def __init__(self, services: Services) -> None:
        self.s = services

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/admin/backends", self.backends)
        app.router.add_post("/admin/backends/{name}/drain", self.drain)
        app.router.add_post("/admin/backends/{name}/undrain", self.undrain)

    def _require_admin(self, request: web.Request) -> None:
        principal = call_of(request).principal
        if principal is None or not principal.admin:
            key = principal.key_id if principal is not None else None
            raise PermissionDenied(f"key {key} may not call the admin APIs (an admin key may)")

    async def backends(self, request: web.Request) -> web.StreamResponse:
        self._require_admin(request)
        return wire.json_response({"models": [_pool_state(p) for p in self.s.gateway.pools.values()]})

    async def drain(self, request: web.Request) -> web.StreamResponse:
        return self._set(request, True)

    async def undrain(self, request: web.Request) -> web.StreamResponse:
        return self._set(request, False)

    def _set(self, request: web.Request, on: bool) -> web.StreamResponse:
        self._require_admin(request)
        name = request.match_info["name"]
        for pool in self.s.gateway.pools.values():
            try:
                backend = pool.drain(name, on)
            except KeyError:
                continue
            return wire.json_response(_backend_state(backend))
        raise NotFound(f"no backend named {name!r}")


def _backend_state(b: Backend) -> dict[str, Any]:
    return {
        "name": b.name,
        "url": b.url,
        "model": b.model_id,
        "healthy": b.healthy,
        "draining": b.draining,
        "in_flight": b.in_flight,
    }


def _pool_state(pool: BackendPool) -> dict[str, Any]:
    return {
        "model": pool.model_id,
        "policy": pool.routing.policy,
        "backends_needed": pool.backends_needed,
        "backends": [_backend_state(b) for b in pool.backends],
    }
