"""Every metric the Grafana dashboard (deploy/grafana/joulegate.json) and the alert rules
(deploy/prometheus/alerts.yml) query exists on a running gateway's /metrics, with every label the query groups or
filters by.

A dashboard that names a metric or label the gateway does not export shows "No data" forever and nobody notices;
this drives traffic of each kind the panels show (shaped and refused requests, both front doors, metered energy)
through a real gateway and reads its /metrics over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.energy_metrics import ENERGY
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig

from ..conftest import REPO_ROOT
from .harness import running_stack

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "joulegate.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC = re.compile(r"\b(joulegate_[a-z_]+)\b(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)\s*\(")
PROMQL_WORDS = {"sum", "max", "min", "rate", "increase", "avg_over_time", "histogram_quantile", "clamp_min"}

SHAPING = {
    "default_class": "interactive",
    "classes": {
        "interactive": {"policy": "passthrough"},
        "bulk": {"policy": "batch", "max_batch": 8, "hold_ms": 400, "max_queued_requests": 3},
    },
}
METER = {"meter": {"source": "sim", "epoch_s": 1.0, "settle_s": 0.2, "engine_interval_s": 0.2}}


def _group(expr: str, open_at: int) -> str:
    """The text inside the parenthesis that opens at ``open_at``."""
    depth = 0
    for i in range(open_at, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return expr[open_at + 1 : i]
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def required_labels(expr: str) -> dict[str, set[str]]:
    """Metric (sample) name -> the labels the query needs on it: those of its matchers, and those of every
    ``by``/``without`` clause around it (``le`` of a histogram included)."""
    need: dict[str, set[str]] = {}
    for m in METRIC.finditer(expr):
        matchers = m.group(2) or ""
        need.setdefault(m.group(1), set()).update(re.findall(r"([a-z_]+)\s*[!=]~?", matchers))
    for m in GROUPING.finditer(expr):
        labels = {x.strip() for x in m.group(1).split(",") if x.strip()}
        for inner in METRIC.finditer(_group(expr, m.end() - 1)):
            need[inner.group(1)] |= labels
    return need


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


def test_the_label_parser_reads_nested_groupings() -> None:
    need = required_labels(
        "1 - sum(max by (tenant, phase) (rate(joulegate_energy_joules_total[5m])))"
        " / sum(max by (backend) (joulegate_backend_power_watts{backend!=''}))"
    )
    assert need == {"joulegate_energy_joules_total": {"tenant", "phase"}, "joulegate_backend_power_watts": {"backend"}}


def test_every_panel_has_a_query_and_names_a_joulegate_metric() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        assert METRIC.search(expr), f"{title}: {expr}"
        words = set(re.findall(r"\b([a-z_]+)\s*\(", expr)) - {"by", "without"}
        assert words <= PROMQL_WORDS, f"{title}: unexpected functions {words - PROMQL_WORDS}"


async def _scrape(url: str) -> dict[str, list[set[str]]]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, list[set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(set(s.labels))
    return samples


async def _missing_after(url: str, queries: list[tuple[str, str]], scrapes: int) -> list[str]:
    """Scrape ``url`` until every metric and label ``queries`` (title, expr) need is there, at most ``scrapes``
    times 0.2 s apart; what is still missing then."""
    missing: list[str] = []
    for _ in range(scrapes):
        samples = await _scrape(url)
        missing = [
            f"{title}: {name} with {sorted(labels)}"
            for title, expr in queries
            for name, labels in required_labels(expr).items()
            if not any(labels <= have for have in samples.get(name, []))
        ]
        if not missing:
            break
        await asyncio.sleep(0.2)
    return missing


async def test_every_dashboard_metric_is_exported_with_its_labels(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ENERGY, "refresh_s", 0.0)
    async with running_stack(
        tmp_path, sim_config=SimConfig(time_scale=1.0), overrides=METER, http=True, model={"shaping": SHAPING}
    ) as s:
        req = pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text="dashboard")],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8)),
        )
        call = s.stub.Generate(req, metadata=s.auth)
        await call
        rid = dict(await call.initial_metadata())["x-request-id"]
        bulk = (*s.auth, ("x-traffic-class", "bulk"))
        held = [asyncio.ensure_future(s.stub.Generate(req, metadata=bulk)) for _ in range(3)]
        await asyncio.sleep(0.1)  # the three are queued (held 400 ms): the fourth hits max_queued_requests = 3
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await s.stub.Generate(req, metadata=bulk)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.gather(*held)
        async with aiohttp.ClientSession() as http:
            body = {"inputs": "dashboard over http", "parameters": {"max_new_tokens": 4}}
            headers = {"authorization": dict(s.auth)["authorization"]}
            async with http.post(f"{s.http_url}/generate", json=body, headers=headers) as resp:
                assert resp.status == 200
        reports = epbg.EnergyReportsStub(s.channel)
        energy = await reports.GetRequestEnergy(
            epb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=20_000),
            metadata=(("authorization", f"Bearer {s.admin_key}"),),
        )
        assert energy.final

        missing = await _missing_after(s.http_url, dashboard_queries(), 25)  # the power gauge: two readings 1 s apart
        assert not missing, "\n".join(missing)


def test_every_alert_names_a_joulegate_metric_and_says_what_to_do() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 5
    for r in rules:
        assert METRIC.search(r["expr"]), r["alert"]
        words = set(re.findall(r"\b([a-z_]+)\s*\(", r["expr"])) - {"by", "without"}
        assert words <= PROMQL_WORDS | {"delta"}, f"{r['alert']}: unexpected functions {words}"
        assert r["labels"]["severity"] in {"info", "warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


async def test_every_alert_metric_is_exported_with_its_labels(tmp_path: Path, pg_url: str, monkeypatch) -> None:
    """On PostgreSQL (the ledgers' clock spread needs a server clock), with the in-process meter."""
    monkeypatch.setattr(ENERGY, "refresh_s", 0.0)
    async with running_stack(
        tmp_path, db_url=pg_url, sim_config=SimConfig(time_scale=1.0), overrides=METER, http=True
    ) as s:
        req = pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text="alerts")],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)),
        )
        await s.stub.Generate(req, metadata=s.auth)
        missing = await _missing_after(s.http_url, alert_queries(), 50)  # the ledger marks (with its clock) every 1 s
        assert not missing, "\n".join(missing)
