"""interp_lib: make GPT-2-family transformers transparent and trustworthy.

``import interp_lib as il`` is cheap: analysis submodules (``il.calibration``, ``il.heads``, ...)
are imported on first use, and TransformerLens only when a model is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = {
    "attribution", "calibration", "checkpoint", "claims", "cli", "cluster", "data", "display", "explain",
    "heads", "models", "notebook", "patching", "paths", "plots", "probing", "results", "runner",
    "selective", "stats", "versions",
}

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "ModelLoadError", "load_model", "select_device",
           "environment", "check_environment", "__version__"]


# Names re-exported from interp_lib.models, which imports torch: resolved on first use so that
# `interp-lib --help` and notebook kernels that only record metrics start quickly.
_MODEL_NAMES = {"BUNDLED_MODELS", "DEFAULT_MODEL", "ModelLoadError", "load_model", "select_device"}


# Names re-exported from interp_lib.versions (cheap: no torch until asked for the device).
_VERSION_NAMES = {"environment", "check_environment"}


def __getattr__(name: str) -> Any:
    if name in _VERSION_NAMES:
        value = getattr(importlib.import_module(".versions", __name__), name)
        globals()[name] = value
        return value
    if name in _MODEL_NAMES:
        value = getattr(importlib.import_module(".models", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'interp_lib' has no attribute {name!r}")
