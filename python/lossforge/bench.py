"""`lossforge bench`: the side-by-side report, ours against each baseline on the same inputs, same run.

Each family contributes `lossforge.benchmarks.<family>.cases(device, full) -> list[Case]`. The runner
first checks every case (every implementation must agree with ours) and measures the peak extra memory
of one call of each implementation (CUDA: the caching allocator's peak; CPU: the process's peak
resident set, reset before each call through /proc/self/clear_refs, with malloc told to return large
blocks to the OS so that the number is the real peak). Then it times them: the implementations of a
case take turns (median of repeats after a warm-up, CUDA synchronised inside the timed call), with
malloc's usual reuse of freed blocks. It prints one table and writes the same as Markdown and a PNG
chart under bench/results/.

A baseline whose package is missing (POT, topolosses, ...) raises ImportError (MissingBaseline) when
called: the runner drops that baseline's rows, says so in the notes, and keeps the other rows.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib
import logging
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

FAMILIES = ("stablemax", "sliced_wasserstein", "betti_matching", "mfac", "pamc")
DEFAULT_OUT = os.path.join("bench", "results")


class MissingBaseline(ImportError):
    """Raised by a baseline whose optional package is not installed; the message says what to install."""


@dataclasses.dataclass
class Case:
    """One shape of one op: implementations keyed by name; `ours` names lossforge's entry.

    `setup(device)` builds the inputs once and returns them; each impl is called as impl(*inputs).
    `check(results)` receives {impl: output} and raises if an implementation disagrees with ours.
    `floor_ms`, when given, is the kernel's floor on this device (bytes over bandwidth or flops over
    rate) and is printed next to our time.
    """

    family: str
    op: str
    shape: str
    impls: dict[str, Callable]
    setup: Callable[[str], tuple]
    ours: str = "lossforge"
    check: Callable[[dict], None] | None = None
    floor_ms: float | None = None
    note: str = ""
    missing: dict[str, str] = dataclasses.field(default_factory=dict)  # baselines dropped: name -> why


@dataclasses.dataclass
class Row:
    family: str
    op: str
    shape: str
    impl: str
    ms: float
    peak_mb: float | None
    is_ours: bool
    floor_ms: float | None = None


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mallopt(mmap_threshold: int, trim_threshold: int, trim_now: bool = False) -> None:
    """glibc's malloc settings (no-op elsewhere). Timing runs with glibc's steady state: blocks up to
    32 MiB are reused from the heap (as after its dynamic threshold has grown), not mapped afresh and
    page-faulted on every call. Peak memory is measured with large blocks mapped and returned to the OS
    on free, and the heap trimmed first, so that the resident-set peak is the call's real peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
        if trim_now:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _malloc_for_timing() -> None:
    _mallopt(32 << 20, 64 << 20)


def _malloc_for_peak() -> None:
    _mallopt(1 << 16, 1 << 16, trim_now=True)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_extra_mb(fn: Callable, device: str) -> float | None:
    """Peak memory allocated by one call of fn beyond what existed before it, in MiB."""
    gc.collect()
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    out = fn()
    peak = _rss_kb("VmHWM") - before
    del out
    return max(peak, 0) / 1024


