"""Render what the Grafana dashboard shows, from a real run: the simulator and a gateway (sim meter) as processes,
three tenants' traffic through two traffic classes, ``/metrics`` scraped every 2 s, and the dashboard's main panels
computed from those scrapes the way its PromQL computes them (``rate`` = counter increase over a window, quantiles
from histogram bucket increases), drawn with matplotlib into ``bench/results/dashboard.png`` for the README.

    python -m bench.dashboard                  # ~2 min
    python -m bench.dashboard --seconds 40     # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import random
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench._procs import create_admin_key, free_port, gateway_process, sim_process
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg

OUT = Path(__file__).parent / "results" / "dashboard.png"
# tenant: (requests/s, prompt tokens, new tokens)
TENANTS = {"acme": (1.2, 200, 64), "globex": (0.6, 900, 32), "initech": (0.3, 60, 200)}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CONFIG = """
[meter]
source = "sim"
epoch_s = 1.0
[[models]]
model_id = "sim-model"
[[models.backends]]
url = "{url0}"
[[models.backends]]
url = "{url1}"
[models.shaping]
default_class = "interactive"
[models.shaping.classes.interactive]
policy = "passthrough"
[models.shaping.classes.bulk]
policy = "batch"
max_batch = 16
hold_ms = 1500
"""


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by(samples: Samples, name: str, label: str, where: Callable[[dict[str, str]], bool] = lambda _: True):
    out: dict[str, float] = defaultdict(float)
    for (n, labels), value in samples.items():
        d = dict(labels)
        if n == name and where(d):
            out[d.get(label, "")] += value
    return out


def rate_series(scrapes: list[tuple[float, Samples]], name: str, label: str, window_s: float, **kw):
    """Per label value: (t, increase over the last ``window_s`` / window) — PromQL's rate, roughly."""
    times = [t for t, _ in scrapes]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i, (t, now) in enumerate(scrapes):
        j = bisect.bisect_left(times, t - window_s)
        if j >= i:
            continue
        t0, then = scrapes[j]
        a, b = by(then, name, label, **kw), by(now, name, label, **kw)
        for key in b:
            series[key].append((t, max(0.0, b[key] - a.get(key, 0.0)) / (t - t0)))
    return series


def quantile_series(scrapes, name: str, label: str, q: float, window_s: float):
    times = [t for t, _ in scrapes]
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for i, (t, now) in enumerate(scrapes):
        j = bisect.bisect_left(times, t - window_s)
        if j >= i:
            continue
        then = scrapes[j][1]
        buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (n, labels), value in now.items():
            if n == f"{name}_bucket":
                d = dict(labels)
                buckets[d[label]].append((float(d["le"]), value - then.get((n, labels), 0.0)))
        for key, bs in buckets.items():
            bs.sort()
            total = bs[-1][1]
            if total <= 0:
                continue
            le = next(le for le, c in bs if c >= q * total)
            if le != float("inf"):
                series[key].append((t, le))
    return series


async def traffic(port: int, keys: dict[str, str], seconds: float) -> dict[str, int]:
    rng = random.Random(7)
    outcomes: dict[str, int] = defaultdict(int)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)

        async def one(tenant: str, prompt: int, new: int, cls: str) -> None:
            md = (("authorization", f"Bearer {keys[tenant]}"), ("x-traffic-class", cls))
            req = pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="word " * (prompt // 2))],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=new)),
            )
            try:
                await stub.Generate(req, metadata=md, timeout=30)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1

        async def tenant_loop(tenant: str, rate: float, prompt: int, new: int) -> None:
            tasks = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                phase = (time.monotonic() - end + seconds) / seconds
                burst = 3.0 if tenant == "acme" and 0.4 < phase < 0.6 else 1.0  # a burst mid-run
                cls = "bulk" if tenant == "globex" or rng.random() < 0.2 else "interactive"
                new_tokens = 10**6 if rng.random() < 0.03 else new  # a few calls past the token limit: refused
                tasks.append(asyncio.ensure_future(one(tenant, prompt, new_tokens, cls)))
                await asyncio.sleep(rng.expovariate(rate * burst))
            await asyncio.gather(*tasks)

        await asyncio.gather(*(tenant_loop(t, *spec) for t, spec in TENANTS.items()))
    return dict(outcomes)


