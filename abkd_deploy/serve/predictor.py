"""``Predictor``: an exported student behind onnxruntime (numpy + onnxruntime only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from abkd_deploy.errors import ConfigError, DeviceError, first_line
from abkd_deploy.serve.errors import ArtifactError, BatchTooLarge, InvalidInput
from abkd_deploy.serve.lookup import lookup_tables
from abkd_deploy.serve.manifest import check_model, load_manifest, onnx_file, verify_files
from abkd_deploy.serve.new_nodes import NewNodeModel, NewNodes, as_new_nodes
from abkd_deploy.serve.postprocess import (
    ANSWERS,
    Postprocess,
    folder_option_supported,
    make_postprocess,
    with_answers,
)
from abkd_deploy.serve.providers import SessionInfo, create_session
from abkd_deploy.serve.request_validation import as_node_ids

log = logging.getLogger(__name__)

#: Default cap on node ids per model run.
DEFAULT_MAX_BATCH = 4096
#: onnxruntime intra-op threads of an ``embedded`` model when none are asked for (idle
#: threads never spin): its call is a few gathers of narrow rows, and a second thread was
#: no faster at batch 1024 and up to 3x slower on a busy machine (docs/BENCHMARKS.md
#: "Model call (issue 10)").
EMBEDDED_THREADS = 1

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class Prediction:
    """Answers for a batch of node ids, row ``i`` for id ``i``.

    Attributes:
        classes: ``[b]`` int64 predicted class (argmax of the logits).
        scores: ``[b, C]`` float32 class probabilities (softmax of the logits).
        embedding: ``[b, hidden]`` float32 last hidden layer, if asked for.
    """

    classes: np.ndarray
    scores: np.ndarray
    embedding: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def __getitem__(self, rows: slice) -> Prediction:
        """Rows ``rows`` of every field (used to split a micro-batch back to its callers)."""
        emb = None if self.embedding is None else self.embedding[rows]
        return Prediction(self.classes[rows], self.scores[rows], emb)

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        """The rows of ``parts``, in order (answers for ``node_ids`` then ``nodes``)."""
        if len(parts) == 1:
            return parts[0]
        embs = [p.embedding for p in parts]
        return Prediction(
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            None if any(e is None for e in embs) else np.concatenate(embs),
        )


def run_on_cpu(session: Any, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``session.run(names, feed)`` without the Python wrapper's per-call checks.

    ``InferenceSession.run`` checks the feed's names against the model and handles a
    failing execution provider's fallback on every call (6-7 us at one id, a fifth of an
    ``embedded`` model's whole run); the Predictor checks its feeds itself and only takes
    this path on CPU. Sessions without the binding (other wrappers) run as usual.
    """
    raw = getattr(session, "_sess", None)
    if raw is None:
        return session.run(names, feed)
    return raw.run(names, feed, None)


class _TableAnswers:
    """Every node's answer, computed once from the tables of a ``--precompute all``
    export (:mod:`abkd_deploy.serve.lookup`): a call is a few ``np.take`` s, with the
    values :meth:`Predictor.predict` would give (the same postprocessing)."""

    def __init__(self, tables: dict[str, np.ndarray], postprocess: Postprocess) -> None:
        logits = np.ascontiguousarray(tables["logits"], dtype=np.float32)
        self.classes, self.scores = postprocess(logits)  # the model path's own function
        self.embedding = tables.get("embedding")

    def predict(self, ids: np.ndarray, return_embedding: bool) -> Prediction:
        emb = np.take(self.embedding, ids, 0) if return_embedding else None
        return Prediction(np.take(self.classes, ids), np.take(self.scores, ids, 0), emb)


