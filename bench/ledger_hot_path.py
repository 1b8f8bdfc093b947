"""What the ledger's write-ahead journal costs the request path: one hand-off, timed call by call.

    .venv/bin/python -m bench.ledger_hot_path [--requests 50000]

Since the journal, a hand-off (``request_started``, ``request_finished``, ``add_samples``) turns the record into its
row, checks it at the door (storable values), encodes one JSON line, appends it to the journal's current segment
with a plain ``write()`` (no fsync) and puts the row in the buffer, under one lock. Before, it only appended the
object to a deque. This measures, on a started ledger over SQLite whose writer sleeps (so only the hand-off is
timed, not a competing writer):

- the hand-off of each kind (p50, p99, mean over a loop),
- the parts: building the row at the door, encoding the line, the ``write()`` syscall,
- the old hand-off (a deque append) for the ratio.

The garbage collector is off while timing (a collection pauses every thread and is not the ledger's doing).
The last line is ``RESULT finished_p50_us=... started_p50_us=... samples_p50_us=... write_p50_us=...
old_p50_us=... ratio=...``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from meter.journal import encode
from meter.ledger import Ledger, timeline_row
from meter.samples import Sample
from meter.store import upgrade
from meter.timeline import Api, RequestStart, Timeline

T0 = time.time_ns()


def _timed(n: int, call: Callable[[int], object]) -> list[int]:
    clock = time.perf_counter_ns
    cost = []
    gc.disable()
    try:
        for i in range(n):
            t0 = clock()
            call(i)
            cost.append(clock() - t0)
    finally:
        gc.enable()
    cost.sort()
    return cost


def _fmt(name: str, cost: list[int]) -> str:
    n = len(cost)
    return (
        f"{name:<34} p50 {cost[n // 2] / 1e3:6.2f} us   p99 {cost[int(n * 0.99)] / 1e3:6.2f} us   "
        f"mean {statistics.fmean(cost) / 1e3:6.2f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    n = parser.parse_args().requests
    starts = [RequestStart(f"r{i}", f"tenant-{i % 7}", "meta-llama/Llama-3.1-8B-Instruct", "10.0.0.7:3000",
                           T0 + i * 1000, T0 + i * 1000 + 10) for i in range(n)]  # fmt: skip
    timelines = [
        Timeline(s.request_id, s.tenant, s.model_id, s.backend, s.received_ns, s.released_ns, s.released_ns + 500,
                 s.released_ns + 9000, 100 + i % 500, 20 + i % 200, traffic_class="interactive", api=Api.HTTP,
                 correlation_id=f"corr-{i:08d}")
        for i, s in enumerate(starts)
    ]  # fmt: skip
    samples = [[Sample("nvml:GPU-5f3c0a8e-2b71-4c1e-9d7a-1f2e3d4c5b6a", T0 + i, 10_000_000 + i)] for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/db.sqlite"
        upgrade(url)
        ledger = Ledger(url, Path(tmp) / "journal.jsonl", flush_interval_s=3600, batch_size=10**9)
        ledger.start()
        started = _timed(n, lambda i: ledger.request_started(starts[i]))
        finished = _timed(n, lambda i: ledger.request_finished(timelines[i]))
        sampled = _timed(n, lambda i: ledger.add_samples(samples[i]))
        journal_bytes = sum(p.stat().st_size for p in Path(tmp).glob("journal.jsonl.*"))
        ledger.close(120)

        rows = _timed(n, lambda i: timeline_row(timelines[i]))
        lines = [encode(["t", *timeline_row(t)]) for t in timelines]
        encoded = _timed(n, lambda i: encode(["t", *timeline_row(timelines[i])]))
        fd = os.open(Path(tmp) / "raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        written = _timed(n, lambda i: os.write(fd, lines[i]))
        os.close(fd)
    buf: deque[object] = deque()
    old = _timed(n, lambda i: (buf.append(timelines[i]), len(buf) >= 5000))  # the hand-off before the journal

    print(f"{n} hand-offs of each kind; journal {journal_bytes / 3 / n:.0f} bytes per hand-off on average")
    print(_fmt("request_started", started))
    print(_fmt("request_finished", finished))
    print(_fmt("add_samples (1 sample)", sampled))
    print(_fmt("  part: row + door (timeline_row)", rows))
    print(_fmt("  part: row + JSON line", encoded))
    print(_fmt("  part: write() of the line", written))
    print(_fmt("before the journal: deque append", old))
    timed = {"finished": finished, "started": started, "samples": sampled, "write": written, "old": old}
    p50 = {k: v[len(v) // 2] / 1e3 for k, v in timed.items()}
    ratio = p50["finished"] / p50["old"]
    print(f"request_finished costs {ratio:.0f}x the old hand-off, {p50['finished'] - p50['old']:.2f} us more (p50)")
    print(f"(single run; 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(
        f"RESULT finished_p50_us={p50['finished']:.2f} started_p50_us={p50['started']:.2f} "
        f"samples_p50_us={p50['samples']:.2f} write_p50_us={p50['write']:.2f} old_p50_us={p50['old']:.2f} "
        f"ratio={ratio:.1f}"
    )


if __name__ == "__main__":
    main()
