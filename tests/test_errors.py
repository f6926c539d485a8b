import onnx
import pytest

from abkd_deploy.errors import ExportError, first_line


def test_first_line_is_the_first_non_blank_line_stripped():
    assert first_line(ValueError("\n  bad shape [3, 4]  \nTraceback ...")) == "bad shape [3, 4]"
    assert first_line(KeyError("node_ids")) == "'node_ids'"


@pytest.mark.parametrize("exc", [ValueError(""), RuntimeError(), OSError("  \n\t\n")])
def test_first_line_of_an_empty_message_is_the_type_name(exc):
    assert first_line(exc) == type(exc).__name__


def test_checker_failure_with_an_empty_message_is_a_one_line_error(tmp_path, monkeypatch):
    # this call site raised IndexError on an empty message before first_line
    from abkd_deploy.export.onnx_format import check_onnx

    def fail(*_args, **_kwargs):
        raise onnx.checker.ValidationError("")

    monkeypatch.setattr(onnx.checker, "check_model", fail)
    with pytest.raises(ExportError, match=r"^m.onnx fails onnx.checker: ValidationError$"):
        check_onnx(tmp_path / "m.onnx")
