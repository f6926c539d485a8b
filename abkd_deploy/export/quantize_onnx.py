"""The ONNX side of ``--quantize int8``: one dequantising node per gather, optional weights.

The dynamo exporter writes a :class:`~abkd_deploy.export.quantize.QuantizedTable` lookup
as ``Gather(T.values, ids)`` -> ``Cast(to float)`` -> ``Mul`` by ``Gather(T.scale, ids)``
(``scale`` [N, 1]). onnxruntime's cost at small batches is mostly per node, so
:func:`fuse_dequantize` rewrites each into ``DequantizeLinear(Gather(T.values, ids),
Gather(T.scale, ids), axis=0)`` with ``T.scale`` stored as [N]: the same float32 product
(int8 -> float is exact, then one multiply), one node fewer per lookup.

:func:`quantize_onnx_weights` is onnxruntime's dynamic int8 quantization of the MatMul
weights (off by default, :data:`~abkd_deploy.export.quantize.QUANTIZE_WEIGHTS`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

#: Suffixes of a QuantizedTable's two initializers (its buffer names).
VALUES, SCALE = ".values", ".scale"


def _dequantize_sites(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, ...]]:
    """``(gather_values, cast, gather_scale, mul)`` of every lookup to rewrite."""
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    sites = []
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        pair = list(mul.input)
        for a, b in (pair, pair[::-1]):
            cast, gscale = producer.get(a), producer.get(b)
            if not (cast and gscale and cast.op_type == "Cast" and gscale.op_type == "Gather"):
                continue
            gvalues = producer.get(cast.input[0])
            if gvalues is None or gvalues.op_type != "Gather":
                continue
            table, scale = gvalues.input[0], gscale.input[0]
            to = next((x.i for x in cast.attribute if x.name == "to"), None)
            if (
                table.endswith(VALUES)
                and scale == table[: -len(VALUES)] + SCALE
                and scale in inits
                and list(inits[scale].dims)[1:] == [1]
                and to == TensorProto.FLOAT
                and gvalues.input[1] == gscale.input[1]
                and uses.get(a) == 1
                and uses.get(b) == 1
            ):
                sites.append((gvalues, cast, gscale, mul))
                break
    return sites


def fuse_dequantize(model: onnx.ModelProto) -> int:
    """Rewrites every ``Cast`` + ``Mul`` dequantisation of ``model`` (in place) into one
    ``DequantizeLinear`` (see the module docstring); returns how many were rewritten.

    A scale initializer is reshaped from [N, 1] to [N] only when every one of its uses is
    rewritten (otherwise that lookup is left as it is).
    """
    graph = model.graph
    sites = _dequantize_sites(graph)
    scale_uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name.endswith(SCALE):
                scale_uses[name] = scale_uses.get(name, 0) + 1
    per_scale: dict[str, int] = {}
    for _, _, gscale, _ in sites:
        per_scale[gscale.input[0]] = per_scale.get(gscale.input[0], 0) + 1
    sites = [s for s in sites if per_scale[s[2].input[0]] == scale_uses[s[2].input[0]]]
    if not sites:
        return 0
    dropped = {id(n) for _, cast, _, mul in sites for n in (cast, mul)}
    replace = {id(mul): (gvalues, gscale, mul) for gvalues, _, gscale, mul in sites}
    nodes = []
    for node in graph.node:
        if id(node) in replace:
            gvalues, gscale, mul = replace[id(node)]
            nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [gvalues.output[0], gscale.output[0]],
                    [mul.output[0]],
                    name=f"{mul.name or mul.output[0]}_dequantize",
                    axis=0,
                )
            )
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    flat = {s[2].input[0] for s in sites}
    for t in graph.initializer:
        if t.name in flat:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(-1), t.name))
    _drop_value_info(graph, flat | {s[2].output[0] for s in sites})
    return len(sites)


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Forgets the stale [N, 1] / [n, 1] shapes of the scales and their gathers (now 1-D)."""
    keep = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def save_like(model: onnx.ModelProto, path: Path, external: bool) -> None:
    """Writes ``model`` over ``path`` with the export's layout: its initializers in
    ``path.data`` (ONNX external data) when ``external``, else one protobuf."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,  # small tensors (shapes, axes) stay inline for the checker
        )
    else:
        onnx.save_model(model, str(path))


def finish_int8(path: Path, external: bool, weights: bool) -> None:
    """Post-processes an int8 export in place: :func:`fuse_dequantize`, then (``weights``)
    :func:`quantize_onnx_weights`."""
    model = onnx.load(str(path))
    if fuse_dequantize(model):
        save_like(model, path, external)
    if weights:
        quantize_onnx_weights(path, external)


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is an initializer (a weight); a
    MatMul of two activations (the weighted neighbour sum) is left in float."""
    inits = {t.name for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits
    ]


def quantize_onnx_weights(path: Path, external: bool) -> int:
    """Dynamic int8 quantization of the MatMul weights of ``path``, in place (QInt8
    weights, activations quantized per call; onnxruntime ``quantize_dynamic``).

    Returns:
        The number of MatMul/Gemm nodes with an initializer weight (0: file unchanged).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path))
    nodes = weight_nodes(model)
    if not nodes:
        return 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".quantize.") as tmp:
        out = Path(tmp) / path.name
        quantize_dynamic(
            model,
            out,
            weight_type=QuantType.QInt8,
            # MatMulConstBOnly keeps the MatMuls of two activations in float
            op_types_to_quantize=["MatMul"],
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
        quantized = onnx.load(str(out))
    save_like(quantized, path, external)
    return len(nodes)
