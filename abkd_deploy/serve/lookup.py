"""The output tables of a ``--precompute all`` export, read for a numpy lookup.

Such a model is one ONNX ``Gather`` of ``node_ids`` per output, on a stored ``[N, *]``
table (``abkd_deploy.export.precompute.OutputTables``). onnxruntime's fixed cost per call
(~5 us) is several times a numpy ``take`` of a few rows, so :class:`Predictor` answers
these exports from the tables themselves: the same values the graph would gather, bit for
bit. :func:`lookup_tables` checks that the graph is exactly that lookup and returns the
tables; anything else (another export, an edited graph) returns ``None`` and the model runs
in onnxruntime as usual.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def lookup_tables(model_path: str | Path, outputs: list[str]) -> dict[str, np.ndarray] | None:
    """``{output name: [N, *] table}`` when every output of the model is a Gather of
    ``node_ids`` (axis 0) on an initializer, with nothing else in the graph; else ``None``.

    Args:
        model_path: the ``.onnx`` file.
        outputs: the model's output names (each must be produced by such a Gather).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    produced: dict[str, str] = {}
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or axis != 0 or len(node.input) != 2:
            return None
        table, index = node.input
        if index != "node_ids" or table not in inits:
            return None
        produced[node.output[0]] = table
    if sorted(produced) != sorted(outputs):
        return None
    tables = {name: numpy_helper.to_array(inits[table]) for name, table in produced.items()}
    if any(t.ndim != 2 for t in tables.values()):
        return None
    return tables
