"""The ``[models.shaping]`` config: defaults keep passthrough, mistakes fail at start with their key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, load_config
from proxy.shaping import ArrivalShaper, Policy, ShapingConfig

EXAMPLE = """
[[models]]
model_id = "m"
backends = [{ url = "http://127.0.0.1:3000" }]

[models.shaping]
default_class = "interactive"
max_queued_requests = 10000      # per model
max_queued_tokens = 4000000
max_queued_requests_per_tenant = 2000

[models.shaping.classes.interactive]
policy = "passthrough"
priority = 10

[models.shaping.classes.batch]
policy = "batch"
max_batch = 32
hold_ms = 2000
priority = 0

[models.shaping.tenant_weights]
acme = 2.0
"""


def model_with(shaping: dict) -> dict:
    return {"models": [{"model_id": "m", "backends": [{"url": "http://127.0.0.1:3000"}], "shaping": shaping}]}


def test_defaults_are_one_passthrough_class() -> None:
    cfg = load_config(environ={}, overrides=model_with({}))
    shaping = cfg.models[0].shaping
    assert isinstance(shaping, ShapingConfig)
    assert list(shaping.classes) == ["default"] and shaping.default_class == "default"
    assert shaping.classes["default"].policy is Policy.PASSTHROUGH
    assert shaping.max_queued_requests == 10_000 and shaping.max_queued_tokens is None


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "joulegate.toml"
    path.write_text(EXAMPLE)
    shaping = load_config(path, environ={}).models[0].shaping
    assert shaping.classes["batch"].max_batch == 32 and shaping.classes["batch"].hold_ms == 2000
    assert shaping.classes["interactive"].priority == 10
    assert shaping.weight("acme") == 2.0 and shaping.weight("other") == 1.0
    shaper = ArrivalShaper("m", shaping)
    assert [c.name for c in shaper.core.by_priority] == ["interactive", "batch"]


def test_policy_parameters_get_the_policy_defaults() -> None:
    c = ShapingConfig.model_validate({"classes": {"default": {"policy": "adaptive"}}}).classes["default"]
    assert (c.ttft_bound_ms, c.service_ttft_ms, c.target_batch, c.rate_window_s) == (1000, 100, 16, 10)
    assert c.max_hold_ms == 900
    t = ShapingConfig.model_validate({"classes": {"default": {"policy": "tokens"}}}).classes["default"]
    assert t.max_batch_prefill_tokens == 4096 and t.hold_ms == 250


@pytest.mark.parametrize(
    ("shaping", "expected"),
    [
        ({"classes": {"batch": {"policy": "batch", "hold_ms": -5}}, "default_class": "batch"},
         "models.0.shaping.classes.batch.hold_ms: Input should be greater than or equal to 0"),
        ({"classes": {"default": {"policy": "window", "hold_ms": 10}}},
         "models.0.shaping.classes.default.hold_ms: Value error, not used by policy 'window' (read by: batch, tokens)"),
        ({"classes": {"default": {"policy": "fifo"}}}, "models.0.shaping.classes.default.policy: Input should be"),
        ({"classes": {"default": {"policy": "batch", "max_btch": 3}}},
         "models.0.shaping.classes.default.max_btch: Extra inputs are not permitted"),
        ({"classes": {"interactive": {}}},
         "models.0.shaping: Value error, default_class 'default' is not a configured class (known: interactive)"),
        ({"classes": {"default": {"policy": "adaptive", "ttft_bound_ms": 100, "service_ttft_ms": 200}}},
         "models.0.shaping.classes.default: Value error, service_ttft_ms (200.0) must be below ttft_bound_ms"),
        ({"tenant_weights": {"acme": 0}}, "models.0.shaping.tenant_weights: Value error, weight of tenant 'acme'"),
        ({"classes": {"a b": {}}, "default_class": "a b"}, "models.0.shaping.classes: Value error, class name 'a b'"),
        ({"max_queued_requests": -1}, "models.0.shaping.max_queued_requests: Input should be greater than"),
    ],
)  # fmt: skip
def test_bad_shaping_config_fails_at_start_with_its_key_path(shaping: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(environ={}, overrides=model_with(shaping))
    assert expected in str(exc.value)
