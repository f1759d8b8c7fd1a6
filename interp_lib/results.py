"""A run's results: its metrics aggregated across seeds, and its results page, the series'
headline numbers said in words.

``aggregate`` / ``aggregate_runs`` turn the long metrics table (``interp_lib.artifacts.
load_metrics``) into one row per configuration and metric (n, mean, std, Student-t CI of the
mean, per-seed values), for one run folder or several merged (shards run anywhere).

``interp-lib run`` writes ``OUT/results.md`` at the end of every run, and ``interp-lib results
OUT [--to FILE]`` writes it again from any run folder (or several seeds' worth). Each sentence is
filled from the metrics the notebooks recorded (``il.record_metrics``), averaged over
seeds with the seed range where there are several; a sentence whose metrics a run did not record
(the notebook failed, or the model's task differs) is left out, and every recorded metric is
listed in full below the sentences. Nothing on the page is typed by hand.
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import METRICS_COLUMNS, atomic_write_text, load_metrics, markdown_table, read_run_manifest

if TYPE_CHECKING:
    import pandas as pd

# notebook -> (section title, sentences). A sentence is a format string over the notebook's
# metric names; it appears only when all of its metrics were recorded. A tuple holds variants,
# fullest first: the first whose metrics are all there is used. A callable takes the values and
# returns the sentence (or None), for wording that depends on the numbers.
HEADLINES: dict[str, tuple[str, Sequence[str | tuple[str, ...]]]] = {
    "00_tour": ("Language modelling", [
        "Held-out loss {heldout_loss:.3f} nats per token; the top prediction is the next token "
        "{top1_accuracy:.1%} of the time.",
    ]),
    "01_calibration": ("Calibration", [
        "Next-token ECE {ece_before:.4f} before and {ece_after:.4f} after temperature scaling "
        "(T = {temperature:.3f}, fitted on the validation split, measured on the test split); "
        "NLL {nll_before:.4f} -> {nll_after:.4f}; top-1 accuracy {accuracy:.1%}.",
        "Cloze task: ECE {cloze_ece_before:.4f} -> {cloze_ece_after:.4f} "
        "(T = {cloze_temperature:.3f}); accuracy {cloze_accuracy:.1%}.",
    ]),
    "02_selective_prediction": ("Selective prediction", [
        "AURC {aurc_before:.4f} (excess over the oracle ranking {eaurc_before:.4f}); after "
        "temperature scaling {aurc_after:.4f}.",
        "The guaranteed-risk threshold (risk at most {sgr_bound:.2f}) keeps {sgr_coverage_test:.1%} "
        "of the test predictions, whose error rate is {sgr_risk_test:.3f}.",
        lambda v: _ood_sentence(v),
    ]),
    "03_logit_lens_and_dla": ("Logit lens and direct logit attribution", [
        ("Logit lens: the answer first becomes the lens' top prediction after layer "
        "{lens_answer_layer:.0f} of {lens_layers:.0f}; its probability is "
        "{lens_before_last_target_prob:.3g} before the last layer and {lens_final_target_prob:.3g} "
        "after it.",
         # lens_answer_layer is recorded only when finite: absent = never the top prediction
         "Logit lens: the answer never becomes the lens' top prediction at any of the {lens_layers:.0f} "
         "layers; its probability is {lens_before_last_target_prob:.3g} before the last layer and "
         "{lens_final_target_prob:.3g} after it."),
        ("The answer beats the alternative by {logit_diff:.2f} logits ({answer_preferred:.0%} of "
         "{n_prompts:.0f} prompts of {prompt_tokens:.0f} tokens); DLA parts sum to it within {dla_sum_error:.1e}.",
         "The answer beats the alternative by {logit_diff:.2f} logits ({answer_preferred:.0%} of "
         "prompts); DLA parts sum to it within {dla_sum_error:.1e}."),
    ]),
    "04_activation_patching": ("Activation patching", [
        "Clean logit difference {clean_logit_diff:.2f}, corrupted {corrupted_logit_diff:.2f}; "
        "the best single residual-stream patch restores {resid_patch_max:.2f} of it and the last "
        "attention layer {last_attn_layer_patch:.2f}.",
        lambda v: _work_size_sentence("04", v),
        "Attribution against exact patching: Spearman {patching_agreement_spearman:.2f} per head, "
        "Pearson r {patching_agreement_r:.2f} per head and position, signs agree on "
        "{patching_sign_agreement:.0%} of head x position cells (the notebook's finding says whether "
        "that makes it a stand-in).",
        "Ablating the top heads together leaves {ablated_metric:.2f} of the clean behaviour.",
    ]),
    "05_induction_and_qk": ("Induction heads", [
        ("{n_induction_heads:.0f} induction heads above the dynamic threshold "
         "{induction_threshold:.3f} (top score {induction_top_score:.3f}); ablating them removes "
        "{ablation_fraction_removed:.0%} of the in-context loss drop ({icl_drop_clean:.2f} -> "
        "{icl_drop_ablated:.2f} nats).",
         "{n_induction_heads:.0f} induction heads above the dynamic threshold "
         "{induction_threshold:.3f} (top score {induction_top_score:.3f})."),
        "K-composition from the previous-token heads into the induction heads: "
        "{k_composition_prev_to_induction:.3f}.",
    ]),
    "06_positional_probing": ("Position probes", [
        "Exact position from a linear probe: {probe_acc_embed:.1%} from the embeddings, "
        "{probe_acc_block0:.1%} after block 0, {probe_acc_last:.1%} after the last block "
        "(shuffled-label control at most {control_acc_max:.1%}).",
        "{n_position_heads:.0f} position heads found; integrated gradients' completeness error "
        "{ig_completeness_error:.2g} logits.",
    ]),
    "07_head_explainer": ("Head explainer", [
        "{heads_explained:.0f} of {heads:.0f} heads explained; the largest causal effect of a "
        "head is {max_causal_effect:.3f}.",
    ]),
    "09_claims": ("Published claims under test", [
        "Of nine published claims, {n_supported:.0f} supported, {n_not_supported:.0f} not supported "
        "and {n_not_testable:.0f} not testable on this model (the verdict table is in the notebook).",
        "Resampling whole sequences gives a next-token ECE interval {ece_ci_width_ratio_cluster_vs_token:.2f}x as "
        "wide as resampling tokens; debiased L2 calibration error {ece_debiased_l2:.4f} vs binned "
        "{ece_binned_l2:.4f}.",
    ]),
    "10_circuits": ("Circuits", [
        "A circuit of {circuit_edges:.0f} of {n_edges_total:.0f} edges restores {circuit_faithfulness:.0%} of the "
        "clean metric under true edge patching (95% interval over resampled prompts "
        "{circuit_faithfulness_ci_low:.0%} to {circuit_faithfulness_ci_high:.0%}); its stable core of "
        "{stable_core_edges:.0f} edges restores {stable_core_faithfulness:.0%}.",
        "MIB: CPR {cpr:.3f} (higher is better), CMD {cmd:.3f} (lower is better).",
    ]),
    "08_head_taxonomy": ("Head taxonomy", [
        "{families:.0f} families covering {coverage:.0%} of the heads; text and behaviour "
        "clusterings agree with ARI {text_vs_behaviour_ari:.2f}.",
    ]),
}


def _ood_sentence(values: Mapping[str, float]) -> str | None:
    """Every recorded OOD score's AUROC, the best named, and the ones below 0.5 said as ranking
    the wrong way."""
    names = {"msp": "max-probability", "energy": "energy", "log_prob": "log-probability",
             "mahalanobis": "Mahalanobis"}
    scores = {k[len("ood_auroc_"):]: v for k, v in values.items()
              if k.startswith("ood_auroc_") and math.isfinite(v)}
    if not scores:
        return None
    label = {k: names.get(k, k) for k in scores}
    best = max(scores, key=scores.get)
    text = ("Telling out-of-distribution text apart (AUROC, 0.5 is chance): "
            + ", ".join(f"{label[k]} {v:.3f}" for k, v in scores.items())
            + f"; best {label[best]} ({scores[best]:.3f})")
    wrong = [k for k, v in scores.items() if v < 0.5]
    if wrong:
        text += ("; " + ", ".join(f"{label[k]} ({scores[k]:.3f})" for k in wrong)
                 + f" rank{'s' if len(wrong) == 1 else ''} the wrong way (below 0.5: the other domain looks "
                   "more familiar to them)")
    return text + "."


def _work_size_sentence(notebook: str, values: Mapping[str, float]) -> str | None:
    """How much work a notebook did, and that it is less than its toy setting when it is."""
    if not all(math.isfinite(values.get(k, math.nan)) for k in ("n_prompts", "prompt_tokens")):
        return None
    n, tokens = values["n_prompts"], values["prompt_tokens"]
    text = f"{notebook} ran {n:.0f} prompts of {tokens:.0f} tokens"
    full = values.get("n_prompts_toy_setting", math.nan)
    if math.isfinite(full) and n < full:
        text += (f", fewer than the {full:.0f} of its toy setting (n_prompts 'auto' shrinks the work for a model "
                 "over 20M parameters on a CPU)")
    return text + "."


def reconcile(by_notebook: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Sentences for quantities two notebooks measure differently, with both numbers and why they
    differ: 01's next-token ECE cut vs claim 1's in 09, and 03's logit difference vs 04's clean one.
    ``by_notebook``: notebook -> its metric values (one configuration)."""
    out: list[str] = []
    cal, claims = by_notebook.get("01_calibration", {}), by_notebook.get("09_claims", {})
    if all(math.isfinite(cal.get(k, math.nan)) for k in ("ece_before", "ece_after")) and \
            math.isfinite(claims.get("claim1_measured", math.nan)) and cal["ece_before"] > 0:
        cut = 1 - cal["ece_after"] / cal["ece_before"]
        low, high = claims.get("claim1_ci_low", math.nan), claims.get("claim1_ci_high", math.nan)
        ci = f" [{low:.1%}, {high:.1%}]" if math.isfinite(low) and math.isfinite(high) else ""
        inside = ("; 01's cut lies inside claim 1's interval, so the two agree within its uncertainty"
                  if ci and low <= cut <= high else
                  "; 01's cut lies outside claim 1's interval" if ci else "")
        out.append(f"ECE reduction by temperature scaling: 01 measures {cut:.1%} ({cal['ece_before']:.4f} -> "
                   f"{cal['ece_after']:.4f}) on its own validation / test split, without an interval; claim 1 in 09 "
                   f"measures {claims['claim1_measured']:.1%}{ci} on 09's windows with its own fitted temperature "
                   f"(a different, smaller sample, with a cluster-bootstrap interval){inside}.")
    lens, patch = by_notebook.get("03_logit_lens_and_dla", {}), by_notebook.get("04_activation_patching", {})
    if math.isfinite(lens.get("logit_diff", math.nan)) and math.isfinite(patch.get("clean_logit_diff", math.nan)):
        def size(v: Mapping[str, float]) -> str:
            if all(math.isfinite(v.get(k, math.nan)) for k in ("n_prompts", "prompt_tokens")):
                return f"{v['n_prompts']:.0f} prompts of {v['prompt_tokens']:.0f} tokens"
            return "prompt count not recorded by this run"
        a, b = lens["logit_diff"], patch["clean_logit_diff"]
        if f"{a:.2f}" == f"{b:.2f}" and size(lens) == size(patch):
            out.append(f"Logit difference of the task: 03 and 04 both measure {a:.2f} ({size(lens)}).")
        else:
            known = "not recorded" not in size(lens) + size(patch)
            why = ("different prompt sets (04's work size shrinks with 'auto' on a CPU)" if known and
                   size(lens) != size(patch) else "the prompt sets differ" if known else
                   "the prompt sets may differ (their sizes are not all recorded)")
            out.append(f"Logit difference of the task: 03 measures {a:.2f} ({size(lens)}), 04 {b:.2f} on its clean "
                       f"prompts ({size(patch)}): {why}, so the two numbers differ.")
    return out


