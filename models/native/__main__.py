"""`python -m models.native build OUT [--march M]`: compile the native kernels ahead of time (the
CPU image does, for x86-64-v3), to be loaded through LETTERREC_NATIVE_LIB; see __init__.py."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from models.native import _build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.native")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the kernels into a shared library")
    b.add_argument("out", type=Path)
    b.add_argument("--march", default="native", help="the compiler's -march (default: native)")
    args = p.parse_args(argv)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (set CC or install one)")
    _build(compiler, args.out, args.march)
    print(args.out)


if __name__ == "__main__":
    main()
