"""Command line: `lossforge {bench,info}` (also `python -m lossforge ...`), `lossforge --version`."""
from __future__ import annotations

import argparse
import json
import sys

from ._version import __version__

USAGE = """\
lossforge [-h] [--version] {bench,info} ...

commands:
  bench   the side-by-side benchmark report: lossforge against each baseline, same inputs, same run;
          writes bench/results/latest-<device>.md and .png (lossforge bench --help for the options)
  info    what this build of lossforge was compiled with (JSON)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="lossforge", usage=USAGE, add_help=True,
                                     description="Fast, exact PyTorch kernels for training-time losses.")
    parser.add_argument("--version", action="version", version=f"lossforge {__version__}")
    parser.add_argument("command", nargs="?", choices=("bench", "info"), help=argparse.SUPPRESS)
    # everything after the command goes to it (`lossforge bench --help` is the bench's help)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in ("bench", "info"):
        command, rest = argv[0], argv[1:]
    else:
        ns = parser.parse_args(argv)  # -h / --version / an unknown command: prints and exits
        command, rest = ns.command, ns.args
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"info takes no arguments, got {' '.join(rest)}")
    from ._ops import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
