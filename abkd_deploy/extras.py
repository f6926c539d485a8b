"""Which install extra a missing module belongs to, and the one-line hint that says so.

``pip install abkd-deploy`` brings the serving set only (``serve``, ``triton``,
:class:`~abkd_deploy.serve.Predictor`); ``teacher``, ``distill``, ``compare``, ``export``
and ``bench`` import the training stack lazily, so without the ``train`` extra they stop
with a :class:`ModuleNotFoundError` that :func:`missing_extra_message` turns into a hint.
"""

from __future__ import annotations

import importlib.util

TRAIN_EXTRA = "train"

# import name -> distribution name of what the `train` extra adds (pyproject.toml).
TRAINING_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "torch_geometric": "torch-geometric",
    "onnxscript": "onnxscript",
    "ogb": "ogb",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "psutil": "psutil",
    "safetensors": "safetensors",
    "sklearn": "scikit-learn",
}


def missing_extra_message(exc: ModuleNotFoundError, command: str | None) -> str | None:
    """The hint for ``exc`` if it is a training package that is not installed, else None.

    Args:
        exc: the error an import raised (``exc.name``: the module it looked for).
        command: the subcommand that needed it (``"export"``), or None.

    Returns:
        ``'abkd-deploy export' needs the training stack (torch is not installed); install it
        with pip install "abkd-deploy[train]"``, or None when the module is not one of
        :data:`TRAINING_PACKAGES` or its package is installed (a broken install, not a
        missing extra: the original error is the better message).
    """
    top = (exc.name or "").partition(".")[0]
    if top not in TRAINING_PACKAGES or importlib.util.find_spec(top) is not None:
        return None
    what = f"'abkd-deploy {command}'" if command else "this command"
    return (
        f"{what} needs the training stack ({TRAINING_PACKAGES[top]} is not installed); "
        f'install it with pip install "abkd-deploy[{TRAIN_EXTRA}]"'
    )
