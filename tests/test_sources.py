"""Energy sources: NVML (real GPUs only, plus its failure modes) and the simulated TGI's counter over HTTP."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pynvml
import pytest

from meter.sampler import Sampler
from meter.samples import EnergySource, Sample
from meter.sources import (
    NvmlSource,
    NvmlUnavailableError,
    SimCounterInfo,
    SimSource,
    nvml_device_name,
    nvml_device_names,
)
from tests.waiting import wait_until, wait_until_async


def _nvml_gpu_count() -> int:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


GPUS = _nvml_gpu_count()
needs_gpu = pytest.mark.skipif(GPUS == 0, reason="NVML finds no GPU here")


# ---- NVML without a GPU ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(GPUS > 0, reason="NVML works here; this checks the error where it does not")
def test_nvml_absent_gives_a_clear_error() -> None:
    with pytest.raises(NvmlUnavailableError, match="NVML could not be initialised") as info:
        NvmlSource()
    assert "driver" in str(info.value)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)
    with pytest.raises(NvmlUnavailableError, match="NVML could not be initialised"):
        nvml_device_names([0])


class _FakeNvml:
    """Stands in for the NVML library where there is no driver, to reach paths no H100 can show: a GPU without the
    energy counter (pre-Volta) and a read that fails after startup."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, counter_supported: bool = True) -> None:
        self.inits = 0
        self.shutdowns = 0
        self.fail_reads = False
        self.energy_mj = 1_000
        self.counter_supported = counter_supported
        monkeypatch.setattr(pynvml, "nvmlInit", self._init)
        monkeypatch.setattr(pynvml, "nvmlShutdown", self._shutdown)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: f"GPU-0000-{h[1]}")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "Tesla P100")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", self._energy)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetFieldValues", self._fields)
        self.counter_reads = 0
        self.power_mw = 300_000

    def _init(self) -> None:
        self.inits += 1

    def _shutdown(self) -> None:
        self.shutdowns += 1

    def _energy(self, handle: tuple[str, int]) -> int:
        if not self.counter_supported:
            raise pynvml.NVMLError_NotSupported()
        if self.fail_reads and handle[1] == 1:
            raise pynvml.NVMLError_GpuIsLost()
        self.counter_reads += 1
        self.energy_mj += 10
        return self.energy_mj

    def _fields(self, handle: tuple[str, int], fields: list[int]) -> list[SimpleNamespace]:
        assert fields == [186]  # NVML_FI_DEV_POWER_INSTANT
        return [
            SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, valueType=1, value=SimpleNamespace(uiVal=self.power_mw))
        ]


def test_gpu_without_energy_counter_is_refused_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml(monkeypatch, counter_supported=False)
    with pytest.raises(NvmlUnavailableError, match=r"GPU 1 \(Tesla P100, GPU-0000-1\) has no total-energy counter"):
        NvmlSource([1])
    assert fake.inits == fake.shutdowns == 1  # NVML is not left initialised behind a failed construction


def test_nvml_failed_read_is_a_gap_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeNvml(monkeypatch)
    source = NvmlSource()
    assert isinstance(source, EnergySource)
    assert source.devices == ("nvml:GPU-0000-0", "nvml:GPU-0000-1")
    assert source.gpu_indices == (0, 1)
    fake.fail_reads = True
    before = time.time_ns()
    good, gap = source.read()
    assert good.device == "nvml:GPU-0000-0" and good.energy_mj is not None and good.error is None
    assert gap.device == "nvml:GPU-0000-1" and gap.energy_mj is None
    assert gap.error is not None and "GpuIsLost" in gap.error
    assert before <= good.t_ns <= gap.t_ns <= time.time_ns()
    source.close()
    source.close()
    assert fake.shutdowns == 1 == fake.inits


def test_nvml_bad_indices_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeNvml(monkeypatch)
    with pytest.raises(NvmlUnavailableError, match="GPU index 2 does not exist"):
        NvmlSource([0, 2])
    with pytest.raises(NvmlUnavailableError, match="twice"):
        NvmlSource([1, 1])
    with pytest.raises(NvmlUnavailableError, match="empty"):
        NvmlSource([])
    assert nvml_device_names([1, 0]) == {1: "nvml:GPU-0000-1", 0: "nvml:GPU-0000-0"}


