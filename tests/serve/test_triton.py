"""``abkd-deploy triton``: config.pbtxt parsed with tritonclient's ModelConfig schema and
checked against the ONNX graph; the repository's model folder runs like the export.

No Triton server runs here (it is a container; there is no Docker engine): the tests parse
the config with the protobuf schema Triton itself reads, and replay what Triton's
onnxruntime backend does with it (wire shapes, reshape, batch dim) on the copied model.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import InferInput, model_config_pb2
from tritonclient.utils import np_to_triton_dtype

from abkd_deploy.cli import main
from abkd_deploy.errors import ConfigError
from abkd_deploy.serve import ArtifactError, Predictor
from abkd_deploy.serve import triton as tr
from abkd_deploy.serve.onnx_signature import TensorSig, read_signature
from abkd_deploy.serve.triton_config import DEFAULT_QUEUE_DELAY_US, Instances, parse_instances
from tests.serve.tiny_export import TinyModel, ell_onnx, write_export

ModelConfig = model_config_pb2.ModelConfig
DataType = model_config_pb2.DataType


def parse_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """``config.pbtxt`` through Triton's own schema (unknown fields or bad enums raise)."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), ModelConfig())


def graph_tensors(model_path: Path) -> tuple[list, list]:
    """(name, Triton dtype, dims with -1 for symbolic) of the graph inputs and outputs."""
    model = onnx.load(str(model_path), load_external_data=False)

    def spec(v: onnx.ValueInfoProto) -> tuple[str, str, list[int]]:
        t = v.type.tensor_type
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return v.name, "TYPE_" + np_to_triton_dtype(np_dtype), dims

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def assert_matches_graph(config: model_config_pb2.ModelConfig, model_path: Path) -> None:
    """Names, dtypes and dims of the config agree with the ONNX graph, batch dim and all."""
    inputs, outputs = graph_tensors(model_path)
    batched = config.max_batch_size > 0
    for declared, graph in ((config.input, inputs), (config.output, outputs)):
        assert [t.name for t in declared] == [name for name, _, _ in graph]
        for tensor, (_, dtype, dims) in zip(declared, graph, strict=True):
            assert DataType.Name(tensor.data_type) == dtype
            model_dims = dims[1:] if batched else dims
            if model_dims:
                assert list(tensor.dims) == model_dims
                assert not tensor.HasField("reshape")
            else:  # batch-only tensor: [n, 1] on the wire, [n] in the model
                assert list(tensor.dims) == [1]
                assert tensor.HasField("reshape") and list(tensor.reshape.shape) == []


def run_like_triton(config: model_config_pb2.ModelConfig, model_dir: Path, feeds: dict) -> dict:
    """What Triton's onnxruntime backend does for one batched request: checks the wire
    shapes against ``[n] + dims``, applies ``reshape``, runs the model, reshapes back."""
    sess = ort.InferenceSession(
        str(model_dir / "1" / config.default_model_filename), providers=["CPUExecutionProvider"]
    )
    n = next(iter(feeds.values())).shape[0]
    assert n <= config.max_batch_size
    model_feeds = {}
    for tensor in config.input:
        wire = feeds[tensor.name]
        assert list(wire.shape) == [n, *tensor.dims]
        shape = [n, *tensor.reshape.shape] if tensor.HasField("reshape") else wire.shape
        model_feeds[tensor.name] = wire.reshape(shape)
    names = [t.name for t in config.output]
    out = dict(zip(names, sess.run(names, model_feeds), strict=True))
    for tensor in config.output:
        assert out[tensor.name].size == n * int(np.prod(tensor.dims))
        out[tensor.name] = out[tensor.name].reshape([n, *tensor.dims])
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ embedded (batched)


def test_embedded_config_matches_graph(embedded_dir: Path, tmp_path: Path) -> None:
    model = tr.write_triton_repo(embedded_dir, tmp_path / "repo", name="student")
    assert model.path == tmp_path / "repo" / "student"
    config = parse_config(model.path)
    assert config.name == "student" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == tr.DEFAULT_MAX_BATCH
    assert config.default_model_filename == "model.onnx"
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == DEFAULT_QUEUE_DELAY_US
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert_matches_graph(config, model.path / "1" / "model.onnx")
    assert [t.name for t in config.input] == ["node_ids"]
    assert DataType.Name(config.input[0].data_type) == "TYPE_INT64"
    # the version folder holds the export's bytes, and its manifest verbatim
    for name in ("model.onnx", "manifest.json"):
        assert sha(model.path / "1" / name) == sha(embedded_dir / name)


