"""Notebook setup shared by the series: Drive, plotly renderer, seeds, parameter resolution.

The mechanism that lets one notebook analyse GPT-2 on Colab and the bundled model offline,
without edits: the ``parameters`` cell says ``model_name = "auto"``; ``resolve_model_name``
turns "auto" into ``INTERP_LIB_MODEL`` if set, else ``gpt2`` on Colab, else the bundled
``toy-lm``. papermill / ``interp-lib run --model NAME`` can always pass an explicit name.
Colab detection and every "auto" resolution live in :mod:`interp_lib.runtime` (re-exported
here for the notebooks: ``il.notebook.resolve_model_name``, ``il.notebook.resolve_output_dir``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .artifacts import atomic_write_json
from .checkpoint import Checkpointer
from .models import BUNDLED_MODELS
from .runtime import COLAB_MODEL, DRIVE_MOUNT, in_colab, resolve_model_name, resolve_output_dir

__all__ = ["setup", "resolve_model_name", "resolve_output_dir", "mount_drive", "set_plotly_renderer",
           "record_environment", "work_size", "quiet_third_party_warnings", "THIRD_PARTY_WARNING_MODULES",
           "COLAB_MODEL", "DRIVE_MOUNT"]

# packages whose UserWarnings (deprecations, n_jobs overrides, tokenizer notices) clutter the
# notebooks without telling the reader anything about the results
THIRD_PARTY_WARNING_MODULES = ("umap", "pynndescent", "sklearn", "hdbscan", "sentence_transformers", "transformers",
                               "torch", "numba", "huggingface_hub", "transformer_lens", "plotly")


def quiet_third_party_warnings(modules=THIRD_PARTY_WARNING_MODULES) -> str:
    """Ignore ``UserWarning`` issued from the named third-party packages only (matched on the
    warning's module, e.g. ``umap.umap_``); interp_lib's own warnings (``EnvironmentWarning``,
    ``IGConvergenceWarning``, ...) and every other package's stay visible. Returns the module
    pattern used."""
    import re
    import warnings

    if isinstance(modules, str) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"modules={modules!r}: expected a non-empty sequence of package names")
    pattern = r"(?:" + "|".join(re.escape(m) for m in modules) + r")(?:\.|$)"
    warnings.filterwarnings("ignore", category=UserWarning, module=pattern)
    return pattern


def mount_drive() -> bool:
    """Mount Google Drive on Colab (asks the user once); returns True when Drive is available."""
    if not in_colab():
        return False
    if not Path(DRIVE_MOUNT, "MyDrive").is_dir():
        from google.colab import drive  # type: ignore[import-not-found]

        drive.mount(DRIVE_MOUNT)
    return Path(DRIVE_MOUNT, "MyDrive").is_dir()


def set_plotly_renderer(renderer: str | None = None) -> str:
    """Choose how plotly figures are displayed; returns the renderer name.

    Default: ``$INTERP_LIB_PLOTLY_RENDERER`` if set; on Colab ``colab+plotly_mimetype`` (Colab
    draws each output in its own frame, so plotly.js comes from the CDN per figure; the JSON
    keeps the saved notebook drawable elsewhere); otherwise the offline renderer of
    :mod:`interp_lib.plots`, which embeds plotly.js once per kernel session, so executed
    notebooks and their HTML exports draw with no network.
    """
    import plotly.io as pio

    from .plots import OFFLINE_RENDERER, register_offline_renderer

    register_offline_renderer()
    chosen = renderer or os.environ.get("INTERP_LIB_PLOTLY_RENDERER") or (
        "colab+plotly_mimetype" if in_colab() else OFFLINE_RENDERER)
    if not isinstance(chosen, str):
        raise ValueError(f"renderer={chosen!r}: expected a plotly renderer name such as {OFFLINE_RENDERER!r}")
    unknown = [name for name in chosen.split("+") if name not in pio.renderers]
    if unknown:
        raise ValueError(f"renderer={chosen!r}: unknown plotly renderer(s) {unknown}; expected names from "
                         f"{sorted(pio.renderers)}")
    pio.renderers.default = chosen
    return chosen


def setup(notebook: str, model_name: str = "auto", output_dir: str | os.PathLike = "auto",
          seed: int = 0, renderer: str | None = None) -> tuple[str, Path, Checkpointer]:
    """One call per notebook: mount Drive on Colab, set the renderer and seeds, resolve the
    model name and output folder, and open the notebook's checkpointer.

    Returns ``(model_name, output_dir, checkpointer)``.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an integer")
    mount_drive()
    set_plotly_renderer(renderer)
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    name = resolve_model_name(model_name)
    out = resolve_output_dir(output_dir, notebook)
    ckpt = Checkpointer(out / "checkpoints" / notebook)  # notebooks of a run share output_dir
    where = "bundled toy model" if name in BUNDLED_MODELS else "model"
    print(f"{notebook}: {where} {name!r}, seed {seed}, outputs in {out}"
          + (" (Colab)" if in_colab() else ""), file=sys.stdout)
    record_environment(out, notebook)
    return name, out, ckpt


def record_environment(output_dir: str | os.PathLike, notebook: str) -> dict:
    """Print the versions this notebook runs on (one line), warn when they are outside the tested
    range, and save them as ``<output_dir>/environment/<notebook>.json``."""
    from .versions import check_environment, describe, environment

    env = environment()
    print(describe(env), file=sys.stdout)
    check_environment()
    atomic_write_json(Path(output_dir) / "environment" / f"{notebook}.json", env, allow_nan=True)
    return env


def work_size(value, model, toy, larger, name: str = "value"):
    """A notebook's work-size parameter: ``value`` unless it is ``"auto"``; then ``toy`` (the
    size the notebook was written for) for models under 20M parameters or on a GPU, and
    ``larger`` (smaller work) for bigger models on a CPU, where each exact patch or ablation is a
    full forward pass."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name}={value!r}: expected 'auto' or a number")
        params = list(model.parameters())
        small = sum(p.numel() for p in params) < 20_000_000
        on_gpu = bool(params) and params[0].device.type != "cpu"
        chosen = toy if small or on_gpu else larger
        if chosen != toy:
            print(f"{name} = {chosen} (auto: a {sum(p.numel() for p in params) / 1e6:.0f}M-parameter model on "
                  f"the CPU; the toy setting is {toy})")
        return chosen
    return value
