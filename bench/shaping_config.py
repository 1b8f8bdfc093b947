"""The gateway configuration the shaping benchmarks run ``joulegate serve`` with, written as a TOML file.

One model per scenario, each with its own backend, and one traffic class per policy under test; the in-process meter
with short epochs so that a run's window is a few whole epochs and its energy is final seconds after it ends.
(The standard library reads TOML but does not write it; ``toml_dumps`` covers the shapes used here.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.shaping_report import PolicySpec


@dataclass(frozen=True, slots=True)
class GatewayBackend:
    model_id: str
    url: str
    name: str
    gpus: tuple[int, ...] = ()


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML has no {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def toml_dumps(doc: Mapping[str, Any], _prefix: str = "") -> str:
    """TOML for nested dicts of scalars, scalar lists, tables and arrays of tables (lists of dicts)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for k, v in doc.items():
        if v is None:
            continue
        path = f"{_prefix}.{_key(k)}" if _prefix else _key(k)
        if isinstance(v, Mapping):
            tables.append((path, v))
        elif isinstance(v, list | tuple) and v and all(isinstance(x, Mapping) for x in v):
            arrays.append((path, v))
        else:
            lines.append(f"{_key(k)} = {_scalar(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for path, table in tables:
        out += f"\n[{path}]\n" + toml_dumps(table, path)
    for path, items in arrays:
        for item in items:
            out += f"\n[[{path}]]\n" + toml_dumps(item, path)
    return out


def gateway_config(
    *,
    backends: Sequence[GatewayBackend],
    policies: Sequence[PolicySpec],
    db_url: str,
    journal_path: str,
    grpc_listen: str,
    meter_source: str,
    epoch_s: float = 1.0,
    max_new_tokens: int = 1024,
    meter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config document: every backend its own model with one class per policy (passthrough the default)."""
    classes = {p.name: p.class_config() for p in policies}
    default = next((p.name for p in policies if not p.shaped), policies[0].name)
    return {
        "server": {"grpc_listen": grpc_listen, "http_listen": "", "drain_grace_s": 5.0, "log_level": "warning"},
        "db": {"url": db_url},
        "auth": {"required": True},
        "meter": {
            "source": meter_source,
            "journal_path": journal_path,
            "epoch_s": epoch_s,
            "settle_s": 0.5,
            "engine_interval_s": 0.5,
            "idle_policy": "none",
            **(meter or {}),
        },
        "models": [
            {
                "model_id": b.model_id,
                "max_new_tokens": max_new_tokens,
                "backends": [{"url": b.url, "name": b.name, **({"gpus": list(b.gpus)} if b.gpus else {})}],
                "shaping": {"default_class": default, "classes": classes},
            }
            for b in backends
        ],
    }
