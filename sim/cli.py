"""``joulegate sim [--engine tgi|vllm|sglang]`` (and ``joulegate sim-tgi``): run one simulated engine server (and its
simulated GPU) until SIGINT or SIGTERM.

Every ``SimConfig`` knob is a flag (``--time-scale``, ``--max-concurrent-requests``, ``--counter-lag-ms``, ...),
generated from the dataclass so the two never drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import signal
import types
import typing
from typing import Any

import structlog

from sim.config import SimConfig

log = structlog.get_logger(__name__)

_HELP = {
    "model_id": "model id reported by /info and the OpenAI routes",
    "name": "name of the simulated GPU; its counter's device is sim:<name> (default: the server's base URL)",
    "time_scale": "multiply every step duration by this (0: every step is instantaneous, for overhead benchmarks)",
    "counter_lag_ms": "the energy counter shows energy up to the last 100 ms boundary at least this old (0..1000)",
    "counter_offset_mj": "the counter's value at start (NVML counts from driver load)",
    "waiting_served_ratio": "waiting/running ratio above which waiting requests interrupt the batch (TGI: 0.3)",
    "max_waiting_tokens": "decode steps after which any waiting request may join the batch (TGI: 20)",
    "engine": "the HTTP API served: tgi, vllm (OpenAI-compatible server) or sglang (native + OpenAI routes)",
}


def _flag_type(field: dataclasses.Field[Any]) -> tuple[Any, bool]:
    """(argparse type, is_bool) of a SimConfig field, from its annotation."""
    hints = typing.get_type_hints(SimConfig)
    hint = hints[field.name]
    if isinstance(hint, types.UnionType):  # X | None
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint is bool:
        return None, True
    return hint, False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port to listen on (default: 3000, TGI's)")
    parser.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="on SIGINT/SIGTERM, let requests in flight finish for up to this long (default: 10)",
    )
    for field in dataclasses.fields(SimConfig):
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _flag_type(field)
        help_text = _HELP.get(field.name, field.name.replace("_", " "))
        if is_bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=f"{help_text} (default: {field.default})",
            )
        else:
            parser.add_argument(
                flag, dest=field.name, type=kind, default=field.default, help=f"{help_text} (default: {field.default})"
            )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)})


async def serve(config: SimConfig, host: str, port: int, shutdown_grace_s: float = 10.0) -> None:
    """Serve until SIGINT or SIGTERM, then drain for up to ``shutdown_grace_s``."""
    from sim.server import SimTGI

    sim = SimTGI(config)
    url = await sim.start(host, port)
    # The event loop is the simulated GPU's clock: a full collection over the objects the imports and the start made
    # stalls it for milliseconds on a loaded host, stretching whatever step is running (and the truth with it) while
    # the gateway's timestamps move on. Frozen, those objects are never scanned again; garbage made later still is.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"sim-{config.engine} listening on {url} (device {sim.device})", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("sim_tgi_stopping", url=url, in_flight=sim.infer.in_flight, grace_s=shutdown_grace_s)
        await sim.stop(shutdown_grace_s)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"joulegate sim: {e}")
        return 2
    asyncio.run(serve(config, args.host, args.port, args.shutdown_grace_s))
    return 0