def _timed(fn: Callable, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def time_ms(fn: Callable, device: str, budget_s: float = 1.0, max_reps: int = 20) -> float:
    """Median wall time of fn in milliseconds: one warm-up, then repeats within the budget."""
    return time_interleaved_ms({"fn": fn}, device, budget_s, max_reps)["fn"]


def time_interleaved_ms(calls: dict[str, Callable], device: str, budget_s: float = 1.0,
                        max_reps: int = 20) -> dict[str, float]:
    """Median wall time of each call in milliseconds: one warm-up each, then rounds in which every call
    that has not used its budget runs once. The calls take turns so that a change in a shared machine's
    load falls on all of them alike, which keeps their ratios steadier than timing one after another."""
    for fn in calls.values():
        fn()
        _sync(device)
    times = {name: [_timed(fn, device)] for name, fn in calls.items()}
    reps = {name: int(max(1, min(max_reps, budget_s / max(t[0], 1e-6)))) for name, t in times.items()}
    for _ in range(max(reps.values()) - 1):
        for name, fn in calls.items():
            if len(times[name]) < reps[name]:
                times[name].append(_timed(fn, device))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


_BANDWIDTH: dict[str, float] = {}


def measured_bandwidth_gbs(device: str) -> float:
    """Memory bandwidth of this device measured now (GB/s), the better of a streaming read (a sum)
    and a copy (which reads and writes its bytes once each), over 1 GiB so that no cache holds it.
    Families use it to state each kernel's floor (bytes moved / bandwidth)."""
    if device not in _BANDWIDTH:
        src = torch.ones(1 << 28, device=device)  # 1 GiB of float32
        nbytes = src.numel() * 4
        read = nbytes / (time_ms(lambda: src.sum(), device, budget_s=0.5) * 1e-3)
        dst = torch.empty_like(src)
        copy = 2 * nbytes / (time_ms(lambda: dst.copy_(src), device, budget_s=0.5) * 1e-3)
        _BANDWIDTH[device] = max(read, copy) / 1e9
        del src, dst
    return _BANDWIDTH[device]


def floor_ms(bytes_moved: float, device: str) -> float:
    """The memory-bound floor of a kernel that must move `bytes_moved` bytes, in milliseconds."""
    return bytes_moved / (measured_bandwidth_gbs(device) * 1e9) * 1e3


def check_and_measure_memory(case: Case, device: str) -> dict[str, float | None]:
    """Checks every implementation against ours (a wrong one is not timed), then measures the peak extra
    memory of one call of each (malloc in its measuring mode: see _mallopt). A baseline that raises
    ImportError (its package is missing) is removed from case.impls and listed in case.missing."""
    _malloc_for_peak()
    inputs = case.setup(device)
    results = {}
    for name, impl in list(case.impls.items()):
        try:
            results[name] = impl(*inputs)
        except ImportError as e:
            if name == case.ours:
                raise
            case.missing[name] = str(e) or type(e).__name__
            del case.impls[name]
    if case.check is not None:
        case.check(results)
    del results
    peaks = {}
    for name, impl in case.impls.items():
        _malloc_for_peak()
        peaks[name] = peak_extra_mb(functools.partial(impl, *inputs), device)
    del inputs
    gc.collect()
    return peaks


def time_case(case: Case, device: str, budget_s: float, peaks: dict[str, float | None]) -> list[Row]:
    """Times every implementation of a case (malloc in its timing mode) and returns the report's rows."""
    _malloc_for_timing()
    inputs = case.setup(device)
    ms = time_interleaved_ms({name: functools.partial(impl, *inputs) for name, impl in case.impls.items()}, device,
                             budget_s)
    del inputs
    gc.collect()
    return [Row(case.family, case.op, case.shape, name, ms[name], peaks[name], name == case.ours, case.floor_ms)
            for name in case.impls]


def pytest_benchmark(benchmark, case: Case, impl: str, device: str):
    """Times one implementation of one Case with pytest-benchmark (the suites under bench/)."""
    inputs = case.setup(device)
    fn = case.impls[impl]

    def call():
        out = fn(*inputs)
        _sync(device)
        return out

    try:
        call()  # the warm-up
    except ImportError as e:  # a missing optional baseline: skipped, like its rows in `lossforge bench`
        if impl == case.ours:
            raise
        import pytest

        pytest.skip(f"baseline {impl!r}: {e}")
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["impl"] = impl
    benchmark.pedantic(call, rounds=3, warmup_rounds=0, iterations=1)


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[Row]) -> list[list[str]]:
    """One line per (op, shape, baseline): baseline time, ours, speed-up, both peaks."""
    out = []
    keys = []
    for r in rows:
        if (r.family, r.op, r.shape) not in keys:
            keys.append((r.family, r.op, r.shape))
    for key in keys:
        group = [r for r in rows if (r.family, r.op, r.shape) == key]
        ours = next((r for r in group if r.is_ours), None)
        for r in group:
            if r.is_ours or ours is None:
                continue
            out.append([
                key[0], key[1], key[2], r.impl, _fmt(r.ms), _fmt(ours.ms), f"{r.ms / ours.ms:.1f}x",
                _fmt(r.peak_mb, 1), _fmt(ours.peak_mb, 1), _fmt(ours.floor_ms, 3),
            ])
    return out


