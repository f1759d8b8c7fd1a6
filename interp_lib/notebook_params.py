"""The declared schema of every notebook parameter: its type and its range or choices.

``interp-lib run -p KEY VALUE`` checks a value here, before any kernel starts (one line naming
the parameter, the value and what is allowed; exit status 2), and converts it to the declared
type: ``-p n_prompts 8`` for a parameter whose default is ``"auto"`` arrives as the int 8, not
the text ``'8'``. Bounds come from this table, never from the prose of a notebook's comments.

The schema lives in the library, not in the notebooks, so that editing a notebook's cells does
not change what the runner accepts; ``tests/test_hardening2.py`` checks that every name a
parameters cell assigns is declared here and that every default validates.

A ``Param`` says:

* ``kind``: ``int``, ``float``, ``bool``, ``text`` (any string), ``choice`` (one of ``choices``),
  ``url`` (an http(s) URL without user-info, query or fragment, or one of ``choices`` such as
  ``""`` / ``"none"``), ``heads`` (``"all"`` or labels like ``L1H0,L1H1``), ``models`` (a model
  name, a comma-separated list of them, or a list), ``list`` (of ``items``);
* ``low`` / ``high`` (inclusive unless ``low_open`` / ``high_open``) for numbers (and list items);
* ``auto``: the string ``"auto"`` is accepted too; ``none``: ``None`` is accepted too;
* ``layer``: an int that indexes the model's layers (0 .. n_layers - 1, or negative from the
  end); checked against the model when its layer count can be read without loading it (a
  bundled model, or a local folder with a config.json).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Param", "SCHEMA", "RUNNER_SET", "declared", "coerce_and_check", "ParameterError",
           "parse_param_value"]


class ParameterError(ValueError):
    """A ``-p`` value the schema does not allow (one line)."""


@dataclass(frozen=True)
class Param:
    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    auto: bool = False
    none: bool = False
    items: "Param | None" = None
    layer: bool = False

    def allowed(self) -> str:
        """What the parameter allows, in words."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "url":
            text = ("an http(s) URL without user-info, query or fragment"
                    + (" or " + " / ".join(repr(c) for c in self.choices) if self.choices else ""))
        elif self.kind == "heads":
            text = "'all' or head labels like 'L1H0,L1H1'"
        elif self.kind == "models":
            text = "a model name, several separated by commas, or a list of names"
        elif self.kind == "list":
            text = f"a list of {self.items.allowed() if self.items else 'values'}"
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "text":
            text = "text"
        else:
            text = ("an integer" if self.kind == "int" else "a number") + self._range()
        if self.auto and self.kind != "choice":
            text += " or 'auto'"
        if self.none:
            text += " or None"
        return text

    def _range(self) -> str:
        parts = []
        if self.layer:
            parts.append("indexing the model's layers")
        if self.low is not None:
            parts.append(f"{'more than' if self.low_open else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'less than' if self.high_open else 'at most'} {self.high:g}")
        return (" " + " and ".join(parts)) if parts else ""


def _int(low=None, high=None, **kw) -> Param:
    return Param("int", low=low, high=high, **kw)


def _float(low=None, high=None, **kw) -> Param:
    return Param("float", low=low, high=high, **kw)


def _choice(*choices: str) -> Param:
    return Param("choice", choices=tuple(choices))


_TEXT = Param("text")
_MODEL = Param("text")  # a name or a local folder: resolved by the kernel (il.load_model)
_DATASET = Param("text")
# Set by the runner itself (--seeds, --out, --model): declared so every cell name is covered.
RUNNER_SET = {"model_name": _MODEL, "seed": _int(0, 2**32 - 1), "output_dir": _TEXT}