# ---- NVML on a real GPU ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_nvml_source_reads_every_gpu_by_uuid() -> None:
    names = nvml_device_names()
    assert len(names) == GPUS
    source = NvmlSource()
    try:
        assert source.devices == tuple(names[i] for i in range(GPUS))
        assert all(d.startswith("nvml:GPU-") for d in source.devices)
        before = time.time_ns()
        first = source.read()
        time.sleep(0.35)  # over three counter updates: even an idle GPU draws tens of watts
        second = source.read()
        assert [s.device for s in first] == list(source.devices)
        for a, b in zip(first, second, strict=True):
            assert a.energy_mj is not None and b.energy_mj is not None, (a, b)
            assert before <= a.t_ns < b.t_ns <= time.time_ns()
            assert b.energy_mj > a.energy_mj
            power_w = (b.energy_mj - a.energy_mj) * 1e6 / (b.t_ns - a.t_ns)
            assert 5 < power_w < 1500, power_w
    finally:
        source.close()


@pytest.mark.gpu
@needs_gpu
def test_nvml_source_one_gpu_and_errors() -> None:
    source = NvmlSource([0])
    try:
        assert source.devices == (nvml_device_name(pynvml_uuid(0)),)
    finally:
        source.close()
    with pytest.raises(NvmlUnavailableError, match=f"GPU index {GPUS} does not exist"):
        NvmlSource([GPUS])


def pynvml_uuid(index: int) -> str:
    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
        return uuid.decode() if isinstance(uuid, bytes) else uuid
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
@needs_gpu
def test_sampler_over_nvml_for_a_second() -> None:
    samples: list[Sample] = []
    source = NvmlSource([0])
    sampler = Sampler(source, samples.extend, interval_ms=100)
    try:
        sampler.start()
        time.sleep(1.25)
        assert sampler.stop(2.0)
    finally:
        source.close()
    stats = sampler.stats
    assert 11 <= stats.reads <= 15 and stats.failed_reads == 0 and stats.resets == 0
    assert len(samples) == stats.reads
    power_w = sampler.power_w(source.devices[0])
    assert power_w is not None and 5 < power_w < 1500
    assert stats.read_ms_p50 is not None and stats.read_ms_p50 < 50
    assert stats.cpu_s < 0.1 * stats.wall_s


# ---- the simulated source: failure modes against a scripted HTTP server ----------------------------------------------


