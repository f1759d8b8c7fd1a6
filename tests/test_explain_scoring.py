"""Scorers (contrastive on toy-2l; simulation and detection against a real local
OpenAI-compatible server), held-out splits, and iterative refinement."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re

import numpy as np
import pytest
import torch

from interp_lib.explain.client import LLMClient
from interp_lib.explain.local_server import LocalOpenAIServer, split_tokens
from interp_lib.explain.prompts import DETECT_SYSTEM, REFINE_SYSTEM, SIMULATE_SYSTEM, format_event
from interp_lib.explain.records import Event, Explanation, ScoreResult
from interp_lib.explain.refine import most_wrong_events, refine_explanations, refinement_gain
from interp_lib.explain.scoring import (ContrastiveScorer, DetectionScorer, Scorer, ScoringItem,
                                        SimulationScorer, cohens_d, score_explanations, split_events)

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "violet", "castle", "needle",
         "orbit", "willow", "copper", "harbor", "meadow", "falcon", "garnet", "quartz", "saddle", "timber"]
BOS = "<|endoftext|>"
REPEAT = Explanation("Fires on a repeated token: a word that already appeared earlier in the text.",
                     "a token that occurred before", "the token after its previous occurrence")
PUNCT = Explanation("Fires on punctuation such as commas.", "punctuation", "the previous word")


def make_events(seed: int = 0, n_top: int = 10, n_other: int = 10, layer: int = 1, head: int = 0) -> list[Event]:
    """Top events end at a repeated word (high activation); others at a new word or a comma."""
    rng = random.Random(seed)
    events = []
    for i in range(n_top):
        words = rng.sample(WORDS, 7)
        k = rng.randrange(5)
        tokens = [BOS] + [" " + w for w in words] + [" " + words[k]]
        events.append(Event(layer, head, i, len(tokens) - 1, 5 + 4 * rng.random(), "top", tokens, [(k + 2, 0.8)]))
    for i in range(n_other):
        words = rng.sample(WORDS, 8)
        tokens = [BOS] + [" " + w for w in words] + ([","] if i % 2 else [])
        events.append(Event(layer, head, 100 + i, len(tokens) - 1, 1.5 * rng.random(), "random", tokens, [(0, 0.9)]))
    return events


def _rule(description: str):
    text = description.lower()
    if "repeat" in text:
        return lambda tokens: tokens[-1].strip() in [t.strip() for t in tokens[:-1]]
    if "punctuation" in text:
        return lambda tokens: tokens[-1].strip() in {",", ".", ";"}
    return lambda tokens: False


def _description(user: str) -> str:
    return next(line for line in user.splitlines() if line.startswith("Head description:"))


def _sim_tokens(user: str) -> list[str]:
    lines = user.split("tokens):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split("\t", 1)[1] for line in lines]


def _det_contexts(user: str) -> list[list[str]]:
    contexts = []
    for line in user.split("Texts:\n", 1)[1].split("\n\n", 1)[0].splitlines():
        match = re.fullmatch(r"\d+\. (.*)\[\[(.*)\]\]", line)
        prior = match.group(1).replace("\u2026", "")
        contexts.append([" " + w for w in prior.split()] + [match.group(2)])
    return contexts


def smart_responder(body: dict) -> str:
    """A competent simulator / detector that applies the explanation it reads, and an explainer
    whose revision of a punctuation explanation is the repeat one (and vice versa)."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system == SIMULATE_SYSTEM:
        fires, tokens = _rule(_description(user)), _sim_tokens(user)
        return json.dumps({"activations": [10 if fires(tokens[: k + 1]) else 0 for k in range(len(tokens))]})
    if system == DETECT_SYSTEM:
        fires = _rule(_description(user))
        return json.dumps({"fires": [i for i, c in enumerate(_det_contexts(user), 1) if fires(c)]})
    if system == REFINE_SYSTEM:
        current = json.loads(user.split("Current explanation:\n", 1)[1].split("\n\n", 1)[0])
        revised = REPEAT if "punctuation" in current["explanation"] else PUNCT
        return "Revised:\n" + json.dumps({"explanation": revised.text, "attends_from": revised.attends_from,
                                          "attends_to": revised.attends_to,
                                          "positive_examples": ["a b a"], "negative_examples": ["a b c"]})
    raise AssertionError(f"unexpected system prompt {system[:40]!r}")


