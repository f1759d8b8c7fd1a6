"""Explainer of attention heads and MLP neurons: events -> explanations -> scores -> refinement ->
causal check -> taxonomy -> viewer (``ExplainConfig.units``: ``"heads"`` or ``"neurons"``).

Submodules are imported on first use (``il.explain.taxonomy``, ``il.explain.client`` ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from .records import (Event, Explanation, HeadRecord, RefinementStep, ScoreResult, UnitRecord, head_label,
                      load_records, parse_head_label, parse_unit_label, save_records)

_SUBMODULES = {"config", "client", "events", "heuristic", "prompts", "scoring", "refine", "pipeline",
               "report", "taxonomy", "viewer", "records", "figures", "stages"}

# Public names that live in submodules, resolved lazily (name -> submodule).
_LAZY = {
    "cluster_explanations": "taxonomy",
    "build_taxonomy": "taxonomy",
    "Taxonomy": "taxonomy",
    "compare_with_behaviour": "taxonomy",
    "quality_flags": "taxonomy",
    "write_viewer": "viewer",
    "read_ratings": "viewer",
    "ratings_vs_scores": "viewer",
    "rating_widgets": "viewer",
    "ExplainConfig": "config",
    "run_explainer": "pipeline",
    "collect_events": "events",
    "sample_windows": "events",
    "heuristic_explanations": "heuristic",
    "neuron_heuristic_explanations": "heuristic",
    "select_neurons": "pipeline",
    "neuron_activation": "events",
}

__all__ = ["Event", "Explanation", "HeadRecord", "UnitRecord", "RefinementStep", "ScoreResult", "head_label",
           "parse_head_label", "parse_unit_label", "save_records", "load_records", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'interp_lib.explain' has no attribute {name!r}")
