import pytest

from abkd_deploy.data import load_dataset, parse_dataset_name
from abkd_deploy.errors import ConfigError


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        load_dataset("imagenet")
    msg = str(info.value)
    assert "'imagenet'" in msg
    for known in ("csbm", "planetoid", "heterophilous", "npz", "ogbn-arxiv"):
        assert known in msg


def test_parse_dataset_name():
    assert parse_dataset_name("planetoid:Cora") == ("planetoid", "Cora", {})
    assert parse_dataset_name("csbm:num_nodes=10,seed=2") == (
        "csbm",
        None,
        {"num_nodes": "10", "seed": "2"},
    )
    assert parse_dataset_name("npz:/a=b/g.npz") == ("npz", "/a=b/g.npz", {})


def test_wrong_split_for_csbm():
    with pytest.raises(ConfigError, match="split"):
        load_dataset("csbm:num_nodes=100", split="3")
