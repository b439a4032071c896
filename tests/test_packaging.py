"""Packaging and the command line: one version source, `lossforge --version` / `--help`, the import-time
warning when torch sees a GPU but the CUDA kernels are missing, and `lossforge bench`'s handling of a
missing optional baseline, of a missing matplotlib and its progress lines."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

import lossforge
from lossforge import __main__ as cli
from lossforge import _ops, bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- version and command line ------------------------------------------------------------------------

def test_one_version_source():
    """pyproject.toml takes the version from lossforge/_version.py; the installed metadata agrees."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lossforge._version.__version__"}
    assert importlib.metadata.version("lossforge") == lossforge.__version__


def test_py_typed_and_license_are_packaged():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["lossforge"]
    assert os.path.exists(os.path.join(os.path.dirname(lossforge.__file__), "py.typed"))
    assert meta["project"]["license"] == "MIT" and meta["project"]["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "MIT License" in f.read()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"lossforge {lossforge.__version__}"


def test_python_m_lossforge_version():
    out = subprocess.run([sys.executable, "-m", "lossforge", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == f"lossforge {lossforge.__version__}"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("bench", "info", "--version"):
        assert command in out
    assert cli.main([]) == 0  # no command: the same help
    assert "bench" in capsys.readouterr().out


def test_unknown_command_fails(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["benchmark"])
    assert e.value.code == 2
    assert "invalid choice: 'benchmark'" in capsys.readouterr().err


def test_bench_help_shows_output_folder(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"(default: {os.path.join('bench', 'results')})" in out


# ---- the import-time warning ---------------------------------------------------------------------------

@pytest.fixture
def gpu_without_kernels(monkeypatch):
    """torch sees a GPU; lossforge was built without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ops._build_config, "WITH_CUDA", False)
    monkeypatch.setattr(_ops._build_config, "CUDA_SKIPPED_REASON", "FORCE_CUDA=0 at build time", raising=False)
    monkeypatch.setattr(_ops, "_cuda_error", None)
    monkeypatch.setattr(_ops, "_warned_cuda_missing", False)


def test_warns_once_when_gpu_but_no_cuda_build(gpu_without_kernels, recwarn):
    _ops._warn_if_cuda_missing()
    _ops._warn_if_cuda_missing()
    found = [w for w in recwarn if issubclass(w.category, _ops.CUDAKernelsMissingWarning)]
    assert len(found) == 1
    msg = str(found[0].message)
    assert "built without its CUDA kernels (FORCE_CUDA=0 at build time)" in msg
    assert "FORCE_CUDA=1" in msg and "CUDA_HOME" in msg
    assert issubclass(_ops.CUDAKernelsMissingWarning, UserWarning)


def test_warns_with_the_load_error(gpu_without_kernels, monkeypatch):
    monkeypatch.setattr(_ops._build_config, "WITH_CUDA", True)
    monkeypatch.setattr(_ops, "_cuda_error", "libcudart.so.13: cannot open shared object file")
    with pytest.warns(_ops.CUDAKernelsMissingWarning, match="failed to load: libcudart.so.13: cannot open"):
        _ops._warn_if_cuda_missing()


@pytest.mark.parametrize("case", ["no GPU", "kernels loaded", "CPU-only torch"])
def test_no_warning_otherwise(gpu_without_kernels, monkeypatch, recwarn, case):
    if case == "no GPU":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    elif case == "kernels loaded":
        monkeypatch.setattr(_ops._build_config, "WITH_CUDA", True)
    else:
        monkeypatch.setattr(torch.version, "cuda", None)
    _ops._warn_if_cuda_missing()
    assert not [w for w in recwarn if issubclass(w.category, _ops.CUDAKernelsMissingWarning)]


def test_import_warns(tmp_path):
    """The check runs when lossforge is imported (a fresh interpreter, GPU and build faked before it)."""
    code = (
        "import warnings, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.version.cuda = '13.0'\n"
        "import sys, types\n"
        "b = sys.modules['lossforge._build_config'] = types.ModuleType('lossforge._build_config')\n"
        "b.TORCH_VERSION, b.TORCH_TARGET_VERSION, b.CUDA_VERSION, b.CUDA_ARCH_LIST = '2.10', '2.10', None, None\n"
        "b.WITH_CUDA, b.CUDA_SKIPPED_REASON = False, 'faked'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import lossforge\n"
        "print([str(x.message) for x in w if type(x.message).__name__ == 'CUDAKernelsMissingWarning'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.count("built without its CUDA kernels (faked)") == 1, out.stdout


# ---- lossforge bench: missing baselines, what it writes, progress ------------------------------------------

def _fake_cases(device, full=False):
    """Two cases: ours, a working baseline and one whose package is missing; ours and the missing one."""
    def setup(device):
        return (torch.arange(6.0, device=device),)

    def missing(x):
        import lossforge_no_such_package  # noqa: F401

    def check(results):
        for name, out in results.items():
            torch.testing.assert_close(out, results["lossforge"], msg=f"{name} disagrees")

    return [bench.Case("fake", "double", "n=6", {"lossforge": lambda x: 2 * x, "x + x": lambda x: x + x,
                                                 "needs a package": missing}, setup, check=check),
            bench.Case("fake", "triple", "n=6", {"lossforge": lambda x: 3 * x, "needs a package": missing},
                       setup, check=check)]


def _fake_family(monkeypatch):
    module = types.ModuleType("lossforge.benchmarks.fake")
    module.cases = _fake_cases
    monkeypatch.setitem(sys.modules, "lossforge.benchmarks.fake", module)
    monkeypatch.setattr(bench, "FAMILIES", ("fake",))
    monkeypatch.setitem(bench._BANDWIDTH, "cpu", 10.0)  # skip measuring 1 GiB copies


def test_bench_missing_baseline_drops_only_its_rows(monkeypatch, tmp_path, capsys, caplog):
    _fake_family(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no matplotlib: no chart
    rc = bench.main(["--budget", "0.001", "--out", str(tmp_path), "--name", "r"])
    # torch.compile's C++ builder logs this whenever CUDA_HOME is set without a GPU: the bench drops it
    log = logging.getLogger("torch.utils.cpp_extension")
    log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
    log.warning("another cpp_extension warning")
    assert "No CUDA runtime" not in caplog.text and "another cpp_extension warning" in caplog.text
    captured = capsys.readouterr()
    assert rc == 0, captured
    report = (tmp_path / "r.md").read_text()
    assert "| fake | double | n=6 | x + x |" in report  # the other baseline's row stays
    assert "| needs a package |" not in report and "| triple |" not in report
    assert "no rows for baseline 'needs a package': No module named 'lossforge_no_such_package'" in report
    assert "FAILED" not in report
    # progress: a line per step (stderr is not a terminal here) with an ETA, and the skipped baseline
    assert "  [1/4 0:00 elapsed, ETA ?] fake: double n=6: check, memory ..." in captured.err
    assert "] fake: triple n=6: time ..." in captured.err
    assert "skipping baseline 'needs a package'" in captured.err
    # only what was written is reported as written
    assert not (tmp_path / "r.png").exists()
    assert f"wrote {tmp_path / 'r.md'}\n" in captured.out and ".png" not in captured.out


def test_pytest_benchmark_skips_missing_baseline():
    """The pytest-benchmark suites (bench/) skip a missing baseline instead of failing."""
    class Benchmark:
        extra_info: dict = {}

        def pedantic(self, fn, **kwargs):
            self.out = fn()

    case = _fake_cases("cpu")[0]
    with pytest.raises(pytest.skip.Exception, match="baseline 'needs a package': No module named"):
        bench.pytest_benchmark(Benchmark(), case, "needs a package", "cpu")
    b = Benchmark()
    bench.pytest_benchmark(b, case, "x + x", "cpu")
    torch.testing.assert_close(b.out, 2 * torch.arange(6.0))


def test_sliced_wasserstein_without_pot_keeps_other_rows(monkeypatch):
    """Without POT, the sliced Wasserstein cases keep ours and the torch recipe; only the POT rows go."""
    from lossforge.benchmarks import sliced_wasserstein as sw

    monkeypatch.setitem(sys.modules, "ot", None)  # `import ot` raises ImportError
    monkeypatch.setitem(bench._BANDWIDTH, "cpu", 10.0)
    case = sw._sw_cases(2, 32, 3, 8, "cpu", pot=True)[0]
    assert any(name.startswith("POT") for name in case.impls)
    peaks = bench.check_and_measure_memory(case, "cpu")
    assert set(case.impls) == {"lossforge", "torch recipe (bmm + sort + pow)"} == set(peaks)
    assert all("pip install pot" in why for why in case.missing.values()) and len(case.missing) == 2
    rows = bench.time_case(case, "cpu", 0.001, peaks)
    assert [r.impl for r in rows] == ["lossforge", "torch recipe (bmm + sort + pow)"]


def test_progress_lines_without_tqdm(monkeypatch):
    """Without tqdm (or without a terminal) each step prints a line with the step count and an ETA."""
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setitem(sys.modules, "tqdm", None)
    out = Tty()
    p = bench.Progress(3, file=out)
    assert p.bar is None
    p.start("a", None)
    p.step()
    p.start("b", 65.4)
    p.drop(1)
    lines = out.getvalue().splitlines()
    assert lines == ["  [1/3 0:00 elapsed, ETA ?] a", "  [2/3 0:00 elapsed, ETA 1:05] b"]
    assert p.total == 2
