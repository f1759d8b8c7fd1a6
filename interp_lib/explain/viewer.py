"""Static HTML viewer of the head explainer, human ratings, and their read-back.

``write_viewer(records, path)`` writes one self-contained HTML file (inline CSS and JS, the
data embedded as JSON, no server, no external URL): a layer x head grid coloured by family or
by score; clicking a head shows its explanation, scores, family and top events with the
attended tokens highlighted; a 1-5 rating per explanation is kept in the page (localStorage,
keyed by the run id) and exported as ``ratings.json``.

``rating_widgets(records, save_to=...)`` is the same rating loop inside a notebook
(ipywidgets); it saves the same JSON format after every change.

``read_ratings(path)`` reads either file back into a DataFrame and ``ratings_vs_scores``
correlates the human ratings with the automated scores.

Ratings file format (schema 1)::

    {"schema": 1, "run": "<run id>",
     "ratings": [{"label": "L1H0", "rating": 4, "comment": "", "time": "<ISO 8601>",
                  "rater": "<optional>"}]}

Everything shown in the page (explanations, tokens, labels) is untrusted text: the page renders
it with ``textContent`` only, and the embedded JSON escapes ``<``, ``>``, ``&`` and ``/`` so no
string can close the ``<script>`` element or spell out a URL.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from ..artifacts import atomic_write, jsonable
from ..checkpoint import REDACTED, is_secret_key, secret_env_values
from .records import HeadRecord, head_label, parse_head_label, parse_unit_label

__all__ = ["write_viewer", "viewer_data", "viewer_run_id", "read_ratings", "ratings_vs_scores",
           "RatingWidget", "rating_widgets", "RATINGS_SCHEMA", "DATA_ELEMENT_ID", "score_verdict",
           "STAT_INFO", "SCORER_INFO"]

RATINGS_SCHEMA = 1
DATA_ELEMENT_ID = "interp-lib-data"
_COLOR_MODES = ("family", "score")
_LABEL_RE = re.compile(r"L\d+[HN]\d+", re.IGNORECASE)  # a head (L1H0) or a neuron (L0N17)

#: Head statistics (``HeadRecord.stats``) as people read them: (name, unit); "%" values are
#: fractions of the head's attention shown as percentages.
STAT_INFO: dict[str, tuple[str, str]] = {
    "bos": ("attention on the first (BOS) token", "%"),
    "self": ("attention on the token itself", "%"),
    "prev": ("attention on the previous token", "%"),
    "recent": ("attention on tokens 2-5 back", "%"),
    "punctuation": ("attention on punctuation / newlines", "%"),
    "punctuation_base": ("punctuation share under uniform attention", "%"),
    "same_token": ("attention on earlier copies of the token", "%"),
    "same_token_base": ("same-token share under uniform attention", "%"),
    "mean_distance": ("mean query-key distance", "tokens"),
    "entropy": ("attention entropy (normalised, 0 = one token, 1 = uniform)", ""),
    "induction": ("induction attention on repeated random tokens", "%"),
    "repeat_duplicate": ("duplicate-token attention on repeated random tokens", "%"),
    "causal_random": ("loss change when ablated at random positions", "nats"),
}

#: Scorers: (what the score measures, its unit, the chance level at or below which the score
#: contradicts the explanation).
SCORER_INFO: dict[str, tuple[str, str, float]] = {
    "simulation": ("correlation of activations an LLM predicts from the explanation with the real ones",
                   "Pearson r", 0.0),
    "detection": ("how well an LLM tells the head's top contexts from others using the explanation",
                  "ROC AUC", 0.5),
    "contrastive": ("activation on the explanation's positive vs negative examples", "Cohen's d", 0.0),
}


def score_verdict(record: HeadRecord) -> dict | None:
    """The score that judges ``record``'s explanation, and whether it contradicts it.

    The refined explanation's held-out score first (with the scorer it used), then simulation,
    detection, contrastive. ``contradicted`` is True when the score is at or below the scorer's
    chance level (:data:`SCORER_INFO`): the explanation predicts the head no better than
    chance, or the opposite of what it does. None when nothing scored the explanation."""
    if record.explanation is None:
        return None
    candidates = []
    refined = record.scores.get("refined")
    if refined is not None and refined.score is not None:
        candidates.append(("refined", str(refined.details.get("scorer") or "simulation"), refined.score))
    for name in ("simulation", "detection", "contrastive"):
        result = record.scores.get(name)
        if result is not None and result.score is not None:
            candidates.append((name, name, result.score))
    if not candidates:
        return None
    key, scorer, score = candidates[0]
    what, unit, chance = SCORER_INFO.get(scorer, ("score", "", 0.0))
    score = float(score)
    return {"scores_key": key, "scorer": scorer, "score": score, "unit": unit, "chance": chance,
            "measures": what, "contradicted": bool(math.isfinite(score) and score <= chance)}


# ----------------------------------------------------------------------------- validation


def _check_records(records: Any) -> list[HeadRecord]:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a sequence of HeadRecord, got {type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError("records is empty: the viewer needs at least one HeadRecord")
    seen: set[str] = set()
    for i, record in enumerate(records):
        if not isinstance(record, HeadRecord):
            raise TypeError(f"records[{i}] must be a HeadRecord, got {type(record).__name__}")
        if record.label in seen:
            raise ValueError(f"records holds head {record.label!r} twice (records[{i}]); "
                             "expected one record per head")
        seen.add(record.label)
    return records


def _strip_url_credentials(value: str) -> str:
    """An http(s) URL without user-info, query string or fragment (where API keys and tokens
    ride, e.g. ``https://user:pass@host/v1?key=...``); any other string unchanged."""
    text = value.strip()
    if not re.match(r"(?i)https?://", text) or re.search(r"\s", text):
        return value
    try:
        parts = urlsplit(text)
    except ValueError:   # e.g. a malformed IPv6 host: not a URL we can vouch for, keep nothing
        return REDACTED
    if not parts.netloc:
        return value
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _clean_meta(value: Any, secrets: set[str]) -> Any:
    """Meta without credential-named keys (at any depth), credential values, or credentials
    inside http(s) URLs (user-info and query strings are dropped)."""
    if isinstance(value, Mapping):
        return {str(k): _clean_meta(v, secrets) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [_clean_meta(v, secrets) for v in value]
    if isinstance(value, str):
        if value in secrets:
            return REDACTED
        return _strip_url_credentials(value)
    return jsonable(value)


def viewer_run_id(records: Sequence[HeadRecord], title: str = "interp_lib head explainer") -> str:
    """The run id that keys a page's ratings: the title plus a hash of the explanations.

    Re-rendering the same explanations gives the same id (ratings survive a rewritten page);
    new explanations give a new id, so old ratings are never attached to new text.
    """
    records = _check_records(records)
    content = [[r.label, r.explanation.text if r.explanation is not None else None]
               for r in sorted(records, key=lambda r: (r.layer, r.head))]
    digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(title)).strip("-")[:60] or "run"
    return f"{slug}-{digest}"


# ----------------------------------------------------------------------------- the page


def viewer_data(records: Sequence[HeadRecord], *, n_layers: int | None = None,
                n_heads: int | None = None, title: str = "interp_lib head explainer",
                meta: dict | None = None, color_by: str = "family", max_events: int = 10,
                run: str | None = None) -> dict:
    """The JSON document the page embeds (what ``write_viewer`` writes, before escaping)."""
    records = _check_records(records)
    if color_by not in _COLOR_MODES:
        raise ValueError(f"color_by={color_by!r} is not supported; expected one of {_COLOR_MODES}")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
        raise ValueError(f"max_events={max_events!r} must be a non-negative int")
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    top_layer = max(r.layer for r in records) + 1
    # grid column of each unit: a head's index; a neuron's rank among its layer's explained
    # neurons (a layer has thousands; the grid shows the explained ones), after the heads' columns
    # on a page that holds both kinds
    column: dict[str, int] = {}
    rank: dict[int, int] = {}
    first = max((r.head + 1 for r in records if r.unit_kind == "head"), default=0)
    for record in sorted(records, key=lambda r: (r.layer, r.unit_kind != "head", r.head)):
        if record.unit_kind == "head":
            column[record.label] = record.head
        else:
            column[record.label] = first + rank.get(record.layer, 0)
            rank[record.layer] = rank.get(record.layer, 0) + 1
    only_heads = all(r.unit_kind == "head" for r in records)
    top_head = max(column.values()) + 1
    if not only_heads:
        n_heads = None  # the grid's width is the most neurons explained in one layer
    for name, given, needed in (("n_layers", n_layers, top_layer), ("n_heads", n_heads, top_head)):
        if given is None:
            continue
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"{name}={given!r} must be a positive int")
        if given < needed:
            raise ValueError(f"{name}={given} is too small: the records go up to {needed - 1}")
    heads = []
    for record in sorted(records, key=lambda r: (r.layer, r.unit_kind != "head", r.head)):
        data = record.to_dict()
        data["top_events"] = data["top_events"][:max_events]
        data["best_score"] = jsonable(record.best_score())
        data["verdict"] = jsonable(score_verdict(record))
        heads.append(data)
    scorers = sorted({name for r in records for name in r.scores})
    return {
        "schema": RATINGS_SCHEMA,
        "run": run if run is not None else viewer_run_id(records, title),
        "title": str(title),
        "n_layers": n_layers if n_layers is not None else top_layer,
        "n_heads": n_heads if n_heads is not None else top_head,
        "column_prefix": "H" if only_heads else "#",
        "columns": column,  # label -> grid column
        "color_by": color_by,
        "scorers": scorers,
        "meta": _clean_meta(dict(meta or {}), secret_env_values()),
        "stat_info": {k: list(v) for k, v in STAT_INFO.items()},
        "scorer_info": {k: list(v) for k, v in SCORER_INFO.items()},
        "heads": heads,
    }


