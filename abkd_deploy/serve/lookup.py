"""The output tables of a ``--precompute all`` export, read for a numpy lookup.

Such a model is one ONNX ``Gather`` of ``node_ids`` per output, on a stored ``[N, *]``
table (``abkd_deploy.export.precompute.OutputTables``); with ``--quantize int8`` an
output can be ``DequantizeLinear`` (axis 0) of the ``Gather`` ed int8 rows by the
``Gather`` ed per-row scales (``abkd_deploy.export.quantize_onnx``; ``Cast`` + ``Mul``
before that rewrite). onnxruntime's fixed cost per call
(~5 us) is several times a numpy ``take`` of a few rows, so :class:`Predictor` answers
these exports from the tables themselves: the same values the graph would gather, bit for
bit (an int8 table is dequantised once, with the same float32 product; it is
element-wise, so applying it to every row and then taking rows equals the graph).
:func:`lookup_tables` checks that the graph is exactly that lookup and returns the
tables; anything else (another export, an edited graph) returns ``None`` and the model runs
in onnxruntime as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: ONNX ``TensorProto.FLOAT``: the one ``Cast`` target of a dequantising lookup.
_FLOAT = 1


def lookup_tables(model_path: str | Path, outputs: list[str]) -> dict[str, np.ndarray] | None:
    """``{output name: [N, *] float table}`` when every output of the model is a lookup of
    ``node_ids`` on initializers, with nothing else in the graph; else ``None``.

    A lookup is a ``Gather`` (axis 0) of ``node_ids`` (or of ``Reshape(node_ids, [-1])``) on
    an initializer, optionally dequantised: ``DequantizeLinear`` (axis 0) of an int8 and a
    [N] float32 such lookup, or ``Cast`` (to float) and ``Mul`` of two of the same ``N`` rows.

    Args:
        model_path: the ``.onnx`` file.
        outputs: the model's output names (each must be produced by such a lookup).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    ids = {"node_ids"}
    tables: dict[str, np.ndarray] = {}  # value name -> the op applied to every row
    for node in graph.node:
        op, args = node.op_type, list(node.input)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Reshape" and len(args) == 2 and args[0] in ids and args[1] in inits:
            if numpy_helper.to_array(inits[args[1]]).tolist() != [-1]:
                return None
            ids.add(node.output[0])
        elif op == "Gather" and len(args) == 2 and args[0] in inits and args[1] in ids:
            if attrs.get("axis", 0) != 0:
                return None
            tables[node.output[0]] = numpy_helper.to_array(inits[args[0]])
        elif op == "Cast" and len(args) == 1 and args[0] in tables and attrs.get("to") == _FLOAT:
            tables[node.output[0]] = tables[args[0]].astype(np.float32)
        elif op == "Mul" and len(args) == 2 and all(a in tables for a in args):
            a, b = tables[args[0]], tables[args[1]]
            same_rows = a.ndim == b.ndim and len(a) == len(b)  # broadcasting as on [B, *]
            if a.dtype != np.float32 or b.dtype != np.float32 or not same_rows:
                return None
            tables[node.output[0]] = a * b
        elif op == "DequantizeLinear" and len(args) == 2 and all(a in tables for a in args):
            a, b = tables[args[0]], tables[args[1]]
            per_row = a.ndim == 2 and b.ndim == 1 and len(a) == len(b)
            if attrs.get("axis", 1) != 0 or a.dtype != np.int8 or b.dtype != np.float32:
                return None
            if not per_row:
                return None
            tables[node.output[0]] = a.astype(np.float32) * b[:, None]
        else:
            return None
    if sorted(o for o in tables if o in outputs) != sorted(outputs):
        return None
    found = {name: tables[name] for name in outputs}
    if any(t.ndim != 2 or t.dtype.kind != "f" for t in found.values()):
        return None
    return found
