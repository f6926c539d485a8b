"""abkd-deploy: distill GNNs with ABKD, export them to ONNX, serve them with onnxruntime.

The package is organised by pipeline stage; data flows one way:
``data -> models -> distill -> export -> serve``. The serving request path
(:mod:`abkd_deploy.serve`) imports only numpy, onnx and onnxruntime (never torch).
"""

__version__ = "0.1.0"