def _script_json(data: dict) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>``, ``&`` and ``/`` only occur inside JSON
    strings, where their escaped forms decode to the same text (so no ``</script>`` and no
    literal URL can appear in the page)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("/", "\\/"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def write_viewer(records: Sequence[HeadRecord], path: str | Path, *, n_layers: int | None = None,
                 n_heads: int | None = None, title: str = "interp_lib head explainer",
                 meta: dict | None = None, color_by: str = "family", max_events: int = 10,
                 run: str | None = None) -> Path:
    """Write the self-contained HTML viewer of ``records`` to ``path`` (atomically).

    ``color_by`` is the initial grid colouring ("family" or "score"; the page has a switch),
    ``max_events`` the top events shown per head, ``meta`` a small dict shown in the header
    (credential-named keys are dropped), ``run`` overrides the run id that keys the ratings.
    """
    data = viewer_data(records, n_layers=n_layers, n_heads=n_heads, title=title, meta=meta,
                       color_by=color_by, max_events=max_events, run=run)
    page = (_PAGE.replace("@@TITLE@@", html.escape(str(title)))
            .replace("@@CSS@@", _CSS).replace("@@JS@@", _JS)
            .replace("@@DATA_ID@@", DATA_ELEMENT_ID)
            .replace("@@DATA@@", _script_json(data)))
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"path={str(path)!r} must end in .html (it is an HTML page)")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = page.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(payload))
    return path


# ----------------------------------------------------------------------------- ratings


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ratings_document(ratings: Mapping[str, dict], run: str) -> dict:
    entries = []
    for label in sorted(ratings, key=lambda label: (parse_unit_label(label).kind, parse_unit_label(label))):
        item = ratings[label]
        entry = {"label": label, "rating": int(item["rating"]), "comment": item.get("comment", ""),
                 "time": item.get("time") or _now_iso()}
        if item.get("rater"):
            entry["rater"] = item["rater"]
        entries.append(entry)
    return {"schema": RATINGS_SCHEMA, "run": run, "ratings": entries}


