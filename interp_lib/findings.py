"""Results said in words: one "what this shows" sentence per notebook section, computed from the
section's results (null and negative results included), and one summary table per notebook.

Each function takes what the section computed and returns a plain sentence; :func:`show` displays
it in a notebook as a highlighted line (``text/markdown`` with a ``text/plain`` copy, so it reads
in Jupyter, Colab, nbconvert HTML and a terminal alike). Nothing here is typed by hand per run:
every number and every verdict word comes from the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Finding", "show", "summary", "top_predictions", "heldout_loss", "calibration_at_t1",
           "temperature_scaling", "cloze_accuracy", "model_sizes", "risk_coverage", "guaranteed_risk",
           "abstention", "ensemble", "ood_detection", "mixed_stream", "interval_widths", "claim_verdicts"]


class Finding(str):
    """A sentence that displays as a highlighted "What this shows" line in a notebook."""

    def _repr_markdown_(self) -> str:
        return f"**What this shows.** {self}"

    def __repr__(self) -> str:  # text/plain: the sentence itself, not a quoted string
        return f"What this shows. {self}"


def show(text: str) -> Finding:
    """The sentence as a :class:`Finding` (the last expression of a cell displays it)."""
    return Finding(text)


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# -------------------------------------------------------------------------------- 00 tour

def top_predictions(frame, prompt: str) -> str:
    """``frame``: ``attribution.top_predictions`` (columns token, probability, ...; most likely first)."""
    if len(frame) == 0:
        return f"No prediction for {prompt!r}."
    first = frame.iloc[0]
    mass = float(frame["probability"].sum())
    share = "a confident guess" if float(first["probability"]) >= 0.5 else (
        "a hedged guess" if float(first["probability"]) >= 0.15 else "no clear favourite")
    return (f"After {prompt!r} the model's top guess is {first['token']!r} with probability "
            f"{float(first['probability']):.2f} ({share}); its top {len(frame)} hold {_pct(mass, 0)} of the "
            "probability.")


def heldout_loss(stats: Mapping[str, float], d_vocab: int) -> str:
    """``stats``: ``attribution.next_token_loss`` (loss, top1_accuracy, n_tokens)."""
    uniform = math.log(d_vocab)
    loss = float(stats["loss"])
    if loss >= uniform:
        verdict = f"no better than a uniform guess over {d_vocab:,} tokens ({uniform:.2f} nats): the model has not learned this text"
    else:
        verdict = (f"{uniform - loss:.2f} nats below a uniform guess ({uniform:.2f}), i.e. perplexity "
                   f"{math.exp(loss):,.1f} instead of {d_vocab:,}")
    return (f"On {int(stats['n_tokens']):,} held-out tokens the loss is {loss:.3f} nats, {verdict}; the top "
            f"prediction is right {_pct(float(stats['top1_accuracy']))} of the time.")


# -------------------------------------------------------------------------------- 01 calibration

def calibration_at_t1(report) -> str:
    """``report``: ``calibration.temperature_scaling_report``; the test split at T = 1."""
    accuracy = float(report.metrics.loc["before", "accuracy"])
    confidence = float(report.test_confidence.mean())
    gap = confidence - accuracy
    ci = report.ece_ci["before"]
    if abs(gap) < 0.01:
        kind = "about as confident as it is accurate"
    elif gap > 0:
        kind = "over-confident"
    else:
        kind = "under-confident"
    return (f"At T = 1 the model is {kind}: mean confidence {confidence:.3f} vs accuracy {accuracy:.3f} "
            f"(gap {gap:+.3f}); test ECE {ci.estimate:.4f}, 95% interval [{ci.lower:.4f}, {ci.upper:.4f}].")


def temperature_scaling(report) -> str:
    """What the fitted temperature did on the test split (ECE and NLL before / after, and whether
    the ECE intervals overlap)."""
    t = report.temperature
    before, after = report.metrics.loc["before"], report.metrics.loc["after"]
    ci_before, ci_after = report.ece_ci["before"], report.ece_ci["after"]
    if t is None or not _finite(t):
        return "No temperature was fitted (vector scaling or a failed fit): nothing to compare."
    direction = ("softens an over-confident model" if t > 1.005 else
                 "sharpens an under-confident model" if t < 0.995 else "leaves the model almost unchanged")
    change = (float(before.ece) - float(after.ece)) / float(before.ece) if float(before.ece) > 0 else math.nan
    if float(after.ece) < float(before.ece):
        ece = f"lowers test ECE {float(before.ece):.4f} -> {float(after.ece):.4f} (a {_pct(change, 0)} cut"
        ece += ("; the intervals do not overlap)" if ci_after.upper < ci_before.lower
                else "; the intervals overlap, so the cut is within resampling noise)")
    else:
        ece = (f"does not lower test ECE ({float(before.ece):.4f} -> {float(after.ece):.4f}): the model was "
               "already calibrated on this text, or the validation split does not transfer")
    nll = float(before.nll) - float(after.nll)
    nll_text = (f"test NLL improves by {nll:.4f} nats" if nll > 1e-4 else
                f"test NLL is unchanged ({float(after.nll):.4f})" if nll > -1e-4 else
                f"test NLL gets worse by {-nll:.4f} nats")
    return f"T = {t:.3f} {direction}: it {ece}; {nll_text}; the top prediction, hence accuracy, is unchanged."


def cloze_accuracy(accuracy_ci, chance: float, report=None) -> str:
    """``accuracy_ci``: a BootstrapCI of the cloze accuracy; ``chance``: 1 / options."""
    if accuracy_ci.lower > chance:
        verdict = f"above chance ({chance:.2f}) beyond resampling noise"
    elif accuracy_ci.upper < chance:
        verdict = f"below chance ({chance:.2f}): the options are ranked the wrong way"
    else:
        verdict = f"not distinguishable from chance ({chance:.2f}) on this many items"
    text = (f"Cloze accuracy {accuracy_ci.estimate:.3f} [{accuracy_ci.lower:.3f}, {accuracy_ci.upper:.3f}] is "
            f"{verdict}.")
    if report is not None and report.temperature is not None:
        text += (f" Temperature scaling (T = {report.temperature:.2f}) takes its ECE from "
                 f"{float(report.metrics.loc['before', 'ece']):.4f} to {float(report.metrics.loc['after', 'ece']):.4f}.")
    return text


def model_sizes(table) -> str:
    """``table``: ``calibration.compare_models`` (model, n_params, ece, ece_scaled, nll, temperature)."""
    if len(table) == 0:
        return "No model could be compared."
    best = table.loc[table["ece_scaled"].idxmin()]
    order = table.sort_values("n_params")
    trend = ""
    if len(order) >= 3:
        eces = order["ece"].to_numpy(dtype=float)
        if all(a >= b for a, b in zip(eces, eces[1:])):
            trend = " Across these models ECE at T = 1 falls with parameter count."
        elif all(a <= b for a, b in zip(eces, eces[1:])):
            trend = " Across these models ECE at T = 1 rises with parameter count."
        else:
            trend = " ECE at T = 1 shows no monotone trend with parameter count."
    hotter = int((table["temperature"] > 1).sum())
    return (f"{len(table)} models: after per-model temperature scaling {best['model']} is best calibrated "
            f"(ECE {float(best['ece_scaled']):.4f}); {hotter} of {len(table)} needed T > 1 (over-confident).{trend}")


# -------------------------------------------------------------------------------- 02 selective

def risk_coverage(raw, scaled) -> str:
    """``raw`` / ``scaled``: ``selective.RiskCoverage`` of the confidence before / after scaling."""
    gain = 1 - scaled.aurc / scaled.error_rate if scaled.error_rate > 0 else math.nan
    if scaled.aurc < scaled.error_rate:
        ranking = (f"confidence ranks errors late: AURC {scaled.aurc:.4f} vs {scaled.error_rate:.4f} for a random "
                   f"order ({_pct(gain, 0)} lower)")
    else:
        ranking = (f"confidence does not rank errors late (AURC {scaled.aurc:.4f} vs {scaled.error_rate:.4f} for a "
                   "random order)")
    delta = scaled.aurc - raw.aurc
    scaling = ("temperature scaling leaves the ranking, hence AURC, unchanged" if abs(delta) < 1e-4 else
               f"temperature scaling changes AURC by {delta:+.4f} (it reorders confidences only slightly)")
    return (f"On the test split {ranking}; the excess over a perfect ranking (E-AURC) is {scaled.eaurc:.4f}; "
            f"{scaling}.")


def guaranteed_risk(sgr, test: Mapping[str, float] | None, target_risk: float) -> str:
    """``sgr``: ``selective.guaranteed_risk_threshold`` on validation; ``test``: its policy's
    evaluation on the test split (coverage, risk_predicted)."""
    if not sgr.feasible:
        return (f"No confidence threshold guarantees risk <= {target_risk:.2f} at this sample size: the guarantee "
                "asks to abstain on everything (raise the target, lower delta's strictness, or add data).")
    text = (f"The guaranteed-risk threshold keeps {_pct(sgr.coverage)} of validation predictions (risk bound "
            f"{sgr.bound:.3f} <= target {target_risk:.2f})")
    if test is not None:
        kept = test["risk_predicted"] <= target_risk
        text += (f"; on the test split it keeps {_pct(test['coverage'])} with error rate {test['risk_predicted']:.3f}, "
                 + ("within the target" if kept else "ABOVE the target (the i.i.d. assumption fails here)"))
    return text + "."


def abstention(table) -> str:
    """``table``: ``selective.abstention_table`` (name, accuracy_predicted, abstention_rate)."""
    best = table.loc[table["accuracy_predicted"].idxmax()]
    least = table.loc[table["abstention_rate"].idxmin()]
    return (f"Accuracy on what is kept ranges {table['accuracy_predicted'].min():.1%}-{table['accuracy_predicted'].max():.1%}: "
            f"'{best['name']}' is most accurate ({best['accuracy_predicted']:.1%}) at {best['abstention_rate']:.1%} "
            f"abstention; '{least['name']}' abstains least ({least['abstention_rate']:.1%}).")


def ensemble(table, members: Sequence[str]) -> str:
    if table is None:
        return (f"Not measured: only {list(members)} share a tokenizer here, and an ensemble needs at least two "
                "models (a null result of this setup, not of the method).")
    return f"Ensemble of {len(members)} models: see the risk-coverage table of each disagreement score above."


def ood_detection(table) -> str:
    """``table``: ``selective.ood_detection_table`` (index: score names; column auroc)."""
    auroc = table["auroc"].astype(float)
    best, worst = auroc.idxmax(), auroc.idxmin()
    wrong = [name for name, value in auroc.items() if value < 0.5]
    text = f"The best score tells code from prose with AUROC {auroc[best]:.3f} ({best})"
    if wrong:
        text += f"; {', '.join(wrong)} rank{'s' if len(wrong) == 1 else ''} the wrong way (AUROC < 0.5)"
    elif auroc[worst] < 0.6:
        text += f"; {worst} is near chance ({auroc[worst]:.3f})"
    return text + "."


def mixed_stream(table) -> str:
    """``table``: ``selective.abstention_table(..., domain=...)`` (name, domain, coverage,
    accuracy_predicted): what each policy keeps of each domain."""
    domains = list(dict.fromkeys(table["domain"]))
    parts = []
    for name, rows in table.groupby("name", sort=False):
        kept = rows.set_index("domain")["coverage"]
        parts.append(f"{name} {' / '.join(_pct(float(kept.get(d, float('nan'))), 0) for d in domains)}")
    return f"Kept on {' / '.join(domains)}: " + "; ".join(parts) + "."


# -------------------------------------------------------------------------------- 09 claims

def interval_widths(ratio: float) -> str:
    if ratio > 1.1:
        return (f"Resampling whole windows gives an interval {ratio:.2f}x as wide as resampling tokens: token-level "
                "bootstraps understate the uncertainty of per-token metrics here.")
    if ratio < 0.9:
        return (f"The window-level interval is narrower ({ratio:.2f}x) than the token-level one: errors within a "
                "window are not positively correlated on this model and text.")
    return (f"Window- and token-level intervals are about as wide ({ratio:.2f}x): errors within a window are only "
            "weakly correlated here, but the window-level interval is the honest one.")


def claim_verdicts(table) -> str:
    """``table``: ``claims.verdict_table`` (index: claim number; column verdict)."""
    counts = table["verdict"].value_counts()
    supported = [str(i) for i, v in table["verdict"].items() if v == "supported"]
    not_supported = [str(i) for i, v in table["verdict"].items() if v == "not supported"]
    text = (f"{int(counts.get('supported', 0))} of {len(table)} claims are supported"
            + (f" ({', '.join(supported)})" if supported else ""))
    text += (f", {int(counts.get('not supported', 0))} not supported"
             + (f" ({', '.join(not_supported)})" if not_supported else ""))
    text += f" and {int(counts.get('not testable', 0))} not testable on this model."
    return text


# -------------------------------------------------------------------------------- the summary

def summary(notebook: str, metrics: Mapping[str, float], model: str | None = None):
    """The notebook's closing summary: its headline sentences (the results page's, filled from
    ``metrics``) and every metric in a readable table. Returns an object that displays as
    markdown (and prints as text)."""
    import pandas as pd

    from .display import table as display_table
    from .results import HEADLINES, headline_sentences

    values = {k: float(v) for k, v in metrics.items() if _finite(v)}
    title = HEADLINES.get(notebook, (notebook, ()))[0]
    sentences = headline_sentences(notebook, values, {})
    missing = sorted(k for k, v in metrics.items() if not _finite(v))
    frame = pd.DataFrame({"metric": list(values), "value": list(values.values())})
    return _Summary(title, model, sentences, display_table(frame), missing)


class _Summary:
    def __init__(self, title: str, model: str | None, sentences: list[str], table, missing: list[str]):
        self.title, self.model, self.sentences, self.table, self.missing = title, model, sentences, table, missing

    def _lines(self) -> list[str]:
        head = f"Summary: {self.title}" + (f" ({self.model})" if self.model else "")
        lines = [head, *[f"- {s}" for s in self.sentences]]
        if self.missing:
            lines.append(f"- not measured: {', '.join(self.missing)}")
        return lines

    def _repr_markdown_(self) -> str:
        lines = self._lines()
        body = "\n".join(lines[1:])
        return f"### {lines[0]}\n\n{body}\n\n{self.table.to_markdown()}"

    def __repr__(self) -> str:
        return "\n".join(self._lines()) + "\n\n" + self.table.to_text()
