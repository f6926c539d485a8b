"""Predictor: loading, integrity checks, providers, validation, raw feeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abkd_deploy.errors import ConfigError, DeviceError, ServeError
from abkd_deploy.serve import (
    ArtifactError,
    BatchTooLarge,
    InvalidInput,
    InvalidNodeIds,
    Prediction,
    Predictor,
)
from abkd_deploy.serve.postprocess import ANSWERS, folder_option_supported
from tests.serve.tiny_export import ell_onnx, embedded_onnx, lookup_onnx, softmax, write_export

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def predictor(embedded_dir: Path) -> Predictor:
    return Predictor(embedded_dir, device="cpu", threads=1, max_batch=64)


def test_predict_matches_reference(predictor: Predictor, tiny) -> None:
    ids = np.array([0, 7, 499, 7, 123])
    pred = predictor.predict(ids.tolist(), return_embedding=True)
    logits, emb = tiny.forward(ids)
    assert pred.classes.dtype == np.int64 and pred.scores.dtype == np.float32
    np.testing.assert_array_equal(pred.classes, logits.argmax(1))
    np.testing.assert_allclose(pred.scores, softmax(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.scores.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(pred.embedding, emb, rtol=1e-5, atol=1e-6)
    assert predictor.predict(ids).embedding is None


def test_attributes(predictor: Predictor) -> None:
    assert predictor.provider == "CPUExecutionProvider"
    assert (predictor.num_nodes, predictor.num_classes, predictor.format) == (500, 4, "embedded")
    assert predictor.manifest["format_version"] == 1
    assert predictor.info()["outputs"] == ["logits", "embedding"]


@pytest.mark.parametrize(
    "ids", [np.array([1, 2], np.int32), np.array([1, 2], np.uint16), [np.int64(1), 2], (1, 2)]
)
def test_accepts_integer_kinds(predictor: Predictor, ids) -> None:
    assert predictor.predict(ids).classes.shape == (2,)


@pytest.mark.parametrize(
    ("ids", "bad"),
    [
        ([1, 2.0, 3], [2.0]),
        ([1, "2"], ["2"]),
        ([True, 1], [True]),
        ([[1, 2]], [[1, 2]]),
        ([None], [None]),
    ],
)
def test_rejects_non_integers(predictor: Predictor, ids, bad) -> None:
    with pytest.raises(InvalidNodeIds, match="integers") as info:
        predictor.predict(ids)
    assert info.value.values == bad
    assert info.value.http_status == 422


@pytest.mark.parametrize("ids", [np.array([1.0, 2.0]), np.array([[1, 2]]), "12", 5])
def test_rejects_bad_containers(predictor: Predictor, ids) -> None:
    with pytest.raises(InvalidNodeIds):
        predictor.predict(ids)


def test_out_of_range_lists_values(predictor: Predictor) -> None:
    with pytest.raises(InvalidNodeIds, match=r"outside \[0, 500\)") as info:
        predictor.predict([0, -1, 500, 3, 10**30])
    assert info.value.values == [-1, 500, 10**30]
    bad = list(range(1000, 1060))
    with pytest.raises(InvalidNodeIds, match=r"\+50 more") as info:
        predictor.predict(bad)
    assert len(info.value.values) == 20  # truncated for the HTTP body


def test_empty_and_too_large(predictor: Predictor) -> None:
    with pytest.raises(InvalidNodeIds, match="empty"):
        predictor.predict([])
    with pytest.raises(BatchTooLarge, match="65 node ids; at most 64") as info:
        predictor.predict(list(range(65)))
    assert (info.value.size, info.value.limit, info.value.http_status) == (65, 64, 413)


def test_errors_are_serve_errors() -> None:
    for cls in (ArtifactError, InvalidNodeIds, BatchTooLarge, InvalidInput):
        assert issubclass(cls, ServeError)


def test_prediction_slicing() -> None:
    p = Prediction(np.arange(4), np.eye(4, dtype=np.float32), np.ones((4, 2), np.float32))
    part = p[1:3]
    assert len(part) == 2 and part.classes.tolist() == [1, 2] and part.embedding.shape == (2, 2)


# ---------------------------------------------------------------- integrity


def test_hash_mismatch(export_copy: Path) -> None:
    path = export_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 of 'model.onnx'"):
        Predictor(export_copy, device="cpu")


def test_size_mismatch_and_missing(export_copy: Path) -> None:
    with open(export_copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="bytes; manifest.json says"):
        Predictor(export_copy, device="cpu")
    (export_copy / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Predictor(export_copy, device="cpu")


def _edit_manifest(export_dir: Path, **changes) -> None:
    path = export_dir / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format_version": 2}, "format_version 2"),
        ({"files": {}}, "files"),
        ({"files": {"../model.onnx": {"sha256": "0"}, "model.onnx": {"sha256": "0"}}}, "relative"),
        ({"adjacency": {"format": "csr"}}, "adjacency.format"),
        ({"graph": {"num_nodes": 0, "num_classes": 4}}, "num_nodes"),
        ({"inputs": [{"name": "ids"}]}, r"inputs\[0\].name='ids' but the copy inside model.onnx"),
    ],
)
def test_bad_manifest(export_copy: Path, changes: dict, match: str) -> None:
    _edit_manifest(export_copy, **changes)
    with pytest.raises(ArtifactError, match=match):
        Predictor(export_copy, device="cpu")


def test_missing_or_broken_manifest(export_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        Predictor(tmp_path / "nope")
    (export_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Predictor(export_copy)
    (export_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Predictor(export_copy)


def test_unloadable_model(export_copy: Path) -> None:
    path = export_copy / "model.onnx"
    path.write_bytes(b"not an onnx model")
    _edit_manifest(export_copy, files={"model.onnx": {"sha256": _sha(path), "bytes": 17}})
    with pytest.raises(ArtifactError, match="onnxruntime cannot load"):
        Predictor(export_copy, device="cpu")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- providers


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime here has the CUDA provider")
def test_cuda_without_cuda_is_an_error(embedded_dir: Path) -> None:
    with pytest.raises(DeviceError, match="cannot run on CUDA"):
        Predictor(embedded_dir, device="cuda")


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime here has the CUDA provider")
@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_cuda_listed_but_not_running(embedded_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_available_providers() may list CUDA where it cannot run: the session decides."""
    from abkd_deploy.serve import providers

    real = ort.get_available_providers()
    monkeypatch.setattr(
        providers.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real]
    )
    with pytest.raises(DeviceError, match="listed but the session runs on CPUExecutionProvider"):
        Predictor(embedded_dir, device="cuda")
    auto = Predictor(embedded_dir, device="auto")
    assert auto.provider == "CPUExecutionProvider"
    assert "listed but" in auto.info()["device_note"]


