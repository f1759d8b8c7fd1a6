"""Figures: plotly charts and circuitsvis views. Analyses return data; these draw it.

Figures render with no network: :data:`OFFLINE_RENDERER` (set by ``il.notebook.setup``) puts
plotly.js into the first figure of a kernel session and only the figure into later ones, next
to the plotly JSON mimetype that JupyterLab / VS Code draw with their own copy of plotly.js.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .units import head_label

OFFLINE_RENDERER = "interp_lib"
"""Name of the offline renderer in ``plotly.io.renderers`` (see :func:`register_offline_renderer`)."""

FIGURE_WIDTH = 960
"""Widest figure drawn here (pixels): fits a notebook / nbconvert page of about 1000 px."""


def _offline_renderer_class():
    from plotly.io.base_renderers import MimetypeRenderer

    class OfflineRenderer(MimetypeRenderer):
        """Three views of each figure, one output: ``text/html`` that carries plotly.js inline
        the first time (so an nbconvert HTML export or a saved notebook draws with no network),
        ``application/vnd.plotly.v1+json`` (JupyterLab, VS Code, nteract draw it themselves)
        and a ``text/plain`` line for viewers that run no JavaScript."""

        def __init__(self, config=None):
            self.config = dict(config) if config else {}
            # shared by the shallow copies plotly makes of a renderer before each use
            self.state = {"plotlyjs_embedded": False}

        def reset(self) -> None:
            """Embed plotly.js again in the next figure (a new notebook / kernel session)."""
            self.state["plotlyjs_embedded"] = False

        def to_mimebundle(self, fig_dict):
            import plotly.io as pio
            from plotly.io.base_renderers import PlotlyRenderer

            bundle = PlotlyRenderer(config=self.config).to_mimebundle(dict(fig_dict))
            html = pio.to_html(fig_dict, config=self.config or None,
                               include_plotlyjs=not self.state["plotlyjs_embedded"],
                               include_mathjax=False, full_html=False, validate=False,
                               default_width="100%", default_height=525)
            self.state["plotlyjs_embedded"] = True
            bundle["text/html"] = html
            bundle["text/plain"] = figure_summary(fig_dict)
            return bundle

    return OfflineRenderer


def figure_summary(figure) -> str:
    """One line naming a figure (its title and traces): the plain-text view of a figure."""
    fig_dict = figure if isinstance(figure, dict) else figure.to_dict()
    layout = fig_dict.get("layout", {}) or {}
    title = layout.get("title")
    title = title.get("text") if isinstance(title, dict) else title
    kinds = [t.get("type", "scatter") for t in fig_dict.get("data", [])]
    counted = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no traces"
    return f"<figure{': ' + str(title) if title else ''} ({counted}); interactive view needs JavaScript>"


def register_offline_renderer(config: dict | None = None):
    """Register (once) and return the offline renderer as ``plotly.io.renderers[OFFLINE_RENDERER]``;
    a second call resets it so that the next figure embeds plotly.js again."""
    import plotly.io as pio

    if OFFLINE_RENDERER not in pio.renderers:
        pio.renderers[OFFLINE_RENDERER] = _offline_renderer_class()(config=config)
    renderer = pio.renderers[OFFLINE_RENDERER]
    if config is not None:
        renderer.config = dict(config)
    renderer.reset()
    return renderer


def _width(natural: float, minimum: int = 460) -> int:
    """A figure width in pixels: ``natural`` clipped to [minimum, FIGURE_WIDTH]."""
    return int(min(FIGURE_WIDTH, max(minimum, natural)))


def readable_token(token: str) -> str:
    """A token as a label people can read: a leading space as '␣', newlines / tabs as '↵' / '⇥',
    and the replacement character of a partial UTF-8 byte sequence (a multi-byte character split
    across tokens, which decodes to '�') as '‹byte›'; an empty token as '‹empty›'."""
    text = str(token)
    if not text:
        return "‹empty›"
    text = text.replace("\ufffd", "‹byte›").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return "␣" + text[1:] if text.startswith(" ") else text


def symmetric_range(values, floor: float = 0.0) -> float:
    """Half-width of a colour scale centred on 0: the largest |value|, at least ``floor`` (so
    noise of ±0.02 next to a floor of 0.1 stays pale instead of filling the scale)."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    return max(top, float(floor)) or 1.0