def test_embedded_wire_shapes_answer_like_predictor(embedded_dir: Path, tmp_path: Path) -> None:
    model = tr.write_triton_repo(embedded_dir, tmp_path / "repo", max_batch=64)
    config = parse_config(model.path)
    assert config.max_batch_size == 64
    ids = np.array([0, 7, 7, 499, 123], dtype=np.int64)
    # the README's client request: tritonclient checks data against shape and datatype
    spec = config.input[0]
    request = InferInput(spec.name, [len(ids), *spec.dims], DataType.Name(spec.data_type)[5:])
    request.set_data_from_numpy(ids.reshape(-1, 1))
    out = run_like_triton(config, model.path, {"node_ids": ids.reshape(-1, 1)})
    pred = Predictor(embedded_dir, device="cpu").predict(ids, return_embedding=True)
    assert np.array_equal(out["logits"].argmax(1), pred.classes)
    assert np.allclose(out["embedding"], pred.embedding, atol=1e-6)


def test_gpu_instances_and_queue_delay(embedded_dir: Path, tmp_path: Path) -> None:
    model = tr.write_triton_repo(
        embedded_dir, tmp_path / "repo", instances="gpu:3", max_queue_delay_us=500
    )
    config = parse_config(model.path)
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 3)
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.name == embedded_dir.name  # default name: the export directory's


def test_max_batch_zero_gives_full_dims_without_batching(
    embedded_dir: Path, tmp_path: Path
) -> None:
    model = tr.write_triton_repo(embedded_dir, tmp_path / "repo", max_batch=0)
    config = parse_config(model.path)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert_matches_graph(config, model.path / "1" / "model.onnx")
    assert list(config.input[0].dims) == [-1]


# ------------------------------------------------------------------ ell (no batch dim)


@pytest.fixture
def ell_dir(tmp_path: Path, tiny: TinyModel) -> Path:
    f, c = tiny.w2.shape
    w = np.random.default_rng(1).normal(size=(f, c)).astype(np.float32)
    return write_export(tmp_path / "ell", ell_onnx(w), "ell", 100, f, c)


def test_ell_config_has_no_batch_dim(ell_dir: Path, tmp_path: Path) -> None:
    model = tr.write_triton_repo(ell_dir, tmp_path / "repo")
    config = parse_config(model.path)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert_matches_graph(config, model.path / "1" / "model.onnx")
    dims = {t.name: list(t.dims) for t in config.input}
    assert dims == {"x": [-1, 6], "nbr_1": [-1, -1], "weight_1": [-1, -1]}
    assert [list(t.dims) for t in config.output] == [[-1, 4]]
    assert "one (sub)graph" in (model.path / "config.pbtxt").read_text()