def _ci_columns(confidence: float) -> tuple[str, str]:
    label = f"{confidence * 100:g}".replace(".", "_")
    return f"ci{label}_low", f"ci{label}_high"


def aggregate(metrics: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Summarise metrics across seeds: one row per (notebook, model, params, metric), i.e. per
    configuration and metric.

    Columns: ``notebook, model, params, metric, n, mean, std`` (sample std, ddof=1),
    ``ci95_low, ci95_high`` (Student-t interval for the mean at ``confidence``; the names follow
    it) and one ``seed_<s>`` column per seed with that seed's value. ``std`` and the interval are
    NaN when ``n < 2``. Rows keep the order of first appearance in ``metrics``. A frame without
    ``model`` / ``params`` columns (one configuration) is accepted.
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r}: expected a number in (0, 1)")
    required = ["seed", "notebook", "metric", "value"]
    missing = [c for c in required if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics: missing column(s) {missing}; expected {METRICS_COLUMNS} "
                         "(the layout load_metrics returns)")
    data = metrics.dropna(subset=["value"]).copy()
    for column, empty in (("model", None), ("params", "{}")):
        if column not in data.columns:
            data[column] = empty
    # groupby drops missing keys: a model left to the notebook's default is shown as n/a
    data["model"] = data["model"].astype(object).where(data["model"].notna(), "n/a")
    keys = ["notebook", "model", "params", "metric"]
    duplicated = data.duplicated(["model", "params", "seed", "notebook", "metric"])
    if duplicated.any():
        first = data[duplicated].iloc[0]
        raise ValueError(f"metrics: several values for seed {first['seed']}, notebook "
                         f"{first['notebook']!r}, model {first['model']!r}, params "
                         f"{first['params']}, metric {first['metric']!r}")
    low_name, high_name = _ci_columns(confidence)
    seeds = sorted(data["seed"].dropna().unique().tolist())
    rows = []
    for key, group in data.groupby(keys, sort=False):
        values = group["value"].to_numpy(dtype=float)
        n = len(values)
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if n > 1 else math.nan
        if n > 1:
            half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
            low, high = mean - half, mean + half
        else:
            low = high = math.nan
        row = dict(zip(keys, key))
        row.update({"n": n, "mean": mean, "std": std, low_name: low, high_name: high})
        by_seed = dict(zip(group["seed"].tolist(), values.tolist()))
        row.update({f"seed_{s}": by_seed.get(s, np.nan) for s in seeds})
        rows.append(row)
    columns = keys + ["n", "mean", "std", low_name, high_name]
    return pd.DataFrame(rows, columns=columns + [f"seed_{s}" for s in seeds])


