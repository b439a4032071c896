"""Writes docs/bad-input.md from the cases of tests/test_bad_input.py (run from the repository root)."""
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root / "tests"))
import test_bad_input  # noqa: E402

(root / "docs" / "bad-input.md").write_text(test_bad_input.render())
print("wrote docs/bad-input.md")
