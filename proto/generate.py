"""Generate the Python protobuf and gRPC modules next to their users (`make proto`).

proto/fmaas/*.proto       -> proxy/pb/fmaas/
proto/joulegate/v1/*.proto -> meter/pb/joulegate/v1/

The descriptors keep their short file names (``fmaas/generation.proto``) so reflection shows clean names; the
absolute imports grpcio-tools writes (``from fmaas import ...``) are rewritten to the package they live in.
``--out DIR`` writes the tree under DIR instead of the repository, which is how the staleness test compares.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# proto package directory -> Python package that holds its generated modules
TARGETS = {"fmaas": "proxy.pb", "joulegate": "meter.pb"}


def _protoc_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under proto/ into ``out_root``; return the files written."""
    written: list[Path] = []
    for proto_top, py_pkg in TARGETS.items():
        protos = sorted((PROTO_DIR / proto_top).rglob("*.proto"))
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_DIR}",
                f"-I{_protoc_include()}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[str(p.relative_to(PROTO_DIR)) for p in protos],
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {proto_top}")
            dest_pkg = out_root / Path(*py_pkg.split("."))
            for src in sorted(Path(tmp).rglob("*.py*")):
                rel = src.relative_to(tmp)
                text = src.read_text()
                text = re.sub(rf"^from {proto_top}(\.| )", rf"from {py_pkg}.{proto_top}\1", text, flags=re.M)
                dest = dest_pkg / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text)
                written.append(dest)
            # every generated directory is a package
            for d in {p.parent for p in written if p.is_relative_to(dest_pkg)} | {dest_pkg}:
                while d.is_relative_to(dest_pkg):
                    init = d / "__init__.py"
                    if not init.exists():
                        init.write_text("")
                    written.append(init)
                    d = d.parent
    return sorted(set(written))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write the packages under")
    args = parser.parse_args()
    if args.out == ROOT:
        for py_pkg in TARGETS.values():
            for sub in (ROOT / Path(*py_pkg.split("."))).iterdir():
                if sub.is_dir() and sub.name != "__pycache__":
                    shutil.rmtree(sub)
    for path in generate(args.out):
        print(path.relative_to(args.out), file=sys.stderr)


if __name__ == "__main__":
    main()
