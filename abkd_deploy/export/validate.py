"""Validation of a written artifact against the PyTorch export-form module.

The artifact is loaded back from disk (onnxruntime with the real thread count for
ONNX; ``torch.jit.load`` / ``torch.export.load`` otherwise), run **twice** on every
input set of the spec (other sizes than the traced one, duplicate ids, a batch of 1),
and compared with the float32 module, in this order (as Optimum's ONNX exporter does):

1. the output names the file declares (formats that name their outputs):
   :class:`~abkd_deploy.errors.OutputNamesMismatch`;
2. the number of outputs of every run: :class:`~abkd_deploy.errors.OutputCountMismatch`;
3. each output's shape: :class:`~abkd_deploy.errors.OutputShapeMismatch`;
4. each output's values, over all sets and runs: any difference above the tolerance
   (``atol``, plus ``rtol`` times the output's scale, the largest |value| of that output
   in the reference over all input sets: an int8 artifact's error grows with its values),
   or a non-finite value, is :class:`~abkd_deploy.errors.ValuesMismatch`.

All four are :class:`~abkd_deploy.errors.ValidationError` s with a one-line message naming
the output. Running twice catches nondeterministic kernels (ScatterND(add) gave
different, wrong results with 2 threads: docs/ARCHITECTURE.md section 9.4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from abkd_deploy.errors import (
    OutputCountMismatch,
    OutputNamesMismatch,
    OutputShapeMismatch,
    ValidationError,
    ValuesMismatch,
    first_line,
)
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
    declared: Sequence[str] | None = None,
    rtol: float = 0.0,
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
        declared: Output names the artifact file declares (``None``: positional outputs).
        rtol: Accepted difference per unit of the output's scale, added to ``atol``.

    Returns:
        ``{output name: max abs diff over all sets and runs}``.

    Raises:
        OutputNamesMismatch / OutputCountMismatch / OutputShapeMismatch / ValuesMismatch:
            see the module docstring (the message names the output, the input set and the
            run).
        ValidationError: the artifact failed to run.
    """
    if declared is not None:
        check_output_names(name, declared, output_names)
    worst = {out: 0.0 for out in output_names}
    where = {out: "" for out in output_names}
    scale = {out: 0.0 for out in output_names}
    for label, inputs in input_sets:
        with torch.inference_mode():
            expected = as_numpy_outputs(reference(*inputs))
        for out, b in zip(output_names, expected, strict=False):
            peak = float(np.abs(b).max()) if b.size else 0.0
            scale[out] = max(scale[out], peak if np.isfinite(peak) else 0.0)
        for run in range(1, RUNS + 1):
            try:
                got = runner(inputs)
            except Exception as exc:
                first = first_line(exc)
                raise ValidationError(
                    f"{name} artifact failed to run on input set '{label}': {first}"
                ) from exc
            at = f"input set '{label}', run {run}"
            check_output_count(name, got, output_names, at)
            for out, a, b in zip(output_names, got, expected, strict=True):
                if a.shape != b.shape:
                    raise OutputShapeMismatch(
                        f"{name} artifact output '{out}' has shape {tuple(a.shape)} on {at}; "
                        f"expected {tuple(b.shape)}; nothing was written"
                    )
                diff = max_abs_diff(a, b)
                if diff > worst[out] or not np.isfinite(diff):
                    worst[out], where[out] = diff, f"{label}, run {run}"
    summary = ", ".join(f"{out} {worst[out]:.2e}" for out in output_names)
    limit = {out: atol + rtol * scale[out] for out in output_names}
    allowed = f"atol {atol:g}"
    if rtol:
        bounds = ", ".join(f"{out} {limit[out]:.2e}" for out in output_names)
        allowed += f" + rtol {rtol:g} x output scale: {bounds}"
    log(
        f"  {name}: max abs diff vs PyTorch over {len(input_sets)} input sets x {RUNS} runs: "
        f"{summary} ({allowed})"
    )
    for out in output_names:
        if not worst[out] <= limit[out]:
            bound = f"atol {atol:g}"
            if rtol:
                bound = f"{limit[out]:.3g} (atol {atol:g} + rtol {rtol:g} x scale {scale[out]:.3g})"
            raise ValuesMismatch(
                f"{name} artifact disagrees with PyTorch: max abs diff {worst[out]:.3g} on "
                f"'{out}' ({where[out]}) exceeds {bound}; nothing was written"
            )
    return worst


def check_output_names(name: str, declared: Sequence[str], expected: Sequence[str]) -> None:
    """The artifact declares exactly ``expected``, in order.

    Raises:
        OutputNamesMismatch: naming the first missing, unexpected or misplaced output.
    """
    if list(declared) == list(expected):
        return
    missing = [out for out in expected if out not in declared]
    extra = [out for out in declared if out not in expected]
    if missing:
        problem = f"lacks '{missing[0]}'"
    elif extra:
        problem = f"has the unexpected output '{extra[0]}'"
    elif len(declared) != len(expected):
        twice = next(out for out in declared if list(declared).count(out) > 1)
        problem = f"declares '{twice}' more than once"
    else:
        moved = next(e for d, e in zip(declared, expected, strict=True) if d != e)
        problem = f"has '{moved}' at position {list(declared).index(moved) + 1}"
    raise OutputNamesMismatch(
        f"{name} artifact {problem}: it declares outputs ({', '.join(declared)}), expected "
        f"({', '.join(expected)}); nothing was written"
    )


def check_output_count(
    name: str, got: Sequence[np.ndarray], expected: Sequence[str], at: str
) -> None:
    """One output per expected name.

    Raises:
        OutputCountMismatch: naming the first missing output, or the position of the first
            extra one.
    """
    if len(got) == len(expected):
        return
    if len(got) < len(expected):
        problem = f"'{expected[len(got)]}' is missing"
    else:
        problem = f"output {len(expected) + 1} is not one of them"
    raise OutputCountMismatch(
        f"{name} artifact returned {len(got)} outputs on {at}, expected {len(expected)} "
        f"({', '.join(expected)}): {problem}; nothing was written"
    )
