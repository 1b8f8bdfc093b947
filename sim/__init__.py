"""A simulated TGI server and the simulated GPU under it, for the demo, tests and what-if runs.

``SimTGI(SimConfig(...))`` serves TGI 3.x's HTTP API with TGI's continuous-batching timing on a simulated H100 whose
power follows the work, exposes an NVML-like energy counter (``GET /sim/energy``) and knows the true energy of every
request (``GET /sim/truth``). See sim/README.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.config import SimConfig
    from sim.server import SimTGI

__all__ = ["SimConfig", "SimTGI"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a light module (sim.ledger, sim.config) does not start up aiohttp.
    if name == "SimConfig":
        from sim.config import SimConfig

        return SimConfig
    if name == "SimTGI":
        from sim.server import SimTGI

        return SimTGI
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