def random_responder(body: dict) -> str:
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    rng = random.Random(hashlib.sha256(user.encode()).hexdigest())
    if system == SIMULATE_SYSTEM:
        return json.dumps({"activations": [rng.randint(0, 10) for _ in _sim_tokens(user)]})
    return json.dumps({"fires": [i for i in range(1, len(_det_contexts(user)) + 1) if rng.random() < 0.5]})


@pytest.fixture
def client_for(tmp_path):
    servers = []

    def make(responder, **kwargs):
        server = LocalOpenAIServer(responder=responder, **kwargs).start()
        servers.append(server)
        client = LLMClient(model="test-model", base_url=server.url, api_key="x",
                           cache_dir=tmp_path / f"cache{len(servers)}", progress=False, max_retries=1,
                           backoff_base=0.0)
        return client, server

    yield make
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------------------------
# Splits and the shared signature
# --------------------------------------------------------------------------------------------

def test_split_events_stratified_disjoint_deterministic():
    events = make_events(0, n_top=10, n_other=7)
    shown, held = split_events(events, holdout_fraction=0.5, seed=3)
    assert sorted(map(id, shown + held)) == sorted(map(id, events))
    assert not set(map(id, shown)) & set(map(id, held))
    assert sum(e.kind == "top" for e in held) == 5 and sum(e.kind == "random" for e in held) == 4
    assert [e.window for e in held] == sorted(e.window for e in held)  # input order kept
    again = split_events(events, holdout_fraction=0.5, seed=3)
    assert [e.window for e in again[1]] == [e.window for e in held]
    assert [e.window for e in split_events(events, 0.5, seed=4)[1]] != [e.window for e in held]
    lone = make_events(0, n_top=1, n_other=0)
    assert split_events(lone) == (lone, [])
    for bad in (0, 1, 1.5, "half"):
        with pytest.raises(ValueError, match="holdout_fraction"):
            split_events(events, holdout_fraction=bad)


