"""Energy counters of simulated GPUs, read over HTTP from a simulated TGI (``sim/``).

The simulator answers ``GET {url}/sim/energy`` with
``{"device": "sim:<name>", "energy_mj": <int>, "t_ns": <int>, "update_period_ms": 100, "lag_ms": <int>}``: a counter
with NVML's 100 ms cadence and lag, so everything downstream of the sampler runs on a CPU exactly as on a GPU.
This module imports nothing from ``sim`` (``meter`` never depends on ``sim``); the HTTP answer is the whole contract.

Reads are blocking (they run on the sampler thread) over one persistent keep-alive connection per simulator with a
short timeout, so a stalled simulator costs one gap, not a stalled sampler.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from meter.samples import Sample

log = structlog.get_logger(__name__)

ENERGY_PATH = "/sim/energy"


@dataclass(frozen=True, slots=True)
class SimCounterInfo:
    """How a simulated counter behaves, as the simulator last reported it."""

    update_period_ms: int | None
    lag_ms: int | None


class _Endpoint:
    """One simulator: its URL, a lazily (re)opened keep-alive connection, and the device name it answers with."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + ENERGY_PATH
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self.device = f"sim:{self.url}"
        self.named = False  # True once the simulator has told us its device name
        self.info = SimCounterInfo(update_period_ms=None, lag_ms=None)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self._timeout_s)
        return self._conn

    def fetch(self) -> dict:
        """GET the energy document; on any failure the connection is dropped (reopened on the next read)."""
        conn = self._connection()
        try:
            conn.request("GET", self._path, headers={"Accept": "application/json"})
            response = conn.getresponse()
            body = response.read()  # read fully, or the connection cannot be reused
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status} from {self.url}{ENERGY_PATH}: {body[:200]!r}")
            doc = json.loads(body)
            if not isinstance(doc, dict) or _int_or_none(doc.get("energy_mj")) is None:
                raise ValueError(f"no integer energy_mj in {body[:200]!r}")
            return doc
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class SimSource:
    """An ``EnergySource`` over the counters of one or more simulated TGI servers, one device each.

    A device's name is the ``device`` the simulator answers with, fixed at the first successful read (construction
    tries one). Until a simulator has answered, its samples carry the fallback name ``sim:<url>``; those are all gaps,
    so nothing measured is filed under the fallback name. A simulator that later reports another name keeps its first
    one (logged): renaming a series mid-run would split it.
    """

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 0.5) -> None:
        if not urls:
            raise ValueError("SimSource needs at least one simulator URL")
        self._endpoints = [_Endpoint(url, timeout_s) for url in urls]
        if len({e.url for e in self._endpoints}) != len(self._endpoints):
            raise ValueError(f"a simulator URL is listed twice: {list(urls)}")
        self.read()  # learn the device names now when the simulators are up

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(e.device for e in self._endpoints)

    def counter_info(self, device: str) -> SimCounterInfo:
        """The update period and lag the simulator reported for ``device`` (None fields before its first answer)."""
        for endpoint in self._endpoints:
            if endpoint.device == device:
                return endpoint.info
        raise KeyError(device)

    def read(self) -> list[Sample]:
        samples = []
        for endpoint in self._endpoints:
            try:
                doc = endpoint.fetch()
            except Exception as e:  # a gap, never an exception out of the sampler's source
                error = f"{type(e).__name__}: {e}"
                samples.append(Sample(device=endpoint.device, t_ns=time.time_ns(), energy_mj=None, error=error))
                continue
            t_ns = time.time_ns()
            self._name(endpoint, doc.get("device"))
            endpoint.info = SimCounterInfo(
                update_period_ms=_int_or_none(doc.get("update_period_ms")), lag_ms=_int_or_none(doc.get("lag_ms"))
            )
            samples.append(Sample(device=endpoint.device, t_ns=t_ns, energy_mj=doc["energy_mj"]))
        return samples

    def _name(self, endpoint: _Endpoint, answered: object) -> None:
        if not isinstance(answered, str) or not answered:
            answered = None
        if not endpoint.named:
            endpoint.named = True
            if answered is not None and answered not in {e.device for e in self._endpoints if e is not endpoint}:
                endpoint.device = answered
            elif answered is not None:
                log.warning("sim_device_name_taken", url=endpoint.url, device=answered, kept=endpoint.device)
        elif answered is not None and answered != endpoint.device:
            log.warning("sim_device_name_changed", url=endpoint.url, device=answered, kept=endpoint.device)

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.close()


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