def test_auto_reports_provider(embedded_dir: Path) -> None:
    p = Predictor(embedded_dir, device="auto")
    expected = "CUDAExecutionProvider" if HAS_CUDA_EP else "CPUExecutionProvider"
    if HAS_CUDA_EP and p.provider != expected:  # CUDA provider present but no usable GPU
        assert p.info()["device_note"]
    else:
        assert p.provider == expected


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"device": "tpu"}, "unknown device"),
        ({"threads": 0}, "threads"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_bad_options(embedded_dir: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Predictor(embedded_dir, **kw)


# ---------------------------------------------------------------- raw feeds


def test_run_raw_embedded(predictor: Predictor, tiny) -> None:
    out = predictor.run({"node_ids": np.array([3, 4], np.int32)})
    assert set(out) == {"logits", "embedding"}
    np.testing.assert_allclose(out["logits"], tiny.forward(np.array([3, 4]))[0], rtol=1e-5)
    with pytest.raises(InvalidInput, match="missing"):
        predictor.run({})
    with pytest.raises(InvalidInput, match="unexpected"):
        predictor.run({"node_ids": [1], "x": [1]})
    with pytest.raises(InvalidInput, match="integers"):
        predictor.run({"node_ids": np.array([1.5])})
    with pytest.raises(InvalidNodeIds, match="outside"):
        predictor.run({"node_ids": [500]})


@pytest.fixture(scope="module")
def ell_predictor(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, np.ndarray]:
    w = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    out = write_export(tmp_path_factory.mktemp("ell") / "e", ell_onnx(w), "ell", 20, 5, 3)
    return Predictor(out, device="cpu"), w


def test_run_raw_ell(ell_predictor) -> None:
    p, w = ell_predictor
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    nbr = rng.integers(0, 20, size=(7, 3))
    weight = rng.random((7, 3)).astype(np.float64)  # cast to float32 by run()
    out = p.run({"x": x, "nbr_1": nbr, "weight_1": weight})
    ref = (x[nbr] * weight[..., None].astype(np.float32)).sum(1) @ w
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput, match="'embedded' export"):
        p.predict([0])
    with pytest.raises(InvalidInput, match="must have 2 dims"):
        p.run({"x": x, "nbr_1": nbr[0], "weight_1": weight})
    with pytest.raises(InvalidInput, match="size 5 on axis 1"):
        p.run({"x": x[:, :4], "nbr_1": nbr, "weight_1": weight})
    with pytest.raises(InvalidInput, match="onnxruntime rejected"):
        p.run({"x": x, "nbr_1": nbr, "weight_1": weight[:3]})


# ---------------------------------------------------------------- manifest vs model


def _rewrite_model(export_dir: Path, manifest_changes: dict, metadata: bool = True) -> None:
    """Edits manifest.json AND the copy inside model.onnx alike (hashes updated): a
    consistent forgery that only the model's own table sizes can catch."""
    import onnx

    from tests.serve.tiny_export import embed_metadata

    m = json.loads((export_dir / "manifest.json").read_text())
    m.update(manifest_changes)
    model = onnx.load(export_dir / "model.onnx")
    if metadata:
        embed_metadata(model, {k: v for k, v in m.items() if k != "files"})
    else:
        del model.metadata_props[:]
    onnx.save(model, export_dir / "model.onnx")
    path = export_dir / "model.onnx"
    m["files"] = {"model.onnx": {"sha256": _sha(path), "bytes": path.stat().st_size}}
    (export_dir / "manifest.json").write_text(json.dumps(m))


def test_raised_num_nodes_in_manifest_is_refused(export_copy: Path) -> None:
    _edit_manifest(export_copy, graph={"num_nodes": 600, "num_features": 8, "num_classes": 4})
    with pytest.raises(ArtifactError) as info:
        Predictor(export_copy, device="cpu")
    msg = str(info.value)
    assert "graph.num_nodes=600" in msg and "says 500" in msg and "\n" not in msg


def test_forged_metadata_is_caught_by_the_table_size(export_copy: Path) -> None:
    _rewrite_model(export_copy, {"graph": {"num_nodes": 600, "num_features": 8, "num_classes": 4}})
    with pytest.raises(ArtifactError, match="table 'features' in model.onnx has 500 rows"):
        Predictor(export_copy, device="cpu")


def test_model_without_metadata_is_refused(export_copy: Path) -> None:
    _rewrite_model(export_copy, {}, metadata=False)
    with pytest.raises(ArtifactError, match="carries no 'abkd_manifest' metadata"):
        Predictor(export_copy, device="cpu")


def test_every_accepted_id_is_in_the_model_table(embedded_dir: Path, tiny) -> None:
    """The largest id the validator accepts runs; the next one is a 422-class error."""
    predictor = Predictor(embedded_dir, device="cpu")
    rows = tiny.features.shape[0]
    assert predictor.num_nodes == rows
    assert len(predictor.predict([rows - 1])) == 1
    with pytest.raises(InvalidNodeIds):
        predictor.predict([rows])


# ---------------------------------------------------------------- issue 10: the model call


def test_embedded_default_session_is_one_thread_without_spinning(embedded_dir: Path) -> None:
    default = Predictor(embedded_dir, device="cpu")
    opts = default.session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    two = Predictor(embedded_dir, device="cpu", threads=2)
    assert two.session.get_session_options().intra_op_num_threads == 2
    ids = np.random.default_rng(1).integers(0, default.num_nodes, 300)
    a, b = default.predict(ids, return_embedding=True), two.predict(ids, return_embedding=True)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6, atol=1e-7)