def test_cohens_d():
    d, failure = cohens_d([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert failure is None and d == pytest.approx(2.0)
    assert cohens_d([1.0], [1.0, 2.0]) == (None, "too few examples (1 positive, 2 negative; need >= 2 each)")
    assert cohens_d([1.0, 1.0], [1.0, 1.0])[1].startswith("zero variance")


# --------------------------------------------------------------------------------------------
# Contrastive on toy-2l
# --------------------------------------------------------------------------------------------

def _induction_texts(seed: int, n: int = 8, length: int = 10):
    from interp_lib.data import load_corpus

    words = sorted(set(re.findall(r"[a-z]{3,9}", load_corpus("validation"))))
    rng = random.Random(seed)
    positive = []
    for _ in range(n):
        segment = " ".join(rng.sample(words, length))
        positive.append(segment + " " + segment)  # a random sequence written twice
    negative = [" ".join(rng.sample(words, 2 * length)) for _ in range(n)]
    return positive, negative


def test_contrastive_scorer_induction_heads_toy_2l(toy_2l):
    torch.set_num_threads(1)
    positive, negative = _induction_texts(seed=1)
    good = Explanation("Induction: attends to the token after the previous copy of the current token.",
                       positive_examples=positive, negative_examples=negative)
    swapped = Explanation("Fires on text without repeats.", positive_examples=negative, negative_examples=positive)
    too_few = Explanation("x", positive_examples=positive[:1], negative_examples=negative)
    scorer = ContrastiveScorer(toy_2l, batch_size=5)
    assert isinstance(scorer, Scorer)
    results = scorer.score_many([ScoringItem(1, 0, good), ScoringItem(1, 0, swapped), ScoringItem(1, 2, good),
                                 ScoringItem(1, 0, too_few)])
    l1h0, l1h0_swapped, l1h2, few = results
    assert l1h0.scorer == "contrastive" and l1h0.n == 16 and l1h0.failure is None
    assert l1h0.score > 0.8, l1h0
    assert l1h2.score > 2.0, l1h2
    assert l1h0_swapped.score == pytest.approx(-l1h0.score)
    assert few.score is None and few.failure.startswith("too few examples (1 positive")
    # batching (and its right padding) does not change the activations
    one_by_one = ContrastiveScorer(toy_2l, batch_size=1).activations(positive[:3] + negative[:2], [(1, 0)] * 5)
    batched = ContrastiveScorer(toy_2l, batch_size=16).activations(positive[:3] + negative[:2], [(1, 0)] * 5)
    assert one_by_one == pytest.approx(batched, rel=1e-4)
    # the default activation is the mean over positions 1 .. n-2 (those with a next token) of the
    # head's direct effect on the next token's logit: z W_O . (W_U[:, next] - mean over the vocab)
    tokens = toy_2l.to_tokens(positive[0])
    _, cache = toy_2l.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"][0, :, 0].float()
    unembed = toy_2l.W_U.float() - toy_2l.W_U.float().mean(-1, keepdim=True)
    written = z @ toy_2l.W_O[1, 0].float()
    effect = torch.stack([written[p] @ unembed[:, tokens[0, p + 1]] for p in range(1, tokens.shape[1] - 1)])
    assert batched[0] == pytest.approx(effect.mean().item(), rel=1e-4)
    # salience="z_norm": the mean over positions >= 1 of ||z|| (the old scorer, same numbers)
    by_norm = ContrastiveScorer(toy_2l, salience="z_norm", batch_size=16).activations(positive[:1], [(1, 0)])
    assert by_norm[0] == pytest.approx(z[1:].norm(dim=-1).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="reduce='median'"):
        ContrastiveScorer(toy_2l, reduce="median")
    with pytest.raises(ValueError, match="batch_size=0"):
        ContrastiveScorer(toy_2l, batch_size=0)
    with pytest.raises(ValueError, match="salience='bogus'"):
        ContrastiveScorer(toy_2l, salience="bogus")


def test_contrastive_salience_matches_the_events_and_backs_the_induction_explanations(toy_2l):
    """Planted truth: toy-2l's induction heads are L1H0, L1H1, L1H2. Scored by what chose the
    events (the default next_token_effect), their heuristic induction explanations get a positive
    contrastive score; scored by ||z|| (the old scorer) at least one is contradicted (d < 0)."""
    from interp_lib.explain.config import ExplainConfig
    from interp_lib.explain.events import sample_windows
    from interp_lib.explain.heuristic import heuristic_explanations

    torch.set_num_threads(1)
    windows = sample_windows(toy_2l, "bundled", 16, 32, seed=0)
    explanations, _ = heuristic_explanations(toy_2l, windows, progress=False)
    induction = [(1, 0), (1, 1), (1, 2)]
    for head in induction:
        assert explanations[head].text.startswith("Induction head"), (head, explanations[head].text)
    items = [ScoringItem(layer, head, explanations[(layer, head)]) for layer, head in induction]

    default = ExplainConfig().salience
    assert default == "next_token_effect"
    scores = {salience: [r.score for r in ContrastiveScorer(toy_2l, salience=salience).score_many(items)]
              for salience in (default, "z_norm")}
    assert all(d is not None and d > 1.0 for d in scores[default]), scores     # measured 5.16, 3.68, 3.18
    assert min(scores["z_norm"]) < 0, scores                                   # measured -0.80, -2.82, +2.00


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------

def test_simulation_good_vs_wrong_vs_random(client_for):
    events = make_events(0)
    client, server = client_for(smart_responder)
    results = SimulationScorer(client).score_many([ScoringItem(1, 0, REPEAT, events), ScoringItem(1, 0, PUNCT, events)])
    good, wrong = results
    assert good.scorer == "simulation" and good.n == 20 and good.n_unparseable == 0
    assert good.score > 0.85, good
    assert wrong.score < 0.3, wrong
    assert sorted(good.details["event_ids"]) == list(range(20))
    assert good.details["predicted"][:10] == [10.0] * 10  # every top event ends on a repeat
    random_client, _ = client_for(random_responder)
    noise = SimulationScorer(random_client).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    assert abs(noise.score) < 0.5, noise
    assert good.score - abs(noise.score) > 0.5


def _with_logprobs(body: dict) -> dict:
    """The smart answer plus top logprobs at each value: 10 -> {10: .8, 7: .2}; 0 -> {0: .9, 3: .1}."""
    content = smart_responder(body)
    entries = []
    for token in split_tokens(content):
        value = token.strip()
        if value in ("10", "0") and not entries[-1]["token"].endswith('"'):
            top = [(token, 0.8), (" 7", 0.2)] if value == "10" else [(token, 0.9), (" 3", 0.1)]
        else:
            top = [(token, 1.0)]
        entries.append({"token": token, "logprob": math.log(top[0][1]),
                        "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]})
    return {"content": content, "logprobs": entries}


def test_simulation_logprob_and_no_logprob_paths(client_for):
    events = make_events(1)
    item = ScoringItem(1, 0, REPEAT, events)
    # an endpoint with logprobs: the expectation over digit tokens is used
    client, server = client_for(_with_logprobs, logprobs=True)
    with_lp = SimulationScorer(client).score_many([item])[0]
    assert all(r["logprobs"] is True and r["top_logprobs"] == 10 for r in server.requests)
    assert with_lp.details["n_logprob_values"] == 20
    expected = [0.8 * 10 + 0.2 * 7 if e.kind == "top" else 0.1 * 3 for e in events]
    order = with_lp.details["event_ids"]
    assert with_lp.details["predicted"] == pytest.approx([expected[i] for i in order])
    # an endpoint that ignores logprobs: the written values are used
    client, server = client_for(_with_logprobs, logprobs=False)
    without = SimulationScorer(client).score_many([item])[0]
    assert without.details["n_logprob_values"] == 0
    assert without.details["predicted"] == [10.0 if events[i].kind == "top" else 0.0 for i in without.details["event_ids"]]
    assert without.score == pytest.approx(with_lp.score, abs=1e-9)  # affine: same correlation
    # an endpoint that rejects the parameter: the client drops it, scoring still works
    client, server = client_for(smart_responder, reject_params=("logprobs",))
    rejected = SimulationScorer(client, use_logprobs="auto").score_many([item])[0]
    assert rejected.n == 20 and rejected.score == pytest.approx(without.score)
    assert client.supports_logprobs is False
    # use_logprobs=False never asks
    client, server = client_for(_with_logprobs, logprobs=True)
    never = SimulationScorer(client, use_logprobs=False).score_many([item])[0]
    assert not any(r.get("logprobs") for r in server.requests)
    assert never.details["n_logprob_values"] == 0
    with pytest.raises(ValueError, match="use_logprobs='yes'"):
        SimulationScorer(client, use_logprobs="yes")


def test_simulation_unparseable_counted_not_zero(client_for):
    events = make_events(2)

    def sometimes_garbage(body):
        user = body["messages"][-1]["content"]
        if "\t quartz" in user:
            return "I am not able to simulate this text."
        return smart_responder(body)

    client, _ = client_for(sometimes_garbage)
    result = SimulationScorer(client).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    garbage = [i for i, e in enumerate(events) if " quartz" in e.tokens]
    assert 0 < len(garbage) < 15
    assert result.n_unparseable == len(garbage) and result.n == 20 - len(garbage)
    assert not set(result.details["event_ids"]) & set(garbage)
    assert result.details["reasons"][0].startswith("unparseable: no JSON")
    kept = result.details["event_ids"]
    predicted = [10.0 if events[i].kind == "top" else 0.0 for i in kept]
    assert result.score == pytest.approx(np.corrcoef(predicted, [events[i].activation for i in kept])[0, 1])

    with_nan = events + [Event(1, 0, 999, 1, float("nan"), "random", [BOS, " apple"], [])]
    again = SimulationScorer(client).score_many([ScoringItem(1, 0, REPEAT, with_nan)])[0]
    assert again.details["n_skipped_events"] == 1 and again.score == pytest.approx(result.score)

    client, _ = client_for(lambda body: "no idea")
    nothing = SimulationScorer(client).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    assert nothing.score is None and nothing.n == 0 and nothing.n_unparseable == 20
    assert nothing.failure == "too few parseable simulations (0 of 20)"


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

def test_detection_good_vs_random_and_unparseable(client_for):
    events = make_events(3)
    client, server = client_for(smart_responder)
    good, wrong = DetectionScorer(client, n_per_prompt=6, seed=0).score_many(
        [ScoringItem(1, 0, REPEAT, events), ScoringItem(1, 0, PUNCT, events)])
    assert server.n_requests == 2 * 4  # 20 contexts in prompts of at most 6
    assert good.scorer == "detection" and good.n == 20 and good.n_unparseable == 0
    assert good.score == 1.0 and good.details["auc"] == 1.0 and good.details["balanced_accuracy"] == 1.0
    assert good.details["n_positive"] == 10 and good.details["n_negative"] == 10
    assert wrong.score < 0.5  # commas are negatives: the wrong explanation fires on negatives only
    # prompts mix positives and negatives (shuffled), never all tops first. Every full prompt is
    # checked: requests arrive concurrently, so the first one received can be a 2-context rest.
    prompts = [_det_contexts(r["messages"][-1]["content"]) for r in server.requests]
    full = [contexts for contexts in prompts if len(contexts) == 6]
    assert len(full) == 2 * 3
    assert all(0 < sum(_rule("repeat")(c) for c in contexts) < 6 for contexts in full)

    random_client, _ = client_for(random_responder)
    noise = DetectionScorer(random_client, n_per_prompt=6).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    assert 0.2 < noise.score < 0.8

    def half_garbage(body):
        contexts = _det_contexts(body["messages"][-1]["content"])
        return "cannot tell" if len(contexts) < 6 else smart_responder(body)

    client, _ = client_for(half_garbage)
    partial = DetectionScorer(client, n_per_prompt=6).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    assert partial.n_unparseable == 1 and partial.details["n_unparseable_contexts"] == 2 and partial.n == 18
    assert partial.score == 1.0  # the lost contexts are excluded, not scored as "does not fire"

    probs = lambda body: json.dumps({"probabilities": [0.9 if _rule("repeat")(c) else 0.2 for c in
                                                       _det_contexts(body["messages"][-1]["content"])]})
    client, server = client_for(probs)
    by_prob = DetectionScorer(client, probabilities=True).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    assert "probabilities" in server.requests[0]["messages"][0]["content"]
    assert by_prob.score == 1.0 and sorted(set(by_prob.details["predicted"])) == [0.2, 0.9]

    only_top = [e for e in events if e.kind == "top"]
    none = DetectionScorer(client).score_many([ScoringItem(1, 0, REPEAT, only_top)])[0]
    assert none.score is None and none.failure.startswith(
        "needs both top (positive) and weaker other (negative) events: got 10 top and 0 negative")
    # a random event as strong as a top event is no clear negative: left out, counted
    strong = events[:10] + [Event(1, 0, 500, 3, 99.0, "quantile", [BOS, " apple", " river", " stone"], [])]
    result = DetectionScorer(client).score_many([ScoringItem(1, 0, REPEAT, strong + events[10:])])[0]
    assert result.details["n_ambiguous"] == 1 and result.n == 20 and 10 not in result.details["event_ids"]


def test_score_explanations_shared_signature(client_for, toy_2l):
    events = make_events(4)
    client, _ = client_for(smart_responder)
    positive, negative = _induction_texts(seed=2, n=4)
    explanation = Explanation(REPEAT.text, positive_examples=positive, negative_examples=negative)
    scorers = [ContrastiveScorer(toy_2l), SimulationScorer(client), DetectionScorer(client)]
    assert all(isinstance(s, Scorer) for s in scorers)
    items = [ScoringItem(1, 0, explanation, events), ScoringItem(1, 2, explanation, events[:12])]
    table = score_explanations(scorers, items)
    assert len(table) == 2 and all(set(row) == {"contrastive", "simulation", "detection"} for row in table)
    assert all(isinstance(r, ScoreResult) and r.scorer == name for row in table for name, r in row.items())
    assert table[1]["simulation"].n == 12
    assert ScoreResult.from_dict(json.loads(json.dumps(table[0]["simulation"].to_dict()))) == table[0]["simulation"]
    with pytest.raises(ValueError, match="distinct names"):
        score_explanations([scorers[1], scorers[1]], items)
    with pytest.raises(TypeError, match="items\\[0\\]"):
        score_explanations(scorers[1:], ["L1H0"])


# --------------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------------

def _split_ten_logprobs(body: dict) -> dict:
    """The smart answer, tokenised the way some tokenizers write numbers: "10" as "1", "0"."""
    content = smart_responder(body)
    entries = []
    for token in split_tokens(content):
        value = token.strip()
        if value == "10":
            pieces = [(token[:-1], [(token[:-1], 0.9), (" 0", 0.1)]), ("0", [("0", 1.0)])]
        elif value == "0" and not entries[-1]["token"].endswith('"'):
            pieces = [(token, [(token, 0.9), (" 3", 0.1)])]
        else:
            pieces = [(token, [(token, 1.0)])]
        for piece, top in pieces:
            entries.append({"token": piece, "logprob": math.log(top[0][1]),
                            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]})
    return {"content": content, "logprobs": entries}


def test_simulation_split_digit_logprobs_use_the_written_value(client_for):
    events = make_events(1)
    client, server = client_for(_split_ten_logprobs, logprobs=True)
    result = SimulationScorer(client).score_many([ScoringItem(1, 0, REPEAT, events)])[0]
    kinds = [events[i].kind for i in result.details["event_ids"]]
    # a written 10 split into "1", "0" is 10 (the old code took the first piece's expectation:
    # 0.9 * 1 + 0.1 * 0 = 0.9); a whole "0" token keeps the expectation 0.1 * 3
    assert result.details["predicted"] == pytest.approx([10.0 if k == "top" else 0.3 for k in kinds])
    assert result.details["n_logprob_values"] == kinds.count("random") == 10
    assert result.score > 0.85


def test_simulation_min_events_below_three_is_rejected(client_for):
    client, _ = client_for(smart_responder)
    for bad in (1, 2):
        with pytest.raises(ValueError, match=f"min_events={bad}.*>= 3"):
            SimulationScorer(client, min_events=bad)
    assert SimulationScorer(client, min_events=5).min_events == 5


def test_refinement_after_a_rejection_asks_something_new(client_for):
    # round 1 keeps REPEAT, round 2's revision (PUNCT) is rejected; round 3 must not resend the
    # round-2 request (the same cached answer) and record the same rejection again
    items = [ScoringItem(1, 0, PUNCT, make_events(6, n_top=12, n_other=12))]
    client, server = client_for(smart_responder)
    steps = refine_explanations(client, SimulationScorer(client), items, rounds=3, n_wrong=4)
    assert [(s.round, s.kept, s.explanation.text) for s in steps[0]] == \
        [(1, True, REPEAT.text), (2, False, PUNCT.text)]  # no duplicate round-3 step
    prompts = [r["messages"][-1]["content"] for r in server.requests
               if r["messages"][0]["content"] == REFINE_SYSTEM]
    assert len(prompts) == 3 and len(set(prompts)) == 3  # round 3 was a new request
    assert "Rejected revision" not in prompts[1]
    assert f"Rejected revision 1: {json.dumps(PUNCT.text)}" in prompts[2]
    gain = refinement_gain(steps)
    assert list(gain["round"]) == [1, 2] and list(gain["n_kept"]) == [1, 0]

    # an explainer that does write something new after a rejection gets it scored and recorded
    variant = Explanation("Fires on a token that repeats an earlier word, variant.", "repeats", "earlier copy")

    def learns(body):
        user = body["messages"][-1]["content"]
        if body["messages"][0]["content"] == REFINE_SYSTEM and "Rejected revision" in user:
            return json.dumps({"explanation": variant.text, "attends_from": variant.attends_from,
                               "attends_to": variant.attends_to})
        return smart_responder(body)

    client, server = client_for(learns)
    steps = refine_explanations(client, SimulationScorer(client), items, rounds=3, n_wrong=4)
    assert [(s.round, s.explanation.text) for s in steps[0]] == \
        [(1, REPEAT.text), (2, PUNCT.text), (3, variant.text)]
    assert steps[0][2].score is not None and not steps[0][2].kept  # as good, not strictly better


def test_most_wrong_events_scales_and_orders():
    events = make_events(5, n_top=2, n_other=2)
    result = ScoreResult("simulation", 0.5, details={"predicted": [0.0, 10.0, 10.0, 5.0],
                                                     "actual": [8.0, 4.0, 0.0, 2.0], "event_ids": [0, 1, 2, 3],
                                                     "predicted_scale": 10.0})
    wrong = most_wrong_events(result, events, 2)
    assert [(w[0] is events[i], round(w[1], 6), round(w[2], 6)) for w, i in zip(wrong, [0, 2])] == \
        [(True, 0.0, 10.0), (True, 10.0, 0.0)]
    assert most_wrong_events(ScoreResult("contrastive", 1.0), events, 3) == []


def test_refinement_keeps_only_improvements_and_reports_gain(client_for):
    items = [ScoringItem(1, 0, PUNCT, make_events(6, n_top=12, n_other=12)),
             ScoringItem(1, 1, PUNCT, make_events(7, n_top=12, n_other=12))]
    client, server = client_for(smart_responder)
    scorer = SimulationScorer(client)
    steps = refine_explanations(client, scorer, items, rounds=2, n_wrong=4)
    assert [[s.round for s in item_steps] for item_steps in steps] == [[1, 2], [1, 2]]
    for item_steps in steps:
        first, second = item_steps
        assert first.kept and first.explanation.text == REPEAT.text and first.explanation.round == 1
        assert first.explanation.source == "llm:test-model"
        assert first.score > 0.85 and first.previous_score < 0.3
        assert not second.kept and second.explanation.text == PUNCT.text  # worse revision rejected
        assert second.previous_score == first.score and second.score < second.previous_score
    gain = refinement_gain(steps)
    assert list(gain["round"]) == [1, 2] and list(gain["n_kept"]) == [2, 0]
    assert gain.loc[0, "mean_gain"] > 0.5 and gain.loc[1, "mean_gain"] == 0.0
    assert gain.loc[1, "mean_delta"] < 0
    # the explainer is shown feedback events only; the deciding held-out events never appear
    refine_prompts = [r["messages"][-1]["content"] for r in server.requests
                      if r["messages"][0]["content"] == REFINE_SYSTEM]
    assert len(refine_prompts) == 4
    for item in items:
        feedback, deciding = split_events(item.events, 0.5, 0)
        shown = [format_event(e) for e in feedback]
        assert any(text in prompt for prompt in refine_prompts for text in shown)
        assert not any(format_event(e) in prompt for prompt in refine_prompts for e in deciding)


def test_refinement_unparseable_revision_and_bad_scorer(client_for, toy_2l):
    items = [ScoringItem(1, 0, PUNCT, make_events(8))]

    def no_revision(body):
        if body["messages"][0]["content"] == REFINE_SYSTEM:
            return "I would keep the explanation as it is."
        return smart_responder(body)

    client, server = client_for(no_revision)
    steps = refine_explanations(client, SimulationScorer(client), items, rounds=1)
    (step,) = steps[0]
    assert step.score is None and not step.kept and step.explanation is PUNCT
    assert step.failure.startswith("unparseable")
    assert refinement_gain(steps).loc[0, "n_scored"] == 0
    # more rounds: the unusable request is not sent again and its failure recorded only once
    server.reset()
    steps = refine_explanations(client, SimulationScorer(client), items, rounds=3)
    assert len(steps[0]) == 1 and steps[0][0].failure.startswith("unparseable")
    refine_requests = [r for r in server.requests if r["messages"][0]["content"] == REFINE_SYSTEM]
    assert refine_requests == []  # round 1's came from the cache; rounds 2-3 sent nothing
    with pytest.raises(ValueError, match="no per-event predictions"):
        refine_explanations(client, ContrastiveScorer(toy_2l), items, rounds=1)
    with pytest.raises(ValueError, match="holdout_events has 2 lists for 1 items"):
        refine_explanations(client, SimulationScorer(client), items, holdout_events=[[], []])
    assert refine_explanations(client, SimulationScorer(client), items, rounds=0) == [[]]
