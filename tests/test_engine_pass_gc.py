"""A pass pauses the cyclic garbage collector (``MeteringEngine.run_once``) and always leaves it as it found it."""

from __future__ import annotations

import gc

import pytest
import sqlalchemy as sa

from tests.engine_helpers import make_engine


def test_a_pass_leaves_the_collector_as_it_found_it(db: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(db)
    seen: list[bool] = []
    load = engine._load

    def spy() -> None:
        seen.append(gc.isenabled())
        load()

    monkeypatch.setattr(engine, "_load", spy)
    assert gc.isenabled()
    engine.run_once()
    assert seen == [False]  # paused during the pass
    assert gc.isenabled()

    def boom() -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(engine, "_load", boom)
    with pytest.raises(RuntimeError):
        engine.run_once()
    assert gc.isenabled()  # resumed on an error too

    gc.disable()
    try:
        monkeypatch.setattr(engine, "_load", spy)
        engine.run_once()
        assert not gc.isenabled()  # someone else's choice stays
    finally:
        gc.enable()
