"""The house's layout, held by tests: which package may import which, no import cycles, and a meter daemon that
loads no request-path module.

Allowed arrows (README, "Layout and development"): ``app -> proxy, meter, sim, common``; ``proxy -> meter,
common``; ``meter -> common``; ``sim -> common``; ``common`` imports none of them. Imports under
``if TYPE_CHECKING:`` are types only and are left out; every other import counts, a function-level one too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "common", "meter", "proxy", "sim")
ALLOWED: dict[str, set[str]] = {
    "app": {"app", "common", "meter", "proxy", "sim"},
    "proxy": {"proxy", "meter", "common"},
    "meter": {"meter", "common"},
    "sim": {"sim", "meter", "common"},  # the offline replay (sim.replay) speaks the meter's pure data types
    "common": {"common"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "pb" not in path.relative_to(ROOT).parts and "migrations" not in path.relative_to(ROOT).parts:
                out[_module_name(path)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The product modules ``module`` imports: the module named, not the packages above it (importing
    ``meter.engine.sql`` runs ``meter/engine/__init__`` too, but the dependency is on ``sql``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: a relative import (joulegate imports absolutely)"
            target = node.module or ""
            # ``from x import y``: the module x.y when y is one, else x
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            for child in ast.iter_child_nodes(node):
                visit(child)
            return
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in known:  # ``from x import y`` where y is not a module: x
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) for m, p in modules.items()}


def test_every_import_follows_an_allowed_arrow() -> None:
    wrong = sorted(
        f"{m} -> {t}"
        for m, targets in _graph().items()
        for t in targets
        if t.split(".")[0] not in ALLOWED[m.split(".")[0]]
    )
    assert wrong == []


def test_the_import_graph_has_no_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    assert cycles == []


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


REQUEST_PATH = ("proxy", "sim", "text_generation", "aiohttp")


def test_the_meter_command_starts_without_the_request_path() -> None:
    """``joulegate meter --help`` (the command's parser, the CLI and the configuration) loads no request-path
    module, no TGIS protobuf and not tenacity (which only the ledger's database retries use, once it runs)."""
    out = _run(
        "import contextlib, io, sys\n"
        "from app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['meter', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import app.commands.meter\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    loaded = out.split()
    assert "app.commands.meter" in loaded and "app.config" in loaded  # the check ran what it says
    assert [m for m in loaded if m.split(".")[0] in (*REQUEST_PATH, "tenacity")] == []


def test_the_meter_daemon_loads_no_request_path_module() -> None:
    """Everything the daemon imports while it runs (``app.commands.meter._serve`` and what it builds) leaves the
    request path out, and the shaping queue's Prometheus metrics unregistered."""
    out = _run(
        "import sys\n"
        "import app.commands.meter, app.commands.serve, app.metering, common.logs\n"
        "import meter.ledger, meter.store.db, meter.store.migrate, meter.reports_api, meter.service\n"
        "import meter.sources.nvml, meter.sources.sim\n"
        "from prometheus_client import REGISTRY\n"
        "names = [n for c in list(REGISTRY._collector_to_names) for n in REGISTRY._collector_to_names[c]]\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
        "print('\\n'.join('metric:' + n for n in names))\n"
    )
    loaded = out.split()
    assert "meter.reports_api" in loaded and "meter.service" in loaded
    assert [m for m in loaded if m.split(".")[0] in REQUEST_PATH] == []
    assert [m for m in loaded if m.startswith("metric:joulegate_shaping")] == []


def test_the_attribution_core_loads_no_io_library() -> None:
    """``meter.attribution`` is a pure function of samples and timelines: importing it (and the error root it raises
    from) loads no gRPC, SQL, HTTP or logging library."""
    loaded = _run("import sys\nimport meter.attribution\nprint('\\n'.join(sorted(sys.modules)))\n").split()
    assert "meter.attribution" in loaded and "common.errors" in loaded
    io = ("grpc", "sqlalchemy", "aiohttp", "structlog", "google", "prometheus_client")
    assert [m for m in loaded if m.split(".")[0] in io] == []