def read_ratings(path: str | Path | Mapping) -> pd.DataFrame:
    """Ratings exported by the page or saved by the notebook widget, as a DataFrame.

    Columns: ``label, layer, head, rating, comment, rater, time`` (time as UTC timestamps);
    ``frame.attrs["run"]`` is the run id. Raises ValueError on anything malformed, naming
    the entry and what was expected. ``path`` may also be the already-parsed document.
    """
    if isinstance(path, Mapping):
        document, where = path, "ratings document"
    else:
        path = Path(path)
        where = f"ratings file {str(path)!r}"
        if not path.exists():
            raise FileNotFoundError(f"{where} does not exist")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("ratings"), list):
        raise ValueError(f"{where} is not a ratings document (expected a JSON object with a "
                         "'ratings' list, as exported by the viewer)")
    if document.get("schema") != RATINGS_SCHEMA:
        raise ValueError(f"{where} has schema {document.get('schema')!r}; expected {RATINGS_SCHEMA}")
    rows = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(document["ratings"]):
        at = f"{where}: ratings[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{at} is {type(entry).__name__}; expected an object")
        label = entry.get("label")
        if not isinstance(label, str) or not _LABEL_RE.fullmatch(label.strip()):
            raise ValueError(f"{at} has label {label!r}; expected a head label like 'L1H0' or a neuron label like 'L0N17'")
        unit = parse_unit_label(label)
        layer, head = unit
        rating = entry.get("rating")
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
            raise ValueError(f"{at} ({label}) has rating {rating!r}; expected an int from 1 to 5")
        comment = entry.get("comment", "")
        if comment is None:
            comment = ""
        if not isinstance(comment, str):
            raise ValueError(f"{at} ({label}) has comment {comment!r}; expected a string")
        rater = entry.get("rater") or ""
        if not isinstance(rater, str):
            raise ValueError(f"{at} ({label}) has rater {rater!r}; expected a string")
        time = entry.get("time")
        try:
            stamp = pd.Timestamp(time) if time else pd.NaT
        except (ValueError, TypeError):
            raise ValueError(f"{at} ({label}) has time {time!r}; expected an ISO 8601 timestamp") from None
        if stamp is not pd.NaT:
            stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
        key = (unit.label, rater)
        if key in seen:
            raise ValueError(f"{at} rates {key[0]} a second time"
                             + (f" for rater {rater!r}" if rater else "")
                             + "; expected one rating per head (per rater)")
        seen.add(key)
        rows.append({"label": key[0], "layer": layer, "head": head, "rating": rating,
                     "comment": comment, "rater": rater, "time": stamp})
    frame = pd.DataFrame(rows, columns=["label", "layer", "head", "rating", "comment", "rater", "time"])
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    frame = frame.astype({"layer": "int64", "head": "int64", "rating": "int64"})
    frame.attrs["run"] = document.get("run")
    return frame


def ratings_vs_scores(ratings: pd.DataFrame | str | Path, records: Sequence[HeadRecord],
                      scorer: str | None = None) -> dict:
    """Correlate human ratings with the automated score of each rated head.

    ``scorer`` picks the score (default: each head's preferred score, ``HeadRecord.best_score``).
    Several raters of one head are averaged. Returns ``{"n", "spearman_rho", "spearman_p",
    "pearson_r", "pearson_p", "scorer", "table", "message"}``; the correlations are NaN and
    ``message`` says why when fewer than 3 heads have both a rating and a score, or when either
    side is constant. ``table`` has one row per rated head (``score`` NaN where missing).
    """
    from scipy import stats

    if isinstance(ratings, (str, Path)):
        ratings = read_ratings(ratings)
    if not isinstance(ratings, pd.DataFrame):
        raise TypeError(f"ratings must be a DataFrame from read_ratings (or its path), "
                        f"got {type(ratings).__name__}")
    missing = {"label", "rating"} - set(ratings.columns)
    if missing:
        raise ValueError(f"ratings lacks columns {sorted(missing)}; expected read_ratings' output")
    records = _check_records(records)
    by_label = {r.label: r for r in records}
    if scorer is not None and not any(scorer in r.scores for r in records):
        known = sorted({s for r in records for s in r.scores})
        raise ValueError(f"scorer={scorer!r} scored none of the records; known scorers: {known}")

    grouped = ratings.groupby("label", sort=False)["rating"].agg(["mean", "count"])
    rows = []
    for label, (mean, count) in grouped.iterrows():
        record = by_label.get(label)
        score = record.best_score(scorer) if record is not None else None
        rows.append({"label": label, "rating": float(mean), "n_ratings": int(count),
                     "score": float("nan") if score is None else float(score),
                     "family": record.family if record is not None else None,
                     "explanation": (record.explanation.text if record is not None
                                     and record.explanation is not None else None),
                     "in_records": record is not None})
    table = pd.DataFrame(rows, columns=["label", "rating", "n_ratings", "score", "family",
                                        "explanation", "in_records"])
    if len(table):
        order = table["label"].map(lambda label: (parse_unit_label(label).kind, tuple(parse_unit_label(label))))
        table = table.iloc[sorted(range(len(table)), key=lambda i: order.iloc[i])].reset_index(drop=True)
    paired = table[table["score"].notna()]
    n = len(paired)
    notes = []
    unknown = table.loc[~table["in_records"], "label"].tolist()
    if unknown:
        notes.append(f"{len(unknown)} rated head(s) not in records: {unknown}")
    unscored = table.loc[table["in_records"] & table["score"].isna(), "label"].tolist()
    if unscored:
        notes.append(f"{len(unscored)} rated head(s) without a {scorer or 'preferred'} score: {unscored}")
    nan = float("nan")
    result = {"n": n, "spearman_rho": nan, "spearman_p": nan, "pearson_r": nan, "pearson_p": nan,
              "scorer": scorer or "best", "table": table}
    if n < 3:
        notes.insert(0, f"only {n} head(s) have both a rating and a score; correlations need at least 3")
    elif paired["rating"].nunique() < 2 or paired["score"].nunique() < 2:
        side = "ratings" if paired["rating"].nunique() < 2 else "scores"
        notes.insert(0, f"the {side} are constant over the {n} paired heads; correlation is undefined")
    else:
        rho, rho_p = stats.spearmanr(paired["rating"], paired["score"])
        r, r_p = stats.pearsonr(paired["rating"], paired["score"])
        result.update(spearman_rho=float(rho), spearman_p=float(rho_p),
                      pearson_r=float(r), pearson_p=float(r_p))
    result["message"] = "; ".join(notes)
    return result


# ----------------------------------------------------------------------------- notebook widget


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _event_html(event) -> str:
    """One event as escaped HTML: query token boxed, attended tokens shaded by weight."""
    weights = {int(p): float(w) for p, w in event.attended}
    parts = []
    start = max(0, event.position - 24)
    if weights:
        start = min(start, max(0, min(weights) - 2))
    if start > 0:
        parts.append("<span style='color:#888'>&hellip;</span>")
    for pos in range(start, min(len(event.tokens), event.position + 1)):
        text = html.escape(event.tokens[pos].replace("\n", "\u21b5"))
        style = "white-space:pre-wrap;"
        title = f"pos {pos}"
        if pos in weights:
            style += f"background:rgba(255,140,0,{min(1.0, max(0.08, weights[pos])):.2f});"
            title += f", attention {weights[pos]:.3f}"
        if pos == event.position:
            style += "outline:2px solid #1f5fbf;"
            title += " (query)"
        parts.append(f"<span style='{style}' title='{html.escape(title)}'>{text}</span>")
    return "<div style='font-family:monospace;margin:2px 0'>" + "".join(parts) + "</div>"