def _check_layer(model, layer: int) -> None:
    if not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer={layer!r}: expected an integer in [0, {model.cfg.n_layers - 1}]")


@torch.no_grad()
def attention_pattern(model, text: str | torch.Tensor, layer: int) -> tuple[list[str], torch.Tensor]:
    """String tokens and the attention pattern [head, query, key] of ``layer`` on ``text``
    (a string, tokenised with BOS, or token ids ``[pos]`` / ``[1, pos]`` used as they are --
    e.g. random tokens, which need not survive decoding and re-encoding)."""
    _check_layer(model, layer)
    if isinstance(text, str):
        tokens = model.to_tokens(text)
    elif isinstance(text, torch.Tensor) and text.dtype in (torch.int32, torch.int64) and (
            text.ndim == 1 or (text.ndim == 2 and text.shape[0] == 1)) and text.numel() > 0:
        tokens = text.reshape(1, -1).to(next(model.parameters()).device)
        if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
            raise ValueError(f"text: token ids must be in [0, {model.cfg.d_vocab - 1}]")
    else:
        raise ValueError(f"text={text!r}: expected a string or an integer token tensor of shape [pos] or [1, pos]")
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].detach().cpu().clone()
    return model.to_str_tokens(tokens[0]), pattern


def attention_view(model, text: str | torch.Tensor, layer: int, heads: Sequence[int] | None = None):
    """An interactive circuitsvis view of the heads of ``layer`` attending over ``text`` (a string
    or token ids, see :func:`attention_pattern`)."""
    import circuitsvis as cv

    str_tokens, pattern = attention_pattern(model, text, layer)
    head_ids = list(range(model.cfg.n_heads)) if heads is None else list(heads)
    bad = [h for h in head_ids if not isinstance(h, int) or not 0 <= h < model.cfg.n_heads]
    if bad or not head_ids:
        raise ValueError(f"heads={heads!r}: expected head indices in [0, {model.cfg.n_heads - 1}]")
    return cv.attention.attention_heads(
        attention=pattern[head_ids], tokens=str_tokens,
        attention_head_names=[head_label(layer, h) for h in head_ids])


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
    max_count = max(int(frame["count"].max()) for frame in panels.values())
    fig = make_subplots(rows=n_rows, cols=len(panels), shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=titles, horizontal_spacing=0.06, vertical_spacing=0.04,
                        row_heights=[0.78, 0.22] if show_counts else None)
    for col, (name, frame) in enumerate(panels.items(), start=1):
        filled = frame[frame["count"] > 0]
        centre = ((filled["bin_lower"] + filled["bin_upper"]) / 2).tolist()
        width = ((filled["bin_upper"] - filled["bin_lower"]) * 0.95).tolist()
        counts = [int(c) for c in filled["count"]]
        first = col == 1
        fig.add_trace(go.Bar(
            x=centre, y=filled["accuracy"].tolist(), width=width, name="accuracy", marker_color="#4c78a8",
            customdata=filled[["bin_lower", "bin_upper", "confidence", "count"]].to_numpy().tolist(),
            hovertemplate=("bin (%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>accuracy %{y:.3f}<br>"
                           "confidence %{customdata[2]:.3f}<br>n = %{customdata[3]}<extra></extra>"),
            legendgroup="accuracy", showlegend=first), row=1, col=col)
        fig.add_trace(go.Bar(
            x=centre, y=filled["gap"].tolist(), base=filled["accuracy"].tolist(), width=width, name="gap (confidence − accuracy)",
            marker=dict(color="rgba(228, 87, 86, 0.35)", line=dict(color="#e45756", width=1)),
            hovertemplate="gap %{y:+.3f}<extra></extra>", legendgroup="gap", showlegend=first), row=1, col=col)
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                 line=dict(color="gray", dash="dash"), legendgroup="diag", showlegend=first),
                      row=1, col=col)
        if show_counts:
            # plain int lists: int64 arrays travel as typed arrays that drew as a 0-4 strip
            fig.add_trace(go.Bar(x=centre, y=counts, width=width, name="inputs per bin",
                                 marker_color="#9d9d9d", text=counts, textposition="outside",
                                 cliponaxis=False, hovertemplate="n = %{y}<extra></extra>",
                                 legendgroup="count", showlegend=first), row=2, col=col)
            fig.update_yaxes(title_text="inputs" if first else None, row=2, col=col,
                             range=[0, 1.3 * max(max_count, 1)])
        fig.update_xaxes(range=[0, 1], row=1, col=col)
        fig.update_xaxes(title_text="confidence", range=[0, 1], row=n_rows, col=col)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], row=1, col=1)
    fig.update_layout(barmode="overlay", title=title, height=520 if show_counts else 420,
                      width=_width(400 * len(panels)), legend=dict(orientation="h", y=-0.15))
    return fig


