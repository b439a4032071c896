"""Every example's --quick mode runs to completion and prints its summary line (examples/README.md)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ("stablemax_grokking", "sliced_wasserstein_autoencoder", "betti_matching_segmentation",
            "mfac_optimizer", "pamc_clustering")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick(name, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "python"), env.get("PYTHONPATH")]))
    results = os.path.join(ROOT, "examples", "results")

    def stamps():
        if not os.path.isdir(results):
            return {}
        return {f: os.stat(os.path.join(results, f)).st_mtime_ns for f in os.listdir(results)}

    before = stamps()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = [line for line in proc.stdout.splitlines() if line.startswith(f"SUMMARY {name}:")]
    assert len(summary) == 1, proc.stdout[-2000:]
    assert not re.search(r"\bnan\b", summary[0], re.IGNORECASE), summary[0]
    assert stamps() == before, "--quick must not write examples/results/ (the committed full runs)"
