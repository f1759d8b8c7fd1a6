"""interp_lib.explain.events (window sampling, streaming event collection) and
interp_lib.explain.heuristic (attention statistics and the no-LLM explainer).

Event collection is checked against a brute-force reference: the whole toy-2l activation cache
of a few windows, sorted exactly. toy-2l's heads are measured facts (data/PROVENANCE.md):
L0H2 previous-token, L1H0-L1H2 induction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interp_lib.explain import events as E
from interp_lib.explain import heuristic as HE
from interp_lib.explain.records import Event, Explanation

N_WINDOWS, WINDOW_LEN = 6, 24


@pytest.fixture(scope="module")
def windows(toy_2l):
    return E.sample_windows(toy_2l, "bundled", N_WINDOWS, WINDOW_LEN, seed=0)


@pytest.fixture(scope="module")
def cache(toy_2l, windows):
    with torch.inference_mode():
        _, cache = toy_2l.run_with_cache(windows)
    return {name: tensor.clone() for name, tensor in cache.items() if name.endswith(("hook_z", "hook_pattern"))}


def reference_salience(model, cache, layer, head, salience, windows=None):
    z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]                      # [window, pos, d_head]
    if salience == "next_token_effect":
        # the head's write through the whole unembedding, centred over the vocabulary, read at
        # the token that comes next; 0 where there is none
        logits = (z @ model.W_O[layer, head].detach()) @ model.W_U.detach()   # [window, pos, vocab]
        logits = logits - logits.mean(-1, keepdim=True)
        following = torch.cat([windows[:, 1:], windows[:, :1]], 1)
        effect = logits.gather(-1, following[..., None])[..., 0]
        effect[:, -1] = 0.0
        return effect
    if salience == "resid_write_norm":
        z = z @ model.W_O[layer, head].detach()                                # the write itself
    return z.norm(dim=-1)                                                      # [window, pos]


def reference_top(values, top_k, skip_bos=True):
    """Exact top-k over every (window, pos), ties to the earlier position."""
    n_pos = values.shape[1]
    values = values[:, 1:] if skip_bos else values
    q0 = 1 if skip_bos else 0
    flat = values.reshape(-1)
    order = torch.sort(-flat, stable=True).indices[:top_k]
    width = n_pos - q0
    return [(int(i) // width, int(i) % width + q0) for i in order], flat[order]


@pytest.fixture(scope="module")
def full_run(toy_2l, windows):
    return E.collect_events(toy_2l, windows, top_k=7, n_random=5, n_quantile=6, batch_size=4, progress=False)


# ------------------------------------------------------------------------ sample_windows

def test_sample_windows_are_bos_prefixed_deterministic_and_distinct(toy_2l):
    first, info = E.sample_windows(toy_2l, "bundled", 40, 32, seed=3, return_info=True)
    again = E.sample_windows(toy_2l, "bundled", 40, 32, seed=3)
    other = E.sample_windows(toy_2l, "bundled", 40, 32, seed=4)
    assert first.shape == (40, 32) and first.dtype == torch.long
    assert (first[:, 0] == toy_2l.tokenizer.bos_token_id).all()
    assert (first[:, 1:] != toy_2l.tokenizer.bos_token_id).any()
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(row) for row in first.tolist()}) == 40
    assert info["n_windows"] == 40 and info["n_available"] >= 40 and info["n_duplicates"] >= 0
    code = E.sample_windows(toy_2l, "code", 8, 32)
    assert code.shape == (8, 32) and not torch.equal(code, first[:8])


def test_sample_windows_counts_and_drops_duplicates(toy_2l, tmp_path):
    path = tmp_path / "repeated.txt"
    path.write_text("the same sentence again and again. " * 400, encoding="utf-8")
    kept, info = E.sample_windows(toy_2l, str(path), 1, 8, return_info=True)
    assert info["n_duplicates"] > 0 and info["n_available"] + info["n_duplicates"] > info["n_available"]
    assert len({tuple(r) for r in kept.tolist()}) == len(kept)
    with pytest.raises(ValueError, match=rf"only {info['n_available']} distinct windows"):
        E.sample_windows(toy_2l, str(path), info["n_available"] + 1, 8)
    everything = E.sample_windows(toy_2l, str(path), info["n_available"] + 1, 8, dedupe=False)
    assert len(everything) == info["n_available"] + 1


def test_sample_windows_bad_input(toy_2l):
    with pytest.raises(ValueError, match=r"n_windows=100000: bundled/validation has only \d+ distinct windows"):
        E.sample_windows(toy_2l, "bundled", 100_000, 64)
    with pytest.raises(ValueError, match="window_len=1000.*context 256"):
        E.sample_windows(toy_2l, "bundled", 4, 1000)
    with pytest.raises(ValueError, match="dataset='nope'"):
        E.sample_windows(toy_2l, "nope", 4, 16)
    with pytest.raises(ValueError, match="n_windows=0"):
        E.sample_windows(toy_2l, "bundled", 0, 16)


# ------------------------------------------------------------------------ brute-force reference

@pytest.mark.parametrize("salience", E.SALIENCE)
def test_top_events_match_brute_force_reference(toy_2l, windows, cache, salience):
    top_k, n_att = 9, 4
    found = E.collect_events(toy_2l, windows, top_k=top_k, n_random=0, n_quantile=0, salience=salience,
                             n_attended=n_att, batch_size=4, progress=False)
    assert found.salience == salience and found.heads() == [(l, h) for l in range(2) for h in range(4)]
    for layer, head in found.heads():
        values = reference_salience(toy_2l, cache, layer, head, salience, windows)
        positions, activations = reference_top(values, top_k)
        events = found.top[(layer, head)]
        assert [(e.window, e.position) for e in events] == positions
        np.testing.assert_allclose([e.activation for e in events], activations.numpy(), rtol=1e-5, atol=1e-5)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, head]
        for event in events:
            assert event.kind == "top" and (event.layer, event.head) == (layer, head)
            row = pattern[event.window, event.position, : event.position + 1]
            weights, sources = row.topk(min(n_att, len(row)))
            assert [w for _, w in event.attended] == pytest.approx(weights.tolist(), abs=1e-6)
            for source, weight in event.attended:  # the recorded weight is the cached weight there
                assert source <= event.position
                assert weight == pytest.approx(float(row[source]), abs=1e-6)
            window = windows[event.window, : event.position + 1].tolist()
            assert event.tokens == [toy_2l.tokenizer.decode([t]) for t in window]
            assert len(event.tokens) == event.position + 1


def test_activation_stats_random_and_quantile_events_match_the_cache(toy_2l, windows, cache, full_run):
    for layer, head in full_run.heads():
        values = reference_salience(toy_2l, cache, layer, head, "z_norm")[:, 1:]
        stats = full_run.activation_stats[(layer, head)]
        assert stats["n"] == values.numel()
        assert stats["mean"] == pytest.approx(float(values.mean()), rel=1e-5)
        assert stats["std"] == pytest.approx(float(values.std(unbiased=False)), rel=1e-4)
        assert stats["max"] == pytest.approx(float(values.max()), rel=1e-6)
        assert stats["min"] == pytest.approx(float(values.min()), rel=1e-6)
        full = reference_salience(toy_2l, cache, layer, head, "z_norm")
        randoms = full_run.random[(layer, head)]
        assert len(randoms) == 5 and len({(e.window, e.position) for e in randoms}) == 5
        for event in randoms + full_run.quantile[(layer, head)]:
            assert event.position >= 1
            assert event.activation == pytest.approx(float(full[event.window, event.position]), rel=1e-5)
        # the reservoir (256) holds every position but the random ones (the two samples are
        # disjoint): quantiles run from the minimum to the maximum of the rest
        quantile = full_run.quantile[(layer, head)]
        assert not {(e.window, e.position) for e in quantile} & {(e.window, e.position) for e in randoms}
        rest = full.clone()
        rest[:, 0] = float("nan")
        for event in randoms:
            rest[event.window, event.position] = float("nan")
        rest = rest[~rest.isnan()]
        activations = [e.activation for e in quantile]
        assert len(activations) == 6 and activations == sorted(activations)
        assert activations[0] == pytest.approx(float(rest.min()), rel=1e-5)
        assert activations[-1] == pytest.approx(float(rest.max()), rel=1e-5)


def test_quantile_events_span_low_to_high_with_a_small_reservoir(toy_2l, windows, cache):
    found = E.collect_events(toy_2l, windows, top_k=1, n_random=0, n_quantile=5, quantile_reservoir=30,
                             progress=False)
    for layer, head in found.heads():
        values = reference_salience(toy_2l, cache, layer, head, "z_norm")[:, 1:].flatten().numpy()
        quantile = [e.activation for e in found.quantile[(layer, head)]]
        assert len(quantile) == 5 and quantile == sorted(quantile)
        assert quantile[0] <= np.quantile(values, 0.2) and quantile[-1] >= np.quantile(values, 0.8)


def test_random_events_are_a_deterministic_function_of_the_seed(toy_2l, windows, full_run):
    def sample(seed):
        found = E.collect_events(toy_2l, windows, top_k=1, n_random=5, n_quantile=6, seed=seed, progress=False)
        return {key: [(e.window, e.position) for e in found.events(*key, kinds=("random", "quantile"))]
                for key in found.heads()}

    same = sample(0)
    assert same == {key: [(e.window, e.position) for e in full_run.events(*key, kinds=("random", "quantile"))]
                    for key in full_run.heads()}
    assert sample(1) != same
    # different heads draw different samples
    assert len({tuple(v[:5]) for v in same.values()}) > 1


def test_results_do_not_depend_on_batch_size(toy_2l, windows, full_run):
    for batch_size in (1, 5, 64):
        other = E.collect_events(toy_2l, windows, top_k=7, n_random=5, n_quantile=6, batch_size=batch_size,
                                 progress=False)
        for key in full_run.heads():
            for kind in E.EVENT_KINDS:
                ours, theirs = getattr(full_run, kind)[key], getattr(other, kind)[key]
                assert [(e.window, e.position) for e in ours] == [(e.window, e.position) for e in theirs]
                np.testing.assert_allclose([e.activation for e in ours], [e.activation for e in theirs], rtol=1e-5)


def test_skip_bos_and_short_windows(toy_2l, windows, cache):
    with_bos = E.collect_events(toy_2l, windows, heads=[(1, 1)], top_k=10, n_attended=50, skip_bos=False,
                                progress=False)
    values = reference_salience(toy_2l, cache, 1, 1, "z_norm")
    positions, _ = reference_top(values, 10, skip_bos=False)
    assert [(e.window, e.position) for e in with_bos.top[(1, 1)]] == positions
    assert with_bos.activation_stats[(1, 1)]["n"] == values.numel()
    for event in with_bos.top[(1, 1)]:  # n_attended > the keys there: every causal key, no future one
        assert sorted(p for p, _ in event.attended) == list(range(event.position + 1))
    without = E.collect_events(toy_2l, windows, heads=[(1, 1)], top_k=200, progress=False)
    assert all(e.position >= 1 for e in without.events(1, 1))
    assert len(without.top[(1, 1)]) == N_WINDOWS * (WINDOW_LEN - 1)  # fewer positions than top_k


def test_head_subsets_and_labels(toy_2l, windows, full_run):
    subset = E.collect_events(toy_2l, windows, heads=["L1H0", "l0h2"], top_k=7, n_random=5, n_quantile=6,
                              batch_size=4, progress=False)
    assert subset.heads() == [(0, 2), (1, 0)]
    for key in subset.heads():
        assert [e.to_dict() for e in subset.events(*key)] == [e.to_dict() for e in full_run.events(*key)]
    assert E.parse_heads([(1, 3), (0, 0), (1, 3)], 2, 4) == [(0, 0), (1, 3)]
    assert E.parse_heads("L0H1, L1H2", 2, 4) == [(0, 1), (1, 2)]
    assert len(E.parse_heads("all", 2, 4)) == 8
    with pytest.raises(ValueError, match="head L0H1 has no events"):
        subset.events(0, 1)
    with pytest.raises(ValueError, match="kinds.*'top', 'random', 'quantile'"):
        subset.events(0, 2, kinds=("best",))


def test_bad_input_errors(toy_2l, windows):
    collect = lambda **kw: E.collect_events(toy_2l, kw.pop("w", windows), progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="top_k=0: expected an integer >= 1"):
        collect(top_k=0)
    with pytest.raises(ValueError, match="salience='loud'.*z_norm, resid_write_norm"):
        collect(salience="loud")
    with pytest.raises(ValueError, match=r"L2H0.*layers 0\.\.1 and heads 0\.\.3"):
        collect(heads=[(2, 0)])
    with pytest.raises(ValueError, match=r"L1H9.*out of range"):
        collect(heads=["L1H9"])
    with pytest.raises(ValueError, match="head label 'H1L0'"):
        collect(heads=["H1L0"])
    with pytest.raises(ValueError, match=r"heads=\[\]"):
        collect(heads=[])
    with pytest.raises(ValueError, match=r"windows has shape \(0, 24\)"):
        collect(w=windows[:0])
    with pytest.raises(ValueError, match=r"windows holds token id 512: expected ids in \[0, 511\]"):
        collect(w=torch.tensor([[0, 1, 512]]))
    with pytest.raises(ValueError, match="windows has dtype torch.float32"):
        collect(w=windows.float())
    with pytest.raises(ValueError, match="batch_size=0"):
        collect(batch_size=0)
    with pytest.raises(ValueError, match="n_attended=0"):
        collect(n_attended=0)


def test_event_set_json_round_trip(full_run):
    text = json.dumps(full_run.to_dict(), allow_nan=False)
    back = E.EventSet.from_dict(json.loads(text))
    assert back == full_run
    assert isinstance(back.top[(1, 0)][0], Event) and isinstance(back.top[(1, 0)][0].attended[0], tuple)
    assert back.config["top_k"] == 7 and back.events(1, 0) == full_run.events(1, 0)
    with pytest.raises(ValueError, match="lacks"):
        E.EventSet.from_dict({"top": {}})


def test_top_events_of_known_heads_show_their_behaviour(full_run):
    # the previous-token head's strongest events attend mostly to the token just before
    events = full_run.top[(0, 2)]
    assert np.mean([e.attended[0][0] == e.position - 1 for e in events]) >= 0.7


# ------------------------------------------------------------------------ heuristic explainer

@pytest.fixture(scope="module")
def stats(toy_2l):
    text = E.sample_windows(toy_2l, "bundled", 24, 48, seed=1)
    return HE.head_statistics(toy_2l, text, progress=False), text


def test_toy_2l_heads_get_their_measured_families(stats):
    frame, _ = stats
    family = {(r.layer, r.head): r.family for r in frame.itertuples()}
    assert family[(0, 2)] == "previous-token"
    assert {key for key, name in family.items() if name == "induction"} == {(1, 0), (1, 1), (1, 2)}
    assert list(frame.columns[:5]) == ["layer", "head", "label", "family", "secondary"]
    assert frame["label"].tolist() == [f"L{l}H{h}" for l in range(2) for h in range(4)]


def test_statistics_are_fractions_and_match_the_patterns(toy_2l, stats):
    frame, text = stats
    for column in ("bos", "self", "prev", "recent", "punctuation", "same_token", "entropy", "induction",
                   "repeat_duplicate", "punctuation_base", "same_token_base"):
        assert frame[column].between(0, 1).all(), column
    assert (frame["mean_distance"] >= 0).all() and (frame["mean_distance"] <= 47).all()
    with torch.inference_mode():
        _, cache = toy_2l.run_with_cache(text)
    n = text.shape[1]
    q = torch.arange(2, n)
    for row in frame.itertuples():
        pattern = cache[f"blocks.{row.layer}.attn.hook_pattern"][:, row.head]
        assert row.bos == pytest.approx(float(pattern[:, 1:, 0].mean()), abs=1e-5)
        assert row.prev == pytest.approx(float(pattern[:, q, q - 1].mean()), abs=1e-5)
        assert row.self == pytest.approx(float(pattern[:, torch.arange(1, n), torch.arange(1, n)].mean()), abs=1e-5)
        # attention on disjoint key sets from the same queries never exceeds 1
        assert float(pattern[:, q, 0].mean() + pattern[:, q, q].mean() + pattern[:, q, q - 1].mean()) <= 1 + 1e-5


def base_row(**values):
    row = {name: 0.02 for name in HE.STAT_COLUMNS}
    row.update(punctuation_base=0.1, same_token_base=0.04, mean_distance=8.0, entropy=0.7, bos=0.1)
    row.update(values)
    return row


@pytest.mark.parametrize("family, values, start, percent", [
    ("previous-token", {"prev": 0.62}, "Previous-token head: from each token it attends to the token immediately "
                                       "before it (62% of its attention).", "62%"),
    ("induction", {"induction": 0.8}, "Induction head:", "80%"),
    ("duplicate-token", {"same_token": 0.5}, "Duplicate-token head:", "50%"),
    ("duplicate-token", {"repeat_duplicate": 0.7}, "Duplicate-token head:", "70%"),
    ("self", {"self": 0.9}, "Self-attending head:", "90%"),
    ("punctuation/delimiter", {"punctuation": 0.55}, "Delimiter head:", "55%"),
    ("recent-window", {"recent": 0.5}, "Local-window head:", "50%"),
    ("bos/resting", {"bos": 0.85}, "Resting head:", "85%"),
    ("diffuse/mixed", {}, "Diffuse head:", "10%"),
])
def test_heuristic_explanation_rules(family, values, start, percent):
    row = base_row(**values)
    explanation = HE.heuristic_explanation(row)
    assert HE.heuristic_family(row) == (family, [])
    assert isinstance(explanation, Explanation) and explanation.source == "heuristic"
    assert explanation.text.startswith(start) and percent in explanation.text
    assert explanation.attends_from and explanation.attends_to
    if family != "diffuse/mixed":
        assert len(explanation.positive_examples) >= 2
    assert explanation == HE.heuristic_explanation(row)  # deterministic


def test_heuristic_rules_need_more_than_the_base_rate_and_report_secondary_patterns():
    # delimiter mass at the base rate of code is not a delimiter head
    assert HE.heuristic_family(base_row(punctuation=0.4, punctuation_base=0.3)) == ("diffuse/mixed", [])
    assert HE.heuristic_family(base_row(same_token=0.35, same_token_base=0.3)) == ("diffuse/mixed", [])
    row = base_row(induction=0.78, self=0.45)
    assert HE.heuristic_family(row) == ("induction", ["self"])
    assert "It also shows a self-attention (45%) pattern." in HE.heuristic_explanation(row).text
    assert set(HE.HEURISTIC_FAMILIES) == {"previous-token", "bos/resting", "induction", "duplicate-token", "self",
                                          "punctuation/delimiter", "recent-window", "diffuse/mixed"}
    with pytest.raises(ValueError, match="row lacks 'induction'"):
        HE.heuristic_explanation({k: v for k, v in base_row().items() if k != "induction"})
    with pytest.raises(ValueError, match=r"row\['prev'\]='high'"):
        HE.heuristic_explanation(base_row(prev="high"))


def test_heuristic_explanations_cover_every_head(toy_2l, stats):
    _, text = stats
    explanations, frame = HE.heuristic_explanations(toy_2l, text[:8], progress=False)
    assert set(explanations) == {(l, h) for l in range(2) for h in range(4)} and len(frame) == 8
    assert explanations[(0, 2)].text.startswith("Previous-token head")
    assert all(e.source == "heuristic" for e in explanations.values())
    assert HE.is_delimiter("\n") and HE.is_delimiter(" (") and not HE.is_delimiter(" def") and not HE.is_delimiter(" ")


# ------------------------------------------------------------------------ salience that reflects function


def _induction_copies(events, windows) -> tuple[int, int]:
    """(events whose most-attended token follows an earlier copy of the query token, events
    whose most-attended token is BOS)."""
    copies = bos = 0
    for event in events:
        ids = windows[event.window].tolist()
        source = max(event.attended, key=lambda pw: pw[1])[0]
        bos += source == 0
        copies += source >= 1 and ids[source - 1] == ids[event.position]
    return copies, bos


def test_next_token_effect_shows_induction_heads_copying_where_z_norm_shows_bos(toy_2l):
    """On toy-2l's bundled text, the induction heads' top events by ||z|| rest on BOS (L1H1) or
    show no copying (L1H0); by their effect on the next token's logit they are repeated-token
    copies: the head attends to the token after an earlier copy of the current token."""
    windows = E.sample_windows(toy_2l, "bundled", 64, 64, seed=0)
    induction = [(1, 0), (1, 1), (1, 2)]
    runs = {salience: E.collect_events(toy_2l, windows, heads=induction, top_k=10, n_random=0, n_quantile=0,
                                       salience=salience, progress=False)
            for salience in ("z_norm", "next_token_effect")}
    by_norm = {head: _induction_copies(runs["z_norm"].top[head], windows) for head in induction}
    by_effect = {head: _induction_copies(runs["next_token_effect"].top[head], windows) for head in induction}
    assert by_norm[(1, 1)][1] >= 8 and by_norm[(1, 1)][0] <= 2, by_norm      # measured: 10 on BOS, 0 copies
    assert by_norm[(1, 0)][0] <= 2, by_norm                                   # measured: 0 copies
    assert all(copies >= 8 and bos == 0 for copies, bos in by_effect.values()), by_effect  # measured: 10 each
    recorded = runs["next_token_effect"]
    assert recorded.salience == "next_token_effect"
    assert recorded.config["salience_description"] == E.SALIENCE_DESCRIPTIONS["next_token_effect"]
    back = E.EventSet.from_dict(json.loads(json.dumps(recorded.to_dict())))
    assert back.salience == "next_token_effect" and back.config["salience_description"].startswith("(z W_O)")


def test_head_salience_matches_the_events_and_separates_induction_examples(toy_2l, windows, cache):
    from interp_lib.explain.scoring import cohens_d

    values = E.head_salience(toy_2l, windows, ["L1H1", "L0H2"], "next_token_effect")
    for (layer, head), value in values.items():
        expected = reference_salience(toy_2l, cache, layer, head, "next_token_effect", windows)
        np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(E.head_salience(toy_2l, windows, [(1, 1)], "z_norm")[(1, 1)].numpy(),
                               reference_salience(toy_2l, cache, 1, 1, "z_norm").numpy(), rtol=1e-5)
    # the heuristic induction explanation's own examples (repeated vs non-repeated text): by ||z||
    # the verified induction heads L1H0 / L1H1 look *less* active on repeats (Cohen's d -0.80 /
    # -2.82, the contradiction of the issue); by next-token effect all three are clearly positive
    _, _, _, positive, negative = HE._TEMPLATES["induction"]

    def mean_salience(text, head, salience):
        return float(E.head_salience(toy_2l, toy_2l.to_tokens(text), [head], salience)[head][0, 1:].mean())

    for head in [(1, 0), (1, 1), (1, 2)]:
        d = {s: cohens_d([mean_salience(t, head, s) for t in positive], [mean_salience(t, head, s) for t in negative])[0]
             for s in ("z_norm", "next_token_effect")}
        assert d["next_token_effect"] > 1.0, (head, d)                       # measured 5.19, 3.63, 3.10
        if head != (1, 2):
            assert d["z_norm"] < 0, (head, d)                                 # measured -0.80, -2.82
    with pytest.raises(ValueError, match="salience='bogus'"):
        E.head_salience(toy_2l, windows, "all", "bogus")
