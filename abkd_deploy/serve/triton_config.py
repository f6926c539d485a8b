"""Triton ``config.pbtxt`` text for the ``onnxruntime_onnx`` backend.

With ``max_batch_size`` > 0 the first dim of every tensor is Triton's batch dim and is left
out of ``dims``; a batch-only tensor (``node_ids [batch]``) is declared ``dims: [1]`` with
``reshape: { shape: [] }`` because Triton needs non-empty dims, so clients send ``[n, 1]``.
With 0 the dims are the full ONNX shapes (symbolic -> ``-1``) and there is no dynamic
batching. The text is protobuf text format of Triton's ``ModelConfig`` (comments allowed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from abkd_deploy import __version__
from abkd_deploy.errors import ConfigError
from abkd_deploy.serve.errors import ArtifactError
from abkd_deploy.serve.onnx_signature import TensorSig

#: First line of every config.pbtxt this module writes.
MARKER = "# Written by abkd-deploy triton"
PLATFORM = "onnxruntime_onnx"
#: How long Triton holds a request for others to join its batch (the built-in server's 2 ms).
DEFAULT_QUEUE_DELAY_US = 2000

#: ONNX element type name (lower case) -> Triton ``DataType``.
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float": "TYPE_FP32",
    "double": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
    "string": "TYPE_STRING",
}
_INSTANCES = re.compile(r"(cpu|gpu)(?::(\d+))?", re.IGNORECASE)


@dataclass(frozen=True)
class Instances:
    """A Triton instance group: ``kind`` is ``KIND_CPU`` or ``KIND_GPU``."""

    kind: str
    count: int


def parse_instances(spec: str) -> Instances:
    """``cpu:N`` / ``gpu:N`` (``cpu`` / ``gpu`` = one instance) -> :class:`Instances`.

    Raises:
        ConfigError: anything else, or N < 1.
    """
    m = _INSTANCES.fullmatch(str(spec).strip())
    count = int(m.group(2)) if m and m.group(2) is not None else 1
    if m is None or count < 1:
        raise ConfigError(f"--instances {spec!r}: expected cpu:N or gpu:N with N >= 1")
    return Instances(f"KIND_{m.group(1).upper()}", count)


def _triton_dtype(t: TensorSig) -> str:
    if t.dtype not in TRITON_DTYPES:
        raise ArtifactError(f"tensor {t.name!r} has ONNX type {t.dtype!r}, which Triton lacks")
    return TRITON_DTYPES[t.dtype]


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(t: TensorSig, batched: bool) -> list[str]:
    dims = [d if isinstance(d, int) else -1 for d in (t.shape[1:] if batched else t.shape)]
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {_triton_dtype(t)}"]
    if dims:
        lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
    else:  # Triton needs non-empty dims: take [1] on the wire, [] in the model
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return [*lines, "  }"]


def _tensor_list(key: str, tensors: list[TensorSig], batched: bool) -> list[str]:
    blocks = [_tensor_block(t, batched) for t in tensors]
    lines = [f"{key} ["]
    for i, block in enumerate(blocks):
        lines += [*block[:-1], block[-1] + ("," if i < len(blocks) - 1 else "")]
    return [*lines, "]"]


def render_config(
    name: str,
    inputs: list[TensorSig],
    outputs: list[TensorSig],
    *,
    max_batch_size: int,
    instances: Instances,
    adjacency: str,
    model_filename: str = "model.onnx",
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    source: str = "",
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``).

    With ``max_batch_size`` > 0 the first dim of every tensor is Triton's batch dim and is
    left out of ``dims``; with 0 the dims are the full ONNX shapes (symbolic -> ``-1``).
    """
    batched = max_batch_size > 0
    source = (source or "an export").replace("\n", "\\n").replace("\r", "\\r")
    head = [f"{MARKER} {__version__} from {source} (adjacency {adjacency})."]
    if batched:
        flat = ", ".join(t.name for t in inputs + outputs if len(t.shape) == 1) or "none"
        head += [
            "# Batching: every tensor's first dim is the request batch, so max_batch_size",
            f"# ({max_batch_size}) counts rows per model run (node ids for embedded) and dims",
            f"# leave it out. Batch-only tensors ({flat}) are [batch] in the model and",
            f"# [n, 1] on the wire (dims [1], reshape []), n <= {max_batch_size}. Row i of",
            "# every output answers row i of the input. dynamic_batching merges concurrent",
            f"# requests, holding each at most {queue_delay_us} us for others to join.",
        ]
    else:
        head += [
            f"# No batching (max_batch_size 0): adjacency {adjacency!r} takes one (sub)graph",
            "# per request; the first dims of its inputs count that graph's rows, not",
            "# independent requests, so Triton must not concatenate two requests along",
            "# them. dims are the full ONNX shapes, -1 = any size.",
        ]
    lines = [
        *head,
        f"name: {_quote(name)}",
        f"platform: {_quote(PLATFORM)}",
        f"default_model_filename: {_quote(model_filename)}",
        f"max_batch_size: {max_batch_size}",
        *_tensor_list("input", inputs, batched),
        *_tensor_list("output", outputs, batched),
    ]
    if batched:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {instances.count}",
        f"    kind: {instances.kind}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"