SCHEMA: dict[str, dict[str, Param]] = {
    "00_tour": {"dataset": _DATASET, "prompt": _TEXT, "top_k": _int(1), "attention_layer": _int(layer=True),
                "n_windows": _int(1), "window_len": _int(2)},
    "01_calibration": {"dataset": _DATASET, "window_len": _int(2), "n_windows": _int(2), "n_bins": _int(1),
                       "n_boot": _int(1), "n_cloze": _int(1), "cloze_bins": _int(1),
                       "extra_task": _choice("auto", "sst2", "none"), "n_sst2": _int(1),
                       "compare": Param("models", auto=True), "compare_windows": _int(2)},
    "02_selective_prediction": {
        "dataset": _DATASET, "window_len": _int(2), "n_windows": _int(2), "n_bins": _int(1),
        "target_risk": _float(0, 1, low_open=True, high_open=True),
        "delta": _float(0, 1, low_open=True, high_open=True),
        "coverages": Param("list", items=_float(0, 1, low_open=True)),
        "ensemble": Param("models", auto=True), "n_fit_windows": _int(2), "n_ood_windows": _int(1),
        "ood_layer": _int(layer=True), "ood_keep": _float(0, 1, low_open=True, high_open=True)},
    "03_logit_lens_and_dla": {"task": _choice("auto", "ioi", "repeat"), "n_prompts": _int(1),
                              "repeat_length": _int(2), "top_k": _int(1)},
    "04_activation_patching": {"task": _choice("auto", "ioi", "repeat"), "n_prompts": _int(1, auto=True),
                               "repeat_length": _int(2, auto=True), "top_k": _int(1),
                               "ablation_method": _choice("zero", "mean", "resample")},
    "05_induction_and_qk": {"dataset": _DATASET, "repeat_lengths": Param("list", items=_int(2), none=True),
                            "offsets": Param("list", items=_int(0)), "n_sequences": _int(1),
                            "ablation_length": _int(2), "threshold_rule": _choice("robust_z", "mean_std", "largest_gap"),
                            "threshold_k": _float(0, low_open=True)},
    "06_positional_probing": {"dataset": _DATASET, "n_windows": _int(8), "window_len": _int(4),
                              "probe_layers": Param("list", items=_int(0), none=True), "n_head_windows": _int(1),
                              "ig_steps": _int(1), "ig_max_steps": _int(1), "example_len": _int(2)},
    "07_head_explainer": {"dataset": _DATASET, "heads": Param("heads"), "n_windows": _int(1),
                          "window_len": _int(4), "top_k": _int(1), "explainer": _TEXT,
                          "base_url": Param("url", choices=("",)), "refine_rounds": _int(0),
                          "max_cost_usd": _float(0, low_open=True), "dry_run": Param("bool"),
                          "neuron_budget": _int(0)},
    "08_head_taxonomy": {"compare": Param("models", auto=True), "explainer": _TEXT,
                         "base_url": Param("url", choices=("",)), "max_cost_usd": _float(0, low_open=True),
                         "embedding": _choice("auto", "sentence-transformers", "openai", "tfidf"),
                         "min_cluster_size": _int(2), "n_windows": _int(1), "window_len": _int(4)},
    "09_claims": {"dataset": _DATASET, "window_len": _int(4), "n_windows": _int(2), "n_runs": _int(2),
                  "n_boot": _int(1), "n_perm": _int(1), "base_url": Param("url", choices=("none", "")),
                  "explain_windows": _int(1)},
    "10_circuits": {"task": _choice("auto", "ioi", "repeat"), "n_prompts": _int(2, auto=True),
                    "repeat_length": _int(2, auto=True),
                    "method": _choice("eap", "eap-ig-inputs", "eap-ig-activations"), "ig_steps": _int(1),
                    "circuit_edges": _int(1, auto=True), "n_resamples": _int(1, auto=True),
                    "stable": _float(0, 1, low_open=True)},
}
# What "auto" means for model_name offline, per notebook (for the layer bounds).
_OFFLINE_MODEL = {"00_tour": "toy-lm", "01_calibration": "toy-lm", "02_selective_prediction": "toy-lm",
                  "03_logit_lens_and_dla": "toy-2l", "04_activation_patching": "toy-2l",
                  "05_induction_and_qk": "toy-2l", "06_positional_probing": "toy-lm",
                  "07_head_explainer": "toy-2l", "08_head_taxonomy": "toy-2l", "09_claims": "toy-2l",
                  "10_circuits": "toy-2l"}

