"""TorchScript and torch.export artifacts load back and answer other sizes."""

import warnings

import numpy as np
import torch

from abkd_deploy.export.adjacency import module_runner


def test_torchscript_round_trip(gcn_embedded):
    out, _ = gcn_embedded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(out / "model.pt"))
    ids = torch.tensor([3, 3, 599, 0])
    logits, emb = module(ids)
    assert logits.shape == (4, 5) and emb.shape == (4, 16)
    assert torch.equal(logits[0], logits[1])


def test_pt2_round_trip_matches_torchscript(gcn_embedded):
    out, _ = gcn_embedded
    program = torch.export.load(str(out / "model.pt2")).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(out / "model.pt"))
    for ids in (torch.tensor([7]), torch.randint(0, 600, (333,))):
        a = module_runner(program)((ids,))
        b = module_runner(scripted)((ids,))
        assert all(np.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))
