"""Plotly figures of a head taxonomy (:mod:`interp_lib.explain.taxonomy`); data comes first
from the taxonomy functions, these only draw it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .taxonomy import Taxonomy, family_layer_table

UNCLUSTERED_COLOUR = "#b0b0b0"
HOVER_FIELDS = ("key", "family_label", "text", "score", "flags")


def _check_taxonomy(taxonomy) -> None:
    if not isinstance(taxonomy, Taxonomy):
        raise TypeError(f"taxonomy: expected a Taxonomy (from build_taxonomy), got "
                        f"{type(taxonomy).__name__}")


def _wrap(text: str, width: int = 60) -> str:
    return "<br>".join(textwrap.wrap(str(text), width)) or ""


def _hover(row: pd.Series, fields: Sequence[str]) -> str:
    parts = []
    for name in fields:
        value = row[name]
        if name == "score":
            value = "missing" if value is None or np.isnan(value) else f"{value:.3f}"
        elif name == "flags":
            value = ", ".join(value) or "none"
        parts.append(f"<b>{name}</b>: {_wrap(value)}")
    return "<br>".join(parts)


def taxonomy_map(taxonomy: Taxonomy, hover: Sequence[str] = HOVER_FIELDS, title: str | None = None,
                 max_legend_label: int = 40):
    """2-D map of the explanations, one trace per family (unclustered grey, drawn first); each
    dot is labelled with its head (the taxonomy key, e.g. ``L1H0``) and hovering it shows
    ``hover`` fields of :attr:`Taxonomy.heads`."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    _check_taxonomy(taxonomy)
    heads = taxonomy.heads
    unknown = [f for f in hover if f not in heads.columns]
    if unknown:
        raise ValueError(f"hover={list(hover)!r} names unknown fields {unknown}: expected some of "
                         f"{list(heads.columns)}")
    figure = go.Figure()
    palette = qualitative.Plotly + qualitative.D3 + qualitative.Set3
    for family in sorted(set(heads["family"].tolist())):
        part = heads[heads["family"] == family]
        if family < 0:
            name, colour = f"unclustered ({len(part)})", UNCLUSTERED_COLOUR
        else:
            label = str(part["family_label"].iloc[0])
            label = label if len(label) <= max_legend_label else label[:max_legend_label - 1] + "…"
            name, colour = f"{family}: {label} ({len(part)})", palette[family % len(palette)]
        figure.add_trace(go.Scatter(
            x=part["x"], y=part["y"], mode="markers+text", name=name,
            marker={"color": colour, "size": 9, "line": {"width": 0.5, "color": "white"}},
            text=[str(key) for key in part["key"]], textposition="top center",
            textfont={"size": 9, "color": colour},
            hovertext=[_hover(row, hover) for _, row in part.iterrows()],
            hovertemplate="%{hovertext}<extra></extra>", customdata=part["key"]))
    method = taxonomy.config.get("projection", {}).get("method", "umap").upper()
    figure.update_layout(title=title or f"Head families ({taxonomy.metrics['n_families']} families, "
                         f"coverage {taxonomy.metrics['coverage']:.0%})",
                         xaxis_title=f"{method} 1", yaxis_title=f"{method} 2",
                         legend_title="family", template="plotly_white")
    return figure


def family_layer_heatmap(data, title: str | None = None):
    """Heads per family (rows) and layer or depth bin (columns): a Taxonomy (via
    :func:`family_layer_table`) or a count DataFrame (e.g. ``compare_models(...)["depth"]``)."""
    import plotly.graph_objects as go

    table = family_layer_table(data) if isinstance(data, Taxonomy) else data
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"data: expected a Taxonomy or a DataFrame of counts, got "
                        f"{type(data).__name__}")
    rows = [("unclustered" if int(f) < 0 else f"family {f}") for f in table.index]
    figure = go.Figure(go.Heatmap(z=table.to_numpy(), x=[str(c) for c in table.columns], y=rows,
                                  colorscale="Blues", hovertemplate="%{y}, %{x}: %{z} heads"
                                  "<extra></extra>"))
    figure.update_layout(title=title or "Head families by layer", xaxis_title=str(
        table.columns.name or "layer"), yaxis_title="family", template="plotly_white")
    figure.update_yaxes(autorange="reversed")
    return figure


def family_table(taxonomy: Taxonomy, max_members: int = 12) -> pd.DataFrame:
    """Display table: one row per family with its label, size, metrics and (some) members."""
    _check_taxonomy(taxonomy)
    table = taxonomy.families.copy()
    table["members"] = [", ".join(m[:max_members]) + (f", … (+{len(m) - max_members})"
                                                      if len(m) > max_members else "")
                        for m in table["members"]]
    return table.round({"agreement": 3, "specificity": 3})


def family_table_figure(taxonomy: Taxonomy, max_members: int = 12, title: str | None = None):
    """The :func:`family_table` as a plotly table."""
    import plotly.graph_objects as go

    table = family_table(taxonomy, max_members)
    columns = ["family", "label", "size", "agreement", "specificity", "members"]
    figure = go.Figure(go.Table(header={"values": columns},
                                cells={"values": [table[c].tolist() for c in columns]}))
    figure.update_layout(title=title or "Head families")
    return figure
