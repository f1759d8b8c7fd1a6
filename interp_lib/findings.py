"""Results said in words: one "what this shows" sentence per notebook section, computed from the
section's results (null and negative results included), and one summary table per notebook.

Each function takes what the section computed and returns a plain sentence; :func:`show` displays
it in a notebook as a highlighted line (``text/markdown`` with a ``text/plain`` copy, so it reads
in Jupyter, Colab, nbconvert HTML and a terminal alike). Nothing here is typed by hand per run:
every number and every verdict word comes from the inputs.

Each function takes the quantities its verdict needs (estimates with intervals or a paired test,
n, the direction expected) and picks its wording from them: a sentence that says a thing agrees,
matters, rises, is within noise or is supported names n and an interval or a p-value; a
correlation or trend over fewer than :data:`MIN_UNITS` units says "too few units to say"; a
result against the expected direction (AUROC < 0.5, an interval that crosses 0, a risk bound
violated on a shift) is said as such, with its number. ``tests/test_findings.py`` checks every
number a sentence quotes against the inputs.

Standard deviations: one convention across the library, the sample standard deviation
(ddof = 1; :func:`sample_std`), as ``torch.Tensor.std`` and ``interp_lib.results.aggregate``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MIN_UNITS", "Finding", "show", "sample_std", "ece_change", "top_predictions", "heldout_loss", "calibration_at_t1", "temperature_scaling",
           "cloze_accuracy", "model_sizes", "risk_coverage", "guaranteed_risk", "abstention", "ensemble",
           "ood_detection", "mixed_stream", "logit_difference", "lens_depth", "top_units",
           "patching_restoration", "attribution_agreement", "joint_ablation", "detection", "icl_ablation",
           "composition", "position_probes", "head_classes", "ablation_importance",
           "integrated_gradients_check", "causal_trace", "known_heads_named", "explainer_run",
           "heads_vs_neurons", "families", "taxonomy_stability", "text_vs_behaviour", "interval_widths",
           "claim_verdicts", "summary"]


class Finding(str):
    """A sentence that displays as a highlighted "What this shows" line in a notebook."""

    def _repr_markdown_(self) -> str:
        return f"**What this shows.** {self}"

    def __repr__(self) -> str:  # text/plain: the sentence itself, not a quoted string
        return f"What this shows. {self}"


def show(text: str) -> Finding:
    """The sentence as a :class:`Finding` (the last expression of a cell displays it)."""
    return Finding(text)


MIN_UNITS = 8
"""Fewest units (heads, models, prompts) a correlation or trend is computed from; below it a
sentence says "too few units to say"."""


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


def temperature_scaling(report, n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> str:
    """What the fitted temperature did on the test split: the ECE change as a *paired* test (the
    difference ECE_after - ECE_before on the same resampled test windows, a cluster bootstrap over
    ``report.test_group``; two intervals that overlap are not a test), and the NLL change."""
    t = report.temperature
    before, after = report.metrics.loc["before"], report.metrics.loc["after"]
    if t is None or not _finite(t):
        return "No temperature was fitted (vector scaling or a failed fit): nothing to compare."
    direction = ("softens the model (T > 1: it was over-confident)" if t > 1.005 else
                 "sharpens the model (T < 1: it was under-confident)" if t < 0.995 else "leaves the model almost unchanged")
    diff = ece_change(report, n_boot=n_boot, seed=seed, alpha=alpha)
    b, a = float(before.ece), float(after.ece)
    level = f"{1 - alpha:.0%}"
    paired = (f"difference {diff.estimate:+.4f}, {level} interval [{diff.lower:+.4f}, {diff.upper:+.4f}], paired "
              f"bootstrap over {diff.n_clusters} test windows")
    if diff.upper < 0:
        ece = f"lowers test ECE {b:.4f} -> {a:.4f} ({paired}: the cut is beyond resampling noise)"
    elif diff.lower > 0:
        ece = f"raises test ECE {b:.4f} -> {a:.4f} ({paired}: worse beyond resampling noise)"
    else:
        ece = (f"changes test ECE {b:.4f} -> {a:.4f} ({paired}: the interval contains 0, so the change is within "
               "resampling noise)")
    nll = float(before.nll) - float(after.nll)
    nll_text = (f"test NLL improves by {nll:.4f} nats" if nll > 1e-4 else
                f"test NLL is unchanged ({float(after.nll):.4f})" if nll > -1e-4 else
                f"test NLL gets worse by {-nll:.4f} nats")
    return f"T = {t:.3f} {direction}: it {ece}; {nll_text}; the top prediction, hence accuracy, is unchanged."


def ece_change(report, n_boot: int = 200, seed: int = 0, alpha: float = 0.05):
    """The paired test behind :func:`temperature_scaling`: a BootstrapCI of ECE_after - ECE_before
    (uniform bins, ``report.n_bins``), both evaluated on the same resampled test windows."""
    import functools

    from .calibration import bootstrap_ci, expected_calibration_error

    ece = functools.partial(expected_calibration_error, n_bins=report.n_bins, strategy="uniform")
    groups = report.test_group if report.test_group is not None and len(np.unique(report.test_group)) >= 2 else None
    return bootstrap_ci(lambda before, after, correct: ece(after, correct) - ece(before, correct),
                        report.test_confidence, report.test_confidence_scaled, report.test_correct,
                        n_boot=n_boot, alpha=alpha, seed=seed, groups=groups)


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
    """``table``: ``calibration.compare_models`` (model, n_params, accuracy, ece, ece_scaled,
    temperature). Names the lowest ECE after scaling *with its accuracy* (a model that is almost
    never right can match its confidence to that), and says whether ECE changes with size only
    from a rank correlation over at least :data:`MIN_UNITS` models."""
    if len(table) == 0:
        return "No model could be compared."
    best = table.loc[table["ece_scaled"].idxmin()]
    text = (f"{len(table)} models: after per-model temperature scaling the lowest test ECE is {best['model']}'s "
            f"({float(best['ece_scaled']):.4f}")
    if "accuracy" in table.columns and _finite(best["accuracy"]):
        text += f", at top-1 accuracy {_pct(float(best['accuracy']))}"
        least = table.loc[table["accuracy"].astype(float).idxmin()]
        if len(table) > 1 and least["model"] == best["model"]:
            text += ", the least accurate model: low ECE there means its confidence matches a low accuracy"
    text += ")"
    hotter = int((table["temperature"] > 1).sum())
    text += f"; {hotter} of {len(table)} needed T > 1 (over-confident at T = 1)"
    text += "; " + _rank_trend(table["n_params"], table["ece"], "ECE at T = 1", "parameter count", "models")
    return text + "."


def _rank_trend(x, y, what: str, against: str, units: str) -> str:
    """'what rises / falls with against' only from a Spearman test over >= MIN_UNITS units."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < MIN_UNITS:
        return f"with {n} {units}, too few units to say whether {what} changes with {against} (a trend needs {MIN_UNITS})"
    rho, p = _spearman(x[keep], y[keep])
    if not _finite(rho):
        return f"{what} does not vary across the {n} {units}: no trend with {against} to measure"
    if p < 0.05:
        way = "rises" if rho > 0 else "falls"
        return f"{what} {way} with {against} (Spearman {rho:+.2f}, n = {n}, p = {p:.3f})"
    return f"no trend of {what} with {against} (Spearman {rho:+.2f}, n = {n}, p = {p:.3f})"


