"""The names every registry accepts, known without importing torch.

The command line checks ``--dataset``, ``--arch``, ``--method``, ``--format`` ... against
these tables before it imports torch (5-10 s), so a typo fails at once with a suggestion.
Each :class:`~abkd_deploy.registry.Registry` whose kind appears in :data:`DECLARED`
refuses to register a name missing here, and ``tests/test_registry.py`` checks that every
table equals its registry's names: adding a dataset family, model, KD method or format
means one line here plus the module that registers it.

This module imports nothing but the standard library.
"""

from __future__ import annotations

#: ``--dataset`` families (``family`` or ``family:arg``), registered in
#: :data:`abkd_deploy.data.registry.DATASETS`.
DATASET_FAMILIES = (
    "csbm",
    "csbm-mag",
    "csbm-mag-papers",
    "heterophilous",
    "npz",
    "ogb-hetero",
    "ogbn-arxiv",
    "ogbn-mag",
    "ogbn-mag-papers",
    "ogbn-products",
    "ogbn-proteins",
    "planetoid",
)
#: ``--arch`` values: :data:`abkd_deploy.models.MODELS`.
ARCHITECTURES = ("gat", "gcn", "gcnii", "mlp", "res-rgcn", "rgcn", "rsage", "sage")
#: ``--method`` values: :data:`abkd_deploy.distill.objective.METHODS`.
KD_METHODS = ("abkd", "at", "ce", "fitnet", "gcrd", "kd", "lsp")
#: Loss terms: :data:`abkd_deploy.distill.losses.LOSSES`.
LOSS_TERMS = ("abkd", "at", "ce", "fitnet", "gcrd", "kd", "lsp")
#: ``--format`` values: :data:`abkd_deploy.export.formats.FORMATS`.
EXPORT_FORMATS = ("onnx", "pt2", "torchscript")
#: ``--adjacency`` values: :data:`abkd_deploy.export.adjacency.ADJACENCY`.
ADJACENCY_FORMATS = ("coo", "ell", "embedded")
#: ``export --dtype`` values: :data:`abkd_deploy.export.formats.DTYPES`.
EXPORT_DTYPES = ("float16", "float32")
#: ``bench --models`` values, in report order: :data:`abkd_deploy.serve.bench.MODELS`.
BENCH_MODELS = ("teacher-torch", "student-torch", "student-torch-export", "student-onnx")

#: Registry kind (``Registry(kind)``) -> the names it may register.
DECLARED: dict[str, tuple[str, ...]] = {
    "dataset": DATASET_FAMILIES,
    "architecture": ARCHITECTURES,
    "KD method": KD_METHODS,
    "loss": LOSS_TERMS,
    "export format": EXPORT_FORMATS,
    "adjacency format": ADJACENCY_FORMATS,
}