class Predictor:
    """Loads an export directory (``docs/FORMATS.md``) and answers node-classification calls.

    Args:
        export_dir: directory with ``manifest.json`` and ``model.onnx``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA if it really runs, else CPU).
        threads: onnxruntime intra-op threads (``None``: :data:`EMBEDDED_THREADS` without
            spinning for an ``embedded`` export, onnxruntime's default for the others).
        max_batch: the most node ids one :meth:`predict` call takes.
        verify: check the SHA-256 of every file in ``manifest["files"]`` (default ``True``).

    Attributes:
        manifest: the parsed ``manifest.json``.
        provider: the execution provider that runs the model.
        format: the adjacency format (``embedded``, ``ell`` or ``coo``).
        num_nodes: number of nodes of the graph baked into the export.
        num_classes: number of classes.

    Raises:
        ArtifactError: missing/malformed manifest, hash mismatch, unloadable model, a manifest
            that disagrees with the copy inside the model or with the size of its node
            tables (so no id in ``[0, num_nodes)`` can be out of the model's range), or a
            model whose inputs/outputs disagree with the manifest.
        DeviceError: ``device='cuda'`` and the model cannot run on CUDA.
    """

    def __init__(
        self,
        export_dir: str | Path,
        device: str = "auto",
        threads: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        verify: bool = True,
    ) -> None:
        if int(max_batch) < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        self.export_dir = Path(export_dir)
        self.manifest: dict[str, Any] = load_manifest(self.export_dir)
        if verify:
            verify_files(self.export_dir, self.manifest)
        model_path = self.export_dir / onnx_file(self.manifest)
        spinning = None
        if threads is None and self.manifest["adjacency"]["format"] == "embedded":
            threads, spinning = EMBEDDED_THREADS, False
        self._info, self._fused = self._open(model_path, device, threads, spinning)
        check_model(self.manifest, model_path)
        self.session = self._info.session
        self.provider: str = self._info.provider
        self.format: str = self.manifest["adjacency"]["format"]
        self.num_nodes: int = int(self.manifest["graph"]["num_nodes"])
        self.num_classes: int = int(self.manifest["graph"]["num_classes"])
        self.max_batch = int(max_batch)
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._outputs = [
            o.name for o in self.session.get_outputs() if not (self._fused and o.name in ANSWERS)
        ]
        self._check_signature()
        self.new_nodes: NewNodeModel | None = None
        if self.format == "embedded" and "new_nodes" in self.manifest:
            self.new_nodes = NewNodeModel(
                self.export_dir,
                self.manifest["new_nodes"],
                self.num_nodes,
                device,
                threads,
                spinning,
            )
        self._answers: _TableAnswers | None = None
        if self.manifest["adjacency"].get("precompute") == "all" and not self._info.on_cuda:
            tables = lookup_tables(model_path, self._outputs)
            self._answers = None if tables is None else _TableAnswers(tables, self._postprocess)
        log.info("loaded %s (%s) on %s", model_path, self.format, self.provider)

    def _open(
        self, model_path: Path, device: str, threads: int | None, spinning: bool | None
    ) -> tuple[SessionInfo, bool]:
        """The model's session, and whether it answers classes and scores itself
        (:func:`~.postprocess.with_answers`, ``embedded`` exports on onnxruntime >= 1.21);
        any other model, or one that does not load that way, is loaded from its file."""
        fused = None
        if self.manifest["adjacency"]["format"] == "embedded" and folder_option_supported():
            try:
                fused = with_answers(model_path)
            except Exception:  # not readable as ONNX: loading the file names the problem
                fused = None
        if fused is not None:
            try:
                info = create_session(fused, device, threads, spinning, self.export_dir)
                return info, True
            except (DeviceError, ConfigError):
                raise
            except Exception as exc:
                log.info("loading %s as it is: %s", model_path, first_line(exc))
        try:
            return create_session(model_path, device, threads, spinning), False
        except (DeviceError, ConfigError):
            raise
        except Exception as exc:
            first = first_line(exc)
            raise ArtifactError(f"onnxruntime cannot load {model_path}: {first}") from exc

    @cached_property
    def _postprocess(self) -> Postprocess:
        """logits -> (classes, scores) in one onnxruntime call (:mod:`.postprocess`): for
        new nodes, precomputed tables and models that do not answer them themselves."""
        return make_postprocess(self.num_classes)

    # ------------------------------------------------------------------ public API

    @property
    def has_embedding(self) -> bool:
        """Whether the model has an ``embedding`` output."""
        return "embedding" in self._outputs

    def predict(
        self, node_ids: Any = None, return_embedding: bool = False, nodes: Any = None
    ) -> Prediction:
        """Classifies a batch of nodes (``embedded`` exports).

        Args:
            node_ids: 1-D integers in ``[0, num_nodes)``, at most ``max_batch`` of them.
            return_embedding: also return the last hidden layer.
            nodes: nodes that are not in the export: ``[{"features": [F floats],
                "neighbors": [ids]}, ...]`` or :class:`~.new_nodes.NewNodes`
                (:mod:`abkd_deploy.serve.new_nodes`); answered after ``node_ids``.

        Raises:
            InvalidNodeIds: non-integers, ids out of range, or an empty batch.
            BatchTooLarge: more than ``max_batch`` ids and nodes.
            InvalidNewNodes: a new node with bad features or neighbours.
            InvalidInput: not an ``embedded`` export, no ``embedding`` output, or ``nodes``
                for an export without a new-node graph.
        """
        if self.format != "embedded":
            raise InvalidInput(
                f"predict() needs an 'embedded' export; this one is {self.format!r}: use run()"
            )
        if return_embedding and not self.has_embedding:
            raise InvalidInput(f"this model has no 'embedding' output (outputs: {self._outputs})")
        if nodes is not None:
            return self._predict_mixed(node_ids, nodes, return_embedding)
        return self.predict_ids(
            as_node_ids(node_ids, self.num_nodes, self.max_batch), return_embedding
        )

    def predict_ids(self, ids: np.ndarray, return_embedding: bool = False) -> Prediction:
        """:meth:`predict` of ids already checked (``[n]`` int64 in ``[0, num_nodes)``,
        ``1 <= n <= max_batch``, e.g. by :func:`~.request_validation.as_node_ids`): the
        serving path, which checks every request once when it parses it."""
        if self._answers is not None:
            return self._answers.predict(ids, return_embedding)
        if self._fused:  # one run answers classes and scores
            names = [*ANSWERS, "embedding"] if return_embedding else list(ANSWERS)
            outs = self._run({"node_ids": ids}, names)
            classes, scores = outs[0], outs[1]
            embedding = np.asarray(outs[2]) if return_embedding else None
        else:
            names = ["logits", "embedding"] if return_embedding else ["logits"]
            outs = self._run({"node_ids": ids}, names)
            classes, scores = self._postprocess(np.ascontiguousarray(outs[0], dtype=np.float32))
            embedding = np.asarray(outs[1]) if return_embedding else None
        return Prediction(classes=classes, scores=scores, embedding=embedding)

    def check_nodes(self, nodes: Any, max_batch: int | None = None) -> NewNodes:
        """Checks new nodes for this export (see :meth:`predict`).

        Raises:
            InvalidInput: the export has no new-node graph.
            InvalidNewNodes / BatchTooLarge: see :func:`~.new_nodes.as_new_nodes`.
        """
        if self.new_nodes is None:
            raise InvalidInput(
                "this export cannot answer for new nodes (no new_nodes.onnx: re-export an "
                "embedded gcn or sage student to ONNX)"
            )
        if isinstance(nodes, NewNodes):
            return nodes
        return as_new_nodes(nodes, self.new_nodes.limits, max_batch or self.max_batch)

    def predict_nodes(self, nodes: Any, return_embedding: bool = False) -> Prediction:
        """Answers new nodes only (:meth:`predict` with ``nodes``), in request order."""
        checked = self.check_nodes(nodes)
        assert self.new_nodes is not None
        names = ["logits", "embedding"] if return_embedding else ["logits"]
        outs = self.new_nodes.run(checked, names)
        classes, scores = self._postprocess(np.ascontiguousarray(outs[0], dtype=np.float32))
        return Prediction(
            classes=classes,
            scores=scores,
            embedding=np.asarray(outs[1], dtype=np.float32) if return_embedding else None,
        )

    def _predict_mixed(self, node_ids: Any, nodes: Any, return_embedding: bool) -> Prediction:
        checked = self.check_nodes(nodes)
        has_ids = node_ids is not None and not (
            isinstance(node_ids, list | tuple) and len(node_ids) == 0
        )
        if not has_ids and not len(checked):
            raise InvalidInput("nothing to answer: node_ids and nodes are both empty")
        parts = []
        if has_ids:
            ids = as_node_ids(node_ids, self.num_nodes, self.max_batch)
            if ids.size + len(checked) > self.max_batch:
                raise BatchTooLarge(int(ids.size) + len(checked), self.max_batch)
            parts.append(self.predict(ids, return_embedding))
        if len(checked):
            parts.append(self.predict_nodes(checked, return_embedding))
        return Prediction.concat(parts)

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Runs the model on a raw feed (any adjacency format) and returns every output.

        Inputs are cast to the model's dtypes (an integer input given floats is an error).
        ``node_ids`` of an ``embedded`` export are range-checked like in :meth:`predict`.

        Args:
            inputs: input name -> array, exactly the model's inputs (``manifest["inputs"]``).

        Raises:
            InvalidInput: missing/unexpected names, wrong dtype kind or rank, or inputs that
                onnxruntime rejects (inconsistent shapes).
        """
        missing = sorted(set(self._inputs) - set(inputs))
        extra = sorted(set(inputs) - set(self._inputs))
        if missing or extra:
            raise InvalidInput(
                f"inputs must be exactly {sorted(self._inputs)}; missing {missing}, "
                f"unexpected {extra}"
            )
        feed = {name: self._cast(name, value) for name, value in inputs.items()}
        if self.format == "embedded" and "node_ids" in feed:
            feed["node_ids"] = as_node_ids(feed["node_ids"], self.num_nodes, self.max_batch)
        try:
            outs = self._run(feed, self._outputs)
        except Exception as exc:
            first = first_line(exc)
            raise InvalidInput(f"onnxruntime rejected the inputs: {first}") from exc
        return dict(zip(self._outputs, outs, strict=True))

    def info(self) -> dict[str, Any]:
        """What ``/healthz`` reports: provider, format, graph size and model summary."""
        m = self.manifest
        return {
            "provider": self.provider,
            "device_note": self._info.note or None,
            "format": self.format,
            "num_nodes": self.num_nodes,
            "num_classes": self.num_classes,
            "max_batch": self.max_batch,
            "model": m.get("model"),
            "producer": m.get("producer"),
            "opset": m.get("opset"),
            "inputs": [i["name"] for i in m["inputs"]],
            "outputs": list(self._outputs),
            "new_nodes": None if self.new_nodes is None else vars(self.new_nodes.limits),
        }

    def __repr__(self) -> str:
        return (
            f"Predictor({str(self.export_dir)!r}, format={self.format}, "
            f"provider={self.provider}, num_nodes={self.num_nodes})"
        )

    # ------------------------------------------------------------------ internals

    def _check_signature(self) -> None:
        want = {i["name"] for i in self.manifest["inputs"]}
        if want != set(self._inputs):
            raise ArtifactError(
                f"manifest.json lists inputs {sorted(want)}; the model has {sorted(self._inputs)}"
            )
        want_out = {o["name"] for o in self.manifest["outputs"]}
        if want_out != set(self._outputs):
            raise ArtifactError(
                f"manifest.json lists outputs {sorted(want_out)}; the model has "
                f"{sorted(self._outputs)}"
            )
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        width = logits.shape[-1] if logits is not None and logits.shape else None
        if isinstance(width, int) and width != self.num_classes:
            raise ArtifactError(
                f"manifest.json says graph.num_classes={self.num_classes}; the model's "
                f"logits have {width} columns"
            )
        if self.format == "embedded" and ("node_ids" not in want or "logits" not in self._outputs):
            raise ArtifactError(
                "an 'embedded' export needs input 'node_ids' and output 'logits'; "
                f"the model has inputs {sorted(self._inputs)}, outputs {self._outputs}"
            )

    def _cast(self, name: str, value: Any) -> np.ndarray:
        spec = self._inputs[name]
        dtype = _ORT_DTYPES.get(spec.type)
        arr = np.asarray(value)
        if dtype is not None:
            want_kind = np.dtype(dtype).kind
            if want_kind in "iu" and arr.dtype.kind not in "iu":
                raise InvalidInput(
                    f"input {name!r} must be integers ({spec.type}), got {arr.dtype}"
                )
            if want_kind == "f" and arr.dtype.kind not in "fiu":
                raise InvalidInput(f"input {name!r} must be numbers ({spec.type}), got {arr.dtype}")
            arr = np.ascontiguousarray(arr, dtype=dtype)
        if len(spec.shape) != arr.ndim:
            raise InvalidInput(
                f"input {name!r} must have {len(spec.shape)} dims {spec.shape}, got shape "
                f"{tuple(arr.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise InvalidInput(
                    f"input {name!r} must have size {want} on axis {axis}, got {tuple(arr.shape)}"
                )
        return arr

    def _run(self, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        """One model run; IO binding on CUDA (outputs on the GPU, copied back once)."""
        if not self._info.on_cuda:
            return run_on_cpu(self.session, names, feed)
        binding = self.session.io_binding()
        for name, arr in feed.items():
            binding.bind_cpu_input(name, arr)
        for name in names:
            binding.bind_output(name, "cuda", self._info.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()