def _correlation(test, x, y) -> tuple[float, float]:
    """``test`` (scipy.stats.spearmanr / pearsonr) of x and y: (statistic, p); NaN for fewer
    than 3 pairs or a constant side, where neither is defined."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    result = test(x, y)
    return float(result.statistic), float(result.pvalue)


def _spearman(x, y) -> tuple[float, float]:
    from scipy import stats

    return _correlation(stats.spearmanr, x, y)


def _pearson(x, y) -> tuple[float, float]:
    from scipy import stats

    return _correlation(stats.pearsonr, x, y)


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
    """``table``: ``selective.ood_detection_table`` (index: score names; column auroc). Names the
    best score, and every score that ranks the wrong way (AUROC < 0.5) with its AUROC."""
    auroc = table["auroc"].astype(float)
    best, worst = auroc.idxmax(), auroc.idxmin()
    wrong = [(name, value) for name, value in auroc.items() if value < 0.5]
    if auroc[best] < 0.5:
        text = f"No score tells code from prose the right way: the best, {best}, has AUROC {auroc[best]:.3f} (< 0.5)"
    else:
        text = f"The best score tells code from prose with AUROC {auroc[best]:.3f} ({best})"
    others = [(n, v) for n, v in wrong if n != best]
    if others:
        text += ("; " + ", ".join(f"{n} ({v:.3f})" for n, v in others)
                 + f" rank{'s' if len(others) == 1 else ''} the wrong way (AUROC < 0.5: code looks *more* familiar "
                   "to them than prose)")
    elif not wrong and auroc[worst] < 0.6 and worst != best:
        text += f"; {worst} is near chance ({auroc[worst]:.3f})"
    return text + "."


def mixed_stream(table, target_risk: float | None = None, guaranteed: str | None = None) -> str:
    """``table``: ``selective.abstention_table(..., domain=...)`` (name, domain, coverage,
    accuracy_predicted): what each policy keeps of each domain. With ``target_risk`` and the name
    of the policy that carries the risk guarantee (``guaranteed``), every domain on which that
    policy's error rate on what it keeps exceeds the target is said, with the numbers."""
    domains = list(dict.fromkeys(table["domain"]))
    parts = []
    for name, rows in table.groupby("name", sort=False):
        kept = rows.set_index("domain")["coverage"]
        parts.append(f"{name} {' / '.join(_pct(float(kept.get(d, float('nan'))), 0) for d in domains)}")
    text = f"Kept on {' / '.join(domains)}: " + "; ".join(parts)
    if target_risk is not None and guaranteed is not None and "accuracy_predicted" in table.columns:
        rows = table[table["name"] == guaranteed]
        broken, held = [], []
        for _, row in rows.iterrows():
            risk = 1 - float(row["accuracy_predicted"])
            if not _finite(risk):
                continue
            (broken if risk > target_risk else held).append(
                f"{row['domain']} (keeps {_pct(float(row['coverage']))} at risk {risk:.3f})")
        if broken:
            text += (f"; the {guaranteed} risk bound (target {target_risk:.2f}) is VIOLATED on " + ", ".join(broken)
                     + ": its guarantee holds only on the distribution it was chosen on")
        if held:
            text += f"; it holds on {', '.join(held)}"
    return text + "."


