"""Export a distilled student to ONNX / TorchScript / torch.export with a static adjacency.

``export(run_dir, out_dir, formats=("onnx",), adjacency="embedded", ...)`` writes a
validated export directory (docs/FORMATS.md). Registries: :data:`ADJACENCY` (``ell``,
``embedded``, ``coo``) and :data:`FORMATS` (``onnx``, ``torchscript``, ``pt2``).
"""

from abkd_deploy.export.adjacency import ADJACENCY
from abkd_deploy.export.api import export
from abkd_deploy.export.formats import FORMATS, format_names
from abkd_deploy.export.manifest import MANIFEST_VERSION, read_manifest

__all__ = ["ADJACENCY", "FORMATS", "MANIFEST_VERSION", "export", "format_names", "read_manifest"]
