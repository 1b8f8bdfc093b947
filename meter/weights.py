"""Which weights each backend serves, asked of the backend now and then, with when that changed.

Why: the engine fits a power model per backend (``meter.engine.calibrate``) and seals requests once its own fit has
settled. A backend restarted with other weights under the same name — an alias such as ``chat`` moved from an 8B to
a 70B model, a new fine-tune deployed over the old — keeps its requests' model id, so nothing in the ledger says the
fit is now of other weights: the engine would go on splitting energy, and sealing bills, with it. So the meter asks
each of its backends what it serves, and the engine starts the backend's fit over from where that changed
(``Learning.learn``'s ``weights``), holding seals until the new fit settles.

What a backend serves is what its engine says: TGI's ``/info`` (``model_id`` and ``model_sha``), SGLang's
``/get_model_info`` (``model_path``), vLLM's ``/v1/models`` (the first card's ``id`` and ``root``). A backend that
does not answer (down, restarting) changes nothing. A change is dated just after the old weights were last seen: a
restart happens while the backend does not answer, so everything after the last sight of the old weights may be the
new ones. Only the standard library is used (the meter runs on bare GPU nodes).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import structlog

log = structlog.get_logger(__name__)

__all__ = ["WeightsWatch", "identity_of"]

POLL_INTERVAL_S = 1.0  # under the engine's default settle time (2 s): a change is known before its epoch is attributed
_HISTORY = 64  # changes kept per backend


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        if resp.status != 200:
            return None
        return json.loads(resp.read())


def identity_of(base_url: str, timeout_s: float = 2.0, get: Callable[[str, float], Any] = _get_json) -> str | None:
    """What the backend at ``base_url`` says it serves, or None when nothing answers as an engine."""
    base = base_url.rstrip("/")
    for path, read in (("/info", _tgi), ("/get_model_info", _sglang), ("/v1/models", _vllm)):
        try:
            doc = get(base + path, timeout_s)
        except (OSError, ValueError):
            continue
        found = read(doc) if isinstance(doc, dict) else None
        if found:
            return found
    return None


def _tgi(doc: dict[str, Any]) -> str | None:
    if "model_id" not in doc or "max_total_tokens" not in doc:
        return None
    return f"tgi:{doc['model_id']}@{doc.get('model_sha') or '-'}"


def _sglang(doc: dict[str, Any]) -> str | None:
    return f"sglang:{doc['model_path']}" if doc.get("model_path") else None


def _vllm(doc: dict[str, Any]) -> str | None:
    data = doc.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or not data[0].get("id"):
        return None
    card = data[0]
    return f"openai:{card['id']}@{card.get('root') or '-'}"


class WeightsWatch:
    """Polls each backend's identity on a thread of its own; ``at(backend, t_ns)`` says what it served at t_ns.

    ``at`` answers None until the backend first answered. The first identity seen is taken to hold since before
    the meter started (nothing says otherwise; a restarted meter's engine does not seal before its own fit
    settles anyway)."""

    def __init__(
        self,
        urls: Mapping[str, str],
        *,
        interval_s: float = POLL_INTERVAL_S,
        timeout_s: float = 2.0,
        identify: Callable[[str], str | None] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._urls = dict(urls)
        self._interval_s = interval_s
        self._identify = identify or (lambda url: identity_of(url, timeout_s))
        self._clock = clock
        self._lock = threading.Lock()
        self._since: dict[str, list[int]] = {}  # backend -> when each identity began (ascending)
        self._identities: dict[str, list[str]] = {}
        self._last_seen_ns: dict[str, int] = {}  # backend -> when its current identity was last confirmed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="joulegate-weights", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._interval_s)

    def poll_once(self) -> None:
        """Ask every backend once (blocking) and record what changed."""
        for backend, url in self._urls.items():
            try:
                identity = self._identify(url)
            except Exception as exc:  # never let one backend stop the watch
                identity = None
                log.warning("meter_weights_unreadable", backend=backend, error=f"{type(exc).__name__}: {exc}")
            now_ns = self._clock()
            if identity is not None:
                self._observe(backend, identity, now_ns)

    def _observe(self, backend: str, identity: str, now_ns: int) -> None:
        with self._lock:
            identities = self._identities.setdefault(backend, [])
            since = self._since.setdefault(backend, [])
            if not identities:
                identities.append(identity)
                since.append(0)
            elif identities[-1] != identity:
                began = self._last_seen_ns[backend] + 1
                log.info("meter_backend_weights_changed", backend=backend, before=identities[-1], now=identity,
                         since_ns=began)  # fmt: skip
                identities.append(identity)
                since.append(began)
                del identities[:-_HISTORY], since[:-_HISTORY]
            self._last_seen_ns[backend] = now_ns

    def at(self, backend: str, t_ns: int) -> str | None:
        """What ``backend`` served at ``t_ns`` (None: not known yet)."""
        with self._lock:
            since = self._since.get(backend)
            if not since:
                return None
            k = bisect.bisect_right(since, t_ns) - 1
            return self._identities[backend][max(k, 0)]