HEADER = ["family", "op", "shape", "baseline", "baseline ms", "ours ms", "speed-up", "baseline peak MB",
          "ours peak MB", "floor ms"]


def format_text(lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(HEADER)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*HEADER), fmt.format(*["-" * w for w in widths])] + [fmt.format(*l) for l in lines])


def format_markdown(lines: list[list[str]], machine: str, command: str, notes: list[str] = ()) -> str:
    md = ["# lossforge bench", "", f"- machine: {machine}", f"- date: {datetime.date.today()}",
          f"- command: `{command}`", "- peak MB: extra memory at the peak of one call (CPU: resident set; "
          "CUDA: allocator)", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(l) + " |" for l in lines]
    if notes:
        md += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(md) + "\n"


def plot(lines: list[list[str]], path: str, machine: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install lossforge[bench])", file=sys.stderr)
        return False
    labels = [f"{l[1]} {l[2]}\nvs {l[3]}" for l in lines]
    speedups = [float(l[6].rstrip("x")) for l in lines]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(lines) + 1.5))
    ax.barh(range(len(lines)), speedups, color="tab:blue")
    ax.set_yticks(range(len(lines)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of lossforge over the baseline (log scale)")
    ax.set_title(f"lossforge bench: {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class _DropNoCudaRuntime(logging.Filter):
    """torch.compile's C++ builder imports torch.utils.cpp_extension, which warns "No CUDA runtime is found"
    whenever CUDA_HOME is set on a machine without a GPU: noise for a CPU benchmark."""

    def filter(self, record):
        return not str(record.msg).startswith("No CUDA runtime is found")


class Progress:
    """Progress with an ETA (the caller's estimate): a tqdm bar under the step lines when tqdm is installed
    and stderr is a terminal, else one line per step with the step count, the elapsed time and the ETA."""

    def __init__(self, total: int, file=None):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.file = file or sys.stderr
        self.bar = None
        if self.file.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.file, dynamic_ncols=True,
                                bar_format="{percentage:3.0f}%|{bar}| {n}/{total} steps [{elapsed} elapsed, {postfix}]")

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def start(self, label: str, eta_s: float | None) -> None:
        eta = "ETA " + ("?" if eta_s is None else self._clock(eta_s))
        if self.bar is not None:
            self.bar.write(f"  {label}", file=self.file)
            self.bar.set_postfix_str(eta)
        else:
            elapsed = self._clock(time.perf_counter() - self.t0)
            print(f"  [{self.done + 1}/{self.total} {elapsed} elapsed, {eta}] {label}", file=self.file, flush=True)

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def drop(self, n: int) -> None:
        """n planned steps will not run."""
        self.total -= n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.file)
        else:
            print(msg, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lossforge bench", description=__doc__.splitlines()[0],
        epilog="Optional baselines (POT, the topolosses build) and the progress bar (tqdm) and chart "
               "(matplotlib): pip install 'lossforge[bench]' and `pip install --no-deps topolosses`; a missing "
               "baseline leaves out only its own rows.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--full", action="store_true", help="the papers' sizes (slow on a CPU)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per implementation")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder for the report, relative to the current directory (default: %(default)s)")
    parser.add_argument("--name", default=None,
                        help="report file stem: writes <out>/<name>.md and .png (default: latest-<device>)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    _malloc_for_timing()
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropNoCudaRuntime) for f in cpp_extension_log.filters):
        cpp_extension_log.addFilter(_DropNoCudaRuntime())
    import lossforge  # noqa: F401  (loads the ops)

    machine = machine_description(args.device)
    machine += f", measured memory bandwidth {measured_bandwidth_gbs(args.device):.1f} GB/s"
    print(f"lossforge bench on {machine}", flush=True)
    rows: list[Row] = []
    notes: list[str] = []
    failed = 0

    cases = [case for family in args.family or FAMILIES
             for case in importlib.import_module(f"lossforge.benchmarks.{family}").cases(args.device, args.full)]
    progress = Progress(2 * len(cases))
    missing: dict[str, str] = {}  # baseline -> why it is missing

    def fail(case, e):
        nonlocal failed
        failed += 1
        notes.append(f"FAILED {case.family} {case.op} {case.shape}: {type(e).__name__}: {e}")
        progress.write(f"  FAILED: {type(e).__name__}: {e}")
        gc.collect()

    # Two passes: every case is checked and its memory measured first, then all are timed. Memory from a
    # timing pass stays in malloc's per-thread arenas, where a later peak measurement would reuse it.
    # ETA: a case's check pass makes about two calls of each implementation (c seconds); its timing pass
    # one warm-up call each, then repeats until the budget or 20 calls: about c/2 + min(n budget, 19 c/2).
    checked_s: list[float] = []
    predicted: dict[int, float] = {}

    def predict(case, c):
        if len(case.impls) < 2:  # no baseline left: not timed
            return 0.0
        return c / 2 + min(len(case.impls) * args.budget, 19 * c / 2)

    measured = []
    for i, case in enumerate(cases):
        eta = None
        if checked_s:
            per_case = statistics.mean(checked_s) + (statistics.mean(predicted.values()) if predicted else 0.0)
            eta = (len(cases) - i) * per_case + sum(predicted.values())
        progress.start(f"{case.family}: {case.op} {case.shape}: check, memory ...", eta)
        t0 = time.perf_counter()
        try:
            measured.append((case, check_and_measure_memory(case, args.device)))
            predicted[id(case)] = predict(case, time.perf_counter() - t0)
        except Exception as e:  # a failed check or a crash: report it, keep the other rows
            fail(case, e)
        checked_s.append(time.perf_counter() - t0)
        for name, why in case.missing.items():
            if name not in missing:
                missing[name] = why
                progress.write(f"  skipping baseline {name!r}: {why}")
        progress.step()
    progress.drop(len(cases) - len(measured))  # failed cases are not timed
    timed_s, timed_predicted = 0.0, 0.0
    for j, (case, peaks) in enumerate(measured):
        left = sum(predicted[id(c)] for c, _ in measured[j:])
        progress.start(f"{case.family}: {case.op} {case.shape}: time ...",
                       left * (timed_s / timed_predicted if timed_predicted > 0 else 1.0))
        t0 = time.perf_counter()
        if len(case.impls) > 1:  # only ours left (its baselines are missing): no row to time
            try:
                rows.extend(time_case(case, args.device, args.budget, peaks))
            except Exception as e:
                fail(case, e)
            else:
                if case.note:
                    notes.append(f"{case.family} {case.op} {case.shape}: {case.note}")
            timed_s += time.perf_counter() - t0
            timed_predicted += predicted[id(case)]
        progress.step()
    progress.close()
    notes += [f"no rows for baseline {name!r}: {why}" for name, why in missing.items()]
    lines = table(rows)
    print()
    print(format_text(lines))
    for note in notes:
        print(f"note: {note}")
    os.makedirs(args.out, exist_ok=True)
    stem = args.name or f"latest-{args.device.split(':')[0]}"
    command = "lossforge bench " + " ".join(argv if argv is not None else sys.argv[2:])
    written = [os.path.join(args.out, stem + ".md")]
    with open(written[0], "w") as f:
        f.write(format_markdown(lines, machine, command.strip(), notes))
    if plot(lines, os.path.join(args.out, stem + ".png"), machine):
        written.append(os.path.join(args.out, stem + ".png"))
    print("\nwrote " + " and ".join(written))
    return 1 if failed else 0
