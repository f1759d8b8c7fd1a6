"""Where the code runs, and what ``"auto"`` means there: the one home of Colab detection and of
every ``"auto"`` setting that depends on it.

One notebook analyses GPT-2 on Colab and a bundled toy model offline, without edits, because its
parameters say ``"auto"`` and this module resolves them:

* ``resolve_model_name("auto")``: ``$INTERP_LIB_MODEL``, else ``gpt2`` on Colab, else the
  bundled ``toy-lm`` (or the caller's ``default``);
* ``resolve_compare_models("auto")`` (notebook 01's size comparison): the GPT-2 sizes on Colab,
  the bundled models elsewhere; ``resolve_ensemble_members("auto")`` (notebook 02): GPT-2 with
  DistilGPT-2 on Colab, ``toy-lm`` plus ``$INTERP_LIB_ENSEMBLE`` elsewhere;
* ``resolve_dataset("auto")``: WikiText on Colab, the bundled corpus elsewhere;
* ``default_root()`` / ``resolve_output_dir("auto")``: Drive on Colab (when mounted), ``runs/``
  in the source checkout elsewhere, ``$INTERP_LIB_RUNS`` when set.

Cheap to import (standard library only): the metrics recorder and the command line use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["in_colab", "default_root", "resolve_output_dir", "resolve_model_name", "resolve_dataset",
           "model_list", "resolve_compare_models", "resolve_ensemble_members", "COLAB_MODEL",
           "DRIVE_MOUNT", "DRIVE_HOME"]

DRIVE_MOUNT = "/content/drive"
DRIVE_HOME = Path(DRIVE_MOUNT) / "MyDrive"
COLAB_MODEL = "gpt2"

#: What ``compare="auto"`` means: the GPT-2 sizes on Colab, the bundled models elsewhere.
COMPARE_COLAB = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
COMPARE_OFFLINE = ("toy-lm", "toy-2l", "toy-1l")

#: What ``ensemble="auto"`` means: GPT-2 with DistilGPT-2 (one tokenizer) on Colab; offline the
#: bundled models sharing toy-lm's tokenizer (only toy-lm: toy-1l / toy-2l use another one)
#: plus model directories listed in ``$INTERP_LIB_ENSEMBLE`` (separated by ``os.pathsep``).
ENSEMBLE_COLAB = ("gpt2", "distilgpt2")
ENSEMBLE_OFFLINE = ("toy-lm",)
ENSEMBLE_ENV = "INTERP_LIB_ENSEMBLE"


def in_colab() -> bool:
    """True inside Google Colab (the module is imported, or the runtime's env var is set)."""
    return "google.colab" in sys.modules or bool(os.environ.get("COLAB_RELEASE_TAG"))


def default_root() -> Path:
    """Where runs are stored: ``$INTERP_LIB_RUNS``; on Colab with Drive mounted
    ``/content/drive/MyDrive/interp_lib/runs`` (survives the VM); else ``runs/`` in the source
    checkout (so a notebook opened from ``notebooks/`` writes there too), else ``./runs``."""
    override = os.environ.get("INTERP_LIB_RUNS")
    if override:
        return Path(override).expanduser().resolve()
    if in_colab() and DRIVE_HOME.is_dir():
        return DRIVE_HOME / "interp_lib" / "runs"
    from .paths import repo_root

    checkout = repo_root()
    return checkout / "runs" if checkout is not None else Path("runs").resolve()


def resolve_output_dir(output_dir: str | os.PathLike = "auto", notebook: str = "notebook") -> Path:
    """'auto' -> ``<checkpoint root>/<notebook>`` (Drive on Colab, runs/ elsewhere); the folder
    is created."""
    path = default_root() / notebook if os.fspath(output_dir) == "auto" else Path(output_dir)
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_name(model_name: str = "auto", default: str | None = None,
                       colab_default: str = COLAB_MODEL) -> str:
    """'auto' -> $INTERP_LIB_MODEL, else ``colab_default`` on Colab, else ``default`` (None:
    ``interp_lib.models.DEFAULT_MODEL``, the bundled ``toy-lm``)."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name={model_name!r}: expected 'auto', a model name or a directory")
    if model_name != "auto":
        return model_name
    if default is None:
        from .models import DEFAULT_MODEL

        default = DEFAULT_MODEL
    return os.environ.get("INTERP_LIB_MODEL") or (colab_default if in_colab() else default)


def resolve_dataset(dataset: str) -> str:
    """'auto' -> 'wikitext' on Colab, 'bundled' elsewhere; any other value as given."""
    if dataset == "auto":
        return "wikitext" if in_colab() else "bundled"
    return dataset


def model_list(spec: Any, name: str, colab: Sequence[str], offline: Sequence[str]) -> list[str]:
    """'auto' -> ``colab`` on Colab else ``offline``; 'a,b', '["a", "b"]' (a list passed as
    text, as papermill's ``-p`` does) or ['a', 'b'] -> that list. ValueError naming ``name``
    for anything else, an empty list or a model named twice."""
    if isinstance(spec, str) and spec.strip().startswith("["):
        import ast

        try:
            spec = ast.literal_eval(spec.strip())
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"{name}={spec!r}: could not read the list ({error})") from None
    if isinstance(spec, str):
        if spec == "auto":
            return list(colab if in_colab() else offline)
        names = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, (list, tuple)):
        names = list(spec)
    else:
        raise ValueError(f"{name}={spec!r}: expected 'auto', a comma-separated string or a list of model names")
    if not names or not all(isinstance(n, (str, os.PathLike)) and os.fspath(n).strip() for n in names):
        raise ValueError(f"{name}={spec!r}: expected 'auto' or a non-empty list of model names / directories")
    names = [os.fspath(n).strip() for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f"{name}={spec!r} names a model twice; expected distinct models")
    return names


def resolve_compare_models(compare: str | Sequence[str] = "auto") -> list[str]:
    """The models of the size comparison: ``"auto"`` -> ``gpt2`` ... ``gpt2-xl`` on Colab, the
    bundled ``toy-lm``, ``toy-2l``, ``toy-1l`` elsewhere; a list (or ``"a,b"``) is used as given."""
    return model_list(compare, "compare", COMPARE_COLAB, COMPARE_OFFLINE)


def resolve_ensemble_members(ensemble: str | Sequence[str] = "auto") -> list[str]:
    """Ensemble members for next-token disagreement (they must share a tokenizer).

    ``"auto"``: ``gpt2`` and ``distilgpt2`` on Colab; elsewhere ``toy-lm`` plus the directories in
    ``$INTERP_LIB_ENSEMBLE``. Offline that is usually one model: no honest ensemble exists among
    the bundled models, and callers should skip the ensemble analysis when fewer than two members
    come back rather than fake one. A list (or ``"a,b"``) is used as given.
    """
    members = model_list(ensemble, "ensemble", ENSEMBLE_COLAB, ENSEMBLE_OFFLINE)
    if ensemble == "auto" and not in_colab():
        extra = [p for p in os.environ.get(ENSEMBLE_ENV, "").split(os.pathsep) if p.strip()]
        members += [p for p in extra if p not in members]
    return members