class _ScriptedEnergyServer:
    """A tiny HTTP/1.1 keep-alive server answering GET /sim/energy as told. The real simulator (sim.server) has no way
    to answer 500, garbage or too slowly on demand; these tests need exactly that."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        self.mode = "ok"
        self.device = "sim:gpu0"
        self.energy_mj = 1_000
        self.connections = 0
        self.in_flight = 0  # requests whose handler has not returned yet
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with lock:
                    server.in_flight += 1
                try:
                    self._answer()
                finally:
                    with lock:
                        server.in_flight -= 1

            def _answer(self) -> None:
                if self.path != "/sim/energy":
                    body, status = b"not found", 404
                elif server.mode == "slow":
                    time.sleep(0.5)
                    body, status = b"{}", 200
                elif server.mode == "error":
                    body, status = b"boom", 500
                elif server.mode == "garbage":
                    body, status = b'{"device": "sim:gpu0", "energy_mj": "lots"}', 200
                else:
                    server.energy_mj += 100
                    doc = {
                        "device": server.device,
                        "energy_mj": server.energy_mj,
                        "t_ns": time.time_ns(),
                        "update_period_ms": 100,
                        "lag_ms": 50,
                    }
                    body, status = json.dumps(doc).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def energy_server() -> Iterator[_ScriptedEnergyServer]:
    server = _ScriptedEnergyServer()
    yield server
    server.close()


def test_sim_source_keeps_one_connection_and_names_the_device(energy_server: _ScriptedEnergyServer) -> None:
    source = SimSource([energy_server.url + "/"])
    try:
        assert isinstance(source, EnergySource)
        assert source.devices == ("sim:gpu0",)
        values = [source.read()[0].energy_mj for _ in range(5)]
        assert values == [1_200, 1_300, 1_400, 1_500, 1_600]  # the constructor's read was 1_100
        assert energy_server.connections == 1  # keep-alive: one TCP connection for six requests
        assert source.counter_info("sim:gpu0") == SimCounterInfo(update_period_ms=100, lag_ms=50)
    finally:
        source.close()


@pytest.mark.parametrize(
    ("mode", "error"), [("error", "HTTP 500"), ("garbage", "no integer energy_mj"), ("slow", "timed out")]
)
def test_sim_source_failures_are_gaps_and_it_recovers(
    energy_server: _ScriptedEnergyServer, mode: str, error: str
) -> None:
    source = SimSource([energy_server.url], timeout_s=0.2)
    try:
        energy_server.mode = mode
        t0 = time.monotonic()
        (gap,) = source.read()
        assert time.monotonic() - t0 < 0.45  # the timeout bounds a stalled simulator
        assert gap.device == "sim:gpu0" and gap.energy_mj is None
        assert gap.error is not None and error in gap.error, gap.error
        energy_server.mode = "ok"
        if mode == "slow":  # let the stalled handler finish before the next request
            wait_until(lambda: energy_server.in_flight == 0, 5.0, what="the stalled handler to finish")
        (sample,) = source.read()
        assert sample.device == "sim:gpu0" and sample.energy_mj is not None
    finally:
        source.close()


def test_sim_source_falls_back_to_the_url_until_the_simulator_answers(energy_server: _ScriptedEnergyServer) -> None:
    energy_server.mode = "error"
    source = SimSource([energy_server.url], timeout_s=0.2)
    try:
        assert source.devices == (f"sim:{energy_server.url}",)
        energy_server.mode = "ok"
        (sample,) = source.read()
        assert sample.device == "sim:gpu0" == source.devices[0]  # fixed on the first success
        energy_server.device = "sim:other"
        (sample,) = source.read()
        assert sample.device == "sim:gpu0"  # a renamed simulator keeps its first name: a series is never split
    finally:
        source.close()


def test_sim_source_unreachable_and_bad_urls(unused_port: int) -> None:
    source = SimSource([f"http://127.0.0.1:{unused_port}"], timeout_s=0.2)
    try:
        (gap,) = source.read()
        assert gap.energy_mj is None and gap.error is not None and "ConnectionRefused" in gap.error
        assert gap.device == f"sim:http://127.0.0.1:{unused_port}"
    finally:
        source.close()
    with pytest.raises(ValueError):
        SimSource([])
    with pytest.raises(ValueError):
        SimSource(["ftp://example"])
    with pytest.raises(ValueError):
        SimSource(["http://127.0.0.1:1", "http://127.0.0.1:1/"])


def test_two_simulators_answering_one_name_keep_distinct_devices(energy_server: _ScriptedEnergyServer) -> None:
    twin = _ScriptedEnergyServer()  # a copy-pasted simulator config: both claim "sim:gpu0"
    try:
        source = SimSource([energy_server.url, twin.url])
        try:
            assert source.devices == ("sim:gpu0", f"sim:{twin.url}")
            assert [s.device for s in source.read()] == list(source.devices)
        finally:
            source.close()
    finally:
        twin.close()


# ---- the simulated source against the real simulator (sim.server.SimTGI) ---------------------------------------------
# SimSource blocks, so it runs in a worker thread while the simulator serves on the test's event loop.


async def test_sim_source_reads_the_simulators_counter() -> None:
    import asyncio

    from sim.config import SimConfig
    from sim.server import SimTGI

    config = SimConfig(name="gpu-a", idle_power_w=80.0, counter_lag_ms=200, counter_offset_mj=7_000_000)
    async with SimTGI(config) as sim:
        source = await asyncio.to_thread(SimSource, [sim.url])
        try:
            assert source.devices == ("sim:gpu-a",)
            assert source.counter_info("sim:gpu-a") == SimCounterInfo(update_period_ms=100, lag_ms=200)
            (first,) = await asyncio.to_thread(source.read)
            await asyncio.sleep(1.0)
            (second,) = await asyncio.to_thread(source.read)
        finally:
            source.close()
        assert first.energy_mj is not None and second.energy_mj is not None
        assert first.energy_mj >= 7_000_000  # the counter's offset comes through untouched
        power_w = (second.energy_mj - first.energy_mj) * 1e6 / (second.t_ns - first.t_ns)
        assert 60 < power_w < 100, power_w  # 80 W idle, give or take one 8 J counter step over a second
        # each sample shows what the simulated counter showed during the read that preceded its stamp
        for sample in (first, second):
            assert sim.gpu.counter(sample.t_ns - 50_000_000).energy_mj <= sample.energy_mj
            assert sample.energy_mj <= sim.gpu.counter(sample.t_ns).energy_mj


async def test_unnamed_simulator_device_matches_the_fallback_name() -> None:
    import asyncio

    from sim.server import SimTGI

    async with SimTGI() as sim:
        source = await asyncio.to_thread(SimSource, [sim.url])
        try:
            assert source.devices == (f"sim:{sim.url}",) == (sim.gpu.device,)
        finally:
            source.close()


async def test_sampler_over_the_simulator_sees_a_request_s_energy() -> None:
    import asyncio

    import aiohttp

    from sim.config import SimConfig
    from sim.server import SimTGI

    config = SimConfig(name="gpu-b", idle_power_w=80.0, decode_base_power_w=400.0, max_power_w=650.0)
    samples: list[Sample] = []
    async with SimTGI(config) as sim:
        source = await asyncio.to_thread(SimSource, [sim.url])
        sampler = Sampler(source, samples.extend, interval_ms=100, power_window_ms=500)
        sampler.start()
        try:
            # the power window (500 ms) spans six reads of an idle GPU
            await wait_until_async(lambda: sampler.stats.reads >= 6, 5.0)
            idle_power_w = sampler.power_w("sim:gpu-b")
            async with aiohttp.ClientSession() as http:
                body = {"inputs": "hello " * 200, "parameters": {"max_new_tokens": 60}}
                async with http.post(f"{sim.url}/generate", json=body) as response:
                    assert response.status == 200, await response.text()
            await asyncio.sleep(0.4)
        finally:
            assert await asyncio.to_thread(sampler.stop, 2.0)
            source.close()
        truth = sim.gpu.truth()
    stats = sampler.stats
    assert stats.failed_reads == 0 and stats.resets == 0 and stats.reads == len(samples) >= 12
    assert idle_power_w is not None and 60 < idle_power_w < 100, idle_power_w
    assert all(s.device == "sim:gpu-b" for s in samples)
    # the sampler's span of the counter holds the request's true energy on top of 80 W idle
    (request,) = truth.requests.values()
    spanned_mj = samples[-1].energy_mj - samples[0].energy_mj  # type: ignore[operator]
    idle_floor_mj = 80 * (samples[-1].t_ns - samples[0].t_ns) / 1e6 - 2 * 80 * 100  # minus a step at each end
    assert request.total_mj > 0
    assert spanned_mj > idle_floor_mj + 0.5 * request.total_mj
    assert spanned_mj <= truth.total_mj


def test_nvml_reads_the_counter_every_nth_read_and_spreads_by_power(monkeypatch: pytest.MonkeyPatch) -> None:
    """``counter_every=5``: one counter read per GPU in five reads (each ~3-4 ms of CPU on an H100, against ~0.08 ms
    for the instant power); the reads between come out when the next counter read does, their values spread by
    power, in order, ending on the counter's own value."""
    fake = _FakeNvml(monkeypatch)
    source = NvmlSource([0], counter_every=5)
    fake.counter_reads = 0
    out = [source.read() for _ in range(11)]
    assert fake.counter_reads == 3  # reads 0, 5 and 10
    assert [len(batch) for batch in out] == [1, 0, 0, 0, 0, 5, 0, 0, 0, 0, 5]
    samples = [x for batch in out for x in batch]
    assert all(a.t_ns < b.t_ns for a, b in itertools.pairwise(samples))
    values = [x.energy_mj for x in samples]
    assert values[0] is not None and values[5] == values[0] + 10 and values[10] == values[0] + 20  # the counter's
    assert all(a <= b for a, b in itertools.pairwise(values))  # type: ignore[operator]
    assert all(x.error is None for x in samples)
    source.close()