def draw(scrapes: list[tuple[float, Samples]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = scrapes[0][0]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    fig.suptitle("joulegate — dashboard panels from a simulated run (deploy/grafana/joulegate.json)", fontsize=13)

    def plot(ax, series, title: str, unit: str, fmt: str = "{}") -> None:
        for key, points in sorted(series.items()):
            if points:
                ax.plot([t - t0 for t, _ in points], [v for _, v in points], label=fmt.format(key), lw=1.6)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(unit)
        ax.set_xlabel("s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")

    plot(
        axes[0][0],
        rate_series(scrapes, "joulegate_energy_joules_total", "tenant", 20),
        "Attributed GPU power by tenant",
        "W",
    )
    energy = rate_series(scrapes, "joulegate_energy_joules_total", "tenant", 30)
    tokens = rate_series(scrapes, "joulegate_generated_tokens_total", "tenant", 30)
    per_token = {
        k: [(t, e / tok) for (t, e), (_, tok) in zip(energy[k], tokens.get(k, []), strict=False) if tok > 0]
        for k in energy
    }
    plot(axes[0][1], per_token, "Energy per generated token by tenant", "J/token")
    power = defaultdict(list)
    idle = []
    for t, s in scrapes:
        watts = by(s, "joulegate_backend_power_watts", "backend")
        for b, w in watts.items():
            power[b].append((t, w))
    attributed = rate_series(scrapes, "joulegate_energy_joules_total", "", 30)
    measured = {t: sum(by(s, "joulegate_backend_power_watts", "backend").values()) for t, s in scrapes}
    for t, w in attributed.get("", []):
        if measured.get(t):
            idle.append((t, max(0.0, 1 - w / measured[t]) * 100))
    ax = axes[0][2]
    plot(ax, power, "GPU power per backend (energy counter)", "W")
    ax2 = ax.twinx()
    ax2.plot([t - t0 for t, _ in idle], [v for _, v in idle], "k--", lw=1.2, label="idle share %")
    ax2.set_ylabel("idle share %")
    ax2.set_ylim(0, 100)
    ax2.legend(fontsize=8, loc="upper right")
    queued = defaultdict(list)
    for t, s in scrapes:
        for cls, n in by(s, "joulegate_shaping_queued_requests", "traffic_class").items():
            queued[cls].append((t, n))
    plot(axes[1][0], queued, "Queued requests by class", "requests")
    hold = quantile_series(scrapes, "joulegate_shaping_hold_seconds", "traffic_class", 0.95, 20)
    ttft = quantile_series(scrapes, "joulegate_time_to_first_token_seconds", "traffic_class", 0.95, 20)
    plot(axes[1][1], {**{f"hold p95 {k}": v for k, v in hold.items()}, **{f"TTFT p95 {k}": v for k, v in ttft.items()}},
         "Hold time and time to first token, p95", "s")  # fmt: skip
    plot(axes[1][2], rate_series(scrapes, "joulegate_requests_total", "code", 20), "Requests by status", "req/s")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=100.0, help="traffic duration")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    from meter.store.db import make_engine
    from meter.store.keys import create_key

    with tempfile.TemporaryDirectory() as tmp, sim_process() as url0, sim_process() as url1:
        workdir = Path(tmp)
        db_url = f"sqlite:///{workdir / 'bench.db'}"
        create_admin_key(db_url)
        engine = make_engine(db_url)
        keys = {t: create_key(engine, t).key for t in TENANTS}
        engine.dispose()
        config = workdir / "joulegate.toml"
        config.write_text(CONFIG.format(url0=url0, url1=url1))
        http_port = free_port()
        env = {"JOULEGATE_AUTH__REQUIRED": "true"}
        args_ = ("--config", str(config), "--http-listen", f"127.0.0.1:{http_port}")
        with gateway_process(workdir, [], env=env, args=args_) as (port, _proc):
            http = f"http://127.0.0.1:{http_port}"
            scrapes: list[tuple[float, Samples]] = []

            async def run() -> dict[str, int]:
                drive = asyncio.ensure_future(traffic(port, keys, args.seconds))
                while not drive.done() or len(scrapes) < 2:
                    scrapes.append((time.monotonic(), await asyncio.to_thread(scrape, http)))
                    await asyncio.sleep(2.0)
                for _ in range(8):  # the attribution of the last epochs and the energy cache (10 s) catch up
                    await asyncio.sleep(2.0)
                    scrapes.append((time.monotonic(), await asyncio.to_thread(scrape, http)))
                return drive.result()

            outcomes = asyncio.run(run())
    draw(scrapes, args.out)
    final = scrapes[-1][1]
    energy_j = sum(by(final, "joulegate_energy_joules_total", "tenant").values())
    tokens = sum(by(final, "joulegate_generated_tokens_total", "tenant").values())
    print(f"outcomes: {outcomes}; wrote {args.out}")
    refused = sum(outcomes.values()) - outcomes.get("OK", 0)
    print(
        f"RESULT scrapes={len(scrapes)} calls_ok={outcomes.get('OK', 0)} calls_refused={refused} "
        f"energy_j={energy_j:.1f} j_per_token={energy_j / max(tokens, 1):.3f}"
    )


if __name__ == "__main__":
    main()
