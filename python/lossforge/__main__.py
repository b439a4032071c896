"""Command line: `lossforge bench [...]` (also `python -m lossforge bench`), `lossforge info`."""
import json
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: lossforge {bench,info} [options]\n  bench  the side-by-side benchmark report"
              " (lossforge bench --help)\n  info   what this build of lossforge was compiled with")
        return 0
    if argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[0] == "info":
        import lossforge

        print(json.dumps(lossforge.build_info(), indent=2))
        return 0
    print(f"lossforge: unknown command {argv[0]!r} (expected bench or info)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