def risk_coverage_curve(curves, thresholds=None, title: str | None = None, target_risk: float | None = None):
    """Risk-coverage curves from :func:`interp_lib.selective.risk_coverage` results.

    ``curves`` is one result or a mapping ``{"raw": rc, "temperature-scaled": rc2}``; the legend
    shows each AURC / E-AURC. ``thresholds`` optionally maps labels to
    :class:`interp_lib.selective.SelectiveThreshold` results, marked as points (with the SGR
    bound as an error bar when there is one); ``target_risk`` draws the risk that decides them.
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
    if target_risk is not None:
        fig.add_hline(y=float(target_risk), line=dict(color="#e45756", dash="dot"),
                      annotation_text=f"target risk {float(target_risk):.3g}", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="coverage (fraction of inputs answered)",
                      yaxis_title="selective risk (error rate on answered)", xaxis_range=[0, 1.02],
                      height=420, width=640, legend=dict(orientation="h", y=-0.25))
    return fig


# --------------------------------------------------------------------------------------------
# Logit lens, direct logit attribution, activation / attribution patching
# --------------------------------------------------------------------------------------------

LENS_VALUES = {"top_prob": "P(top token)", "target_prob": "P(next token)", "target_rank": "rank of next token"}


def logit_lens_heatmap(frame, value: str = "top_prob", prompt: int = 0, title: str | None = None,
                       max_positions: int | None = 24):
    """Heatmap of a :func:`interp_lib.attribution.logit_lens` table: stages (rows, embeddings at
    the bottom) by positions (columns), coloured by ``value`` (``top_prob``, ``target_prob``,
    ``target_rank``), each cell labelled with its top token (readable: '␣' for a leading space,
    '‹byte›' for part of a multi-byte character). Only the last ``max_positions`` positions are
    drawn (the answer and, on repeated sequences, the second copy; ``None``: all)."""
    import plotly.graph_objects as go

    required = {"prompt", "stage", "layer", "position", "input_token", "top_token", value}
    missing = required - set(getattr(frame, "columns", ()))
    if missing:
        raise ValueError(f"frame lacks columns {sorted(missing)}; expected a logit_lens(...) table"
                         + (" run with a target" if value.startswith("target") else ""))
    rows = frame[frame["prompt"] == prompt]
    if rows.empty:
        raise ValueError(f"prompt={prompt!r}: the table holds prompts {sorted(frame['prompt'].unique())}")
    stages = rows.drop_duplicates("stage").sort_values("layer")["stage"].tolist()
    positions = sorted(rows["position"].unique())
    if max_positions is not None:
        if not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions={max_positions!r}: expected a positive integer or None")
        positions = positions[-max_positions:]
    grid = rows.pivot(index="stage", columns="position", values=value).loc[stages, positions]
    text = rows.pivot(index="stage", columns="position", values="top_token").loc[stages, positions]
    text = text.map(lambda t: readable_token(t)[:10])
    inputs = rows.drop_duplicates("position").set_index("position").loc[positions, "input_token"]
    columns = [f"{p}: {readable_token(t)[:12]}" for p, t in zip(positions, inputs)]
    label = LENS_VALUES.get(value, value)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=columns, y=stages, text=text.to_numpy(), texttemplate="%{text}",
        textfont=dict(size=9), zmin=0 if value != "target_rank" else None,
        zmax=1 if value != "target_rank" else None,
        colorscale="Blues" if value != "target_rank" else "Blues_r", colorbar=dict(title=label),
        hovertemplate="stage %{y}<br>position %{x}<br>top token %{text}<br>" + label + " %{z:.3g}<extra></extra>"))
    fig.update_layout(title=title or f"Logit lens ({label})", xaxis_title="position: input token",
                      yaxis_title="residual stream after", height=max(300, 26 * len(stages) + 170),
                      width=_width(48 * len(positions) + 220), xaxis_tickangle=-60)
    return fig


def logit_attribution_bar(contributions, labels, title: str | None = None, top: int | None = None,
                          unit: str = "logit difference"):
    """Bar chart of a direct logit attribution (mean over prompts, with the spread as error bars)."""
    import plotly.graph_objects as go

    contributions = torch.as_tensor(contributions, dtype=torch.float32)
    if contributions.ndim == 1:
        contributions = contributions[:, None]
    if contributions.shape[0] != len(labels):
        raise ValueError(f"{contributions.shape[0]} contributions but {len(labels)} labels")
    mean = contributions.mean(1)
    spread = contributions.std(1) if contributions.shape[1] > 1 else None
    order = list(range(len(labels)))
    if top is not None:
        order = sorted(order, key=lambda i: -abs(float(mean[i])))[:top]
    fig = go.Figure(go.Bar(
        x=[labels[i] for i in order], y=mean[order].tolist(),
        error_y=None if spread is None else dict(type="data", array=spread[order].tolist()),
        marker_color=["#4c78a8" if float(mean[i]) >= 0 else "#e45756" for i in order]))
    fig.update_layout(title=title or "Direct logit attribution", xaxis_title="component",
                      yaxis_title=f"direct contribution ({unit})", height=420,
                      width=_width(22 * len(order) + 200, 500))
    return fig


def patching_heatmap(result, labels, title: str | None = None, zmid: float = 0.0,
                     value: str = "normalised logit diff", floor: float = 0.1,
                     tokens: Sequence[str] | None = None):
    """Heatmap of a patching / ablation sweep (``activation_patch(..., return_labels=True)``).

    2-D sweeps draw as one heatmap (first axis down); 3-D sweeps (``[layer, pos, head]``) as one
    panel per entry of the last axis. ``value`` titles the colour bar; the colour scale is
    symmetric around ``zmid`` and spans at least ±``floor`` (so noise stays pale); ``tokens``
    (the prompt's string tokens) label a position axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    result = torch.as_tensor(result, dtype=torch.float32).detach().cpu()
    axes = [a for a in labels if a != "cell"]
    if tuple(result.shape) != tuple(len(labels[a]) for a in axes):
        raise ValueError(f"result has shape {tuple(result.shape)} but labels describe "
                         f"{tuple(len(labels[a]) for a in axes)}")
    if result.ndim == 1:
        result, axes = result[:, None], axes + ["value"]
        labels = {**labels, "value": [""]}
    panels = [(None, result)] if result.ndim == 2 else [
        (labels[axes[2]][i], result[..., i]) for i in range(result.shape[2])]
    if result.ndim > 3:
        raise ValueError(f"cannot draw a {result.ndim}-D sweep; select a slice first")
    if tokens is not None and "pos" in axes:
        positions = list(labels["pos"])
        if len(tokens) < len(positions):
            raise ValueError(f"tokens: {len(tokens)} given for {len(positions)} positions")
        labels = {**labels, "pos": [f"{p}: {readable_token(t)[:10]}" for p, t in zip(positions, tokens)]}
    bound = symmetric_range((result - zmid).numpy(), floor)
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[str(name) for name, _ in panels] if len(panels) > 1 else None)
    for col, (_, grid) in enumerate(panels, start=1):
        fig.add_trace(go.Heatmap(z=grid.numpy(), x=list(labels[axes[1]]), y=list(labels[axes[0]]),
                                 zmin=zmid - bound, zmax=zmid + bound, colorscale="RdBu",
                                 showscale=col == len(panels), colorbar=dict(title=value),
                                 hovertemplate="%{y} %{x}<br>" + value + " %{z:.4f}<extra></extra>"),
                      row=1, col=col)
    names = {"pos": "position", "layer": "layer", "head": "head"}
    fig.update_yaxes(autorange="reversed", title_text=names.get(axes[0], axes[0]), row=1, col=1)
    fig.update_xaxes(title_text=names.get(axes[1], axes[1]))
    fig.update_layout(title=title, height=max(320, 28 * result.shape[0] + 160),
                      width=_width(260 * len(panels) + 28 * result.shape[1] + 120, 480))
    return fig


