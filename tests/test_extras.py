"""The one-line hint for a training command run without the `train` extra."""

from __future__ import annotations

import sys

import pytest

from abkd_deploy.extras import TRAINING_PACKAGES, missing_extra_message


def test_missing_training_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # find_spec: not installed
    with pytest.raises(ModuleNotFoundError) as err:
        import sklearn  # noqa: F401
    assert missing_extra_message(err.value, "bench") == (
        "'abkd-deploy bench' needs the training stack (scikit-learn is not installed); "
        'install it with pip install "abkd-deploy[train]"'
    )


def test_installed_or_unrelated_modules_keep_their_error() -> None:
    # torch is installed here: a missing torch submodule is a broken install, not an extra
    assert missing_extra_message(ModuleNotFoundError(name="torch._no_such"), "export") is None
    assert missing_extra_message(ModuleNotFoundError(name="no_such_package"), "export") is None
    assert missing_extra_message(ModuleNotFoundError(), None) is None


def test_training_packages_are_the_train_extra() -> None:
    tomllib = pytest.importorskip("tomllib")
    from tests.conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    train = {
        r.split(">")[0].split("=")[0].split("[")[0]
        for r in extras["optional-dependencies"]["train"]
    }
    assert set(TRAINING_PACKAGES.values()) == train
    base = {r.split(">")[0].split("=")[0] for r in extras["dependencies"]}
    assert not base & train, "a training package among the serving dependencies"