_ID_VALUES = st.one_of(
    st.integers(min_value=-5, max_value=520),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([np.int32(3), np.uint64(2**63 + 1), "7", None]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ID_VALUES, max_size=12) | st.lists(st.integers(0, 499), max_size=70))
def test_fast_id_validation_equals_elementwise(values: list) -> None:
    from abkd_deploy.serve import request_validation as validate

    def outcome(fast: bool):
        saved = validate.fast_node_ids
        if not fast:
            validate.fast_node_ids = lambda values, num_nodes: None
        try:
            return validate.as_node_ids(values, 500, 64).tolist()
        except ServeError as exc:
            return type(exc).__name__, str(exc), getattr(exc, "values", None)
        finally:
            validate.fast_node_ids = saved

    assert outcome(True) == outcome(False)


class _RecordingSession:
    """Wraps an onnxruntime session and records the output names of each run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session, self.names = session, []

    def run(self, names, feed):
        self.names.append(list(names))
        return self.session.run(names, feed)

    def __getattr__(self, name):
        if name == "_sess":  # no raw binding: every run goes through run() above
            raise AttributeError(name)
        return getattr(self.session, name)


def test_runs_fetch_only_the_outputs_requests_need(embedded_dir: Path) -> None:
    from abkd_deploy.serve.server import create_app
    from tests.serve.live_server import LiveServer

    predictor = Predictor(embedded_dir, device="cpu")
    answers = list(ANSWERS)  # classes and scores, computed in the model's own run
    recorder = _RecordingSession(predictor.session)
    predictor.session = recorder
    assert predictor.predict([1, 2]).embedding is None and recorder.names == [answers]
    with LiveServer(create_app(predictor, max_batch=64)) as live:
        client = live.connect()
        recorder.names.clear()
        status, body = client.predict([3, 4])
        assert status == 200 and "embeddings" not in body
        assert recorder.names == [answers]
        status, body = client.predict([5], return_embedding=True)
        assert status == 200 and len(body["embeddings"]) == 1
        assert recorder.names[-1] == [*answers, "embedding"]
        status, body = client.predict([6])
        assert status == 200 and recorder.names[-1] == answers
        client.close()


@pytest.fixture(scope="module")
def lookup_dir(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    """A ``--precompute all`` export of ``tiny``: every node's outputs, one Gather each."""
    n, f = tiny.features.shape
    logits, emb = tiny.forward(np.arange(n))
    out = tmp_path_factory.mktemp("lookup") / "export"
    model = lookup_onnx(logits.astype(np.float32), emb.astype(np.float32))
    adjacency = {"precompute": "all", "layout": "lookup"}
    return write_export(out, model, "embedded", n, f, logits.shape[1], adjacency=adjacency)