def _head_html(record: HeadRecord, index: int, total: int, max_events: int) -> str:
    esc = html.escape
    lines = [f"<b>{esc(record.label)}</b> &nbsp; ({index + 1} / {total})"]
    if record.explanation is not None:
        lines.append(f"<div style='font-size:1.1em;margin:6px 0'>{esc(record.explanation.text)}</div>"
                     f"<div style='color:#666'>source: {esc(record.explanation.source)}, "
                     f"round {record.explanation.round}</div>")
    else:
        lines.append(f"<div style='color:#a00'>no explanation: {esc(record.failure or 'unknown')}</div>")
    verdict = score_verdict(record)
    if verdict is not None:
        text = (f"{verdict['scorer']}: {verdict['score']:.3f} {verdict['unit']} (chance {verdict['chance']:g})")
        lines.append(f"<div style='color:#8a1c00;font-weight:bold'>&#9888; the score contradicts this explanation "
                     f"({esc(text)})</div>" if verdict["contradicted"] else f"<div>scored by {esc(text)}</div>")
    if record.heuristic is not None and (record.explanation is None
                                         or record.heuristic.text != record.explanation.text):
        lines.append(f"<div style='color:#555'>heuristic baseline: {esc(record.heuristic.text)}</div>")
    if record.family is not None:
        lines.append(f"<div>family {record.family}: {esc(record.family_label or '')}</div>")
    if record.scores:
        cells = "".join(f"<tr><td>{esc(name)}</td><td>{_fmt(s.score)}</td><td>{s.n}</td></tr>"
                        for name, s in sorted(record.scores.items()))
        lines.append("<table><tr><th>scorer</th><th>score</th><th>n</th></tr>" + cells + "</table>")
    if record.causal_effect is not None:
        lines.append(f"<div>causal effect: {_fmt(record.causal_effect)}</div>")
    lines.extend(_event_html(e) for e in record.top_events[:max_events])
    return "\n".join(lines)


class RatingWidget:
    """Rate head explanations 1-5 in a notebook, one head at a time.

    ``.widget`` is the ipywidgets box to display (the object also displays itself);
    ``.ratings`` maps label -> ``{"rating", "comment", "time"}``. With ``save_to`` every change
    is written there atomically, in the page's export format; an existing file is resumed.
    """

    def __init__(self, records: Sequence[HeadRecord], save_to: str | Path | None = None, *,
                 run: str | None = None, title: str = "interp_lib head explainer",
                 rater: str = "", max_events: int = 3) -> None:
        import ipywidgets as widgets

        self.records = sorted(_check_records(records), key=lambda r: (r.layer, r.head))
        self.run = run if run is not None else viewer_run_id(self.records, title)
        self.save_to = Path(save_to) if save_to is not None else None
        self.rater = str(rater)
        self.max_events = max_events
        self._ratings: dict[str, dict] = {}
        self.index = 0
        if self.save_to is not None and self.save_to.exists():
            self._resume(self.save_to)

        self.head_view = widgets.HTML()
        self.buttons = widgets.ToggleButtons(options=[(str(i), i) for i in range(1, 6)], value=None,
                                             description="rating", tooltips=[
                                                 "1: wrong", "2: mostly wrong", "3: partly right",
                                                 "4: mostly right", "5: exactly right"])
        self.comment = widgets.Text(placeholder="optional comment", description="comment",
                                    continuous_update=False)
        self.prev_button = widgets.Button(description="< prev")
        self.next_button = widgets.Button(description="next >")
        self.status = widgets.Label()
        self.prev_button.on_click(lambda _: self.show(self.index - 1))
        self.next_button.on_click(lambda _: self.show(self.index + 1))
        self._updating = False  # set while show() loads a head, so loading is not a rating
        self.buttons.observe(self._on_rating, names="value")
        self.comment.observe(self._on_comment, names="value")
        self.widget = widgets.VBox([
            self.head_view, self.buttons, self.comment,
            widgets.HBox([self.prev_button, self.next_button, self.status])])
        self.show(0)

    # -- state
    @property
    def ratings(self) -> dict[str, dict]:
        return {label: dict(item) for label, item in self._ratings.items()}

    @property
    def current(self) -> HeadRecord:
        return self.records[self.index]

    def _resume(self, path: Path) -> None:
        frame = read_ratings(path)
        if frame.attrs.get("run") != self.run:
            warnings.warn(f"ratings file {str(path)!r} is for run {frame.attrs.get('run')!r}, not "
                          f"{self.run!r}; resuming the ratings of heads present in both", stacklevel=3)
        labels = {r.label for r in self.records}
        for row in frame.itertuples():
            if row.label in labels:
                self._ratings[row.label] = {
                    "rating": int(row.rating), "comment": row.comment,
                    "time": row.time.isoformat() if pd.notna(row.time) else _now_iso(),
                    **({"rater": row.rater} if row.rater else {})}

    def document(self) -> dict:
        """The ratings in the page's export format."""
        return _ratings_document(self._ratings, self.run)

    def _save(self) -> None:
        if self.save_to is None:
            return
        self.save_to.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.document(), indent=1).encode("utf-8")
        atomic_write(self.save_to, lambda handle: handle.write(payload))

    # -- navigation and rating
    def show(self, index: int) -> None:
        self.index = max(0, min(int(index), len(self.records) - 1))
        record = self.current
        item = self._ratings.get(record.label, {})
        self._updating = True
        try:
            self.head_view.value = _head_html(record, self.index, len(self.records), self.max_events)
            self.buttons.value = item.get("rating")
            self.comment.value = item.get("comment", "")
        finally:
            self._updating = False
        self.prev_button.disabled = self.index == 0
        self.next_button.disabled = self.index == len(self.records) - 1
        self._update_status()

    def select(self, label: str) -> None:
        label = parse_unit_label(label).label
        for i, record in enumerate(self.records):
            if record.label == label:
                return self.show(i)
        raise ValueError(f"label={label!r} is not one of the rated heads")

    def rate(self, rating: int | None, comment: str | None = None) -> None:
        """Rate the current head (None clears its rating); saves at once."""
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                   or not 1 <= rating <= 5):
            raise ValueError(f"rating={rating!r} must be an int from 1 to 5 (or None to clear)")
        label = self.current.label
        if rating is None:
            self._ratings.pop(label, None)
        else:
            old = self._ratings.get(label, {})
            self._ratings[label] = {"rating": rating,
                                    "comment": old.get("comment", "") if comment is None else comment,
                                    "time": _now_iso(), **({"rater": self.rater} if self.rater else {})}
        self._save()
        if self.buttons.value != rating or (comment is not None and self.comment.value != comment):
            self._updating = True
            try:
                self.buttons.value = rating
                if comment is not None:
                    self.comment.value = comment
            finally:
                self._updating = False
        self._update_status()

    def _on_rating(self, change: dict) -> None:
        if not self._updating:
            self.rate(change["new"])

    def _on_comment(self, change: dict) -> None:
        if self._updating:
            return
        item = self._ratings.get(self.current.label)
        if item is None:
            return  # a comment is kept with a rating; it is saved once the head is rated
        item["comment"] = change["new"]
        item["time"] = _now_iso()
        self._save()

    def _update_status(self) -> None:
        where = f" -> {self.save_to}" if self.save_to is not None else ""
        self.status.value = f"rated {len(self._ratings)} / {len(self.records)}{where}"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def rating_widgets(records: Sequence[HeadRecord], save_to: str | Path | None = None,
                   **kwargs: Any) -> RatingWidget:
    """A ``RatingWidget`` over ``records`` (display it as a cell's last expression)."""
    return RatingWidget(records, save_to, **kwargs)


