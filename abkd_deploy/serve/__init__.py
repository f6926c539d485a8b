"""Serving: the exported student behind onnxruntime, micro-batched, over HTTP.

This package imports numpy and onnxruntime only (never torch or PyG), so a serving
process stays small. The HTTP layer (:mod:`abkd_deploy.serve.server`, FastAPI + uvicorn)
is imported on demand.

>>> from abkd_deploy.serve import Predictor
>>> p = Predictor("exports/student", device="cpu")      # doctest: +SKIP
>>> p.predict([0, 1, 2]).classes                           # doctest: +SKIP
"""

from abkd_deploy.serve.batcher import MicroBatcher
from abkd_deploy.serve.errors import (
    ArtifactError,
    BatchTooLarge,
    InvalidInput,
    InvalidNodeIds,
    RequestError,
    Unavailable,
)
from abkd_deploy.serve.predictor import Prediction, Predictor
from abkd_deploy.serve.providers import create_session

__all__ = [
    "ArtifactError",
    "BatchTooLarge",
    "InvalidInput",
    "InvalidNodeIds",
    "MicroBatcher",
    "Prediction",
    "Predictor",
    "RequestError",
    "Unavailable",
    "create_session",
]
