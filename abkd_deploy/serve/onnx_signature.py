"""Inputs and outputs of an ONNX model, read without torch (and without its weights).

``onnx`` reads the graph without loading external data when it is installed; a serving
image without ``onnx`` falls back to an onnxruntime session's metadata (CPU provider, no
graph optimisation). Both give the same :class:`TensorSig` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abkd_deploy.errors import first_line
from abkd_deploy.serve.errors import ArtifactError


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output.

    Attributes:
        name: tensor name.
        dtype: ONNX element type, lower case (``"float"``, ``"int64"``, ...).
        shape: per dim an int (fixed), a str (symbolic ``dim_param``) or None (unknown).
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def read_signature(model_path: Path) -> tuple[list[TensorSig], list[TensorSig]]:
    """Inputs and outputs of an ONNX model (``onnx`` when installed, else onnxruntime).

    Raises:
        ArtifactError: the model cannot be read.
    """
    try:
        import onnx
    except ImportError:
        return _signature_onnxruntime(model_path)
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"cannot read ONNX model {model_path}: {exc}") from exc

    def sig(v: Any) -> TensorSig:
        t = v.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
        if not t.HasField("shape"):
            raise ArtifactError(f"{model_path}: tensor {v.name!r} has no shape in the graph")
        return TensorSig(v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), dims)

    inits = {i.name for i in model.graph.initializer}
    inputs = [sig(v) for v in model.graph.input if v.name not in inits]
    return inputs, [sig(v) for v in model.graph.output]


def _signature_onnxruntime(model_path: Path) -> tuple[list[TensorSig], list[TensorSig]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = first_line(exc)
        raise ArtifactError(f"onnxruntime cannot load {model_path}: {first}") from exc

    def sig(a: Any) -> TensorSig:
        dtype = a.type.removeprefix("tensor(").removesuffix(")")
        dims = tuple(d if isinstance(d, (int, str)) else None for d in a.shape)
        return TensorSig(a.name, dtype, dims)

    return [sig(a) for a in sess.get_inputs()], [sig(a) for a in sess.get_outputs()]


def external_data_files(model_path: Path) -> set[str]:
    """Relative locations of the model's external data (empty without ``onnx``)."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        return set()
    model = onnx.load(str(model_path), load_external_data=False)
    return {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}


def batch_dim(inputs: list[TensorSig], outputs: list[TensorSig]) -> str | None:
    """The symbolic first dim every input and output shares (e.g. ``"batch"``), or None."""
    firsts = {t.shape[0] if t.shape else None for t in inputs + outputs}
    if len(firsts) != 1:
        return None
    first = firsts.pop()
    return first if isinstance(first, str) else None
