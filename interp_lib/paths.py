"""Where the bundled data lives: ``./data`` in a source checkout, ``interp_lib/_data`` in a wheel."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The bundled data folder (corpus, tokenizers, toy models, known-head tables).

    ``INTERP_LIB_DATA`` overrides; otherwise the checkout's ``data/`` (editable installs) or
    the copy packed into the wheel.
    """
    override = os.environ.get("INTERP_LIB_DATA")
    candidates = [Path(override)] if override else []
    candidates += [_PACKAGE.parent / "data", _PACKAGE / "_data"]
    for candidate in candidates:
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(
        "bundled data not found (looked in " + ", ".join(str(c) for c in candidates)
        + "); install interp_lib from a checkout of the repository or set INTERP_LIB_DATA"
    )


def repo_root() -> Path | None:
    """The source checkout holding this package, or None for an installed wheel."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() else None