# ----------------------------------------------------------------------------- page template

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<link rel="icon" href="data:,">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head>
<body>
<header>
  <h1 id="title">@@TITLE@@</h1>
  <div id="meta"></div>
  <div class="controls">
    <label>colour by <select id="color-by"></select></label>
    <label>rater <input id="rater" type="text" size="12" placeholder="optional"></label>
    <button id="export-btn" type="button">Export ratings</button>
    <span id="rated-count"></span>
    <span id="storage-note"></span>
  </div>
</header>
<main>
  <section id="grid-panel">
    <table id="grid" aria-label="attention heads by layer and head"></table>
    <div id="legend"></div>
    <p class="hint">Click a head (or use the arrow keys); keys 1-5 rate the selected head.</p>
  </section>
  <section id="detail" aria-live="polite">
    <p id="detail-empty">Select a head in the grid.</p>
    <div id="detail-body" hidden>
      <h2 id="detail-label"></h2>
      <p id="detail-explanation"></p>
      <p id="detail-verdict"></p>
      <p id="detail-failure" class="failure"></p>
      <p id="detail-source" class="dim"></p>
      <dl id="detail-fields"></dl>
      <div id="rating">
        <span>rating</span>
        <button type="button" class="rate-btn" data-value="1" title="wrong">1</button>
        <button type="button" class="rate-btn" data-value="2" title="mostly wrong">2</button>
        <button type="button" class="rate-btn" data-value="3" title="partly right">3</button>
        <button type="button" class="rate-btn" data-value="4" title="mostly right">4</button>
        <button type="button" class="rate-btn" data-value="5" title="exactly right">5</button>
        <button type="button" id="rate-clear" title="remove this rating">clear</button>
        <textarea id="rating-comment" rows="2" placeholder="optional comment"></textarea>
      </div>
      <h3>Scores</h3>
      <table id="detail-scores"></table>
      <h3>Top events</h3>
      <p id="events-legend" class="dim"><span class="tok query">query</span> the token the head attends
        <em>from</em> (the event); <span class="tok attended" style="background-color: rgba(255, 140, 0, 0.6)">attended</span>
        tokens it attends <em>to</em>, darker = more attention (hover a token for its weight);
        <span class="gap">&hellip;</span> tokens left out.</p>
      <div id="detail-events"></div>
    </div>
  </section>
</main>
<script type="application/json" id="@@DATA_ID@@">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 8px 16px; background: #fff; border-bottom: 1px solid #ddd; }
h1 { font-size: 1.25em; margin: 4px 0; }
#meta { font-size: 0.85em; color: #555; }
#meta span { margin-right: 12px; }
#meta details { margin-top: 4px; }
#meta pre { white-space: pre-wrap; word-break: break-word; max-height: 320px; overflow: auto; background: #f6f6f6; padding: 6px; }
.controls { margin-top: 6px; display: flex; gap: 14px; align-items: center; flex-wrap: wrap; }
main { display: flex; gap: 16px; padding: 12px 16px; align-items: flex-start; }
#grid-panel { flex: 0 0 auto; max-width: 50vw; overflow: auto; }
#detail { flex: 1 1 auto; min-width: 320px; background: #fff; border: 1px solid #ddd;
          padding: 8px 14px; border-radius: 4px; }
#grid { border-collapse: collapse; }
#grid th { font-size: 0.75em; font-weight: normal; color: #666; padding: 1px 3px; }
#grid td { padding: 1px; }
.cell { width: 28px; height: 28px; border: 1px solid #ccc; border-radius: 3px; cursor: pointer;
        font-size: 0.75em; padding: 0; }
