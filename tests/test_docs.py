"""The README and the example configuration say what the code does (tests/test_demo.py runs the README's demo).

- ``deploy/joulegate.example.toml`` claims every key with its default: every field of every configuration model is
  in it (set, or commented out where the default is "none"), the defaults it shows are the code's, and it names no
  key the code does not read.
- Every link of the README points at a file or a heading that exists; it sends readers to nothing they cannot see.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pydantic import BaseModel

from app.config import BackendConfig, Config, ModelConfig, load_config
from common.shaping_config import ClassConfig, ShapingConfig

from .conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
EXAMPLE = REPO_ROOT / "deploy" / "joulegate.example.toml"


# -- the example configuration ---------------------------------------------------------------------------------------

TABLE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
KEY = re.compile(r"^\s*(#\s*)?([a-z_][a-z0-9_]*)\s*=")


def _keys_by_table(text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Keys set and keys commented out (``# key = ...``), per table; class tables are folded into one."""
    set_keys: dict[str, set[str]] = {}
    commented: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        if m := TABLE.match(line):
            table = re.sub(r"^models\.shaping\.classes\.[^.]+$", "models.shaping.classes.*", m.group(1))
            set_keys.setdefault(table, set())
            continue
        if m := KEY.match(line):
            (commented if m.group(1) else set_keys).setdefault(table, set()).add(m.group(2))
    return set_keys, commented


SECTIONS: dict[str, type[BaseModel]] = {
    **{name: field.annotation for name, field in Config.model_fields.items() if name != "models"},  # type: ignore[misc]
    "models": ModelConfig,
    "models.backends": BackendConfig,
    "models.shaping": ShapingConfig,
    "models.shaping.classes.*": ClassConfig,
}
SUBTABLES = {
    "models": {"backends", "shaping"},
    "models.shaping": {"classes", "tenant_weights"},
    "rate_limits": {"tenants"},
    "budgets": {"tenants"},
}


def test_the_example_config_has_every_key() -> None:
    set_keys, commented = _keys_by_table(EXAMPLE.read_text())
    set_keys["models.shaping"] |= {"classes", "tenant_weights"} & set(set_keys)  # tables of their own
    missing, unknown = [], []
    for table, model in SECTIONS.items():
        shown = set_keys.get(table, set()) | commented.get(table, set()) | SUBTABLES.get(table, set())
        fields = set(model.model_fields)
        missing += [f"{table}.{k}" for k in sorted(fields - shown)]
        unknown += [f"{table}.{k}" for k in sorted(commented.get(table, set()) - fields)]
    assert missing == [] and unknown == []
    assert set(set_keys) - {"models.shaping.tenant_weights"} <= set(SECTIONS)  # no table the code does not read


def test_the_example_config_loads_and_shows_the_defaults() -> None:
    cfg = load_config(EXAMPLE, environ={})
    data: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    for section in SECTIONS:
        if "." in section or section == "models":
            continue
        for key in data[section]:
            assert getattr(getattr(cfg, section), key) == getattr(getattr(defaults, section), key), f"{section}.{key}"
    # commented-out keys are the ones whose default is none
    _, commented = _keys_by_table(EXAMPLE.read_text())
    for table, keys in commented.items():
        for key in keys:
            assert SECTIONS[table].model_fields[key].default is None, f"{table}.{key}"
    shaping = cfg.models[0].shaping
    assert {c.policy.value for c in shaping.classes.values()} == {
        "passthrough",
        "batch",
        "tokens",
        "window",
        "adaptive",
    }
    assert shaping.max_queued_requests == ShapingConfig().max_queued_requests


# -- links -----------------------------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_readme_link_resolves_and_nothing_points_at_unpublished_notes() -> None:
    text = README.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        if path:
            assert (REPO_ROOT / path).exists(), link
        else:
            assert anchor in anchors, link
    assert not re.search(r"issue (closing )?notes|see issue|issue \d", text, re.I)