# -------------------------------------------------------------------------------- 03 / 04 circuits

def logit_difference(diffs, what: str = "answer") -> str:
    """``diffs``: per-prompt logit difference answer - alternative. Mean ± sample standard
    deviation (ddof = 1, the library's convention) and a Student-t 95% interval of the mean."""
    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    wins = int((diffs > 0).sum())
    share = wins / n if n else math.nan
    mean, sd = float(diffs.mean()), sample_std(diffs)
    low, high = _t_interval(diffs)
    ci = f", 95% interval of the mean [{low:.2f}, {high:.2f}]" if _finite(low) else ""
    if share >= 0.9 and _finite(low) and low > 0:
        verdict = "the model solves the task"
    elif _finite(low) and low > 0:
        verdict = "the model prefers the answer on average (interval above 0) but not on every prompt"
    elif _finite(high) and high < 0:
        verdict = "the model prefers the alternative (interval below 0): later findings explain a behaviour it lacks"
    else:
        verdict = ("the interval contains 0: no preference is shown on this many prompts" if _finite(low) else
                   "too few prompts for an interval")
    return (f"The {what} beats the alternative by {mean:.2f} ± {sd:.2f} logits (mean ± sample SD, n = {n}{ci}) and "
            f"wins on {wins} of {n} prompts: {verdict}.")


