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

import numpy as np

__all__ = ["Finding", "show", "top_predictions", "heldout_loss", "calibration_at_t1", "temperature_scaling",
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


# -------------------------------------------------------------------------------- 03 / 04 circuits

def logit_difference(diffs, what: str = "answer") -> str:
    """``diffs``: per-prompt logit difference answer - alternative."""
    diffs = np.asarray(diffs, dtype=float)
    share = float((diffs > 0).mean())
    verdict = ("the model solves the task" if share >= 0.9 else
               "the model prefers the answer on most prompts" if share > 0.5 else
               "the model does not solve the task: later findings explain a behaviour it lacks")
    return (f"The {what} beats the alternative by {diffs.mean():.2f} ± {diffs.std():.2f} logits and wins on "
            f"{share:.0%} of {len(diffs)} prompts: {verdict}.")


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
              known: Sequence[str] | None = None, role: str = "") -> str:
    """The ``k`` rows of ``frame`` with the largest |value|: who they are, what share of ``total``
    they carry, and their overlap with ``known`` units of a ``role``."""
    top = frame.reindex(frame[value].abs().sort_values(ascending=False).index).head(k)
    names = ", ".join(f"{row[label]} ({float(row[value]):+.2f})" for _, row in top.iterrows())
    text = f"The top {len(top)} by |{value}| are {names}"
    if total is not None and _finite(total) and abs(total) > 1e-9:
        text += f", together {float(top[value].sum()) / total:.0%} of the total {total:.2f}"
    if known is not None:
        known = set(known)
        hits = [n for n in top[label] if n in known]
        text += (f"; {len(hits)} of them {'is' if len(hits) == 1 else 'are'} known {role} heads" if known
                 else f"; no {role} heads are on record for this model to compare with")
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


def attribution_agreement(spearman: float, sign: float) -> str:
    quality = ("a reliable stand-in" if spearman > 0.8 and sign > 0.9 else
               "a usable first pass, to be confirmed exactly" if spearman > 0.5 else
               "not a reliable stand-in here")
    return (f"Attribution patching ranks heads like exact patching with Spearman {spearman:.2f} and agrees on the "
            f"sign of {sign:.0%} of head x position cells: {quality}.")


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
    labels = list(labels)
    counts = {name: labels.count(name) for name in ("position", "hybrid", "content")}
    if counts["position"] == 0:
        return (f"No position heads found among {len(labels)} heads ({counts['hybrid']} hybrid, {counts['content']} "
                "content): attention here follows what tokens are, not where they are.")
    return (f"{counts['position']} position, {counts['hybrid']} hybrid and {counts['content']} content heads "
            f"among {len(labels)}.")


def ablation_importance(frame, value: str = "drop", label: str = "unit", floor: float = 0.02) -> str:
    top = frame.loc[frame[value].idxmax()]
    if float(top[value]) < floor:
        return (f"No single head matters to the probe: the largest accuracy drop is {float(top[value]):.3f} "
                f"({top[label]}), within noise.")
    return f"{top[label]} matters most to the probe: ablating it drops accuracy by {float(top[value]):.3f}."


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
    """``frame``: ``explain.report.records_frame`` (unit, explanation, primary_score, causal_effect)."""
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
        top = causal.loc[causal["causal_effect"].abs().idxmax()]
        text += f"; ablating {top['unit']} changes the loss at its top events most ({float(top['causal_effect']):+.3f} nats)"
        both = frame[["primary_score", "causal_effect"]].dropna()
        if len(both) >= 4 and both["primary_score"].std() > 0 and both["causal_effect"].std() > 0:
            rho = float(both["primary_score"].corr(both["causal_effect"], method="spearman"))
            text += (f"; score and causal effect correlate with Spearman {rho:.2f} "
                     + ("(well-explained units are the ones the model uses)" if rho > 0.3 else
                        "(a good explanation does not mean the unit matters)"))
    return text + "."


def heads_vs_neurons(summary_frame) -> str:
    """``summary_frame``: per kind (``kind`` index or column): units, explained, mean_score, mean_abs_causal."""
    frame = summary_frame.reset_index() if "kind" not in summary_frame.columns else summary_frame
    rows = {row["kind"]: row for _, row in frame.iterrows()}
    if not {"head", "neuron"} <= set(rows):
        return "Only one kind of unit was explained: nothing to compare."
    h, n = rows["head"], rows["neuron"]
    more = "heads" if float(h["mean_abs_causal"]) > float(n["mean_abs_causal"]) else "neurons"
    return (f"Heads: {int(h['explained'])}/{int(h['units'])} explained, mean score {float(h['mean_score']):.2f}, "
            f"mean |causal effect| {float(h['mean_abs_causal']):.3f} nats; neurons: {int(n['explained'])}/"
            f"{int(n['units'])}, {float(n['mean_score']):.2f}, {float(n['mean_abs_causal']):.3f}: single {more} "
            "matter more to the loss at their own events on this model.")


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


def text_vs_behaviour(ari: float, disagreements) -> str:
    n = len(disagreements) if disagreements is not None else 0
    if not _finite(ari):
        return "Text and behaviour families could not be compared (too few clustered units)."
    verdict = ("agree closely" if ari >= 0.8 else "agree partly" if ari >= 0.3 else "barely agree")
    return (f"Families from the explanations' text and from attention statistics {verdict} (ARI {ari:.2f}); "
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
