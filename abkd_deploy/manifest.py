"""The one owner of ``manifest.json`` (format_version 1, ``docs/FORMATS.md``): torch-free.

``export`` builds and writes manifests through this module and ``serve`` (and ``bench``)
read them through it, so both sides apply the same checks:

* :func:`read_manifest`: the file exists, is a JSON object of format_version 1 and has
  every field a consumer needs, with one-line :class:`ManifestError` messages;
* :func:`verify_files`: every listed file is inside the directory and has its size and
  SHA-256;
* :func:`check_model`: the manifest agrees with the copy the exporter stored in the ONNX
  model's ``metadata_props`` and with the tables baked into the model (an ``embedded``
  model's ``node_ids`` index tables of exactly ``graph.num_nodes`` rows), so a hand-edited
  manifest can never make the runtime send onnxruntime an id outside a table.

Only ``json``/``numpy``-level code here (``onnx`` is imported lazily by :func:`check_model`);
``export`` may import it (it sits above every stage) and ``serve`` may too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from abkd_deploy import __version__
from abkd_deploy.errors import AbkdError, first_line
from abkd_deploy.files import sha256_file
from abkd_deploy.names import ADJACENCY_FORMATS

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: ``metadata_props`` key of the manifest copy inside ``model.onnx``.
METADATA_KEY = "abkd_manifest"
#: Keys of manifest.json that the metadata copy does not hold (written after it).
NOT_IN_METADATA = ("files", "timings")
#: Ops that pass ``node_ids`` through unchanged in value (traced to the Gathers).
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


class ManifestError(AbkdError):
    """A manifest that is missing, malformed or disagrees with its files or its model."""


def file_entries(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for files of ``directory``."""
    out = {}
    for name in sorted(names):
        path = directory / name
        out[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def build_manifest(
    *,
    adjacency: dict[str, Any],
    model: dict[str, Any],
    graph: dict[str, Any],
    opset: int,
    dtype: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    artifacts: dict[str, str],
    provenance: dict[str, Any],
    accuracy: dict[str, Any],
    validation: dict[str, Any],
    quantize: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assembles a manifest (without ``files``; see :func:`file_entries`).

    ``quantize``: how the artifacts were quantized (``{"mode": "none"}`` when omitted;
    ``abkd_deploy.export.quantize.quantize_entry``).
    """
    return {
        "format_version": MANIFEST_VERSION,
        "producer": {"name": "abkd-deploy", "version": __version__},
        "adjacency": adjacency,
        "model": model,
        "graph": graph,
        "opset": opset,
        "dtype": dtype,
        "quantize": quantize or {"mode": "none"},
        "inputs": inputs,
        "outputs": outputs,
        "artifacts": artifacts,
        "provenance": provenance,
        "accuracy": accuracy,
        "validation": validation,
    }


def snapshot_entry(
    name: str, root: str | None, split: str | None, num_nodes: int, num_edges: int
) -> dict[str, Any]:
    """``provenance.snapshot``: the graph embedded when it is not the run's own dataset.

    ``export RUN --dataset SPEC`` records here what it embedded (``graph.num_nodes`` equals
    ``num_nodes``); ``provenance.dataset`` stays what the student was trained on.
    """
    return {
        "name": name,
        "root": root,
        "split": split,
        "num_nodes": int(num_nodes),
        "num_edges": int(num_edges),
    }


def metadata_copy(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of ``manifest`` that the ONNX ``metadata_props`` copy must equal."""
    return {k: v for k, v in manifest.items() if k not in NOT_IN_METADATA}


def onnx_file(manifest: dict[str, Any]) -> str:
    """Name of the ONNX model inside the export directory (``artifacts.onnx``)."""
    return str((manifest.get("artifacts") or {}).get("onnx") or "model.onnx")


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """Loads and checks ``export_dir/manifest.json``.

    Raises:
        ManifestError: the directory or manifest is missing, not JSON, of another format
            version, or lacks a field a consumer needs.
    """
    root = Path(export_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"export directory {str(root)!r} does not exist")
    if not path.is_file():
        from abkd_deploy.rundir import not_an_export_hint  # run dir given instead of export

        raise ManifestError(
            f"no {MANIFEST_NAME} in {str(root)!r}; expected a directory written by "
            f"`abkd-deploy export`{not_an_export_hint(root)}"
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}; this version reads {MANIFEST_VERSION}"
        )
    _check_fields(manifest, path)
    return manifest


def _check_fields(m: dict[str, Any], path: Path) -> None:
    """Checks the fields consumers use, with one-line messages."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ManifestError(f"{path}: {what}")

    adj = m.get("adjacency")
    need(isinstance(adj, dict), "missing object 'adjacency'")
    fmt = adj.get("format")
    need(fmt in ADJACENCY_FORMATS, f"adjacency.format {fmt!r} is not one of {ADJACENCY_FORMATS}")
    graph = m.get("graph")
    need(isinstance(graph, dict), "missing object 'graph'")
    for key in ("num_nodes", "num_classes"):
        val = graph.get(key)
        ok = isinstance(val, int) and not isinstance(val, bool) and val > 0
        need(ok, f"graph.{key} must be a positive int, got {val!r}")
    prov = m.get("provenance")
    snapshot = prov.get("snapshot") if isinstance(prov, dict) else None
    if snapshot is not None:
        need(
            isinstance(snapshot, dict) and snapshot.get("num_nodes") == graph["num_nodes"],
            "provenance.snapshot must be an object whose num_nodes equals graph.num_nodes",
        )
    for key in ("inputs", "outputs"):
        specs = m.get(key)
        need(
            isinstance(specs, list) and all(isinstance(s, dict) and "name" in s for s in specs),
            f"'{key}' must be a list of {{name, dtype, shape}} objects",
        )
    files = m.get("files")
    need(isinstance(files, dict) and bool(files), "missing object 'files' (name -> sha256, bytes)")
    artifacts = m.get("artifacts")
    need(artifacts is None or isinstance(artifacts, dict), "'artifacts' must be an object")
    for name in (artifacts or {}).values():
        need(name in files, f"files does not list the artifact {name!r}")


def verify_files(export_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Checks the size and SHA-256 of every file listed in ``manifest["files"]``.

    Raises:
        ManifestError: a file is missing, escapes the directory, or has another size/hash.
    """
    root = Path(export_dir)
    for name, entry in manifest["files"].items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ManifestError(f"manifest file name {name!r} must be relative to the export dir")
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"{name!r} is listed in manifest.json but missing from {root}")
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(want, str):
            raise ManifestError(f"manifest entry for {name!r} has no sha256")
        size = entry.get("bytes")
        if isinstance(size, int) and path.stat().st_size != size:
            raise ManifestError(
                f"{name!r} has {path.stat().st_size} bytes; manifest.json says {size} "
                "(corrupt or replaced file)"
            )
        got = sha256_file(path)
        if got != want.lower():
            raise ManifestError(
                f"sha256 of {name!r} is {got}; manifest.json says {want} (corrupt or replaced file)"
            )


