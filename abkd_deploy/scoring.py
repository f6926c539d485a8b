"""Scoring predictions on numpy arrays (no torch import): accuracy and ROC-AUC.

Which one a dataset uses is its ``metric`` (recorded in every run's ``metrics.json`` and
in the export manifest). Not to be confused with :mod:`abkd_deploy.serve.metrics`, the
server's Prometheus metrics.
"""

from __future__ import annotations

import numpy as np

from abkd_deploy.errors import ConfigError


def score(metric: str, y_true: np.ndarray, logits: np.ndarray) -> float:
    """Scores ``logits`` ([n, C]) against ``y_true`` ([n]).

    Args:
        metric: ``accuracy`` or ``roc_auc`` (binary: score of class 1; multi-class:
            one-vs-rest macro average).
    """
    y_true = np.asarray(y_true).reshape(-1)
    logits = np.asarray(logits, dtype=np.float64)
    if metric == "accuracy":
        return float((logits.argmax(1) == y_true).mean()) if y_true.size else float("nan")
    if metric == "roc_auc":
        from sklearn.metrics import roc_auc_score

        z = logits - logits.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        if len(np.unique(y_true)) < 2:
            return float("nan")
        if p.shape[1] == 2:
            return float(roc_auc_score(y_true, p[:, 1]))
        return float(roc_auc_score(y_true, p, multi_class="ovr", labels=np.arange(p.shape[1])))
    raise ConfigError(f"unknown metric {metric!r}; expected accuracy or roc_auc")