def test_lookup_export_answers_from_its_tables(lookup_dir: Path, embedded_dir: Path, tiny) -> None:
    fast = Predictor(lookup_dir, device="cpu", max_batch=64)
    assert fast._answers is not None
    slow = Predictor(lookup_dir, device="cpu", max_batch=64)
    slow._answers = None  # the onnxruntime path, for comparison
    ids = [0, 7, 499, 7, 123]
    a, b = fast.predict(ids, return_embedding=True), slow.predict(ids, return_embedding=True)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    assert fast.predict(ids).embedding is None
    # same answers as the model the tables were computed from, same errors
    ref = Predictor(embedded_dir, device="cpu", max_batch=64).predict(ids)
    np.testing.assert_array_equal(a.classes, ref.classes)
    np.testing.assert_allclose(a.scores, ref.scores, rtol=1e-6)
    with pytest.raises(InvalidNodeIds, match=r"outside \[0, 500\)"):
        fast.predict([3, 500])
    with pytest.raises(BatchTooLarge):
        fast.predict(list(range(65)))
    # a manifest that says "all" over a graph that is not a pure lookup: onnxruntime runs it
    other = write_export(
        lookup_dir.parent / "not_lookup",
        embedded_onnx(tiny),
        "embedded",
        *tiny.features.shape,
        tiny.w2.shape[1],
        adjacency={"precompute": "all"},
    )
    plain = Predictor(other, device="cpu")
    assert plain._answers is None
    np.testing.assert_array_equal(plain.predict(ids).classes, tiny.forward(ids)[0].argmax(1))


def test_an_embedded_model_answers_classes_and_scores_in_its_own_run(
    tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With its tables in ``model.onnx.data`` (as the exporter writes them), the model is
    loaded with ArgMax and Softmax appended (onnxruntime >= 1.21); the answers are those
    of the file loaded as it is with the separate postprocess session."""
    from abkd_deploy.serve import predictor as predictor_module

    n, f = tiny.features.shape
    out = write_export(
        tmp_path / "ext",
        embedded_onnx(tiny),
        "embedded",
        n,
        f,
        tiny.w2.shape[1],
        external_data=True,
    )
    fused = Predictor(out, device="cpu")
    assert fused._fused == folder_option_supported()
    monkeypatch.setattr(predictor_module, "folder_option_supported", lambda: False)
    plain = Predictor(out, device="cpu")
    assert not plain._fused
    ids = np.array([0, 7, 499, 7, 123, 31])
    a, b = fused.predict(ids, return_embedding=True), plain.predict(ids, return_embedding=True)
    np.testing.assert_array_equal(a.classes, b.classes)
    assert a.classes.dtype == np.int64 and a.scores.dtype == np.float32
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(a.embedding, b.embedding)
    logits, _ = tiny.forward(ids)
    np.testing.assert_allclose(a.scores, softmax(logits), rtol=1e-5, atol=1e-6)
    # the added outputs stay internal: same outputs, same raw run
    assert fused.info()["outputs"] == plain.info()["outputs"] == ["logits", "embedding"]
    assert sorted(fused.run({"node_ids": ids})) == ["embedding", "logits"]


def test_a_model_that_cannot_load_as_bytes_is_loaded_from_its_file(
    embedded_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from abkd_deploy.serve import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "with_answers", lambda path: b"not a model")
    p = Predictor(embedded_dir, device="cpu")
    assert not p._fused and p.predict([1, 2]).classes.shape == (2,)
