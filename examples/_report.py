"""What the example scripts share: the machine line, the printed output kept for examples/results/<name>.txt,
and matplotlib on the Agg backend for the plots (full runs only)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> str:
    """CPU model, logical CPUs, torch version and threads."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # no lscpu (macOS, Windows)
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


class Report:
    """Prints each line and keeps it; write() saves them as examples/results/<name>.txt."""

    def __init__(self, name: str):
        self.name = name
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def path(self, ext: str) -> str:
        """examples/results/<name><ext>, e.g. path(".png")."""
        return os.path.join(RESULTS, self.name + ext)

    def write(self, argv=None) -> None:
        """The command line ("$ python examples/<name>.py <args>"), then every line said."""
        os.makedirs(RESULTS, exist_ok=True)
        given = sys.argv[1:] if argv is None else argv
        command = " ".join([f"$ python examples/{self.name}.py", *given])
        with open(self.path(".txt"), "w") as f:
            f.write(command + "\n" + "\n".join(self.lines) + "\n")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    print(f"wrote {path}")
