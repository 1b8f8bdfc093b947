"""A key's default traffic class: checked when the key is made, and blamed on the key (not on a header the client
never sent) when a model does not have it.

The request-time case is real: a key made before the configuration dropped its class (or made with an older
joulegate) still exists in the database.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest

from app.cli import main as cli_main
from meter.store import create_key, lookup_key, make_engine
from meter.store.migrate import upgrade
from proxy.pb.fmaas import generation_pb2 as pb

from .harness import running_stack

SHAPING = {
    "default_class": "interactive",
    "classes": {"interactive": {"policy": "passthrough"}, "bulk": {"policy": "batch", "max_batch": 2, "hold_ms": 50}},
}
CONFIG = """
[[models]]
model_id = "m"
backends = [{url = "http://tgi-0:80"}]
[models.shaping]
default_class = "interactive"
classes = {interactive = {}, bulk = {policy = "batch"}}

[[models]]
model_id = "other"
backends = [{url = "http://tgi-1:80"}]
"""


def _request() -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="hello")],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
    )


async def test_a_key_default_class_the_model_lacks_is_blamed_on_the_key(tmp_path: Path) -> None:
    async with running_stack(tmp_path, model={"shaping": SHAPING}, http=True) as s:
        stale = create_key(s.app.engine, "tenant-a", default_class="batch")  # no such class in this gateway
        good = create_key(s.app.engine, "tenant-a", default_class="bulk")
        md = (("authorization", f"Bearer {stale.key}"),)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(_request(), metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert details.startswith(f"default traffic class of API key {stale.key_id}"), details
        assert "unknown class 'batch' (known: interactive, bulk)" in details

        async with aiohttp.ClientSession() as http:
            body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
            async with http.post(
                f"{s.http_url}/generate", json=body, headers={"authorization": f"Bearer {stale.key}"}
            ) as resp:
                assert resp.status == 422
                error = (await resp.json())["error"]
                assert error.startswith(f"default traffic class of API key {stale.key_id}"), error

        # the same key naming a class the model has is served; a header naming an unknown class is the header's fault
        resp = await s.stub.Generate(_request(), metadata=(*md, ("x-traffic-class", "interactive")))
        assert resp.responses[0].generated_token_count == 2
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(_request(), metadata=(*md, ("x-traffic-class", "nope")))
        assert (err.value.details() or "").startswith("x-traffic-class: unknown class 'nope'")
        # a key whose default class exists is served in it without any header
        resp = await s.stub.Generate(_request(), metadata=(("authorization", f"Bearer {good.key}"),))
        assert resp.responses[0].generated_token_count == 2


def _keys(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["keys", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_keys_create_checks_the_class_against_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOULEGATE_DB__URL", raising=False)
    url = f"sqlite:///{tmp_path / 'jg.db'}"
    upgrade(url)
    config = tmp_path / "jg.toml"
    config.write_text(CONFIG)
    capsys.readouterr()

    rc, out, err = _keys(capsys, "create", "--tenant", "acme", "--class", "batch", "--db", url, "--config", str(config))
    assert rc == 2 and out == ""
    assert err.strip() == (
        "joulegate keys: --class 'batch': no model of the configuration has this traffic class "
        "(classes: bulk, default, interactive)"
    )
    # without a configuration there is nothing to check against: refused, saying what to pass
    rc, out, err = _keys(capsys, "create", "--tenant", "acme", "--class", "bulk", "--db", url)
    assert rc == 2 and out == "" and "--config" in err
    engine = make_engine(url)
    try:
        rc, out, err = _keys(
            capsys, "create", "--tenant", "acme", "--class", "bulk", "--db", url, "--config", str(config)
        )
        assert rc == 0
        info = lookup_key(engine, out.strip().splitlines()[-1])
        assert info is not None and info.default_class == "bulk"
        assert "models other have no class 'bulk'" in err  # served there only with x-traffic-class
        rc, out, _ = _keys(capsys, "list", "--db", url)
        assert rc == 0 and len(out.strip().splitlines()) == 2  # the refused keys were never stored
    finally:
        engine.dispose()