def sample_std(values) -> float:
    """The library's one standard-deviation convention: the sample standard deviation (ddof = 1),
    as ``torch.Tensor.std`` and ``results.aggregate`` compute it; NaN below two values."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _t_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sample_std(values) / math.sqrt(n)
    return float(values.mean()) - half, float(values.mean()) + half


def lens_depth(depth: float, n_layers: int, before_last: float, final: float) -> str:
    """``depth``: ``attribution.lens_answer_depth`` (blocks completed; NaN = never)."""
    if not _finite(depth):
        where = "never becomes the lens' top prediction at any depth"
    elif depth >= n_layers:
        where = f"becomes the lens' top prediction only after the last block ({n_layers})"
    else:
        where = f"becomes the lens' top prediction after {depth:g} of {n_layers} blocks"
    jump = "most of it is written by the last layer" if final > 2 * max(before_last, 1e-12) else \
        "it is already mostly there before the last layer"
    return f"The answer {where}; its probability is {before_last:.3g} before the last layer and {final:.3g} after: {jump}."


def top_units(frame, value: str, label: str = "unit", k: int = 3, total: float | None = None,
              known: Sequence[str] | None = None, role: str = "", rank: str = "abs") -> str:
    """The ``k`` rows of ``frame`` with the largest |value| (``rank="abs"``) or the largest value
    (``rank="signed"``: the order a notebook's own "top-k" print uses): who they are, what share of
    ``total`` they carry, and their overlap with ``known`` units of a ``role``."""
    if rank not in ("abs", "signed"):
        raise ValueError(f"rank={rank!r}: expected 'abs' or 'signed'")
    key = frame[value].abs() if rank == "abs" else frame[value]
    top = frame.reindex(key.sort_values(ascending=False).index).head(k)
    names = ", ".join(f"{row[label]} ({float(row[value]):+.2f})" for _, row in top.iterrows())
    text = f"The top {len(top)} by {'|' + value + '|' if rank == 'abs' else value} are {names}"
    if total is not None and _finite(total) and abs(total) > 1e-9:
        text += f", together {float(top[value].sum()) / total:.0%} of the total {total:.2f}"
    if known is not None:
        known = set(known)
        hits = [n for n in top[label] if n in known]
        text += (f"; {len(hits)} of them {'is a' if len(hits) == 1 else 'are'} known {role} head{'' if len(hits) == 1 else 's'}"
                 if known else f"; no {role} heads are on record for this model to compare with (overlap n/a)")
    return text + "."


def patching_restoration(value: float, where: str) -> str:
    if value >= 0.9:
        grade = "restores the clean behaviour almost fully"
    elif value >= 0.5:
        grade = "restores most of the clean behaviour"
    elif value >= 0.1:
        grade = "restores part of the clean behaviour: the information is spread over several places"
    else:
        grade = "restores almost nothing: no single place carries the difference"
    return f"Patching {where} {grade} ({value:.2f} of the clean logit difference, normalised)."


def attribution_agreement(exact, estimate, sign: float | None = None, k: int = 3) -> str:
    """``exact`` / ``estimate``: per-head exact (activation) patching effects and attribution
    patching estimates, as Series indexed by head label (same labels). ``sign``: the sign
    agreement per head and position. The verdict is a conclusion of the numbers quoted: Pearson
    and Spearman over the n heads (with p; "too few units to say" below :data:`MIN_UNITS`), the
    estimate of the head with the largest exact effect, and whether both name the same top-k."""
    import pandas as pd

    exact = pd.Series(exact, dtype=float)
    estimate = pd.Series(estimate, dtype=float).reindex(exact.index)
    n = len(exact)
    r, p_r = _pearson(exact, estimate)
    rho, p_rho = _spearman(exact, estimate)
    largest = exact.abs().idxmax()
    k = min(k, n)
    top_exact = list(exact.sort_values(ascending=False).index[:k])
    top_estimate = list(estimate.sort_values(ascending=False).index[:k])
    same = len(set(top_exact) & set(top_estimate))
    if n < MIN_UNITS:
        correlation = f"with {n} heads, too few units to say how well the rankings agree"
    else:
        correlation = (f"over {n} heads Pearson r = {r:.2f} (p = {p_r:.2g}), Spearman {rho:.2f} (p = {p_rho:.2g})")
    text = (f"Attribution against exact patching: {correlation}; the head with the largest exact effect, {largest} "
            f"({float(exact[largest]):+.3f}), is estimated at {float(estimate[largest]):+.3f}; top {k} by exact "
            f"patching {', '.join(top_exact)} vs by attribution {', '.join(top_estimate)} ({same} of {k} shared)")
    if sign is not None and _finite(sign):
        text += f"; signs agree on {_pct(float(sign), 0)} of head x position cells"
    captured = (np.sign(exact[largest]) == np.sign(estimate[largest])
                and abs(float(estimate[largest])) >= 0.5 * abs(float(exact[largest])))
    good = n >= MIN_UNITS and _finite(rho) and rho >= 0.8 and _finite(r) and r >= 0.8 and same == k and captured
    if good:
        verdict = "attribution patching is a usable stand-in for exact patching here"
    else:
        reasons = []
        if n >= MIN_UNITS and (not _finite(rho) or rho < 0.8 or not _finite(r) or r < 0.8):
            reasons.append("a correlation below 0.8")
        if not captured:
            reasons.append(f"it misses the largest effect ({largest})")
        if same < k:
            reasons.append(f"the top {k} differ")
        if n < MIN_UNITS:
            reasons.append("too few heads")
        verdict = "not a stand-in here (" + ", ".join(reasons) + "): confirm with exact patching"
    return text + f": {verdict}."


def joint_ablation(together: float, alone: Mapping[str, float], method: str) -> str:
    each = min(alone.values()) if alone else math.nan
    text = f"Ablating the top heads together ({method}) leaves {together:.2f} of the clean behaviour"
    if _finite(each):
        text += ("; each alone leaves at least {:.2f}, so they are redundant: the circuit survives losing any one"
                 .format(each) if each > 0.5 else f"; one alone already drops it to {each:.2f}")
    return text + "."


# -------------------------------------------------------------------------------- 05 / 06 heads and position

def detection(found: Sequence[str], kind: str, threshold: float, prf: Mapping[str, float] | None = None) -> str:
    text = (f"{len(found)} {kind} head{'s' if len(found) != 1 else ''} above the dynamic threshold {threshold:.3f}"
            + (f": {', '.join(found)}" if found else ": none found (a null result for this model and probe)"))
    if prf:
        text += (f"; against the ground truth precision {prf['precision']:.2f}, recall {prf['recall']:.2f}, "
                 f"F1 {prf['f1']:.2f}")
    return text + "."


def icl_ablation(clean_drop: float, ablated_drop: float, fraction: float) -> str:
    if not _finite(clean_drop) or clean_drop <= 0.1:
        return (f"The loss barely drops on the repeated half ({clean_drop:.2f} nats): this model does little "
                "in-context copying, so ablation has nothing to remove.")
    share = "all" if fraction >= 1 else f"{fraction:.0%}"
    return (f"The loss drops {clean_drop:.2f} nats on the repeated half; with the heads ablated it drops "
            f"{ablated_drop:.2f}: they carry {share} of the in-context copying ({fraction:.0%} removed).")


def composition(score: float, median: float) -> str:
    ratio = score / median if median > 0 else math.inf
    verdict = ("previous-token heads clearly feed the induction heads' keys" if ratio > 1.5 else
               "weakly above the typical pair" if ratio > 1 else "no K-composition above the typical pair")
    return f"K-composition previous-token -> induction {score:.3f} vs median pair {median:.3f} ({ratio:.1f}x): {verdict}."


def position_probes(accuracy: Sequence[float], streams: Sequence[str], chance: float, control_max: float) -> str:
    accuracy = [float(a) for a in accuracy]
    best = int(np.argmax(accuracy))
    above = [s for s, a in zip(streams, accuracy) if a > 2 * chance]
    if not above:
        return (f"No stream holds linearly readable position (best {accuracy[best]:.3f} vs chance {chance:.3f}): "
                "a null result, as expected without learned position embeddings.")
    return (f"Position is linearly readable in {len(above)} of {len(streams)} streams, best at {streams[best]} "
            f"({accuracy[best]:.1%} vs chance {chance:.1%}); the shuffled-label control stays at most "
            f"{control_max:.1%}, so the probe reads the stream, not its own capacity.")


def head_classes(labels: Sequence[str]) -> str:
    """``labels``: each head's class (position / hybrid / content). The sentence reports the counts
    and says which class is most common; nothing beyond the counts."""
    labels = list(labels)
    names = ("position", "hybrid", "content")
    counts = {name: labels.count(name) for name in names}
    other = len(labels) - sum(counts.values())
    text = (f"{counts['position']} position, {counts['hybrid']} hybrid and {counts['content']} content heads among "
            f"{len(labels)}" + (f" ({other} unclassified)" if other else ""))
    if not labels:
        return "No head was classified."
    top = max(names, key=lambda n: counts[n])
    tied = [n for n in names if counts[n] == counts[top]]
    meaning = {"position": "attend by where tokens are", "hybrid": "mix where tokens are with what they are",
               "content": "attend by what tokens are, not where they are"}
    if len(tied) > 1:
        text += f": {' and '.join(tied)} heads are equally common ({counts[top]} each)"
    else:
        text += f": most heads ({counts[top]} of {len(labels)}) {meaning[top]}"
    if counts["position"] == 0:
        text += "; none attends by position alone"
    return text + "."


def ablation_importance(frame, value: str = "drop", label: str = "unit", floor: float = 0.02) -> str:
    """The head whose ablation drops probe accuracy most, against a fixed ``floor`` (the sentence
    says the floor; it makes no claim about noise it did not measure)."""
    top = frame.loc[frame[value].idxmax()]
    n = len(frame)
    if float(top[value]) < floor:
        return (f"No single head's ablation drops probe accuracy by {floor:.2f} or more: the largest drop of {n} "
                f"heads is {float(top[value]):.3f} ({top[label]}).")
    return (f"{top[label]} matters most to the probe of {n} heads ablated one at a time: ablating it drops accuracy by "
            f"{float(top[value]):.3f} (at least the {floor:.2f} floor).")


def integrated_gradients_check(error: float, output: float, baseline: float) -> str:
    scale = max(1.0, abs(output - baseline))
    verdict = "complete: the attributions add up" if error < 1e-2 * scale else \
        "not complete: read the attributions as approximate"
    return f"Integrated gradients: completeness error {error:.2g} logits on a difference of {output - baseline:.2f}, {verdict}."


def causal_trace(clean: float, corrupted: float, best: float) -> str:
    restored = (best - corrupted) / (clean - corrupted) if clean > corrupted else math.nan
    amount = (f"more than all of it ({restored:.0%}: that state alone carries the prediction)" if restored > 1
              else f"{restored:.0%} of it")
    return (f"Noising the input drops the prediction's probability from {clean:.3f} to {corrupted:.3f}; the best "
            f"single restored state brings back {amount}.")


# -------------------------------------------------------------------------------- 07 / 08 explainer and taxonomy

def known_heads_named(named: Mapping[str, Sequence[bool]]) -> str:
    """``named``: role -> whether each known head of that role got the role's explanation."""
    if not named or not any(len(v) for v in named.values()):
        return "No verified head table for this model: the heuristic's names cannot be checked here."
    parts = [f"{sum(map(bool, v))} of {len(v)} {role.replace('_', '-')}" for role, v in named.items() if len(v)]
    total, right = sum(len(v) for v in named.values()), sum(sum(map(bool, v)) for v in named.values())
    verdict = "every known head named by its role" if right == total else f"{total - right} known head(s) misnamed"
    return f"Against the verified table: {', '.join(parts)} heads named correctly ({verdict})."


def explainer_run(frame) -> str:
    """``frame``: ``explain.report.records_frame`` (unit, explanation, primary_score, causal_effect).
    Whether score and causal effect go together is said only from a Spearman test over at least
    :data:`MIN_UNITS` units, with n and p."""
    n = len(frame)
    explained = int(frame["explanation"].notna().sum())
    text = f"{explained} of {n} {'units' if frame['kind'].nunique() > 1 else frame['kind'].iloc[0] + 's'} explained"
    scores = frame["primary_score"].dropna()
    if len(scores):
        negative = list(frame.loc[frame["primary_score"] < 0, "unit"])
        text += (f"; scores {scores.min():.2f} to {scores.max():.2f}"
                 + (f", negative (the score contradicts the explanation) for {', '.join(negative)}" if negative
                    else ", none negative"))
    causal = frame[["unit", "causal_effect"]].dropna()
    if len(causal):
        if (causal["causal_effect"].abs() == 0).all():
            text += (f"; ablating any of the {len(causal)} units at its top events changes the loss by exactly 0: "
                     "they have no causal effect to check the explanations against")
            return text + "."
        top = causal.loc[causal["causal_effect"].abs().idxmax()]
        text += f"; ablating {top['unit']} changes the loss at its top events most ({float(top['causal_effect']):+.3f} nats)"
        both = frame[["primary_score", "causal_effect"]].dropna()
        m = len(both)
        if m < MIN_UNITS:
            text += (f"; with {m} scored units, too few units to say whether score and causal effect go together "
                     f"(that needs {MIN_UNITS})")
        else:
            rho, p = _spearman(both["primary_score"], both["causal_effect"])
            if not _finite(rho):
                text += f"; score or causal effect is constant over the {m} units: no correlation to measure"
            elif p < 0.05:
                text += (f"; score and causal effect correlate (Spearman {rho:+.2f}, n = {m}, p = {p:.3f}): "
                         + ("better-explained units are the ones the model uses more" if rho > 0 else
                            "better-explained units matter less to the loss"))
            else:
                text += (f"; no evidence that score and causal effect go together (Spearman {rho:+.2f}, n = {m}, "
                         f"p = {p:.2f})")
    return text + "."


def heads_vs_neurons(frame) -> str:
    """``frame``: ``explain.report.records_frame`` of heads and neurons together (kind, explanation,
    primary_score, causal_effect). "matters more" is said only from a two-sided Mann-Whitney test
    of |causal effect| between the kinds (with both n and p); a kind whose effects are all exactly
    0 is said as such (nothing to compare)."""
    from scipy import stats

    if "kind" not in frame.columns:
        frame = frame.reset_index()
    kinds = set(frame["kind"])
    if not {"head", "neuron"} <= kinds:
        return "Only one kind of unit was explained: nothing to compare."
    parts, effects = [], {}
    for kind in ("head", "neuron"):
        rows = frame[frame["kind"] == kind]
        effect = rows["causal_effect"].dropna().abs().to_numpy(dtype=float)
        effects[kind] = effect
        score = rows["primary_score"].dropna()
        parts.append(f"{kind}s: {int(rows['explanation'].notna().sum())}/{len(rows)} explained"
                     + (f", mean score {float(score.mean()):.2f}" if len(score) else "")
                     + (f", mean |causal effect| {float(effect.mean()):.3f} nats" if len(effect) else ""))
    text = "; ".join(parts)
    zero = [k for k, e in effects.items() if len(e) and (e == 0).all()]
    if zero:
        return (text + f"; every {' and '.join(zero)} ablation changes the loss by exactly 0 "
                f"(n = {', '.join(str(len(effects[k])) for k in zero)}): "
                "those units do nothing to the loss here, so their explanations cannot be checked causally and no "
                "comparison is made.")
    h, m = effects["head"], effects["neuron"]
    if len(h) < 2 or len(m) < 2:
        return text + f"; too few causal checks (heads {len(h)}, neurons {len(m)}) to compare."
    p = float(stats.mannwhitneyu(h, m, alternative="two-sided").pvalue)
    if p < 0.05:
        more = "heads" if np.median(h) > np.median(m) else "neurons"
        return (text + f": single {more} matter more to the loss at their own events (Mann-Whitney on |causal "
                f"effect|, n = {len(h)} heads and {len(m)} neurons, p = {p:.3f}).")
    return (text + f": no difference in |causal effect| between heads and neurons is shown (Mann-Whitney, "
            f"n = {len(h)} heads and {len(m)} neurons, p = {p:.2f}).")


def families(metrics: Mapping[str, Any], table) -> str:
    """``metrics``: ``Taxonomy.metrics``; ``table``: ``explain.figures.family_table`` (label, size)."""
    n = int(metrics.get("n_families", 0))
    coverage = float(metrics.get("coverage", float("nan")))
    if n == 0:
        return "No family formed: the explanations are too few or too different to cluster."
    largest = table.loc[table["size"].idxmax()] if len(table) else None
    text = f"{n} famil{'y' if n == 1 else 'ies'} cover {coverage:.0%} of the units"
    if largest is not None:
        text += f"; the largest is '{largest['label']}' ({int(largest['size'])} units)"
    if coverage < 1:
        text += f"; {1 - coverage:.0%} stay unclustered"
    return text + "."


def taxonomy_stability(frame) -> str:
    """``frame``: ``explain.taxonomy.stability``."""
    ok = frame[frame["failure"].isna()] if "failure" in frame.columns else frame
    if ok.empty:
        return "No configuration could be clustered: stability not measured."
    ari = ok.loc[~ok["reference"], "ari_vs_reference"].astype(float)
    families = ok["n_families"].astype(float)
    text = f"Across {len(ok)} configurations the number of families ranges {int(families.min())}-{int(families.max())}"
    if len(ari):
        text += (f" and agreement with the reference (ARI) {ari.min():.2f}-{ari.max():.2f}: "
                 + ("stable" if ari.min() >= 0.8 else "sensitive to the embedder and cluster size: "
                    "read the families as one view, not a fact"))
    if (families == 0).any():
        text += f"; {int((families == 0).sum())} configuration(s) find no family at all"
    return text + "."


def text_vs_behaviour(ari: float, disagreements, n_units: int | None = None) -> str:
    """``ari``: adjusted Rand index of text vs behaviour families over ``n_units`` clustered units
    (below :data:`MIN_UNITS` the sentence says too few units to say)."""
    n = len(disagreements) if disagreements is not None else 0
    if not _finite(ari):
        return "Text and behaviour families could not be compared (too few clustered units)."
    over = f" over {n_units} clustered units" if n_units is not None else ""
    if n_units is not None and n_units < MIN_UNITS:
        return (f"Families from the explanations' text and from attention statistics: ARI {ari:.2f}{over}, too few "
                f"units to say how well they agree (that needs {MIN_UNITS}); {n} unit(s) sit in different families.")
    verdict = ("agree closely" if ari >= 0.8 else "agree partly" if ari >= 0.3 else "barely agree")
    return (f"Families from the explanations' text and from attention statistics {verdict} (ARI {ari:.2f}{over}); "
            f"{n} unit(s) sit in different families.")


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
    """``table``: ``claims.claims_table`` (index: claim number; columns verdict, and decided_by:
    the sub-test that decided) or ``claims.verdict_table``. Each claim that is not supported is
    named with the sub-test it failed."""
    counts = table["verdict"].value_counts()
    supported = [str(i) for i, v in table["verdict"].items() if v == "supported"]
    not_supported = [str(i) for i, v in table["verdict"].items() if v == "not supported"]
    text = (f"{int(counts.get('supported', 0))} of {len(table)} claims are supported"
            + (f" ({', '.join(supported)})" if supported else ""))
    text += (f", {int(counts.get('not supported', 0))} not supported"
             + (f" ({', '.join(not_supported)})" if not_supported else ""))
    text += f" and {int(counts.get('not testable', 0))} not testable on this model."
    if "decided_by" in table.columns:
        for i, v in table["verdict"].items():
            if v == "not supported":
                text += f" Claim {i} fails: {str(table.loc[i, 'decided_by']).removeprefix('failed: ')}."
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


# --------------------------------------------------------------------------------------------
# Circuits (notebook 10): edge attribution patching, faithfulness and its resampling spread
# --------------------------------------------------------------------------------------------

__all__ += ["circuit", "circuit_heads_known"]


def circuit(n_edges: int, n_total: int, faithfulness: float, interval: Sequence[float], n_core: int,
            core_faithfulness: float, method: str, stable: float = 0.9, confidence: float = 0.95) -> str:
    """The circuit's size, its faithfulness with a bootstrap interval over prompts, and its stable
    core (edges kept in at least ``stable`` of the resamples), with a verdict on each."""
    low, high = (float(v) for v in interval)
    text = (f"{method.upper()} picks a circuit of {n_edges} of {n_total} edges ({_pct(n_edges / max(n_total, 1))}); "
            f"with every other edge patched from the corrupted run it restores {_pct(faithfulness, 0)} of the "
            f"clean metric ({confidence:.0%} interval over resampled prompts {_pct(low, 0)} to {_pct(high, 0)}).")
    share = n_core / max(n_edges, 1)
    text += (f" Its stable core (edges in at least {stable:.0%} of the resamples) has {n_core} edges "
             f"({_pct(share, 0)} of the circuit) and alone restores {_pct(core_faithfulness, 0)}.")
    if low < 0.5:
        text += " The interval reaches below 50%: on other prompts from the same task the circuit may not hold."
    elif share < 0.5:
        text += " Most of the circuit's edges change when the prompts are resampled: only the core is a finding."
    else:
        text += " Both the faithfulness and most of the edges survive resampling the prompts."
    return text


def circuit_heads_known(found: Sequence[str], classes: Mapping[str, Sequence[str]]) -> str:
    """Which heads of a circuit belong to published head classes (e.g. Wang et al.'s IOI circuit)."""
    known = {head: name for name, heads in classes.items() for head in heads}
    hits = [f"{head} ({known[head]})" for head in found if head in known]
    if not found:
        return "The circuit contains no attention head."
    if not hits:
        return f"None of the circuit's {len(found)} heads is in a published class."
    return (f"{len(hits)} of the circuit's {len(found)} heads are in a published class: {', '.join(hits)}; "
            f"{len(set(known) - set(found))} published heads are not in it.")
