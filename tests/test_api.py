"""The public surface: every public name means one thing, and every public entry point is compiled by a test."""
import importlib
import inspect

import pytest

import lossforge

FAMILY_TESTS = ("test_stablemax", "test_sliced_wasserstein", "test_betti_matching", "test_mfac", "test_pamc")
# result containers: no computation to compile
DATA_CLASSES = {"BettiMatchingResult", "PersistenceBarcode", "PamCGraph", "SBMGraph"}


def public_entry_points() -> set[str]:
    names = set()
    for name in lossforge.__all__:
        obj = getattr(lossforge, name)
        if inspect.isfunction(obj) and name != "build_info":
            names.add(f"lossforge.{name}")
    names |= {f"lossforge.nn.{name}" for name in lossforge.nn.__all__}
    names |= {f"lossforge.optim.{name}.step" for name in lossforge.optim.__all__}
    for name in lossforge.mfac.__all__:
        cls = getattr(lossforge.mfac, name)
        names |= {f"lossforge.mfac.{name}.{m}" for m, v in vars(cls).items()
                  if callable(v) and not m.startswith("_") and m not in ("state_dict", "load_state_dict")}
    return names


def test_all_names_resolve():
    for name in lossforge.__all__:
        assert hasattr(lossforge, name), name
    for module in (lossforge.nn, lossforge.optim, lossforge.mfac):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


@pytest.mark.parametrize("name", ["stablemax", "sliced_wasserstein", "betti_matching", "pamc"])
def test_function_names_are_not_modules(name):
    # `import lossforge.sliced_wasserstein as m` must not silently bind a function (or a module that hides one)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"lossforge.{name}")
    assert not inspect.ismodule(getattr(lossforge, name, None))


def test_public_modules_are_modules():
    for name in ("nn", "optim", "mfac"):
        assert inspect.ismodule(getattr(lossforge, name)), name


def test_every_public_entry_point_has_a_compile_test():
    covered = set()
    for module in FAMILY_TESTS:
        covered |= set(importlib.import_module(module).COMPILE_ENTRY_POINTS)
    expected = public_entry_points()
    assert len(expected) >= 30
    assert not expected - covered, f"no torch.compile test for {sorted(expected - covered)}"
    assert not covered - expected, f"compile tests name entry points that do not exist: {sorted(covered - expected)}"