def patching_scatter(exact, approx, labels=None, title: str | None = None):
    """Attribution patching (y) against exact activation patching (x), one point per cell, with
    the diagonal; the title carries :func:`interp_lib.patching.patching_agreement`."""
    import numpy as np
    import plotly.graph_objects as go

    from .patching import patching_agreement

    exact = torch.as_tensor(exact, dtype=torch.float32).flatten()
    approx = torch.as_tensor(approx, dtype=torch.float32).flatten()
    agreement = patching_agreement(exact, approx, k=min(10, exact.numel()))
    cells = None if labels is None else np.asarray(labels["cell"]).reshape(-1)
    low, high = float(min(exact.min(), approx.min())), float(max(exact.max(), approx.max()))
    fig = go.Figure([
        go.Scatter(x=exact.tolist(), y=approx.tolist(), mode="markers", text=cells, name="cells",
                   hovertemplate="%{text}<br>exact %{x:.4f}<br>attribution %{y:.4f}<extra></extra>"),
        go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x", line=dict(color="gray", dash="dash")),
    ])
    fig.update_layout(
        title=title or (f"Attribution vs exact patching: r = {agreement['pearson']:.3f}, "
                        f"sign agreement {agreement['sign_agreement']:.2f}, "
                        f"top-{agreement['k']} overlap {agreement['top_k_overlap']:.2f}"),
        xaxis_title="activation patching (exact)", yaxis_title="attribution patching (estimate)",
        height=460, width=560)
    return fig


