"""Report stage of the head explainer: records.json, report.md, scores.html and viewer.html."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .records import Event, HeadRecord, save_records

SCORE_ORDER = ("refined", "simulation", "detection", "contrastive")


def unit_noun(records: Sequence[HeadRecord]) -> str:
    """What the records are: ``"head"``, ``"neuron"``, or ``"unit"`` when they mix kinds."""
    kinds = {getattr(r, "unit_kind", "head") for r in records}
    return kinds.pop() if len(kinds) == 1 else "unit"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _md(text: str | None) -> str:
    """One table cell / line of Markdown: no pipes, no newlines, no raw HTML."""
    text = "" if text is None else str(text)
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
            .replace("<", "&lt;").replace(">", "&gt;"))


def event_line(event: Event, max_context: int = 24) -> str:
    """The event as the explainer's prompts show it (:func:`prompts.format_event`): the context
    ending at the query, query in ``[[...]]``, attended tokens marked ``{token|weight}``."""
    from .prompts import format_event

    return format_event(event, max_context=max_context)


def primary_scorer(records: Sequence[HeadRecord]) -> str | None:
    """The scorer to rank heads by: simulation, else detection, else contrastive -- the first
    that scored any head (scores of different scorers are not comparable)."""
    for name in ("simulation", "detection", "contrastive"):
        if any(name in r.scores and r.scores[name].score is not None for r in records):
            return name
    return None


def score_for(record: HeadRecord, scorer: str | None) -> float | None:
    """The head's ``scorer`` score, its refined explanation's when refinement used that scorer."""
    if scorer is None:
        return None
    refined = record.scores.get("refined")
    if refined is not None and refined.score is not None and refined.details.get("scorer") == scorer:
        return refined.score
    result = record.scores.get(scorer)
    return None if result is None else result.score


def score_grid(records: Sequence[HeadRecord], n_layers: int, n_heads: int, scorer: str | None = None
               ) -> np.ndarray:
    """[layer, head] score by ``scorer`` (default: :func:`primary_scorer`; NaN where none)."""
    grid = np.full((n_layers, n_heads), np.nan)
    scorer = scorer or primary_scorer(records)
    for record in records:
        value = score_for(record, scorer)
        if value is not None and record.layer < n_layers and record.head < n_heads:
            grid[record.layer, record.head] = value
    return grid


def score_heatmap(records: Sequence[HeadRecord], n_layers: int, n_heads: int, scorer: str | None = None):
    """Plotly layer x head heatmap of the preferred score, hover = explanation. Neurons (a
    handful of a layer's thousands) sit in the order they were explained: column ``k`` is the
    ``k``-th explained neuron of its layer (the hover names it)."""
    import plotly.graph_objects as go

    noun = unit_noun(records)
    if noun == "head":
        grid, place = score_grid(records, n_layers, n_heads, scorer), {r.label: (r.layer, r.head) for r in records}
        columns = [f"H{h}" for h in range(n_heads)]
    else:
        rank: dict[int, int] = {}
        place = {}
        for record in sorted(records, key=lambda r: (r.layer, getattr(r, "unit_kind", "head"), r.head)):
            place[record.label] = (record.layer, rank.get(record.layer, 0))
            rank[record.layer] = rank.get(record.layer, 0) + 1
        n_layers, width = max(n_layers, max(r.layer for r in records) + 1), max(rank.values())
        grid = np.full((n_layers, width), np.nan)
        for record in records:
            value = score_for(record, scorer or primary_scorer(records))
            if value is not None:
                grid[place[record.label]] = value
        columns = [f"#{k}" for k in range(width)]
    hover = [["" for _ in range(grid.shape[1])] for _ in range(grid.shape[0])]
    for record in records:
        text = record.explanation.text if record.explanation else f"(no explanation: {record.failure})"
        row, column = place[record.label]
        if row < grid.shape[0] and column < grid.shape[1]:
            hover[row][column] = f"{record.label}: {text[:160]}"
    figure = go.Figure(go.Heatmap(z=grid, x=columns, y=[f"L{l}" for l in range(grid.shape[0])], text=hover,
                                  hovertemplate="%{text}<br>score %{z:.3f}<extra></extra>",
                                  colorscale="Viridis"))
    figure.update_layout(title=f"explanation score by {noun} ({scorer or primary_scorer(records)})",
                         yaxis_autorange="reversed", yaxis_title="layer",
                         xaxis_title=noun if noun == "head" else f"{noun} (k-th explained in its layer)")
    return figure


def score_verdict(record: HeadRecord) -> dict | None:
    """See :func:`interp_lib.explain.viewer.score_verdict` (the score that judges the
    explanation, and whether it is at or below the scorer's chance level)."""
    from .viewer import score_verdict as verdict

    return verdict(record)


def _verdict_word(record: HeadRecord, verdict: dict) -> str:
    """'contradicted' / 'supported' by the score; a supported explanation of a unit whose ablation
    changes the loss by exactly 0 says so (e.g. toy-2l's neurons: its MLP outputs are zero)."""
    if verdict["contradicted"]:
        return "contradicted"
    if record.causal_effect is not None and record.causal_effect == 0:
        return "supported by its score, but ablating the unit changes nothing (0 nats)"
    return "supported"


def _verdict_cell(record: HeadRecord) -> str:
    verdict = score_verdict(record)
    if verdict is None:
        return "–"
    return _verdict_word(record, verdict)


def markdown_report(records: Sequence[HeadRecord], meta: Mapping | None = None, n_best: int = 5,
                    n_events: int = 3) -> str:
    meta = dict(meta or {})
    config = meta.get("config", {})
    noun = unit_noun(records)
    lines = [f"# {noun.capitalize()} explainer report", ""]
    if config:
        lines.append(f"Model **{_md(config.get('model_resolved', config.get('model')))}**, "
                     f"explainer **{_md(config.get('explainer') or 'heuristic (no LLM)')}**, "
                     f"{config.get('windows')} windows x {config.get('window_len')} tokens "
                     f"({_md(config.get('dataset'))}), top-{config.get('top_k')} events per {noun}, "
                     f"seed {config.get('seed')}.")
        if noun == "neuron":
            from .events import NEURON_SALIENCE, NEURON_SALIENCE_DESCRIPTION

            lines += ["", f"Events are ranked by `{NEURON_SALIENCE}`: {_md(NEURON_SALIENCE_DESCRIPTION)}."]
        elif config.get("salience"):
            from .events import SALIENCE_DESCRIPTIONS

            salience = str(config["salience"])
            lines.append("")
            lines.append(f"Events are ranked by `{_md(salience)}`: {_md(SALIENCE_DESCRIPTIONS.get(salience, ''))}.")
        lines.append("")
    skipped = meta.get("skipped_scorers") or {}
    for name, why in skipped.items():
        lines.append(f"- scorer `{name}` not run: {_md(why)}")
    usage = meta.get("usage") or {}
    if usage.get("summary"):
        lines.append(f"- LLM usage: {_md(usage['summary'])}")
    taxonomy = meta.get("taxonomy")
    if isinstance(taxonomy, str):
        lines.append(f"- taxonomy not built: {_md(taxonomy)}")
    elif isinstance(taxonomy, Mapping) and taxonomy.get("metrics"):
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in taxonomy["metrics"].items()
                            if isinstance(v, (int, float)))
        lines.append(f"- taxonomy: {_md(metrics)}")
    explained = [r for r in records if r.explanation is not None]
    failed = [r for r in records if r.explanation is None]
    lines += [f"- {len(explained)} of {len(records)} {noun}s explained; {len(failed)} failed", ""]

    names = [s for s in SCORE_ORDER if any(s in r.scores for r in records)]
    names += sorted({k for r in records for k in r.scores} - set(names))
    header = [noun, "family", *names, "causal Δloss (nats)", "verdict", "explanation"]
    lines += ["## Scores", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        text = record.explanation.text if record.explanation else f"FAILED: {record.failure}"
        family = "–" if record.family is None else (str(record.family) if record.family >= 0 else "none")
        cells = [record.label, family, *[_fmt(record.scores[n].score) if n in record.scores else "–" for n in names],
                 _fmt(record.causal_effect), _verdict_cell(record), _md(text)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # ranked on one scorer only: correlations, AUCs and effect sizes are not on one scale
    scorer = primary_scorer(records)
    ranked = sorted([r for r in explained if score_for(r, scorer) is not None],
                    key=lambda r: score_for(r, scorer), reverse=True)
    if ranked:
        lines += [f"## Best explained {noun}s (by {scorer})", ""]
        lines += [f"- {r.label} ({_fmt(score_for(r, scorer))}): {_md(r.explanation.text)}" for r in ranked[:n_best]]
        lines += ["", f"## Worst explained {noun}s (by {scorer})", ""]
        lines += [f"- {r.label} ({_fmt(score_for(r, scorer))}): {_md(r.explanation.text)}"
                  for r in ranked[::-1][:n_best]]
        lines.append("")
    refined = [r.refinement for r in records if r.refinement]
    if refined:
        from ..artifacts import markdown_table
        from .refine import refinement_gain

        lines += ["## Refinement: held-out score gain per round", "",
                  "A revision is kept only when its held-out score beats the current explanation's; "
                  "`mean_gain` counts a rejected revision as 0.", "",
                  markdown_table(refinement_gain(refined)), ""]
    if failed:
        lines += [f"## {noun.capitalize()}s without an explanation", ""]
        lines += [f"- {r.label}: {_md(r.failure)}" for r in failed]
        lines.append("")

    lines += [f"## {noun.capitalize()}s", ""]
    for record in records:
        lines.append(f"### {record.label}")
        lines.append("")
        if record.explanation is not None:
            e = record.explanation
            lines.append(f"**{_md(e.text)}** ({_md(e.source)}, round {e.round})")
            if e.attends_from or e.attends_to:
                lines.append(f"- attends from: {_md(e.attends_from)}; to: {_md(e.attends_to)}")
        else:
            lines.append(f"No explanation: {_md(record.failure)}")
        verdict = score_verdict(record)
        if verdict is not None and verdict["contradicted"]:
            lines.append(f"- **contradicted by its score**: {verdict['scorer']} {_fmt(verdict['score'])} "
                         f"{verdict['unit']}, at or below chance {verdict['chance']:g}")
        if record.heuristic is not None and record.heuristic is not record.explanation \
                and (record.explanation is None or record.heuristic.text != record.explanation.text):
            lines.append(f"- heuristic baseline: {_md(record.heuristic.text)}")
        for name, result in record.scores.items():
            extra = f", {result.n_unparseable} unparseable" if result.n_unparseable else ""
            why = f" ({_md(result.failure)})" if result.failure else ""
            lines.append(f"- {name}: {_fmt(result.score)} on {result.n} items{extra}{why}")
        if record.refinement:
            gains = ", ".join(f"round {s.round}: " + (f"revision failed ({_md(s.failure)})" if s.failure else
                              f"{_fmt(s.previous_score)} → {_fmt(s.score)} ({'kept' if s.kept else 'rejected'})")
                              for s in record.refinement)
            lines.append(f"- refinement: {gains}")
        if record.causal_effect is not None:
            base = record.stats.get("causal_random")
            lines.append(f"- causal check: ablating it changes next-token loss by {_fmt(record.causal_effect, 4)} "
                         f"nats at its top events ({_fmt(base, 4)} at random positions)")
        if record.top_events:
            lines.append("- top events:")
            for event in record.top_events[:n_events]:
                lines.append(f"  - `{event_line(event).replace('`', 'ʼ')}` ({event.activation:.2f})")
        lines.append("")
    return "\n".join(lines)


def write_report(records: Sequence[HeadRecord], out: str | Path, *, meta: Mapping | None = None,
                 n_layers: int | None = None, n_heads: int | None = None) -> dict[str, Path]:
    """Write records.json, report.md, scores.html and viewer.html into ``out``."""
    from ..artifacts import atomic_write
    from .viewer import write_viewer

    if not records:
        raise ValueError("records is empty: nothing to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = n_layers or max(r.layer for r in records) + 1
    n_heads = n_heads or max(r.head for r in records) + 1
    files = {"records": save_records(list(records), out / "records.json", meta=meta)}
    text = markdown_report(records, meta).encode()
    atomic_write(out / "report.md", lambda handle: handle.write(text))
    files["report"] = out / "report.md"
    # plotly.js inline (like the viewer's code): the page draws offline and from any folder
    html = score_heatmap(records, n_layers, n_heads).to_html(include_plotlyjs=True, include_mathjax=False,
                                                             full_html=True).encode()
    atomic_write(out / "scores.html", lambda handle: handle.write(html))
    files["heatmap"] = out / "scores.html"
    title = f"interp_lib {unit_noun(records)} explainer"
    if meta and meta.get("config"):
        title += f": {meta['config'].get('model_resolved', '')}"
    files["viewer"] = write_viewer(records, out / "viewer.html", n_layers=n_layers, n_heads=n_heads,
                                   title=title, meta=meta)
    return files


def events_frame(events: Sequence[Event], max_context: int = 24):
    """One row per event: kind, window, position, activation, and the context as a line with
    the query in ``[[...]]`` and attended tokens as ``{token|weight}``."""
    import pandas as pd

    return pd.DataFrame([{"unit": e.label, "head": e.label, "kind": e.kind, "window": e.window, "position": e.position,
                          "activation": e.activation, "context": event_line(e, max_context)} for e in events])


def records_frame(records: Sequence[HeadRecord]):
    """One row per unit: the unit schema's columns (``unit``, ``layer``, ``index``, ``kind``;
    ``head`` / ``head_index`` repeat the label and index under their older names), then the
    explanation (or failure), source, family, every score, causal effect."""
    from ..units import unit_columns
    import pandas as pd

    rows = []
    for r in records:
        row = {**unit_columns(r.unit), "head": r.label, "head_index": r.head,
               "explanation": r.explanation.text if r.explanation else None,
               "failure": r.failure, "source": r.explanation.source if r.explanation else None,
               "family": r.family, "family_label": r.family_label,
               "primary_score": score_for(r, primary_scorer(records)),
               "causal_effect": r.causal_effect, "causal_random": r.stats.get("causal_random")}
        row.update({f"score_{name}": result.score for name, result in r.scores.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def records_table(records: Sequence[HeadRecord], *, digits: int = 3):
    """The records as a readable table (:func:`interp_lib.display.table`): head, family, the
    explanation (full, wrapped), the scorer that judges it with its score and unit, whether the
    score contradicts it, and the causal check in nats. :func:`records_frame` has every column."""
    import pandas as pd

    from ..display import table

    rows, noun = [], unit_noun(records)
    for r in records:
        verdict = score_verdict(r)
        family = None if r.family is None else ("unclustered" if r.family < 0 else
                                                f"{r.family}: {r.family_label}" if r.family_label else str(r.family))
        rows.append({noun: r.label, "family": family,
                     "explanation": r.explanation.text if r.explanation else f"no explanation: {r.failure}",
                     "scorer": None if verdict is None else verdict["scorer"] + (" (refined)" if verdict["scores_key"] == "refined" else ""),
                     "score": None if verdict is None else verdict["score"],
                     "unit (chance)": None if verdict is None else f"{verdict['unit']} ({verdict['chance']:g})",
                     "verdict": None if verdict is None else _verdict_word(r, verdict),
                     "causal_effect": r.causal_effect, "causal_random": r.stats.get("causal_random")})
    return table(pd.DataFrame(rows), digits=digits, units={"causal_effect": "Δ loss, nats", "causal_random": "Δ loss, nats"},
                 names={"causal_effect": "ablated at top events", "causal_random": "ablated at random positions"})