.cell.missing { background: repeating-linear-gradient(45deg, #ddd, #ddd 3px, #f4f4f4 3px, #f4f4f4 6px); }
.cell.absent { background: #fff; border-style: dashed; cursor: default; }
.cell.selected { outline: 3px solid #1f5fbf; outline-offset: 1px; }
.cell.failed { border: 2px solid #c33; }
#legend { font-size: 0.8em; margin-top: 8px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
          margin-right: 4px; border: 1px solid #aaa; }
.legend-item { display: block; margin: 2px 0; }
.scale { display: inline-block; width: 160px; height: 12px; vertical-align: middle; margin: 0 6px; }
.hint, .dim { color: #777; font-size: 0.85em; }
#detail-explanation { font-size: 1.1em; }
.failure { color: #a00; }
#detail-verdict { margin: 4px 0; font-size: 0.9em; }
#detail-verdict.contradicted { color: #8a1c00; background: #fff1ec; border-left: 4px solid #d4380d; padding: 4px 8px; }
#detail-fields { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
#detail-fields dt { color: #666; }
#detail-fields dd { margin: 0; }
#rating { margin: 10px 0; display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.rate-btn { width: 32px; height: 28px; border: 1px solid #999; background: #fff; border-radius: 3px; }
.rate-btn[aria-pressed="true"] { background: #1f5fbf; color: #fff; border-color: #1f5fbf; }
#rating-comment { flex-basis: 100%; font: inherit; }
#detail-scores { border-collapse: collapse; font-size: 0.9em; }
#detail-scores th, #detail-scores td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
.event { font-family: ui-monospace, monospace; font-size: 0.85em; margin: 6px 0; padding: 4px;
         border-left: 3px solid #ddd; line-height: 1.7; word-break: break-word; }
.event-head { color: #777; font-family: system-ui, sans-serif; font-size: 0.9em; }
.tok { white-space: pre-wrap; border-radius: 2px; }
.tok.attended { box-shadow: inset 0 -2px 0 rgba(200, 90, 0, 0.9); }
.tok.query { outline: 2px solid #1f5fbf; }
.gap { color: #999; }
"""

_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("interp-lib-data").textContent);
  var STORAGE_KEY = "interp_lib_viewer:" + DATA.run;
  var PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                 "#ff9da7", "#9c755f", "#17becf", "#bcbd22", "#8c564b"];
  var GREY = "#bdbdbd";
  var VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  // Maps keyed by head label (and looked up with the URL hash or stored ratings) have no
  // prototype, so "#constructor" or "__proto__" never find Object.prototype members.
  function has(obj, key) { return Object.prototype.hasOwnProperty.call(obj, key); }
  function nullMap(source) {
    var out = Object.create(null);
    if (source && typeof source === "object") {
      Object.keys(source).forEach(function (k) { out[k] = source[k]; });
    }
    return out;
  }
  var heads = Object.create(null);
  DATA.heads.forEach(function (h) { heads[h.label] = h; });
  var cells = Object.create(null);
  var selected = null;
  var colorMode = DATA.color_by === "score" ? "score:best" : "family";

  // ---------------------------------------------------------------- storage
  var storageOk = true;
  function loadStore() {
    try {
      var raw = window.localStorage.getItem(STORAGE_KEY);
      return raw ? JSON.parse(raw) : {};
    } catch (e) { storageOk = false; return {}; }
  }
  var store = loadStore();
  var ratings = nullMap(store && typeof store.ratings === "object" ? store.ratings : null);
  var rater = (store && typeof store.rater === "string") ? store.rater : "";
  function saveStore() {
    try {
      window.localStorage.setItem(STORAGE_KEY, JSON.stringify({ ratings: ratings, rater: rater }));
    } catch (e) { storageOk = false; }
    document.getElementById("storage-note").textContent =
      storageOk ? "" : "(browser storage unavailable: ratings are kept until the page closes; export them)";
  }

  // ---------------------------------------------------------------- helpers
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function fmt(x) {
    if (x === null || x === undefined || (typeof x === "number" && !isFinite(x))) { return "-"; }
    if (typeof x === "number") { return Number.isInteger(x) ? String(x) : x.toFixed(3); }
    return String(x);
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function scoreOf(h, mode) {
    if (mode === "score:best") { return h.best_score; }
    var name = mode.slice(6);
    var s = h.scores && has(h.scores, name) ? h.scores[name] : null;
    return s ? s.score : null;
  }
  function viridis(t) {
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    var i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
    var c = VIRIDIS[i].map(function (v, k) { return Math.round(v + f * (VIRIDIS[i + 1][k] - v)); });
    return "rgb(" + c.join(",") + ")";
  }
  function familyColor(f) {
    return (f === null || f === undefined || f < 0) ? GREY : PALETTE[f % PALETTE.length];
  }
  function textColor(rgb) {
    var m = rgb.match(/\d+/g);
    if (!m) { var n = parseInt(rgb.slice(1), 16); m = [n >> 16, (n >> 8) & 255, n & 255]; }
    return (0.299 * m[0] + 0.587 * m[1] + 0.114 * m[2]) > 150 ? "#111" : "#fff";
  }
  var cellLabels = {};
  var columnOf = DATA.columns || {};
  DATA.heads.forEach(function (h) {
    if (!has(columnOf, h.label)) { columnOf[h.label] = h.head; }
    cellLabels[h.layer + ":" + columnOf[h.label]] = h.label;
  });
  function labelOf(layer, column) {
    return has(cellLabels, layer + ":" + column) ? cellLabels[layer + ":" + column] : "L" + layer + "H" + column;
  }

  // ---------------------------------------------------------------- header
  // scalars inline; nested run details (config, usage, taxonomy) folded away in one <details>
  var metaBox = document.getElementById("meta");
  var meta = DATA.meta || {};
  var cfg = (meta.config && typeof meta.config === "object") ? meta.config : {};
  ["model_resolved", "explainer", "dataset", "windows", "window_len", "top_k"].forEach(function (k) {
    if (k in cfg) { metaBox.appendChild(el("span", null, k.replace("_resolved", "") + ": " + (cfg[k] === null ? "none (heuristic)" : cfg[k]))); }
  });
  var nested = [];
  Object.keys(meta).forEach(function (k) {
    var v = meta[k];
    if (v !== null && typeof v === "object") { nested.push(k); }
    else { metaBox.appendChild(el("span", null, k + ": " + v)); }
  });
  if (nested.length) {
    var details = el("details"), summary = el("summary", null, "run details (" + nested.join(", ") + ")");
    details.appendChild(summary);
    nested.forEach(function (k) { details.appendChild(el("pre", null, k + ": " + JSON.stringify(meta[k], null, 1))); });
    metaBox.appendChild(details);
  }
  var select = document.getElementById("color-by");
  [["family", "family"], ["score:best", "score (preferred)"]].concat(
    DATA.scorers.map(function (s) { return ["score:" + s, "score: " + s]; })
  ).forEach(function (o) {
    var opt = el("option", null, o[1]); opt.value = o[0]; select.appendChild(opt);
  });
  select.value = colorMode;
  select.addEventListener("change", function () { colorMode = select.value; paint(); });
  var raterInput = document.getElementById("rater");
  raterInput.value = rater;
  raterInput.addEventListener("input", function () { rater = raterInput.value.trim(); saveStore(); });

  // ---------------------------------------------------------------- grid
  var grid = document.getElementById("grid");
  var headRow = el("tr");
  headRow.appendChild(el("th", null, ""));
  for (var hh = 0; hh < DATA.n_heads; hh++) { headRow.appendChild(el("th", null, (DATA.column_prefix || "H") + hh)); }
  grid.appendChild(headRow);
  for (var l = 0; l < DATA.n_layers; l++) {
    var row = el("tr");
    row.appendChild(el("th", null, "L" + l));
    for (var h = 0; h < DATA.n_heads; h++) {
      var label = labelOf(l, h);
      var td = el("td");
      var btn = el("button", "cell");
      btn.type = "button";
      btn.setAttribute("data-head", label);
      btn.setAttribute("aria-label", label);
      if (heads[label]) {
        btn.addEventListener("click", (function (lab) { return function () { selectHead(lab); }; })(label));
      } else {
        btn.classList.add("absent");
        btn.disabled = true;
        btn.title = label + ": not explained";
      }
      cells[label] = btn;
      td.appendChild(btn);
      row.appendChild(td);
    }
    grid.appendChild(row);
  }

  function paint() {
    var legend = document.getElementById("legend");
    clear(legend);
    var lo = Infinity, hi = -Infinity;
    if (colorMode !== "family") {
      DATA.heads.forEach(function (hd) {
        var s = scoreOf(hd, colorMode);
        if (s !== null && s !== undefined) { lo = Math.min(lo, s); hi = Math.max(hi, s); }
      });
    }
    DATA.heads.forEach(function (hd) {
      var btn = cells[hd.label];
      btn.classList.remove("missing");
      var colour, tip = hd.label;
      if (hd.explanation) { tip += ": " + hd.explanation.text; } else { tip += ": (no explanation)"; }
      if (colorMode === "family") {
        colour = familyColor(hd.family);
        tip += "\nfamily " + fmt(hd.family) + (hd.family_label ? " (" + hd.family_label + ")" : "");
      } else {
        var s = scoreOf(hd, colorMode);
        if (s === null || s === undefined) {
          colour = null;
          btn.classList.add("missing");
          tip += "\nscore: missing";
        } else {
          colour = viridis(hi > lo ? (s - lo) / (hi - lo) : 0.5);
          tip += "\nscore " + fmt(s);
        }
      }
      btn.style.background = colour || "";
      btn.style.color = colour ? textColor(colour) : "#111";
      btn.setAttribute("data-color", colour || "missing");
      var r = ratings[hd.label];
      btn.textContent = r ? String(r.rating) : "";
      btn.classList.toggle("rated", !!r);
      btn.classList.toggle("failed", !hd.explanation);
      if (r) { tip += "\nyour rating: " + r.rating; }
      btn.title = tip;
    });
    if (colorMode === "family") {
      var fams = {};
      DATA.heads.forEach(function (hd) {
        var key = (hd.family === null || hd.family === undefined || hd.family < 0) ? "none" : String(hd.family);
        if (!(key in fams)) { fams[key] = hd.family_label || ""; }
      });
      Object.keys(fams).sort(function (a, b) {
        return a === "none" ? 1 : b === "none" ? -1 : Number(a) - Number(b);
      }).forEach(function (k) {
        var item = el("span", "legend-item");
        var sw = el("span", "swatch");
        sw.style.background = k === "none" ? GREY : familyColor(Number(k));
        item.appendChild(sw);
        item.appendChild(document.createTextNode(
          k === "none" ? "unclustered / none" : "family " + k + (fams[k] ? ": " + fams[k] : "")));
        legend.appendChild(item);
      });
    } else if (lo <= hi) {
      var bar = el("span", "scale");
      bar.style.background = "linear-gradient(to right," + VIRIDIS.map(function (c) {
        return "rgb(" + c.join(",") + ")"; }).join(",") + ")";
      legend.appendChild(document.createTextNode(fmt(lo)));
      legend.appendChild(bar);
      legend.appendChild(document.createTextNode(fmt(hi)));
      var miss = el("span", "legend-item");
      var sw2 = el("span", "swatch cell missing");
      sw2.style.width = "12px"; sw2.style.height = "12px";
      miss.appendChild(sw2);
      miss.appendChild(document.createTextNode("no score"));
      legend.appendChild(miss);
    } else {
      legend.appendChild(document.createTextNode("no head has this score"));
    }
    var n = Object.keys(ratings).filter(function (k) { return heads[k]; }).length;
    document.getElementById("rated-count").textContent = "rated " + n + " / " + DATA.heads.length;
  }

  // ---------------------------------------------------------------- detail
  function addField(dl, name, value) {
    if (value === null || value === undefined || value === "") { return; }
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", null, value));
  }
  function renderEvent(ev) {
    var box = el("div", "event");
    box.appendChild(el("div", "event-head", "window " + ev.window + ", query position " + ev.position +
      ", activation " + fmt(ev.activation) + (ev.kind && ev.kind !== "top" ? " (" + ev.kind + ")" : "")));
    var weights = {};
    (ev.attended || []).forEach(function (pw) { weights[pw[0]] = pw[1]; });
    var end = Math.min(ev.tokens.length - 1, ev.position);
    var show = {};
    for (var p = Math.max(0, ev.position - 20); p <= end; p++) { show[p] = true; }
    Object.keys(weights).forEach(function (k) {
      var q = Number(k);
      for (var d = -3; d <= 1; d++) { if (q + d >= 0 && q + d <= end) { show[q + d] = true; } }
    });
    var line = el("div", "tokens");
    var last = -1;
    for (var i = 0; i <= end; i++) {
      if (!show[i]) { continue; }
      if (i !== last + 1) { line.appendChild(el("span", "gap", " \u2026 ")); }
      last = i;
      var tok = el("span", "tok", String(ev.tokens[i]).replace(/\n/g, "\u21b5"));
      tok.setAttribute("data-pos", String(i));
      var tip = "pos " + i;
      if (weights.hasOwnProperty(i)) {
        var w = weights[i];
        tok.classList.add("attended");
        tok.setAttribute("data-weight", String(w));
        tok.style.backgroundColor = "rgba(255, 140, 0, " + Math.max(0.08, Math.min(1, w)).toFixed(3) + ")";
        tip += ", attention " + fmt(w);
      }
      if (i === ev.position) { tok.classList.add("query"); tip += " (query)"; }
      tok.title = tip;
      line.appendChild(tok);
    }
    box.appendChild(line);
    return box;
  }
  function renderDetail(hd) {
    document.getElementById("detail-empty").hidden = true;
    document.getElementById("detail-body").hidden = false;
    document.getElementById("detail-label").textContent = hd.label;
    var ex = hd.explanation;
    document.getElementById("detail-explanation").textContent = ex ? ex.text : "";
    document.getElementById("detail-failure").textContent =
      ex ? "" : "No explanation: " + (hd.failure || "unknown reason");
    document.getElementById("detail-source").textContent =
      ex ? "source " + ex.source + ", refinement round " + ex.round : "";
    var verdict = document.getElementById("detail-verdict");
    var vd = hd.verdict;
    verdict.className = vd && vd.contradicted ? "contradicted" : "";
    verdict.textContent = !vd ? (ex ? "not scored" : "") :
      (vd.contradicted ? "\u26a0 The score contradicts this explanation: " : "Scored by ") +
      vd.scorer + (vd.scores_key === "refined" ? " (held-out, after refinement)" : "") + ": " +
      fmt(vd.score) + " " + vd.unit + " (chance " + fmt(vd.chance) + "; measures the " + vd.measures + ").";
    var dl = document.getElementById("detail-fields");
    clear(dl);
    if (ex) {
      addField(dl, "attends from", ex.attends_from);
      addField(dl, "attends to", ex.attends_to);
      addField(dl, "positive examples", (ex.positive_examples || []).join(" | "));
      addField(dl, "negative examples", (ex.negative_examples || []).join(" | "));
    }
    addField(dl, "family", hd.family === null || hd.family === undefined ? "none"
      : (hd.family < 0 ? "unclustered (-1)" : hd.family + (hd.family_label ? ": " + hd.family_label : "")));
    addField(dl, "causal effect", hd.causal_effect === null ? null : fmt(hd.causal_effect));
    // the explanation is shown once: a baseline or revision with the same text is not repeated
    var shown = ex ? ex.text : null;
    if (hd.heuristic && hd.heuristic.text !== shown) { addField(dl, "heuristic baseline", hd.heuristic.text); }
    var info = DATA.stat_info || {};
    Object.keys(hd.stats || {}).forEach(function (k) {
      var v = hd.stats[k], name = has(info, k) ? info[k][0] : k.replace(/_/g, " "), unit = has(info, k) ? info[k][1] : "";
      var text = typeof v !== "number" ? fmt(v) : unit === "%" ? (100 * v).toFixed(1) + "%" :
        fmt(v) + (unit ? " " + unit : "");
      addField(dl, name, text);
    });
    (hd.refinement || []).forEach(function (st) {
      var revision = st.explanation && st.explanation.text !== shown ? ": " + st.explanation.text : " (the explanation above)";
      addField(dl, "refinement round " + st.round, fmt(st.previous_score) + " \u2192 " + fmt(st.score) +
        (st.kept ? " (kept)" : " (rejected)") + (st.failure ? ", " + st.failure : revision));
    });
    var table = document.getElementById("detail-scores");
    clear(table);
    var names = Object.keys(hd.scores || {}).sort();
    if (names.length) {
      var tr = el("tr");
      ["scorer", "score", "unit (chance)", "items", "unparseable", "note"].forEach(function (c) { tr.appendChild(el("th", null, c)); });
      table.appendChild(tr);
      names.forEach(function (name) {
        var s = hd.scores[name];
        var row = el("tr");
        row.setAttribute("data-scorer", name);
        var si = (DATA.scorer_info || {})[name === "refined" && s.details && s.details.scorer ? s.details.scorer : name];
        var unit = si ? si[1] + " (" + fmt(si[2]) + ")" : "";
        [name, fmt(s.score), unit, fmt(s.n), fmt(s.n_unparseable), s.failure || ""].forEach(function (c) {
          row.appendChild(el("td", null, c));
        });
        table.appendChild(row);
      });
    } else {
      table.appendChild(el("tr")).appendChild(el("td", "dim", "not scored"));
    }
    var events = document.getElementById("detail-events");
    clear(events);
    if (!hd.top_events || !hd.top_events.length) { events.appendChild(el("p", "dim", "no events")); }
    (hd.top_events || []).forEach(function (ev) { events.appendChild(renderEvent(ev)); });
    renderRating();
  }
  function renderRating() {
    if (!selected) { return; }
    var r = ratings[selected];
    Array.prototype.forEach.call(document.querySelectorAll(".rate-btn"), function (b) {
      b.setAttribute("aria-pressed", r && Number(b.getAttribute("data-value")) === r.rating ? "true" : "false");
    });
    document.getElementById("rating-comment").value = r ? (r.comment || "") : "";
  }
  function selectHead(label) {
    if (!heads[label]) { throw new Error("unknown head " + label); }
    if (selected && cells[selected]) { cells[selected].classList.remove("selected"); }
    selected = label;
    cells[label].classList.add("selected");
    renderDetail(heads[label]);
    if (window.location.hash !== "#" + label) {
      try { window.history.replaceState(null, "", "#" + label); } catch (e) { /* file:// quirks */ }
    }
  }

  // ---------------------------------------------------------------- rating
  function setRating(label, value, comment) {
    if (!heads[label]) { throw new Error("unknown head " + label); }
    if (value === null) { delete ratings[label]; }
    else {
      value = Number(value);
      if (!(value >= 1 && value <= 5 && Math.round(value) === value)) { throw new Error("rating must be 1-5"); }
      var old = ratings[label] || {};
      ratings[label] = { rating: value, comment: comment !== undefined ? comment : (old.comment || ""),
                         time: new Date().toISOString() };
    }
    saveStore();
    paint();
    if (label === selected) { renderRating(); }
  }
  Array.prototype.forEach.call(document.querySelectorAll(".rate-btn"), function (b) {
    b.addEventListener("click", function () {
      if (selected) { setRating(selected, Number(b.getAttribute("data-value"))); }
    });
  });
  document.getElementById("rate-clear").addEventListener("click", function () {
    if (selected) { setRating(selected, null); }
  });
  document.getElementById("rating-comment").addEventListener("input", function (e) {
    if (selected && ratings[selected]) {
      ratings[selected].comment = e.target.value;
      ratings[selected].time = new Date().toISOString();
      saveStore();
    }
  });
  function exportRatings() {
    var labels = Object.keys(ratings).filter(function (k) { return heads[k]; });
    labels.sort(function (a, b) {
      var x = heads[a], y = heads[b];
      return x.layer - y.layer || columnOf[a] - columnOf[b];
    });
    var out = labels.map(function (k) {
      var entry = { label: k, rating: ratings[k].rating, comment: ratings[k].comment || "",
                    time: ratings[k].time };
      if (rater) { entry.rater = rater; }
      return entry;
    });
    return JSON.stringify({ schema: 1, run: DATA.run, ratings: out }, null, 1);
  }
  document.getElementById("export-btn").addEventListener("click", function () {
    var blob = new Blob([exportRatings()], { type: "application/json" });
    var url = URL.createObjectURL(blob);
    var a = document.createElement("a");
    a.href = url;
    a.download = "ratings.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 5000);
  });

  // ---------------------------------------------------------------- keyboard
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT" || t.tagName === "SELECT")) { return; }
    if (e.key >= "1" && e.key <= "5" && selected) { setRating(selected, Number(e.key)); return; }
    var moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (!has(moves, e.key)) { return; }
    e.preventDefault();
    var cur = selected ? heads[selected] : null;
    var layer = cur ? cur.layer : 0, head = cur ? columnOf[selected] : -1;
    for (var step = 0; step < DATA.n_layers * DATA.n_heads; step++) {
      layer += moves[e.key][0]; head += moves[e.key][1];
      if (layer < 0 || layer >= DATA.n_layers || head < 0 || head >= DATA.n_heads) { return; }
      if (heads[labelOf(layer, head)]) { selectHead(labelOf(layer, head)); cells[selected].focus(); return; }
    }
  });

  paint();
  saveStore();
  var initial = null;
  try { initial = decodeURIComponent(window.location.hash.slice(1)); } catch (e) { /* bad %-escape */ }
  if (initial !== null && heads[initial]) { selectHead(initial); }
  window.interpLibViewer = {
    exportRatings: exportRatings,
    select: selectHead,
    setRating: setRating,
    ratings: function () { return JSON.parse(JSON.stringify(ratings)); },
    run: DATA.run
  };
})();
"""
