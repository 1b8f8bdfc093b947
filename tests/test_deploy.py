"""The deploy files say what the code accepts: every command line parses, every config loads, every path exists.

There is no Docker engine or Kubernetes cluster here, so this checks what can be checked without one.
"""

from __future__ import annotations

import argparse
import importlib
import re
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


def _k8s_docs() -> list[dict]:
    docs = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d)
    return docs


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


def test_configmap_toml_is_a_valid_config(tmp_path: Path) -> None:
    cm = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")
    path = tmp_path / "joulegate.toml"
    path.write_text(cm["data"]["joulegate.toml"])
    cfg = load_config(path, environ={"JOULEGATE_DB__URL": "postgresql://u@db/jg"})
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
