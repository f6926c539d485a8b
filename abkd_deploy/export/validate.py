"""Validation of a written artifact against the PyTorch export-form module.

The artifact is loaded back from disk (onnxruntime with the real thread count for
ONNX; ``torch.jit.load`` / ``torch.export.load`` otherwise), run **twice** on every
input set of the spec (other sizes than the traced one, duplicate ids, a batch of 1),
and compared output by output with the float32 module. Running twice catches
nondeterministic kernels (ScatterND(add) gave different, wrong results with 2 threads:
docs/ARCHITECTURE.md section 9.4). Any difference above ``atol``, or a non-finite value, raises
:class:`~abkd_deploy.errors.ValidationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from abkd_deploy.errors import ValidationError
from abkd_deploy.export.formats import Runner, as_numpy_outputs

#: How many times the artifact runs on each input set.
RUNS = 2


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| (inf on a shape mismatch or a non-finite value in ``a``)."""
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def validate_artifact(
    name: str,
    runner: Runner,
    reference: nn.Module,
    input_sets: Sequence[tuple[str, Sequence[Tensor]]],
    output_names: Sequence[str],
    atol: float,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, float]:
    """Compares ``runner`` with ``reference`` on every input set, :data:`RUNS` times.

    Args:
        name: Artifact label for messages (``onnx``, ...).
        runner: The loaded artifact.
        reference: The float32 export-form module.
        input_sets: ``(label, flat inputs)`` pairs.
        output_names: Names of the outputs, in order.
        atol: Largest accepted absolute difference.
        log: Where the per-output max-abs-diff line is printed.

    Returns:
        ``{output name: max abs diff over all sets and runs}``.

    Raises:
        ValidationError: a difference exceeds ``atol`` (the message names the output,
            the input set and the run).
    """
    worst = {out: 0.0 for out in output_names}
    where = {out: "" for out in output_names}
    for label, inputs in input_sets:
        with torch.inference_mode():
            expected = as_numpy_outputs(reference(*inputs))
        for run in range(1, RUNS + 1):
            try:
                got = runner(inputs)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise ValidationError(
                    f"{name} artifact failed to run on input set '{label}': {first}"
                ) from exc
            for out, a, b in zip(output_names, got, expected):
                diff = max_abs_diff(a, b)
                if diff > worst[out] or not np.isfinite(diff):
                    worst[out], where[out] = diff, f"{label}, run {run}"
    summary = ", ".join(f"{out} {worst[out]:.2e}" for out in output_names)
    log(
        f"  {name}: max abs diff vs PyTorch over {len(input_sets)} input sets x {RUNS} runs: "
        f"{summary} (atol {atol:g})"
    )
    for out in output_names:
        if not worst[out] <= atol:
            raise ValidationError(
                f"{name} artifact disagrees with PyTorch: max abs diff {worst[out]:.3g} on "
                f"'{out}' ({where[out]}) exceeds atol {atol:g}; nothing was written"
            )
    return worst
