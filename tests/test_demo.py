"""``joulegate demo`` — the README's first command — runs as ``make demo`` runs it, and what it prints adds up.

One short run (3 s of traffic) serves every test here: its output has the README block's shape, line for line
(numbers, ports and paths aside), and its energy report balances: per tenant prefill + decode = total and the tenants
sum to the total row; per backend the counter = attributed + idle with no conservation error; what the backends
attributed is what the tenants were billed; every request and token the gateway served is in the bill.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
# Each figure is printed to 0.1 J: a sum of n printed figures is off the printed sum by at most n x 0.05 J.
ROUNDING_J = 0.05


def _within(a: float, b: float, bound: float) -> bool:
    """|a - b| <= bound for figures printed to 0.1, in whole hundredths (so 0.1000000000001 is 0.1)."""
    return round(abs(a - b) * 100) <= round(bound * 100)


def _shape(text: str) -> list[list[str]]:
    """Each line's words with every number as '#': what stays the same from run to run."""
    return [NUMBER.sub("#", line).split() for line in text.strip().splitlines()]


def _readme_demo() -> str:
    match = re.search(r"```\n\$ make demo\n(.*?)```", README.read_text(), re.S)
    assert match, "README has no `$ make demo` block"
    return match.group(1)


@dataclass(frozen=True)
class Demo:
    output: str  # what it printed
    db_url: str  # the SQLite database it left behind


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """``joulegate demo --seconds 3``: the installed console script (as ``make demo`` runs it), in a process of its
    own (the demo sets up logging for its whole process), with none of the developer's settings."""
    joulegate = Path(sys.executable).parent / "joulegate"
    assert joulegate.exists(), f"{joulegate} is missing: install the project (make venv)"
    workdir = tmp_path_factory.mktemp("demo")
    run = subprocess.run(
        [str(joulegate), "demo", "--dir", ".demo", "--seconds", "3"],
        cwd=workdir,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return Demo(run.stdout, f"sqlite:///{workdir / '.demo' / 'joulegate.db'}")


def test_the_readme_demo_output_is_what_the_demo_prints(demo: Demo) -> None:
    assert _shape(demo.output) == _shape(_readme_demo()), f"the demo printed:\n{demo.output}"


def _numbers(line: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(line)]


def _section(text: str, heading: str) -> list[str]:
    """The indented lines under the line that starts with ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        out.append(line.strip())
    return out


def test_the_demo_energy_report_balances(demo: Demo) -> None:
    demo_output = demo.output
    traffic = {line.split()[0]: _numbers(line) for line in _section(demo_output, "what the gateway did")}
    table = _section(demo_output, "energy per tenant")
    assert table[0].split()[0] == "tenant"
    # tenant, requests, tokens, prefill J, decode J, total J, Wh, J/token, gCO2e
    tenants = {line.split()[0]: _numbers(line) for line in table[1:]}
    total = tenants.pop("total")
    assert set(tenants) == {"acme", "globex"}, demo_output
    for name, (_requests, _tokens, prefill_j, decode_j, total_j, *_rest) in tenants.items():
        assert _within(prefill_j + decode_j, total_j, 2 * ROUNDING_J), (name, prefill_j, decode_j, total_j)
    for column in (0, 1):  # requests and tokens: integers, exact
        assert sum(t[column] for t in tenants.values()) == total[column]
    for column in (2, 3, 4):
        assert _within(sum(t[column] for t in tenants.values()), total[column], 3 * ROUNDING_J), column

    # What the gateway served is what was billed: acme's streams, globex's jobs of 4 texts, and their tokens.
    acme_streams, acme_tokens = traffic["acme"][:2]
    globex_jobs, texts_per_job, globex_tokens = traffic["globex"][:3]
    assert (tenants["acme"][0], tenants["acme"][1]) == (acme_streams, acme_tokens)
    assert (tenants["globex"][0], tenants["globex"][1]) == (globex_jobs * texts_per_job, globex_tokens)

    # Per backend: counter = attributed + idle + the adjustment booked for requests already final, conservation
    # error 0 mJ, no gaps.
    lines = _section(demo_output, "conservation per backend")
    backends = [_numbers(line) for line in lines]
    assert sorted(line.split()[0] for line in lines) == ["tgi-0", "tgi-1"], lines
    for b in backends:
        # tgi-N: N, counter J, attributed J, idle J, adjustment J, error mJ, samples, gaps
        _n, counter_j, attributed_j, idle_j, adjusted_j, error_mj, samples, gaps = b
        assert _within(attributed_j + idle_j + adjusted_j, counter_j, 4 * ROUNDING_J), b
        assert error_mj == 0 and gaps == 0 and samples > 10, b
    # With idle policy NONE the tenants are billed exactly what the backends attributed to their requests.
    assert "IDLE_POLICY_NONE" in demo_output
    attributed_j = sum(b[2] for b in backends)
    assert _within(attributed_j, total[4], (len(backends) + 1) * ROUNDING_J), (attributed_j, total[4])
    assert demo_output.rstrip().endswith("conservation holds to the millijoule on every backend")


def test_shape_keeps_words_and_drops_numbers() -> None:
    assert _shape("  acme   57 streams, TTFT p50 15.9 ms, error -0.6 %") == [
        ["acme", "#", "streams,", "TTFT", "p#", "#", "ms,", "error", "#", "%"]
    ]
    assert _shape("a 1 b") != _shape("a 1 c")
