"""interp_lib: make GPT-2-family transformers transparent and trustworthy.

``import interp_lib as il`` is cheap: analysis submodules (``il.calibration``, ``il.heads``, ...)
are imported on first use, and TransformerLens only when a model is loaded.

Layers (imports point down only; ``tests/test_layers.py`` checks it):

1. foundation: ``models``, ``data``, ``units``, ``paths``, ``artifacts`` (atomic files, metrics,
   run manifests), ``errors``, ``runtime`` (Colab, every ``"auto"``), ``checkpoint``,
   ``safe_serialize``, ``versions``, ``display`` (tables), ``streaming`` (logits on disk, work sizes);
2. analyses: ``calibration``, ``selective``, ``attribution``, ``patching``, ``heads``, ``probing``,
   ``stats``, ``explain``, ``circuits``;
3. figures: ``plots``;
4. notebook glue: ``claims``, ``findings``, ``notebook``, ``results``;
5. commands: ``runner``, ``tasks``, ``cluster``, ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "artifacts", "attribution", "calibration", "checkpoint", "circuits", "claims", "cli", "cluster", "data", "display",
    "errors", "explain", "findings", "heads", "models", "notebook", "patching", "paths", "plots", "probing", "results",
    "runner", "runtime", "selective", "stats", "streaming", "tasks", "units", "versions",
}

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "ModelLoadError", "load_model", "select_device",
           "environment", "check_environment", "record_metrics", "__version__"]


# Names re-exported from interp_lib.models, which imports torch: resolved on first use so that
# `interp-lib --help` and notebook kernels that only record metrics start quickly.
_MODEL_NAMES = {"BUNDLED_MODELS", "DEFAULT_MODEL", "ModelLoadError", "load_model", "select_device"}


# Names re-exported from interp_lib.versions (cheap: no torch until asked for the device).
_VERSION_NAMES = {"environment", "check_environment"}

# Names re-exported from interp_lib.artifacts (cheap: a notebook's last cell records its metrics).
_ARTIFACT_NAMES = {"record_metrics"}


def __getattr__(name: str) -> Any:
    for module_name, names in ((".versions", _VERSION_NAMES), (".models", _MODEL_NAMES),
                               (".artifacts", _ARTIFACT_NAMES)):
        if name in names:
            value = getattr(importlib.import_module(module_name, __name__), name)
            globals()[name] = value
            return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'interp_lib' has no attribute {name!r}")