def check_model(manifest: dict[str, Any], model_path: str | Path) -> None:
    """Cross-checks ``manifest`` with the ONNX model it describes.

    1. ``metadata_props[abkd_manifest]`` (written by export) must equal the manifest
       without ``files``/``timings``.
    2. ``embedded``: every table that ``node_ids`` index (``Gather`` on an initializer) must
       have exactly ``graph.num_nodes`` rows, so ids the runtime accepts are ids the model
       can look up.

    Raises:
        ManifestError: no metadata copy, a field that differs (named), or a table size
            that differs from ``graph.num_nodes``.
    """
    import onnx

    path = Path(model_path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        first = first_line(exc)
        raise ManifestError(f"cannot read the ONNX model {path}: {first}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ManifestError(
            f"{path.name} carries no '{METADATA_KEY}' metadata: not a model written by "
            "`abkd-deploy export`, or its metadata was stripped"
        )
    try:
        stored = json.loads(props[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{path.name}: metadata '{METADATA_KEY}' is not JSON: {exc}") from None
    diff = _first_difference(metadata_copy(manifest), metadata_copy(stored))
    if diff is not None:
        key, here, there = diff
        raise ManifestError(
            f"manifest.json says {key}={here!r} but the copy inside {path.name} says "
            f"{there!r}: manifest.json was edited or belongs to another model"
        )
    if manifest["adjacency"]["format"] == "embedded":
        _check_node_tables(model, int(manifest["graph"]["num_nodes"]), path.name)


def _first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """``(dotted key, a's value, b's value)`` of the first place where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub, a.get(k, "<absent>"), b.get(k, "<absent>")
            found = _first_difference(a[k], b[k], sub)
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found is not None:
                return found
        return None
    same = (a == b and type(a) is type(b)) or (_is_number(a) and _is_number(b) and a == b)
    return None if same else (key, a, b)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_node_tables(model: Any, num_nodes: int, name: str) -> None:
    """Every initializer gathered by ``node_ids`` must have ``num_nodes`` rows."""
    graph = model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    derived = {"node_ids"}
    rows: dict[str, int] = {}
    for node in graph.node:  # topologically sorted (ONNX requirement)
        if node.op_type in _PASS_THROUGH and node.input and node.input[0] in derived:
            derived.add(node.output[0])
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in derived:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            table = shapes.get(node.input[0])
            if axis == 0 and table:
                rows[node.input[0]] = int(table[0])
    if not rows:
        raise ManifestError(
            f"{name}: no table indexed by 'node_ids' found; not an 'embedded' model"
        )
    wrong = {t: n for t, n in rows.items() if n != num_nodes}
    if wrong:
        table, n = next(iter(wrong.items()))
        raise ManifestError(
            f"manifest.json says graph.num_nodes={num_nodes} but table {table!r} in {name} "
            f"has {n} rows: manifest.json was edited or belongs to another model"
        )
