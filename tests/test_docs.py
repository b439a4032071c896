"""The documentation runs: every ```python block of README.md and docs/*.md, every docstring example
(doctest) of the public modules, the generated numbers match bench/results/, and the README's API
index names every public name."""
import doctest
import importlib
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
import torch

import lossforge

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks():
    for path in DOCUMENTS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield pytest.param(m.group(1), id=f"{path.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_code_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may write files
    torch.manual_seed(0)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_documents_have_python_blocks():
    # the runner above finds the README's quickstart (a broken fence pattern would find nothing)
    readme = (ROOT / "README.md").read_text()
    assert len(FENCE.findall(readme)) >= 5


DOCTEST_MODULES = ["lossforge._stablemax", "lossforge._sliced_wasserstein", "lossforge._betti_matching",
                   "lossforge._pamc", "lossforge.mfac", "lossforge.nn", "lossforge.optim"]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    # no extra globals: an example imports what it uses, as a reader copying it must
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
    assert result.attempted > 0, f"{name} has no docstring examples"


# ---- the measured numbers: generated from bench/results/, never copied by hand -------------------------

def _readme_numbers():
    spec = importlib.util.spec_from_file_location("readme_numbers", ROOT / "tools" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_numbers_blocks_match_bench_results(path):
    text = path.read_text()
    assert _readme_numbers().update_text(text) == text, (
        f"{path.relative_to(ROOT)}: the numbers differ from bench/results/: run python tools/readme_numbers.py")


def test_numbers_blocks_follow_the_results(tmp_path):
    rn = _readme_numbers()
    readme = (ROOT / "README.md").read_text()
    assert len(rn.BLOCK.findall(readme)) == 1
    shutil.copytree(rn.RESULTS, tmp_path, dirs_exist_ok=True)
    report = tmp_path / "latest-cpu.md"
    rows = report.read_text().splitlines()
    i = next(i for i, r in enumerate(rows) if r.startswith("| stablemax |"))
    cells = rows[i].split("|")
    cells[6] = " 1234.56 "  # ours ms of the first row
    rows[i] = "|".join(cells)
    report.write_text("\n".join(rows) + "\n")
    updated = rn.update_text(readme, tmp_path)
    assert updated != readme and "1234.56" in updated


# ---- the README's API index and wording ----------------------------------------------------------------

def _public_names():
    names = [n for n in lossforge.__all__ if n not in ("nn", "optim", "mfac")]
    names += [f"nn.{n}" for n in lossforge.nn.__all__]
    names += [f"optim.{n}" for n in lossforge.optim.__all__]
    names += [f"mfac.{n}" for n in lossforge.mfac.__all__]
    return names


def test_readme_api_index_lists_every_public_name():
    readme = (ROOT / "README.md").read_text()
    index = readme[readme.index("## API"):readme.index("## Switching")]
    missing = [n for n in _public_names() if f"`{n}`" not in index]
    assert not missing, f"README's API index misses {missing}"


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    # docs/switching-*.md join the nav through tools/mkdocs_hooks.py
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if p.name not in nav and not p.name.startswith("switching-")]
    assert not missing, f"mkdocs.yml's nav misses {missing}"


def test_no_internal_paths_in_the_docs_and_docstrings():
    files = DOCUMENTS + [ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "python" / "lossforge").rglob("*.py"))
    bad = [str(p.relative_to(ROOT)) for p in files if "shared/specs" in p.read_text() or "specs/" in p.read_text()]
    assert not bad, f"paths outside the repository cited in {bad}"


def test_every_public_name_has_an_api_reference_entry():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    documented = set(re.findall(r"^::: lossforge\.([\w.]+)", pages, re.M))
    missing = [n for n in _public_names() if n != "__version__" and n not in documented]
    assert not missing, f"no `::: lossforge.<name>` entry in docs/ for {missing}"
