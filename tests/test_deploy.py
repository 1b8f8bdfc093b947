"""The deploy files say what the code accepts: every command line parses, every config loads, every path exists.

There is no Docker engine or Kubernetes cluster here, so this checks what can be checked without one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
import yaml

from app.cli import COMMANDS
from app.config import load_config

from .conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
ENV_KEY = re.compile(r"^JOULEGATE_([A-Z_]+?)__([A-Z_]+)$")


def _parse_cli(args: list[str]) -> argparse.Namespace:
    command, rest = args[0], args[1:]
    assert command in COMMANDS, f"unknown joulegate command {command!r}"
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"joulegate {command}", exit_on_error=False)
    module.add_arguments(parser)
    return parser.parse_args(rest)


def _check_env(env: dict[str, str]) -> None:
    """JOULEGATE_* variables name real config keys (a typo would be silently ignored otherwise)."""
    overrides = {k: v for k, v in env.items() if ENV_KEY.match(k)}
    if overrides:
        load_config(environ={k: (v if v else "x") for k, v in overrides.items()})


def _k8s_docs(folder: Path = DEPLOY / "k8s") -> list[dict]:
    docs = []
    for f in sorted(folder.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") != "Kustomization")
    return docs


def _doc(kind: str) -> dict:
    return next(d for d in _k8s_docs() if d["kind"] == kind)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return template.get("containers", [])


def test_kubernetes_manifests_parse_and_their_commands_are_valid() -> None:
    docs = _k8s_docs()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Secret", "Job", "Deployment", "Service", "DaemonSet", "PodDisruptionBudget"} <= kinds
    kustomized = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    manifests = sorted(f.name for f in (DEPLOY / "k8s").glob("*.yaml") if f.name != "kustomization.yaml")
    assert sorted(kustomized) == manifests
    checked = 0
    for doc in docs:
        for c in _containers(doc):
            _parse_cli(c["args"])
            env = {e["name"]: e.get("value", "x") for e in c.get("env", [])}
            _check_env(env)
            checked += 1
    assert checked == 3  # migrate, gateway, meter


def _configmap_config():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "joulegate.toml"
        path.write_text(_doc("ConfigMap")["data"]["joulegate.toml"])
        return load_config(path, environ={"JOULEGATE_DB__URL": "postgresql://u@db/jg"})


def test_configmap_toml_is_a_valid_config() -> None:
    cfg = _configmap_config()
    assert cfg.db.url.startswith("postgresql://") and len(cfg.backends) == 2
    assert cfg.models[0].shaping.default_class == "interactive"


def test_example_config_loads() -> None:
    cfg = load_config(DEPLOY / "joulegate.example.toml", environ={})
    assert cfg.models and cfg.server.grpc_listen == "0.0.0.0:8033"


def test_compose_commands_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for name in ("migrate", "joulegate"):
        _parse_cli(compose["services"][name]["command"])
        _check_env(compose["services"][name].get("environment", {}))


COPY_LINES = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")]


@pytest.mark.parametrize("line", COPY_LINES)
def test_dockerfile_copies_paths_that_exist(line: str) -> None:
    parts = line.split()
    if parts[1].startswith("--from"):
        return
    for src in parts[1:-1]:
        assert (REPO_ROOT / src).exists(), src


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Strict: a misspelt or misplaced field (which kubectl would reject or silently drop) fails here."""
    import kubernetes_validate

    docs = _k8s_docs()
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    bad = json.loads(json.dumps(_doc("DaemonSet")))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}  # the check itself can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30.0", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")
@pytest.mark.parametrize("folder", ["k8s", "k8s/monitoring"])
def test_kustomize_renders_every_manifest(folder: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / folder)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    rendered = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d)
    assert rendered == sorted((d["kind"], d["metadata"]["name"]) for d in _k8s_docs(DEPLOY / folder))


def test_meter_daemonset_needs_no_privilege() -> None:
    """Reviewed against Kepler's and dcgm-exporter's DaemonSets: those run privileged or with SYS_ADMIN for
    counters we do not read; NVML's energy counter needs neither, so the meter gets nothing beyond its journal."""
    spec = _doc("DaemonSet")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert not spec.get("hostPID") and not spec.get("hostNetwork") and spec["automountServiceAccountToken"] is False
    (meter,) = spec["containers"]
    ctx = meter["securityContext"]
    assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"] and not ctx["allowPrivilegeEscalation"]
    assert ctx["capabilities"] == {"drop": ["ALL"]} and not ctx.get("privileged")
    assert "nvidia.com/gpu" not in meter["resources"].get("limits", {})  # reads counters, takes no GPU
    ports = {p["containerPort"] for p in meter["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert meter[probe]["grpc"]["port"] in ports
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    # the meter listens where its probes look
    cfg_port = int(load_config(environ={}).meter.grpc_listen.rsplit(":", 1)[1])
    assert cfg_port in ports


def test_gateway_probes_and_security() -> None:
    spec = _doc("Deployment")["spec"]["template"]["spec"]
    (gw,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gw[probe]["grpc"]["port"] == ports["grpc"]
    assert gw["securityContext"]["readOnlyRootFilesystem"] and gw["securityContext"]["capabilities"] == {
        "drop": ["ALL"]
    }
    # the grace period outlasts the drain the configuration asks for
    cm = _configmap_config()
    assert spec["terminationGracePeriodSeconds"] > cm.server.drain_grace_s


def test_podmonitor_scrapes_the_gateways_metrics_port() -> None:
    (pm,) = [d for d in _k8s_docs(DEPLOY / "k8s" / "monitoring") if d["kind"] == "PodMonitor"]
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    gw = _doc("Deployment")["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= gw["metadata"]["labels"].items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in gw["spec"]["containers"][0]["ports"]}
    http_port = next(p["containerPort"] for p in gw["spec"]["containers"][0]["ports"] if p["name"] == endpoint["port"])
    assert _configmap_config().server.http_listen.endswith(f":{http_port}")


def test_the_operators_alert_rules_are_the_rule_files() -> None:
    (rule,) = [d for d in _k8s_docs(DEPLOY / "k8s" / "monitoring") if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]


def test_compose_monitoring_is_wired() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    for rules in prom["rule_files"]:  # each rule file Prometheus reads is one compose mounts there
        (src,) = [s for s, dst in mounts.items() if dst == rules]
        assert yaml.safe_load((DEPLOY / src).read_text())["groups"]
    host, port = target.split(":")
    assert host in services and f"{port}:{port}" in services[host]["ports"]
    for svc in ("prometheus", "grafana"):
        for volume in services[svc]["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), src
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_dockerfile_copies_every_package() -> None:
    """A package the wheel needs but the image build does not copy is missing only in the image."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pattern.split(".")[0].rstrip("*") for pattern in include}
    copied = {line.split()[1].strip("./") for line in COPY_LINES if not line.split()[1].startswith("--from")}
    assert tops <= copied, tops - copied
