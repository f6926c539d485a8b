"""Export against another snapshot of the graph than the one the student was trained on.

``export RUN --dataset SPEC`` embeds ``SPEC``'s graph (today's) into the artifact while the
student's weights come from ``RUN`` (trained on last week's graph). The snapshot must fit
the student: same feature width, same class count, same metric (when the run records
one), homogeneous for a homogeneous student. The manifest's ``provenance.snapshot``
(:func:`snapshot_entry`) records what was embedded next to ``provenance.dataset`` (what
the student was trained on).
"""

from __future__ import annotations

from typing import Any

from torch_geometric.data import Data

from abkd_deploy import manifest
from abkd_deploy.data import load_dataset
from abkd_deploy.distill.graphs import check_arch_for_data
from abkd_deploy.errors import ConfigError
from abkd_deploy.models.base import GNN


def load_snapshot(
    dataset: str,
    root: str | None,
    split: str | None,
    student: GNN,
    trained_on: dict[str, Any] | None,
    trained_metric: str | None,
) -> Data:
    """Loads the snapshot ``dataset`` and checks it fits ``student``.

    Args:
        dataset: Dataset spec of the snapshot (``csbm:num_nodes=2000,seed=1``, ...).
        root: Folder holding its files (``None``: not needed).
        split: Its split (``None``: the family's default).
        student: The trained student (``in_channels`` / ``out_channels`` / ``arch``).
        trained_on: The run's ``dataset`` entry (``{"name", "root", "split"}``), for messages.
        trained_metric: The run's metric (``metrics.json``), ``None`` when not recorded.

    Returns:
        The snapshot (``x`` ``[N, F]``, ``edge_index`` ``[2, E]``, ``y`` ``[N]``, masks).

    Raises:
        ConfigError: a typed snapshot for a homogeneous student, or another feature width,
            class count or metric than the student's (one line naming both values).
    """
    data = load_dataset(dataset, root, split)
    check_arch_for_data(student.arch, data, dataset, "student")
    trained = (trained_on or {}).get("name") or "the training dataset"
    if data.num_features != student.in_channels:
        raise ConfigError(
            f"snapshot {dataset!r} has {data.num_features} features but the student was "
            f"trained on {trained!r} with {student.in_channels} features; expected the same width"
        )
    if int(data.num_classes) != student.out_channels:
        raise ConfigError(
            f"snapshot {dataset!r} has {int(data.num_classes)} classes but the student was "
            f"trained on {trained!r} with {student.out_channels} classes; expected the same classes"
        )
    metric = getattr(data, "metric", None)
    if trained_metric is not None and metric != trained_metric:
        raise ConfigError(
            f"snapshot {dataset!r} is scored by {metric!r} but the student was trained on "
            f"{trained!r} scored by {trained_metric!r}; expected the same metric"
        )
    return data


def snapshot_entry(dataset: str, root: str | None, split: str | None, data: Data) -> dict:
    """``provenance.snapshot`` of ``data`` (:func:`abkd_deploy.manifest.snapshot_entry`)."""
    num_edges = int(data.edge_index.size(1))
    return manifest.snapshot_entry(dataset, root, split, int(data.num_nodes), num_edges)
