"""meter.weights: what a backend says it serves, asked of real simulated engines over loopback, and when it changed."""

from __future__ import annotations

import asyncio

import pytest

from meter.weights import WeightsWatch, identity_of
from sim.config import SimConfig
from sim.server import SimTGI


@pytest.mark.parametrize(
    ("engine", "expected"),
    [
        ("tgi", "tgi:org/model-a@-"),
        ("vllm", "openai:org/model-a@org/model-a"),
        ("sglang", "sglang:org/model-a"),
    ],
)
async def test_each_engine_says_what_it_serves(engine: str, expected: str) -> None:
    sim = SimTGI(SimConfig(engine=engine, model_id="org/model-a", time_scale=0.0))
    url = await sim.start()
    try:
        assert await asyncio.to_thread(identity_of, url) == expected
    finally:
        await sim.stop()
    assert await asyncio.to_thread(identity_of, url, 0.5) is None  # nothing answers: no identity, no exception


def test_a_change_is_dated_just_after_the_old_weights_were_last_seen() -> None:
    answers = iter(["A", None, None, "B", "B", "A"])
    now = iter([100, 200, 300, 400, 500, 600])
    watch = WeightsWatch({"b1": "http://unused"}, identify=lambda url: next(answers), clock=lambda: next(now))
    assert watch.at("b1", 50) is None  # not asked yet
    for _ in range(6):
        watch.poll_once()
    # A seen at 100, then down (200, 300: nothing answered, nothing changed), B from just after 100, A again from
    # just after B was last seen (500)
    assert [watch.at("b1", t) for t in (0, 100, 101, 450, 500, 501, 10**12)] == ["A", "A", "B", "B", "B", "A", "A"]
    assert watch.at("b2", 100) is None


def test_a_backend_that_raises_does_not_stop_the_others() -> None:
    def identify(url: str) -> str | None:
        if url == "http://bad":
            raise RuntimeError("boom")
        return "X"

    watch = WeightsWatch({"bad": "http://bad", "good": "http://good"}, identify=identify, clock=lambda: 7)
    watch.poll_once()
    assert watch.at("good", 7) == "X" and watch.at("bad", 7) is None


def test_answers_in_no_engine_s_shape_are_no_identity() -> None:
    """A server answering the three doors with shapes no engine sends: no identity, and no exception to log."""
    answers = {"/info": [1, 2], "/get_model_info": {"model_path": ""}, "/v1/models": {"data": {"0": {"id": "x"}}}}
    assert identity_of("http://b", get=lambda url, _t: answers[url.removeprefix("http://b")]) is None
