import numpy as np
import pytest
import torch

from abkd_deploy.data import load_dataset
from abkd_deploy.data.csbm import CSBMConfig, generate_csbm
from abkd_deploy.errors import ConfigError


def test_csbm_contract_and_determinism():
    a = load_dataset("csbm:num_nodes=2000,num_classes=4,num_features=16,seed=3")
    b = load_dataset("csbm:num_nodes=2000,num_classes=4,num_features=16,seed=3")
    assert a.x.shape == (2000, 16) and a.x.dtype == torch.float32
    assert a.num_classes == 4 and a.metric == "accuracy"
    assert torch.equal(a.edge_index, b.edge_index) and torch.equal(a.x, b.x)
    c = load_dataset("csbm:num_nodes=2000,num_classes=4,num_features=16,seed=4")
    assert not torch.equal(a.edge_index, c.edge_index)
    # undirected, no self loops, no duplicates
    ei = a.edge_index
    assert not bool((ei[0] == ei[1]).any())
    fwd = set(map(tuple, ei.t().tolist()))
    assert all((v, u) in fwd for u, v in fwd)
    assert len(fwd) == ei.size(1)
    # masks partition the nodes
    total = a.train_mask.int() + a.val_mask.int() + a.test_mask.int()
    assert bool((total == 1).all())


@pytest.mark.parametrize("homophily", [0.2, 0.9])
def test_csbm_homophily_and_degree(homophily):
    d = generate_csbm(CSBMConfig(num_nodes=20_000, avg_degree=8, homophily=homophily))
    ei = d.edge_index
    measured = float((d.y[ei[0]] == d.y[ei[1]]).float().mean())
    assert abs(measured - homophily) < 0.03
    assert abs(ei.size(1) / d.num_nodes - 8) < 0.5


def test_csbm_features_carry_class_signal():
    d = generate_csbm(CSBMConfig(num_nodes=5000, signal=3.0))
    means = np.stack([d.x[d.y == k].mean(0).numpy() for k in range(d.num_classes)])
    assert np.linalg.norm(means[0] - means[1]) > 1.0


@pytest.mark.parametrize(
    "name, message",
    [
        ("csbm:num_nodes=5", "num_nodes"),
        ("csbm:homophily=1.5", "homophily"),
        ("csbm:colour=red", "unknown csbm option 'colour'"),
        ("csbm:num_nodes=abc", "not a number"),
        ("csbm:num_nodes", "key=value"),
    ],
)
def test_csbm_bad_options(name, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset(name)