def aggregate_runs(run_dirs: Sequence[str | os.PathLike], confidence: float = 0.95
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the metrics of several run folders (shards of one sweep, runs made anywhere) and
    aggregate them per configuration: returns ``(metrics, table)``, ``metrics`` with a ``run``
    column naming the folder each row came from.

    Raises ValueError naming both folders when two of them hold a value for the same
    (configuration, seed, notebook, metric), and FileNotFoundError for a missing folder.
    """
    import pandas as pd

    if not run_dirs:
        raise ValueError("run folders: give at least one")
    resolved = [Path(d).expanduser().resolve() for d in run_dirs]
    for i, folder in enumerate(resolved):
        if folder in resolved[:i]:
            raise ValueError(f"run folders: {run_dirs[i]} is listed twice")
    frames = []
    for run_dir in run_dirs:
        frame = load_metrics(run_dir)
        frame.insert(0, "run", str(run_dir))
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True)
    merged["seed"] = merged["seed"].astype("Int64")
    key = ["model", "params", "seed", "notebook", "metric"]
    clash = merged[merged.astype({"model": str}).duplicated(key, keep=False)]
    if not clash.empty:
        first = clash.iloc[0]
        same = clash[(clash["notebook"] == first["notebook"]) & (clash["metric"] == first["metric"])
                     & (clash["seed"] == first["seed"]) & (clash["params"] == first["params"])]
        where = list(dict.fromkeys(same["run"]))
        raise ValueError(f"{' and '.join(where)} both hold seed {first['seed']} of notebook "
                         f"{first['notebook']!r} (model {first['model']}, params "
                         f"{first['params']}): merge runs of disjoint configurations or seeds")
    return merged, aggregate(merged.drop(columns="run"), confidence)



def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def headline_sentences(notebook: str, values: Mapping[str, float],
                       spread: Mapping[str, tuple[float, float]] | None = None) -> list[str]:
    """The notebook's HEADLINES sentences whose metrics are all present and finite, filled from
    ``values``; ``spread`` (metric -> (min, max) across seeds) adds the seed range."""
    spread = spread or {}
    out: list[str] = []
    for entry in HEADLINES.get(notebook, ("", ()))[1]:
        if callable(entry):  # a sentence whose wording depends on the values
            sentence = entry(values)
            if sentence:
                out.append(sentence)
            continue
        for template in (entry,) if isinstance(entry, str) else entry:
            names = _fields(template)
            if all(name in values and math.isfinite(values[name]) for name in names):
                break
        else:
            continue
        text = template.format(**{name: values[name] for name in names})
        ranges = [f"{name} {spread[name][0]:.4g}..{spread[name][1]:.4g}" for name in dict.fromkeys(names)
                  if name in spread and spread[name][0] != spread[name][1]]
        out.append(text + (f" (across seeds: {'; '.join(ranges)})" if ranges else ""))
    return out


_sentences = headline_sentences  # the old private name, imported by interp_lib.findings


def results_page(run_dirs: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """The markdown results page of one run folder, or of several merged (shards of one sweep,
    or notebooks of one series run at different times; see ``interp-lib aggregate``)."""
    roots = [Path(run_dirs)] if isinstance(run_dirs, (str, os.PathLike)) else [Path(d) for d in run_dirs]
    if len(roots) == 1:
        metrics = load_metrics(roots[0])
    else:
        metrics = aggregate_runs(roots)[0].drop(columns="run")
    lines = ["# Results", ""]
    for root in roots:
        lines += _run_header(root)
    if metrics.empty:
        return "\n".join(lines + ["No metrics were recorded.", ""])
    table = aggregate(metrics)
    for (model, params), config in table.groupby(["model", "params"], sort=False):
        seeds = sorted(metrics.loc[(metrics["model"].astype(object).fillna("n/a") == model)
                                   & (metrics["params"] == params), "seed"].dropna().unique().tolist())
        heading = f"## Model `{model}`" + (f", parameters {params}" if params not in ("{}", None) else "")
        lines += [heading, "", f"Seeds: {', '.join(map(str, seeds)) or 'n/a'} "
                  f"(numbers are means over the seeds).", ""]
        for notebook, rows in config.groupby("notebook", sort=False):
            values = dict(zip(rows["metric"], rows["mean"].astype(float)))
            seed_columns = [c for c in rows.columns if c.startswith("seed_")]
            spread = {}
            for _, row in rows.iterrows():
                vals = [float(row[c]) for c in seed_columns if not _missing(row[c])]
                if len(vals) > 1:
                    spread[row["metric"]] = (min(vals), max(vals))
            title = HEADLINES.get(notebook, (notebook, ()))[0]
            lines += [f"### {title} ({notebook})", ""]
            lines += [f"- {s}" for s in headline_sentences(notebook, values, spread)] or [
                "- (no headline sentence for these metrics; see the table)"]
            lines += ["", "<details><summary>All metrics</summary>", "",
                      markdown_table(rows[["metric", "n", "mean", "std"]].reset_index(drop=True)),
                      "</details>", ""]
        by_notebook = {nb: dict(zip(rows["metric"], rows["mean"].astype(float)))
                       for nb, rows in config.groupby("notebook", sort=False)}
        reconciled = reconcile(by_notebook)
        if reconciled:
            lines += ["### Two notebooks, one quantity", ""] + [f"- {s}" for s in reconciled] + [""]
    return "\n".join(lines)


def _run_header(root: Path) -> list[str]:
    """Lines on how a run folder was made: command, start, status, versions, failures."""
    run = read_run_manifest(root)
    if run is None:
        return [f"Metrics read from `{root.name}`.", ""]
    command = " ".join(str(a) for a in run.get("argv") or [])
    lines = [f"Generated from the run folder `{root.name}`" + (f" (`{command}`)" if command else "")
             + f", started {run.get('started', '?')}, status {run.get('status', '?')}.", ""]
    env = run.get("environment") or {}
    packages = env.get("packages") if isinstance(env, dict) else None
    if isinstance(packages, dict) and packages:
        shown = ", ".join(f"{k} {v}" for k, v in packages.items()
                          if k in ("torch", "transformers", "transformer-lens", "numpy"))
        lines += [f"Versions: {shown}.", ""]
    cost = _cost_line(run.get("runs") or [])
    if cost:
        lines += [cost, ""]
    failed = [r for r in run.get("runs") or [] if isinstance(r, dict) and r.get("status") not in ("ok", None)]
    for record in failed:
        error = record.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        lines.append(f"- **{record.get('notebook')} (seed {record.get('seed')}) did not finish**: "
                     f"{message or record.get('status')}")
    return lines + ([""] if failed else [])


def _cost_line(runs: Sequence[Any]) -> str:
    """One line with each finished notebook's wall time and peak memory (from run.json), and
    the total time; '' when no notebook finished."""
    done = [r for r in runs if isinstance(r, dict) and isinstance(r.get("seconds"), (int, float))]
    if not done:
        return ""
    several_seeds = len({r.get("seed") for r in done}) > 1
    parts = []
    for r in done:
        part = f"{r.get('notebook')}" + (f" (seed {r.get('seed')})" if several_seeds else "")
        part += f" {r['seconds']:.0f} s"
        if isinstance(r.get("peak_rss_mib"), (int, float)):
            part += f", {r['peak_rss_mib']:.0f} MiB"
        parts.append(part)
    total = sum(r["seconds"] for r in done)
    return (f"Time and peak memory (resident, the notebook's kernel) per notebook: {'; '.join(parts)}. "
            f"Total {total / 60:.1f} min.")


def _missing(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def write_results_page(run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
                       path: str | os.PathLike | None = None) -> Path:
    """Write :func:`results_page` to ``path`` (default ``results.md`` in the first run folder)
    atomically."""
    first = run_dirs if isinstance(run_dirs, (str, os.PathLike)) else run_dirs[0]
    target = Path(path) if path is not None else Path(first) / "results.md"
    text = results_page(run_dirs)
    atomic_write_text(target, text)  # makes the folder too
    return target
