"""Bad options get one clear line; existing export directories are not clobbered."""

import pytest

from abkd_deploy.errors import CheckpointError, ConfigError
from abkd_deploy.export import export
from abkd_deploy.export.options import parse_fanouts


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"formats": ("onnx", "tflite")}, r"unknown export format 'tflite'; expected one of: onnx"),
        ({"adjacency": "csr"}, r"unknown adjacency format 'csr'; expected one of: coo, "),
        ({"opset": 15}, r"opset 15 is not supported; expected >= 16"),
        ({"adjacency": "coo", "opset": 17}, r"coo adjacency needs opset >= 18"),
        ({"dtype": "bfloat16"}, r"unknown dtype 'bfloat16'; expected one of: float32, float16"),
        ({"fanouts": "10,10,10"}, r"has 3 values but the student has 2 layers"),
        ({"fanouts": "ten"}, r"bad fanout 'ten'"),
    ],
)
def test_bad_options(gcn_run, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        export(gcn_run, tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_run_dir_without_student(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no student checkpoint in .*student.json is missing"):
        export(tmp_path / "run", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_is_kept_unless_force(gcn_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        export(gcn_run, out, formats=("torchscript",), progress=False)
    with pytest.raises(ConfigError, match="not written by abkd-deploy"):  # --force: not ours
        export(gcn_run, out, formats=("torchscript",), force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export(gcn_run, out, formats=("onnx",), progress=False)  # an empty dir may be used
    manifest = export(gcn_run, out, formats=("torchscript",), force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pt"]
    assert manifest["artifacts"] == {"torchscript": "model.pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp / old dirs left


def test_parse_fanouts():
    assert parse_fanouts("max", 2, 17) == [17, 17]
    assert parse_fanouts("5, 3", 2, 17) == [5, 3]
    assert parse_fanouts(4, 3, 17) == [4, 4, 4]
    assert parse_fanouts(["max", 2], 2, 9) == [9, 2]
