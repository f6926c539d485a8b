"""The torch-free name tables (abkd_deploy/names.py) and the registries they guard."""

import subprocess
import sys

import pytest

from abkd_deploy import names
from abkd_deploy.errors import ConfigError
from abkd_deploy.registry import Registry, check_name


def _registries():
    from abkd_deploy.data.registry import DATASETS, _import_builtin_loaders
    from abkd_deploy.distill.losses import LOSSES
    from abkd_deploy.distill.objective import METHODS
    from abkd_deploy.export.adjacency import ADJACENCY
    from abkd_deploy.export.formats import FORMATS, format_names
    from abkd_deploy.models import MODELS

    _import_builtin_loaders()
    format_names()  # imports the format modules
    return [
        (names.DATASET_FAMILIES, DATASETS),
        (names.ARCHITECTURES, MODELS),
        (names.KD_METHODS, METHODS),
        (names.LOSS_TERMS, LOSSES),
        (names.EXPORT_FORMATS, FORMATS),
        (names.ADJACENCY_FORMATS, ADJACENCY),
    ]


def test_static_tables_equal_registered_names():
    registries = _registries()
    assert len(registries) == len(names.DECLARED)
    for table, registry in registries:
        assert sorted(table) == registry.names(), registry.kind
        assert names.DECLARED[registry.kind] == table


def test_other_static_tables_match_their_owners():
    from abkd_deploy.export.formats import DTYPES
    from abkd_deploy.serve.bench import MODELS

    assert sorted(DTYPES) == sorted(names.EXPORT_DTYPES)
    assert tuple(MODELS) == names.BENCH_MODELS


def test_registering_an_undeclared_name_is_refused():
    registry: Registry[int] = Registry("architecture")
    registry.register("gcn")(1)
    with pytest.raises(ValueError, match="names.py"):
        registry.register("gin")(2)
    assert registry.names() == ["gcn"]


def test_undeclared_kind_accepts_any_name():
    registry: Registry[int] = Registry("widget")
    registry.register("Anything")(3)
    assert registry.get("ANYTHING") == 3 and "anything" in registry


def test_check_name_suggests_the_closest_name():
    with pytest.raises(ConfigError) as info:
        check_name("architecture", "gcnn", names.ARCHITECTURES)
    msg = str(info.value)
    assert msg.startswith("unknown architecture 'gcnn'; did you mean 'gcn'? expected one of: ")
    assert msg.endswith(", ".join(sorted(names.ARCHITECTURES)))
    assert info.value.exit_code == 2


def test_check_name_without_a_close_match_lists_names_only():
    with pytest.raises(ConfigError) as info:
        check_name("export format", "zip", names.EXPORT_FORMATS)
    assert str(info.value) == "unknown export format 'zip'; expected one of: onnx, pt2, torchscript"


def test_check_name_is_case_insensitive():
    assert check_name("dataset", "Planetoid", names.DATASET_FAMILIES) == "planetoid"


def test_registry_get_uses_the_same_message():
    from abkd_deploy.models import MODELS

    with pytest.raises(ConfigError, match="did you mean 'sage'"):
        MODELS.get("sag")


def test_name_tables_import_without_torch():
    code = (
        "import sys; import abkd_deploy.cli, abkd_deploy.names, abkd_deploy.registry; "
        "print(sorted(m for m in ('torch', 'numpy', 'torch_geometric') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
