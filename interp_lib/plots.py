"""Figures: plotly charts and circuitsvis views. Analyses return data; these draw it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_layer(model, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer!r}: expected an integer in [0, {model.cfg.n_layers - 1}]")


@torch.no_grad()
def attention_pattern(model, text: str, layer: int) -> tuple[list[str], torch.Tensor]:
    """String tokens and the attention pattern [head, query, key] of ``layer`` on ``text``."""
    _check_layer(model, layer)
    tokens = model.to_tokens(text)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].detach().cpu().clone()
    return model.to_str_tokens(tokens[0]), pattern


def attention_view(model, text: str, layer: int, heads: Sequence[int] | None = None):
    """An interactive circuitsvis view of the heads of ``layer`` attending over ``text``."""
    import circuitsvis as cv

    str_tokens, pattern = attention_pattern(model, text, layer)
    head_ids = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    bad = [h for h in head_ids if not isinstance(h, int) or not 0 <= h < model.cfg.n_heads]
    if bad or not head_ids:
        raise ValueError(f"heads={heads!r}: expected head indices in [0, {model.cfg.n_heads - 1}]")
    return cv.attention.attention_heads(
        attention=pattern[head_ids], tokens=str_tokens,
        attention_head_names=[f"L{layer}H{h}" for h in head_ids])


# --------------------------------------------------------------------------------------------
# Calibration and selective prediction: reliability diagrams, risk-coverage curves
# --------------------------------------------------------------------------------------------

def _as_panels(data, kind: str) -> dict:
    from collections.abc import Mapping

    panels = dict(data) if isinstance(data, Mapping) else {"": data}
    if not panels:
        raise ValueError(f"{kind}: expected at least one entry to draw")
    return panels


def reliability_diagram(data, title: str | None = None, show_counts: bool = True):
    """Reliability diagram(s) from :func:`interp_lib.calibration.reliability_data` frames.

    ``data`` is one frame, or a mapping ``{"before": frame, "after (T=1.8)": frame}`` drawn as
    side-by-side panels sharing the axes. Each panel: accuracy per bin (bars), the gap to the
    mean confidence shaded (red above the bar: over-confident; below: under-confident) and the
    diagonal of perfect calibration; the panel title carries the ECE. With ``show_counts`` a
    strip underneath shows the number of inputs per bin (also written on its bars).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = _as_panels(data, "data")
    required = {"bin_lower", "bin_upper", "confidence", "accuracy", "count", "gap"}
    for name, frame in panels.items():
        missing = required - set(getattr(frame, "columns", ()))
        if missing:
            raise ValueError(f"data[{name!r}] lacks columns {sorted(missing)}; expected a reliability_data(...) frame")
    titles = []
    for name, frame in panels.items():
        filled = frame["count"] > 0
        ece = float((frame["count"][filled] * frame["gap"][filled].abs()).sum() / frame["count"].sum())
        titles.append(f"{name}{' — ' if name else ''}ECE {ece:.4f}")
    n_rows = 2 if show_counts else 1
    fig = make_subplots(rows=n_rows, cols=len(panels), shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=titles, horizontal_spacing=0.06, vertical_spacing=0.04,
                        row_heights=[0.78, 0.22] if show_counts else None)
    for col, (name, frame) in enumerate(panels.items(), start=1):
        filled = frame[frame["count"] > 0]
        centre = (filled["bin_lower"] + filled["bin_upper"]) / 2
        width = (filled["bin_upper"] - filled["bin_lower"]) * 0.95
        first = col == 1
        fig.add_trace(go.Bar(
            x=centre, y=filled["accuracy"], width=width, name="accuracy", marker_color="#4c78a8",
            customdata=filled[["bin_lower", "bin_upper", "confidence", "count"]].to_numpy(),
            hovertemplate=("bin (%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>accuracy %{y:.3f}<br>"
                           "confidence %{customdata[2]:.3f}<br>n = %{customdata[3]}<extra></extra>"),
            legendgroup="accuracy", showlegend=first), row=1, col=col)
        fig.add_trace(go.Bar(
            x=centre, y=filled["gap"], base=filled["accuracy"], width=width, name="gap (confidence − accuracy)",
            marker=dict(color="rgba(228, 87, 86, 0.35)", line=dict(color="#e45756", width=1)),
            hovertemplate="gap %{y:+.3f}<extra></extra>", legendgroup="gap", showlegend=first), row=1, col=col)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                 line=dict(color="gray", dash="dash"), legendgroup="diag", showlegend=first),
                      row=1, col=col)
        if show_counts:
            fig.add_trace(go.Bar(x=centre, y=filled["count"], width=width, name="inputs per bin",
                                 marker_color="#9d9d9d", text=filled["count"], textposition="outside",
                                 hovertemplate="n = %{y}<extra></extra>", legendgroup="count",
                                 showlegend=first), row=2, col=col)
            fig.update_yaxes(title_text="count" if first else None, row=2, col=col)
        fig.update_xaxes(range=[0, 1], row=1, col=col)
        fig.update_xaxes(title_text="confidence", range=[0, 1], row=n_rows, col=col)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=1)
    fig.update_layout(barmode="overlay", title=title, height=520 if show_counts else 420,
                      width=max(460, 400 * len(panels)), legend=dict(orientation="h", y=-0.15))
    return fig


def risk_coverage_curve(curves, thresholds=None, title: str | None = None):
    """Risk-coverage curves from :func:`interp_lib.selective.risk_coverage` results.

    ``curves`` is one result or a mapping ``{"raw": rc, "temperature-scaled": rc2}``; the legend
    shows each AURC / E-AURC. ``thresholds`` optionally maps labels to
    :class:`interp_lib.selective.SelectiveThreshold` results, marked as points (with the SGR
    bound as an error bar when there is one).
    """
    import math

    import plotly.graph_objects as go

    panels = _as_panels(curves, "curves")
    fig = go.Figure()
    for name, curve in panels.items():
        if not all(hasattr(curve, a) for a in ("coverage", "risk", "aurc", "eaurc")):
            raise ValueError(f"curves[{name!r}] is {type(curve).__name__}; expected a risk_coverage(...) result")
        label = f"{name + ': ' if name else ''}AURC {curve.aurc:.4f}, E-AURC {curve.eaurc:.4f}"
        fig.add_trace(go.Scatter(x=curve.coverage, y=curve.risk, mode="lines", name=label, line_shape="hv",
                                 hovertemplate="coverage %{x:.3f}<br>risk %{y:.3f}<extra></extra>"))
    for name, result in (thresholds or {}).items():
        if not getattr(result, "feasible", True):
            continue
        bound = getattr(result, "bound", math.nan)
        error = None if bound is None or math.isnan(bound) else dict(
            type="data", symmetric=False, array=[bound - result.risk], arrayminus=[0])
        fig.add_trace(go.Scatter(x=[result.coverage], y=[result.risk], mode="markers", name=name,
                                 marker=dict(size=11, symbol="diamond"), error_y=error,
                                 hovertemplate=(f"threshold {result.threshold:.4g}<br>coverage %{{x:.3f}}<br>"
                                                "risk %{y:.3f}<extra></extra>")))
    fig.update_layout(title=title, xaxis_title="coverage (fraction of inputs answered)",
                      yaxis_title="selective risk (error rate on answered)", xaxis_range=[0, 1.02],
                      height=420, width=640, legend=dict(orientation="h", y=-0.25))
    return fig