def test_ell_refuses_a_batch_size(ell_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'ell'.*max_batch_size must be 0"):
        tr.write_triton_repo(ell_dir, tmp_path / "repo", max_batch=8)
    assert not (tmp_path / "repo").exists()


# ------------------------------------------------------------------ external data


@pytest.fixture(scope="module")
def external_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sage export with every initializer in ``model.onnx.data``."""
    from abkd_deploy.export import export, onnx_format
    from tests.export.conftest import make_run

    root = tmp_path_factory.mktemp("triton_real")
    run = make_run(root / "run", "sage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_format, "EXTERNAL_DATA_BYTES", 0)
        export(run, root / "export", progress=False)
    return root / "export"


def test_external_data_export(external_export: Path, tmp_path: Path) -> None:
    assert (external_export / "model.onnx.data").is_file()
    model = tr.write_triton_repo(external_export, tmp_path / "repo", name="sage")
    version = model.path / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "graph.npz",  # what `refresh` reads; copied with the manifest's files too
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "new_nodes.onnx",  # copied with the manifest's files; Triton loads model.onnx only
        "new_nodes.onnx.data",
    ]
    assert sha(version / "model.onnx.data") == sha(external_export / "model.onnx.data")
    config = parse_config(model.path)
    assert_matches_graph(config, version / "model.onnx")
    ids = np.array([0, 3, 3, 599, 42], dtype=np.int64)
    # the copied model finds its external data at the same relative location
    out = run_like_triton(config, model.path, {"node_ids": ids.reshape(-1, 1)})
    want = Predictor(external_export, device="cpu").predict(ids, return_embedding=True)
    assert np.array_equal(out["logits"].argmax(1), want.classes)
    # the version folder is itself a valid export (hashes, metadata, tables all check)
    again = Predictor(version, device="cpu").predict(ids, return_embedding=True)
    assert np.array_equal(again.scores, want.scores)


def test_signature_readers_agree(external_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_path = external_export / "model.onnx"
    with_onnx = read_signature(model_path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # a serving image without onnx
    assert read_signature(model_path) == with_onnx
    assert with_onnx[0] == [TensorSig("node_ids", "int64", ("batch",))]


# ------------------------------------------------------------------ refusals


def test_parse_instances() -> None:
    assert parse_instances("cpu:4") == Instances("KIND_CPU", 4)
    assert parse_instances("GPU") == Instances("KIND_GPU", 1)
    for bad in ("tpu:2", "cpu:0", "cpu:-1", "cpu:x", "", "gpu:2,cpu:1"):
        with pytest.raises(ConfigError, match="cpu:N or gpu:N"):
            parse_instances(bad)


def run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["triton", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_writes_and_refuses_bad_instances(embedded_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code, out, err = run_cli(str(embedded_dir), "--out", str(repo), "--instances", "tpu:2")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "'tpu:2'" in err and len(err.splitlines()) == 1
    assert not repo.exists()
    code, out, _ = run_cli(str(embedded_dir), "--out", str(repo), "--instances", "cpu:2")
    assert code == 0 and "max_batch_size 1024" in out
    assert parse_config(repo / embedded_dir.name).instance_group[0].count == 2


def test_existing_model_needs_force(embedded_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tr.write_triton_repo(embedded_dir, repo, name="m")
    (repo / "other").mkdir()  # another model of the repository: never touched
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    code, _, err = run_cli(str(embedded_dir), "--out", str(repo), "--name", "m")
    assert code == 2 and "already exists" in err and len(err.splitlines()) == 1
    code, _, _ = run_cli(str(embedded_dir), "--out", str(repo), "--name", "m", "--max-batch", "8")
    assert code == 2 and parse_config(repo / "m").max_batch_size == tr.DEFAULT_MAX_BATCH
    args = (str(embedded_dir), "--out", str(repo), "--name", "m", "--max-batch", "8", "--force")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert parse_config(repo / "m").max_batch_size == 8
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert sorted(p.name for p in repo.iterdir()) == ["m", "other"]  # no staging leftovers


def test_force_never_replaces_what_it_did_not_write(embedded_dir: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text('name: "m"\n')  # a hand-made model folder
    code, _, err = run_cli(str(embedded_dir), "--out", str(repo), "--name", "m", "--force")
    assert code == 2 and "not written by abkd-deploy" in err
    assert (repo / "m" / "config.pbtxt").read_text() == 'name: "m"\n'
    # ... nor one of ours to which the user added a file
    tr.write_triton_repo(embedded_dir, repo, name="ours")
    (repo / "ours" / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="labels.txt"):
        tr.write_triton_repo(embedded_dir, repo, name="ours", force=True)
    assert (repo / "ours" / "labels.txt").is_file()


def test_refuses_to_write_over_the_export(export_copy: Path) -> None:
    before = sorted(p.name for p in export_copy.iterdir())
    args = (str(export_copy), "--out", str(export_copy.parent), "--name", export_copy.name)
    code, _, err = run_cli(*args, "--force")
    assert code == 2 and "source directory" in err
    assert sorted(p.name for p in export_copy.iterdir()) == before


def test_bad_name_and_tampered_export(export_copy: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    code, _, err = run_cli(str(export_copy), "--out", str(repo), "--name", "../x")
    assert code == 2 and "'../x'" in err
    data = bytearray((export_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (export_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 of 'model.onnx'"):
        tr.write_triton_repo(export_copy, repo)
    assert not repo.exists()  # nothing written, not even the repository folder
    code, _, err = run_cli(str(export_copy), "--out", str(repo))
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_module_is_torch_free(embedded_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from abkd_deploy.serve.triton import write_triton_repo\n"
        f"write_triton_repo({str(embedded_dir)!r}, {str(tmp_path / 'repo')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "repo" / embedded_dir.name / "config.pbtxt").is_file()