_HEADS_RE = re.compile(r"\s*(all|L\d+H\d+(\s*,\s*L\d+H\d+)*)\s*")
_MODEL_NAME_RE = re.compile(r"[\w./@:+-]+")


def declared(stem: str) -> dict[str, Param] | None:
    """The schema of notebook ``stem`` (runner-set names included); None if it has none."""
    table = SCHEMA.get(stem)
    return None if table is None else {**RUNNER_SET, **table}


def _n_layers(model: str | None, stem: str) -> int | None:
    """The model's layer count when it can be read without loading the model."""
    from .runtime import in_colab

    name = model if model not in (None, "auto") else (None if in_colab() else _OFFLINE_MODEL.get(stem))
    if not name:
        return None
    from .models import BUNDLED_MODELS, bundled_model_path

    folder = bundled_model_path(name) if name in BUNDLED_MODELS else Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("n_layer", "num_hidden_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def parse_param_value(text: str) -> Any:
    """``-p`` value text -> JSON or Python literal (``64``, ``0.5``, ``true``, ``None``,
    ``[1, 2]``), else the text itself."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, (str, bool, int, float, list, dict)):
            return value
    return text


_parse = parse_param_value


def coerce_and_check(stem: str, key: str, text: str, spec: Param, model: str | None = None,
                     default: str | None = None) -> Any:
    """The value of ``-p key text`` for notebook ``stem`` as the declared type; ParameterError
    (one line: parameter, value, what is allowed) when the schema does not allow it.
    ``default``: the cell's default as written, quoted in the message."""

    def refuse(why: str | None = None) -> ParameterError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        said = f" (declared default {default})" if default else ""
        return ParameterError(f"parameter {key!r}: {stem}.ipynb expects {why or spec.allowed()}"
                              f"{said}, got {shown}")

    if spec.kind in ("text", "choice", "url", "heads") or (spec.kind == "models" and not text.lstrip().startswith("[")):
        value: Any = text
        if spec.none and text.strip() == "None":
            return None
    else:
        value = _parse(text)
    if value is None:
        if spec.none:
            return None
        raise refuse()
    if spec.auto and value == "auto":
        return value
    kind = spec.kind
    if kind == "text":
        return value
    if kind == "choice":
        if value not in spec.choices:
            raise refuse()
        return value
    if kind == "url":
        if value in spec.choices:
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname) and " " not in value
            parts.port  # noqa: B018 - a bad port raises ValueError
        except ValueError:
            ok = False
        if not ok:
            raise refuse()
        return value
    if kind == "heads":
        if not _HEADS_RE.fullmatch(value):
            raise refuse()
        return value
    if kind == "models":
        names = value if isinstance(value, list) else [n.strip() for n in str(value).split(",")]
        if not names or not all(isinstance(n, str) and _MODEL_NAME_RE.fullmatch(n) for n in names):
            raise refuse()
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise refuse()
        for item in value:
            _check_number(item, spec.items, lambda: refuse())
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise refuse()
        return value
    _check_number(value, spec, lambda: refuse())
    if spec.layer:
        n_layers = _n_layers(model, stem)
        if n_layers is not None and not -n_layers <= value < n_layers:
            raise refuse(why=f"a layer of the model ({n_layers} layers: 0 to {n_layers - 1}, or "
                             f"-1 to -{n_layers} from the end)")
    return value


def _check_number(value: Any, spec: Param | None, refuse) -> None:
    if spec is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise refuse()
    if spec.kind == "int" and not isinstance(value, int):
        raise refuse()
    if not math.isfinite(value):
        raise refuse()
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        raise refuse()
    if spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high):
        raise refuse()