# --------------------------------------------------------------------------------------------
# Attention heads: head-score grids, attention / QK heatmaps, composition (interp_lib.heads)
# --------------------------------------------------------------------------------------------

def _heatmap(matrix, x=None, y=None, title=None, xaxis="", yaxis="", zmid=None, colorscale="RdBu_r",
             value: str = "value", floor: float = 0.0):
    import plotly.graph_objects as go

    z = torch.as_tensor(matrix, dtype=torch.float32)
    if z.ndim != 2:
        raise ValueError(f"matrix has shape {tuple(z.shape)}: expected a 2-d tensor")
    z = torch.where(torch.isinf(z), torch.full_like(z, float("nan")), z)
    extent = {} if zmid is None else dict(zmin=zmid - symmetric_range((z - zmid).numpy(), floor),
                                          zmax=zmid + symmetric_range((z - zmid).numpy(), floor))
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=y, colorscale=colorscale, colorbar=dict(title=value),
                               hovertemplate="%{y}, %{x}<br>" + value + " %{z:.3g}<extra></extra>", **extent))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis, height=440, width=600)
    fig.update_yaxes(autorange="reversed")
    return fig


def head_score_heatmap(scores, title: str | None = None, threshold: float | None = None,
                       value: str = "score"):
    """A [layer, head] score grid (``il.heads.head_scores``), each cell labelled with its score;
    with ``threshold`` (the one that decides detection) the heads at or above it are outlined
    and the threshold is named in the title and marked on the colour bar."""
    import plotly.graph_objects as go

    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected [n_layers, n_heads]")
    suffix = "" if threshold is None else f" (threshold {threshold:.3f})"
    x, y = [f"H{h}" for h in range(scores.shape[1])], [f"L{l}" for l in range(scores.shape[0])]
    fig = _heatmap(scores, x=x, y=y, title=(title or "head scores") + suffix,
                   xaxis="head", yaxis="layer", colorscale="Blues", value=value)
    fig.update_traces(text=[[f"{v:.2f}" for v in row] for row in scores.tolist()], texttemplate="%{text}",
                      selector=dict(type="heatmap"))
    if threshold is not None:
        above = (scores >= threshold).nonzero().tolist()
        fig.add_trace(go.Scatter(x=[x[h] for _, h in above], y=[y[l] for l, _ in above], mode="markers",
                                 name=f"≥ threshold {threshold:.3f}", hoverinfo="skip",
                                 marker=dict(symbol="square-open", size=34, color="#e45756",
                                             line=dict(width=3))))
        fig.update_traces(colorbar=dict(title=value, tickvals=[threshold], ticktext=[f"threshold {threshold:.2f}"],
                                        ticks="outside"), selector=dict(type="heatmap"))
        fig.update_layout(legend=dict(orientation="h", y=-0.18))
    fig.update_layout(width=_width(70 * scores.shape[1] + 260, 420), height=max(280, 60 * scores.shape[0] + 180))
    return fig


