"""TLS on the gateway's gRPC and HTTP listeners and the meter's report port: real TLS clients (grpc secure channels,
aiohttp, the ssl module), certificates made at test time, plaintext refused, mutual TLS, rotation without restart."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from tests.certs import Authority, Issued

from ..waiting import wait_until_async
from .harness import running_stack

REQUEST = pb.BatchedGenerationRequest(
    requests=[pb.GenerationRequest(text="over TLS")],
    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)),
)


def _tls(server: Issued, ca: Authority | None = None, reload_s: float = 0.2) -> dict:
    tls = {"cert_path": str(server.cert_path), "key_path": str(server.key_path), "reload_interval_s": reload_s}
    if ca is not None:
        tls["client_ca_cert_path"] = str(ca.ca_path)
    return {"tls": tls}


def _client_context(ca: Authority, client: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca.ca_path)
    if client is not None:
        ctx.load_cert_chain(client.cert_path, client.key_path)
    return ctx


def _credentials(ca: Authority, client: Issued | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.ca_path.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.ca_path.read_bytes(),
        private_key=client.key_path.read_bytes(),
        certificate_chain=client.cert_path.read_bytes(),
    )


async def _generate(port: int, credentials: grpc.ChannelCredentials | None, auth) -> str:
    target = f"127.0.0.1:{port}"
    async with (
        grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    ) as channel:
        reply = await pbg.GenerationServiceStub(channel).Generate(REQUEST, metadata=auth, timeout=10)
        return reply.responses[0].text


async def _https_health(url: str, ctx: ssl.SSLContext | None, auth) -> int:
    body = {"inputs": "over https", "parameters": {"max_new_tokens": 4}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/generate", json=body, headers={"authorization": dict(auth)["authorization"]}, ssl=ctx
        ) as resp,
    ):
        return resp.status


def _peer_serial(port: int, ca: Authority, client: Issued | None = None, alpn: str | None = None) -> int:
    """The serial of the certificate the listener presents now (a fresh handshake)."""
    ctx = _client_context(ca, client)
    if alpn:
        ctx.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


async def _serial(*args) -> int:
    """``_peer_serial`` off the event loop (the gateway under test runs on it)."""
    return await asyncio.to_thread(_peer_serial, *args)


async def test_grpc_and_https_over_tls_and_plaintext_refused(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    server = ca.issue("gateway", server=True)
    async with running_stack(tmp_path, overrides=_tls(server), http=True) as s:
        https = s.http_url.replace("http://", "https://")
        assert await _generate(s.app.grpc_port, _credentials(ca), s.auth)
        assert await _https_health(https, _client_context(ca), s.auth) == 200
        # plaintext on a TLS port gets nothing
        with pytest.raises(grpc.aio.AioRpcError) as plain:
            await _generate(s.app.grpc_port, None, s.auth)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(aiohttp.ClientError):
            await _https_health(s.http_url, None, s.auth)
        # a client that does not trust the CA refuses the server
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _https_health(https, ssl.create_default_context(), s.auth)


async def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(tmp_path: Path) -> None:
    ca = Authority(tmp_path)
    rogue = Authority(tmp_path, "rogue CA")
    server = ca.issue("gateway", server=True)
    good, bad = ca.issue("client", server=False), rogue.issue("intruder", server=False)
    async with running_stack(tmp_path, overrides=_tls(server, ca), http=True) as s:
        https = s.http_url.replace("http://", "https://")
        assert await _generate(s.app.grpc_port, _credentials(ca, good), s.auth)
        assert await _https_health(https, _client_context(ca, good), s.auth) == 200
        for client in (None, bad):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _generate(s.app.grpc_port, _credentials(ca, client), s.auth)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(aiohttp.ClientError):
                await _https_health(https, _client_context(ca, client), s.auth)


async def test_rotated_certificates_are_served_without_a_restart_and_a_botched_rotation_is_refused(
    tmp_path: Path,
) -> None:
    ca = Authority(tmp_path)
    first = ca.issue("gateway", server=True)
    async with running_stack(tmp_path, overrides=_tls(first), http=True) as s:
        grpc_port, http_port = s.app.grpc_port, s.app.http_port
        assert await _serial(grpc_port, ca, None, "h2") == first.serial
        assert await _serial(http_port, ca) == first.serial

        # a key that is not the certificate's (a half-done rotation): refused, the first pair keeps serving
        other = ca.issue("other", server=True)
        first.key_path.write_bytes(other.key_path.read_bytes())
        await asyncio.sleep(0.6)  # three of the HTTP listener's 0.2 s looks
        assert await _serial(grpc_port, ca, None, "h2") == first.serial
        assert await _serial(http_port, ca) == first.serial
        assert await _generate(grpc_port, _credentials(ca), s.auth)

        second = ca.issue("gateway", server=True, cert_path=first.cert_path, key_path=first.key_path)
        assert second.serial != first.serial
        assert await _serial(grpc_port, ca, None, "h2") == second.serial  # gRPC: the next handshake

        async def rotated() -> bool:
            return await _serial(http_port, ca) == second.serial

        await wait_until_async(rotated, timeout_s=5)
        assert await _generate(grpc_port, _credentials(ca), s.auth)


async def test_the_meter_report_port_serves_tls(tmp_path: Path) -> None:
    from app.config import load_config
    from app.metering import authenticator, settings_from_config
    from common.tls import TlsFiles
    from meter.reports_api import start_reports_server
    from meter.store import make_engine
    from meter.store.migrate import ensure_schema

    ca = Authority(tmp_path)
    server = ca.issue("meter", server=True)
    config = load_config(environ={}, overrides={"db": {"url": f"sqlite:///{tmp_path / 'm.db'}"}})
    engine = make_engine(config.db.url)
    ensure_schema(engine)
    reports = await start_reports_server(
        engine,
        authenticator(config, engine),
        settings_from_config(config),
        "127.0.0.1:0",
        tls=TlsFiles(server.cert_path, server.key_path),
    )
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{reports.port}", _credentials(ca)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{reports.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plain:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await reports.stop(0.5)
        engine.dispose()
