"""Serving what a run trained: model sources (a store or a run directory, read only), the
REST model service and dashboard (``fedloom serve``), and export (``fedloom export``).

FastAPI, uvicorn and onnx are optional extras (``pip install 'fedloom[serve]'`` /
``'fedloom[export]'``), imported only by the modules that need them.
"""

from fedloom.serve.source import ModelSource, ModelVersion, RunDirSource, RunModels, SourceError, StoreSource, open_source

__all__ = ["ModelSource", "ModelVersion", "RunDirSource", "RunModels", "SourceError", "StoreSource", "open_source"]
