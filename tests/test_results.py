"""The results page: sentences filled from recorded metrics (planted values), nothing typed."""

from __future__ import annotations

import interp_lib as il
from interp_lib import results as R


def _record(out, seed, notebook, metrics, model="toy-lm"):
    il.runner.record_metrics(metrics, out / f"seed-{seed}", notebook, seed=seed, model=model)


def test_sentences_use_the_seed_mean_and_show_the_range(tmp_path):
    for seed, (before, after) in enumerate([(0.040, 0.020), (0.060, 0.030)]):
        _record(tmp_path, seed, "01_calibration", {
            "ece_before": before, "ece_after": after, "temperature": 1.1, "nll_before": 3.8,
            "nll_after": 3.7, "accuracy": 0.34})
    page = R.results_page(tmp_path)
    assert "## Model `toy-lm`" in page and "Seeds: 0, 1" in page
    assert "Next-token ECE 0.0500 before and 0.0250 after temperature scaling" in page
    assert "ece_before 0.04..0.06" in page and "ece_after 0.02..0.03" in page
    assert "T = 1.100" in page and "top-1 accuracy 34.0%" in page
    # the cloze sentence needs metrics nobody recorded: left out, not filled with blanks
    assert "Cloze" not in page
    # every recorded metric is in the full table
    for name in ("ece_before", "ece_after", "temperature", "nll_before", "nll_after", "accuracy"):
        assert f"| {name} |" in page


def test_the_fuller_variant_wins_and_the_plain_one_is_the_fallback(tmp_path):
    base = {"n_induction_heads": 4, "induction_threshold": 0.31, "induction_top_score": 0.9}
    _record(tmp_path / "a", 0, "05_induction_and_qk", {**base, "ablation_fraction_removed": 0.88,
                                                      "icl_drop_clean": 11.0, "icl_drop_ablated": 1.33})
    _record(tmp_path / "b", 0, "05_induction_and_qk", base)
    full, plain = R.results_page(tmp_path / "a"), R.results_page(tmp_path / "b")
    assert "removes 88% of the in-context loss drop (11.00 -> 1.33 nats)" in full
    assert full.count("4 induction heads above") == 1
    assert "4 induction heads above the dynamic threshold 0.310 (top score 0.900)." in plain
    assert "removes" not in plain


def test_a_missing_metric_drops_its_sentence_and_unknown_notebooks_get_the_table(tmp_path):
    _record(tmp_path, 0, "00_tour", {"top1_accuracy": 0.5})
    _record(tmp_path, 0, "99_extra", {"anything": 1.5})
    page = R.results_page(tmp_path)
    assert "Held-out loss" not in page
    assert "### 99_extra (99_extra)" in page and "| anything |" in page
    path = R.write_results_page(tmp_path)
    assert path == tmp_path / "results.md" and path.read_text() == page


def test_interp_lib_results_merges_folders_and_the_runner_writes_the_page(tmp_path):
    import subprocess
    import sys

    _record(tmp_path / "a", 0, "00_tour", {"heldout_loss": 3.5, "top1_accuracy": 0.25})
    _record(tmp_path / "b", 0, "05_induction_and_qk", {"n_induction_heads": 18, "induction_threshold": 0.2,
                                                      "induction_top_score": 0.85})
    page = tmp_path / "page.md"
    done = subprocess.run([sys.executable, "-m", "interp_lib.cli", "results", str(tmp_path / "a"),
                           str(tmp_path / "b"), "--to", str(page)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "Held-out loss 3.500 nats per token" in text and "18 induction heads above" in text
    missing = subprocess.run([sys.executable, "-m", "interp_lib.cli", "results", str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr


def test_page_says_what_the_numbers_say_smollm2_metrics(tmp_path):
    """Issue 26, with the metrics results/smollm2-135m.md recorded: every OOD score with the ones
    below 0.5 said as ranking the wrong way, the lens that never reaches top-1, 04's shrunken work
    and the two pairs of notebooks that measure one quantity differently, reconciled."""
    _record(tmp_path, 0, "01_calibration", {"ece_before": 0.0404, "ece_after": 0.02037, "temperature": 1.083,
                                            "nll_before": 3.816, "nll_after": 3.798, "accuracy": 0.34})
    _record(tmp_path, 0, "02_selective_prediction", {"ood_auroc_msp": 0.1807, "ood_auroc_energy": 0.36352,
                                                     "ood_auroc_log_prob": 0.2493, "ood_auroc_mahalanobis": 0.968})
    _record(tmp_path, 0, "03_logit_lens_and_dla", {"logit_diff": 13.06, "lens_layers": 30, "answer_preferred": 1.0,
                                                   "lens_final_target_prob": 0.09662, "dla_sum_error": 9.5e-6,
                                                   "lens_before_last_target_prob": 0.0001012})
    _record(tmp_path, 0, "04_activation_patching", {"clean_logit_diff": 8.32, "n_prompts": 4, "prompt_tokens": 17,
                                                    "n_prompts_toy_setting": 16, "patching_agreement_r": 0.5765,
                                                    "patching_agreement_spearman": 0.8832,
                                                    "patching_sign_agreement": 0.9381})
    _record(tmp_path, 0, "09_claims", {"claim1_measured": -0.07438, "claim1_ci_low": -0.5449,
                                       "claim1_ci_high": 0.2997})
    page = R.results_page(tmp_path)
    assert ("max-probability 0.181, energy 0.364, log-probability 0.249, Mahalanobis 0.968; best Mahalanobis "
            "(0.968); max-probability (0.181), energy (0.364), log-probability (0.249) rank the wrong way") in page
    assert "the answer never becomes the lens' top prediction at any of the 30 layers" in page
    assert "04 ran 4 prompts of 17 tokens, fewer than the 16 of its toy setting" in page
    assert "Attribution patching agrees" not in page and "Pearson r 0.58" in page
    assert "ECE reduction by temperature scaling: 01 measures 49.6% (0.0404 -> 0.0204)" in page
    assert "claim 1 in 09 measures -7.4% [-54.5%, 30.0%]" in page and "01's cut lies outside claim 1's interval" in page
    assert "03 measures 13.06 (prompt count not recorded by this run), 04 8.32 on its clean prompts (4 prompts of " \
           "17 tokens)" in page
    # a lens that does reach top-1 keeps the fuller sentence; a cut inside claim 1's interval is said to agree
    _record(tmp_path / "b", 0, "03_logit_lens_and_dla", {"lens_answer_layer": 2, "lens_layers": 2,
                                                         "lens_final_target_prob": 0.9,
                                                         "lens_before_last_target_prob": 0.1})
    _record(tmp_path / "b", 0, "01_calibration", {"ece_before": 0.04, "ece_after": 0.03})
    _record(tmp_path / "b", 0, "09_claims", {"claim1_measured": 0.2, "claim1_ci_low": 0.1, "claim1_ci_high": 0.4})
    other = R.results_page(tmp_path / "b")
    assert "first becomes the lens' top prediction after layer 2 of 2" in other and "never" not in other
    _record(tmp_path / "c", 0, "03_logit_lens_and_dla", {"logit_diff": 12.59, "n_prompts": 16, "prompt_tokens": 41})
    _record(tmp_path / "c", 0, "04_activation_patching", {"clean_logit_diff": 12.589, "n_prompts": 16,
                                                          "prompt_tokens": 41})
    assert "03 and 04 both measure 12.59 (16 prompts of 41 tokens)." in R.results_page(tmp_path / "c")
    assert "01's cut lies inside claim 1's interval" in other
