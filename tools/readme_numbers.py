#!/usr/bin/env python3
"""Regenerate the measured numbers in README.md and docs/*.md from the committed bench/results/*.md.

The numbers live only in bench/results/ (written by `lossforge bench`); the README and the docs pages
carry generated copies between markers, so they cannot drift apart:

    <!-- numbers:begin -->                                       the README summary of latest-cpu.md
    <!-- numbers:begin source=pamc-cpu-full family=pamc -->     every row of one report for one family
    ...generated...
    <!-- numbers:end -->

    python tools/readme_numbers.py          rewrite the blocks in place
    python tools/readme_numbers.py --check  exit 1 if a block is out of date (tests/test_docs.py runs this)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- numbers:begin(?P<spec>[^>]*?)-->\n)(?P<body>.*?)(<!-- numbers:end -->)", re.S)
DEFAULT_SPEC = "source=latest-cpu style=summary"


def parse_results(path: Path) -> dict:
    """One `lossforge bench` report: its header fields, its table rows (dicts by column) and its notes."""
    meta, rows, notes, header = {}, [], [], None
    for line in path.read_text().splitlines():
        if line.startswith("- ") and not rows and ": " in line:
            key, value = line[2:].split(": ", 1)
            meta[key] = value
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(cells[0]) <= {"-"}:
                rows.append(dict(zip(header, cells)))
        elif line.startswith("- ") and rows:
            notes.append(line[2:])
    if header is None:
        raise ValueError(f"{path}: no table")
    for row in rows:  # an internal label in older reports' shapes
        row["shape"] = re.sub(r"^goal ", "", row["shape"])
    return {"meta": meta, "rows": rows, "notes": notes, "name": path.stem}


def _intro(res: dict) -> str:
    meta = res["meta"]
    return (f"Measured with {meta.get('command', '`lossforge bench`')} on {meta.get('date', '?')}: "
            f"{meta.get('machine', '?')}. Medians of one call in ms; peak MB is the extra memory at the "
            f"peak of one call (CPU: resident set; CUDA: allocator). The machine is shared with other jobs: "
            f"compare within a row. Source: `bench/results/{res['name']}.md`.")


def _summary(res: dict) -> list[str]:
    """One row per (op, shape): our time and memory, and the speed-up against each baseline."""
    groups: dict[tuple, list[dict]] = {}
    for row in res["rows"]:
        groups.setdefault((row["op"], row["shape"]), []).append(row)
    out = ["| family | op | shape | ours ms | ours peak MB | speed-up against each baseline (baseline ms) |",
           "|---|---|---|---|---|---|"]
    for (op, shape), rows in groups.items():
        against = "; ".join(f"**{r['speed-up']}** {r['baseline']} ({r['baseline ms']})" for r in rows)
        out.append(f"| {rows[0]['family']} | {op} | {shape} | {rows[0]['ours ms']} | {rows[0]['ours peak MB']} "
                   f"| {against} |")
    return out


def _full(res: dict, family: str | None) -> list[str]:
    cols = ["op", "shape", "baseline", "baseline ms", "ours ms", "speed-up", "baseline peak MB",
            "ours peak MB", "floor ms"]
    rows = [r for r in res["rows"] if family is None or r["family"] == family]
    if not rows:
        raise ValueError(f"bench/results/{res['name']}.md has no rows of family {family!r}")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(c, "-") for c in cols) + " |" for r in rows]
    notes = [n for n in res["notes"] if family is None or n.startswith(family + " ")]
    if notes:
        out += ["", "Notes from the report:", ""] + [f"- {n.removeprefix((family or '') + ' ')}" for n in notes]
    out += ["", "floor ms: the time to move the op's minimum bytes at the measured bandwidth."]
    return out


def render(spec: str, results_dir: Path = RESULTS) -> str:
    opts = dict(kv.split("=", 1) for kv in (spec.strip() or DEFAULT_SPEC).split())
    res = parse_results(results_dir / f"{opts['source']}.md")
    body = _summary(res) if opts.get("style") == "summary" else _full(res, opts.get("family"))
    return "\n".join([_intro(res), ""] + body) + "\n"


def update_text(text: str, results_dir: Path = RESULTS) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec"), results_dir) + m.group(4), text)


def documents() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date blocks (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for path in documents():
        text = path.read_text()
        new = update_text(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("out of date (run python tools/readme_numbers.py):", *map(str, stale), file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale else "all numbers blocks are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
