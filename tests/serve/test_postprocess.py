"""Classes and scores from logits in onnxruntime equal numpy's argmax and stable softmax."""

from __future__ import annotations

import numpy as np

from abkd_deploy.serve.postprocess import make_postprocess
from tests.serve.tiny_export import softmax


def test_matches_numpy_including_ties_and_huge_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(65, 7)).astype(np.float32) * 5
    logits[0] = 3.0  # a tie everywhere: the first class, as numpy picks it
    logits[1, 2:4] = 1e4  # exp() would overflow without the max shift
    logits[2] = -1e4
    classes, scores = make_postprocess(7)(logits)
    assert classes.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(classes, logits.argmax(axis=1))
    np.testing.assert_allclose(scores, softmax(logits.copy()), rtol=1e-6, atol=3e-7)
    assert np.isfinite(scores).all() and scores[1, 2] == scores[1, 3] == 0.5


def test_any_batch_size() -> None:
    post = make_postprocess(3)
    for n in (1, 2, 1024):
        logits = np.arange(n * 3, dtype=np.float32).reshape(n, 3) % 5
        classes, scores = post(logits)
        assert classes.shape == (n,) and scores.shape == (n, 3)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