def test_a_sampler_that_stops_settles_the_reads_waiting_for_a_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``counter_every`` N, up to N - 1 reads wait for the next counter read: a meter stopped meanwhile used to
    leave them (with N = 10, up to ~1 s of every GPU's energy) unstored. The sampler's stop now reads the counter
    once more, and the samples the sink got end on the counter's value at stop, after the last tick, in order. (N
    here is past the reads the test makes, so the stop always finds reads waiting.)"""
    fake = _FakeNvml(monkeypatch)
    source = NvmlSource([0, 1], counter_every=1000)
    fake.counter_reads = 0
    got: list[Sample] = []
    sampler = Sampler(source, got.extend, interval_ms=10, phase_lock=False)
    sampler.start()
    wait_until(lambda: sampler.stats.reads >= 13, 10, what="a counter read and some reads after it")
    assert sampler.stop()
    assert source.settle() == []  # nothing is held back any more
    reads = sampler.stats.reads
    assert fake.counter_reads == 4 and reads < 100  # the first read's and the stop's, per GPU; no tick given up
    for device in source.devices:
        mine = [x for x in got if x.device == device]
        assert len(mine) == reads + 1  # every read's tick, and the settling counter read
        assert all(a.t_ns < b.t_ns for a, b in itertools.pairwise(mine))
        assert all(x.energy_mj is not None for x in mine)
    assert got[-1].energy_mj == fake.energy_mj  # the counter's last value is stored
    source.close()