def attention_heatmap(pattern, tokens: Sequence[str] | None = None, title: str | None = None):
    """One head's [query, key] attention pattern (or a QK score matrix)."""
    return _heatmap(pattern, x=None if tokens is None else [f"{i}:{t}" for i, t in enumerate(tokens)],
                    y=None if tokens is None else [f"{i}:{t}" for i, t in enumerate(tokens)],
                    title=title, xaxis="key position", yaxis="query position", colorscale="Blues",
                    value="attention weight")


def qk_heatmap(matrix, title: str | None = None, xaxis: str = "key", yaxis: str = "query"):
    """A QK circuit (token x token, position x position) or a [sequence, key] QK interaction."""
    return _heatmap(matrix, title=title, xaxis=xaxis, yaxis=yaxis, zmid=0.0, value="QK score (logit)")


def composition_heatmap(scores, title: str | None = None):
    """Composition scores [layer_a, head_a, layer_b, head_b] as a (source head x target head) grid."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    if scores.ndim != 4:
        raise ValueError(f"scores has shape {tuple(scores.shape)}: expected [layer, head, layer, head]")
    n_layers, n_heads = scores.shape[:2]
    labels = [head_label(l, h) for l in range(n_layers) for h in range(n_heads)]
    grid = scores.reshape(n_layers * n_heads, n_layers * n_heads)
    return _heatmap(grid, x=labels, y=labels, title=title or "composition scores", xaxis="target (later head)",
                    yaxis="source (earlier head)", colorscale="Blues", value="composition score")


# --------------------------------------------------------------------------------------------
# Positional probing and input attribution (interp_lib.probing; notebook 06)
# --------------------------------------------------------------------------------------------

def probe_curves(frames, title: str | None = None, chance: float | None = None):
    """Probe accuracy per residual stream, one line per probe, dashed lines for the controls.

    ``frames``: one :func:`interp_lib.probing.position_probe` DataFrame or a list of them;
    ``chance`` draws the chance accuracy."""
    import pandas as pd
    import plotly.graph_objects as go

    frame = pd.concat(frames) if isinstance(frames, (list, tuple)) else frames
    fig = go.Figure()
    for name, part in frame.groupby("probe", sort=False):
        fig.add_trace(go.Scatter(x=part["stream"], y=part["accuracy"], mode="lines+markers", name=f"{name} probe"))
        if "control_accuracy" in part:
            fig.add_trace(go.Scatter(x=part["stream"], y=part["control_accuracy"], mode="lines+markers",
                                     name=f"{name} control", line=dict(dash="dash")))
    if chance is not None:
        fig.add_hline(y=float(chance), line=dict(color="gray", dash="dot"),
                      annotation_text=f"chance {float(chance):.2f}", annotation_position="bottom right")
    fig.update_layout(title=title or "Position probe accuracy on held-out sequences", xaxis_title="residual stream",
                      yaxis_title="accuracy (held-out)", yaxis_range=[0, 1], height=400, width=680)
    return fig


def head_class_scatter(frame, title: str | None = None):
    """Heads from :func:`interp_lib.probing.head_position_scores`: position score against mean
    attention offset, coloured by class."""
    import plotly.express as px

    fig = px.scatter(frame, x="position_score", y="mean_offset", color="label", text="unit",
                     hover_data=["bos_attention"], title=title or "Position vs content heads")
    fig.update_traces(textposition="top center")
    fig.update_layout(height=440, width=680, xaxis_title="position score (1 = content-independent)",
                      yaxis_title="mean query - key offset")
    return fig


def head_importance_heatmap(frame, value: str = "drop", title: str | None = None, floor: float = 0.1,
                            unit: str = "accuracy"):
    """``[layer, head]`` heatmap of a per-head column (e.g. probe accuracy drop under ablation),
    each cell labelled; the colour scale is symmetric and spans at least ±``floor`` so that
    ablation noise of a hundredth stays pale (a drop that matters fills the scale)."""
    import plotly.graph_objects as go

    if value not in getattr(frame, "columns", ()):
        raise ValueError(f"value={value!r}: not a column of the frame ({list(getattr(frame, 'columns', []))})")
    grid = frame.pivot(index="layer", columns="index", values=value)
    bound = symmetric_range(grid.to_numpy(), floor)
    fig = go.Figure(go.Heatmap(z=grid.to_numpy().tolist(), x=[f"H{h}" for h in grid.columns],
                               y=[f"L{l}" for l in grid.index], colorscale="RdBu", zmin=-bound, zmax=bound,
                               text=[[f"{v:+.3f}".replace("-0.000", "0.000").replace("+0.000", "0.000")
                                     for v in row] for row in grid.to_numpy().tolist()],
                               texttemplate="%{text}", colorbar=dict(title=f"{value} ({unit})"),
                               hovertemplate="%{y}%{x}<br>" + value + " %{z:.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="head")
    fig.update_layout(title=title or f"Head ablation: {value} (scale at least ±{floor:g})",
                      height=max(300, 50 * len(grid.index) + 180), width=_width(70 * len(grid.columns) + 260, 480))
    return fig


def token_attribution_bar(tokens, values, title: str | None = None, value: str = "attribution"):
    """One bar per input token (integrated gradients, rollout row, ...)."""
    import plotly.graph_objects as go

    labels = [f"{i}: {readable_token(t)}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Bar(x=labels, y=[float(v) for v in values]))
    fig.update_layout(title=title, height=380, width=_width(28 * len(labels) + 160), xaxis_tickangle=-60,
                      xaxis_title="input token", yaxis_title=value)
    return fig


def causal_trace_heatmap(trace, tokens, title: str | None = None):
    """Probability of the target with one (stream, position) restored: a
    :class:`interp_lib.probing.CausalTrace` over its input ``tokens`` (strings)."""
    import plotly.graph_objects as go

    labels = [f"{i}: {readable_token(t)}" + ("*" if i in trace.corrupt_positions else "") for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=trace.scores.T.numpy().tolist(), x=list(trace.stream_labels), y=labels,
                               colorscale="Purples", colorbar=dict(title="P(target)"), zmin=0,
                               hovertemplate="%{y} %{x}<br>p = %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or (f"Causal tracing: clean p = {trace.clean_prob:.3f}, "
                                      f"corrupted p = {trace.corrupted_prob:.3f} (* = noised)"),
                      xaxis_title="restored stream", yaxis_title="position: token", height=max(320, 22 * len(labels) + 120), width=560)
    return fig


# --------------------------------------------------------------------------------------------
# Claims under test (interp_lib.claims)
# --------------------------------------------------------------------------------------------

def claims_forest(table, title: str | None = None):
    """Forest plot of ``claims.claims_table``: per claim (one row each) the measured value with its
    interval (a bar where there is one), and the claimed value as an open diamond; the colour is
    the verdict. Claims measured in different units share the axis: read each row against its
    own claimed value. Claims with nothing measured are left out (named in the title)."""
    import math

    import plotly.graph_objects as go

    colours = {"supported": "#2ca02c", "not supported": "#d62728", "not testable": "#7f7f7f"}
    rows = table.reset_index()
    shown = rows[rows["measured"].map(lambda v: v is not None and math.isfinite(float(v)))]
    missing = [str(c) for c in rows.loc[~rows.index.isin(shown.index), "claim"]]
    labels = [f"{int(r.claim)}. {r.metric}"[:60] for r in shown.itertuples()]
    traces = []
    for verdict, colour in colours.items():
        part = shown[shown["verdict"] == verdict]
        if part.empty:
            continue
        low = (part["measured"] - part["ci_low"]).where(part["ci_low"].notna(), 0.0)
        high = (part["ci_high"] - part["measured"]).where(part["ci_high"].notna(), 0.0)
        traces.append(go.Scatter(
            x=part["measured"].tolist(), y=[labels[list(shown.index).index(i)] for i in part.index], mode="markers",
            name=f"measured ({verdict})", marker=dict(color=colour, size=10),
            error_x=dict(type="data", symmetric=False, array=high.tolist(), arrayminus=low.tolist(), color=colour),
            hovertemplate="%{y}<br>measured %{x:.3f}<extra></extra>"))
    claimed = shown[shown["claimed"].map(lambda v: v is not None and math.isfinite(float(v)))]
    traces.append(go.Scatter(
        x=claimed["claimed"].tolist(), y=[labels[list(shown.index).index(i)] for i in claimed.index], mode="markers",
        name="claimed", marker=dict(symbol="diamond-open", color="black", size=12),
        hovertemplate="%{y}<br>claimed %{x:.3f}<extra></extra>"))
    fig = go.Figure(traces)
    fig.update_layout(
        title=title or ("Claims: measured (95% interval) vs claimed"
                        + (f"; nothing measured for claim {', '.join(missing)}" if missing else "")),
        xaxis_title="value (each row in its claim's own unit)", yaxis=dict(autorange="reversed"),
        height=max(260, 60 + 48 * len(shown)), width=_width(FIGURE_WIDTH))
    return fig


def faithfulness_curve(*curves, title: str | None = None):
    """Faithfulness against circuit size (fraction of edges, log axis) for one or more
    :func:`interp_lib.circuits.faithfulness_curve` frames (e.g. MIB's ``cmd_curve`` and
    ``cpr_curve``: circuits ranked by |score| and by signed score); 1 = the clean model."""
    import plotly.graph_objects as go

    if not curves:
        raise ValueError("faithfulness_curve needs at least one curve (a circuits.faithfulness_curve frame)")
    fig = go.Figure()
    for i, curve in enumerate(curves):
        missing = {"fraction", "n_edges", "faithfulness"} - set(curve.columns)
        if missing:
            raise ValueError(f"curve {i} lacks columns {sorted(missing)}: expected a circuits.faithfulness_curve frame")
        shown = curve[curve["fraction"] > 0]
        name = ["ranked by |score|", "ranked by signed score"][i] if len(curves) == 2 else f"curve {i}"
        fig.add_trace(go.Scatter(x=shown["fraction"], y=shown["faithfulness"], mode="lines+markers", name=name,
                                 customdata=shown["n_edges"],
                                 hovertemplate="%{customdata} edges (%{x:.1%})<br>faithfulness %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="#888", dash="dot"), annotation_text="clean model")
    fig.update_xaxes(type="log")
    fig.update_layout(title=title, xaxis_title="circuit size (fraction of edges)", yaxis_title="faithfulness",
                      height=420, width=640, legend=dict(orientation="h", y=-0.25))
    return fig
