"""The floor: a relay with no logic — every POST forwarded to one upstream, the response's bytes streamed back as
they arrive. What any Python gateway on aiohttp must add at least; ``bench/proxy_overhead.py`` measures joulegate
against it.

    python -m bench.relay --port 9000 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def relay_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["http"] = aiohttp.ClientSession(upstream, connector=aiohttp.TCPConnector(limit=0))

    async def stop(app: web.Application) -> None:
        await app["http"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        async with request.app["http"].post(request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={"content-type": up.headers["content-type"]})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/{path:.*}", forward)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    web.run_app(relay_app(args.upstream), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
