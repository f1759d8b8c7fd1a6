"""Explainer prompts (exact text pinned), answer parsers, shrink-to-fit, logprob expectations,
and LLMExplainer against a real local OpenAI-compatible server."""

from __future__ import annotations

import json
import math

import pytest

from interp_lib.explain.client import LLMClient
from interp_lib.explain.local_server import LocalOpenAIServer, LocalServerHTTPError
from interp_lib.explain.prompts import (DETECT_SYSTEM, EXPLAIN_SYSTEM, REFINE_SYSTEM, SIMULATE_SYSTEM,
                                        LLMExplainer, ParseError, detection_messages,
                                        expected_values_from_logprobs, explanation_messages,
                                        format_context, format_event, parse_detection,
                                        parse_explanation, parse_simulation, refinement_messages,
                                        simulation_messages, visible_token)
from interp_lib.explain.records import Event, Explanation

E1 = Event(1, 0, 3, 5, 4.5, "top", ["<|endoftext|>", "The", " cat", " sat", ".\n", " The"], [(2, 0.62), (0, 0.2)])
E2 = Event(1, 0, 7, 3, 3.25, "top", ["<|endoftext|>", "\u0120A", "\u010a", "\u0120dog"], [(3, 0.5)])
E3 = Event(1, 0, 9, 2, 0.4, "random", ["<|endoftext|>", "x", "\ty"], [(0, 0.9)])
EX = Explanation("Copies the token after an earlier copy of the current token.", "repeated tokens",
                 "the token after the previous occurrence", ["a b c a b c"], ["a b c d e f"])


# --------------------------------------------------------------------------------------------
# Exact prompt text
# --------------------------------------------------------------------------------------------

def test_visible_token_and_format_event_exact():
    assert visible_token("\u0120cat\u010a\t\r") == " cat\u23ce\u21e5\u240d"
    assert format_event(E1) == "{<|endoftext|>|0.20}The{ cat|0.62} sat.\u23ce[[ The]]"
    assert format_event(E1, max_context=3) == (
        "\u2026 sat.\u23ce[[ The]]   (also attends to: { cat|0.62} 3 tokens back, "
        "{<|endoftext|>|0.20} 5 tokens back)")
    assert format_event(E1, n_attended=1) == "<|endoftext|>The{ cat|0.62} sat.\u23ce[[ The]]"
    assert format_event(E2) == "<|endoftext|> A\u23ce[[{ dog|0.50}]]"  # attends to itself
    assert format_event(E3, n_attended=0) == "<|endoftext|>x[[\u21e5y]]"
    # tokens after the query are never shown
    later = Event(0, 1, 0, 1, 1.0, "top", ["a", "b", "c"], [])
    assert format_event(later) == "a[[b]]"
    assert format_context(["a", " b", "\n"]) == "a b[[\u23ce]]"
    assert format_context(["a", " b", " c"], max_context=2) == "\u2026 b[[ c]]"


def test_format_event_bad_input():
    with pytest.raises(ValueError, match="position=9"):
        format_event(Event(0, 0, 0, 9, 1.0, "top", ["a"], []))
    with pytest.raises(ValueError, match="attended source 4"):
        format_event(Event(0, 0, 0, 1, 1.0, "top", ["a", "b", "c", "d", "e"], [(4, 0.5)]))
    with pytest.raises(ValueError, match="max_context=0"):
        format_event(E1, max_context=0)
    with pytest.raises(TypeError, match="event="):
        format_event("not an event")


EXPECTED_EXPLAIN_USER = """Attention head L1H0.

Each example is a text that ends at a query token marked [[like this]]. Tokens the head attends to from that query are marked {like this|0.62} with their attention weight; strong attention to tokens before the shown text is listed after it. The activation is the size of the head's output at the query: higher means the head does more there.

Top-activating examples:
1. activation 4.50: {<|endoftext|>|0.20}The{ cat|0.62} sat.\u23ce[[ The]]
2. activation 3.25: <|endoftext|> A\u23ce[[{ dog|0.50}]]

Random positions (for contrast):
3. activation 0.40: {<|endoftext|>|0.90}x[[\u21e5y]]

Explain what this head does, in the JSON format given."""


def test_explanation_messages_exact():
    messages = explanation_messages("L1H0", [E3, E1, E2])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == EXPLAIN_SYSTEM
    assert messages[1]["content"] == EXPECTED_EXPLAIN_USER
    for key in ("explanation", "attends_from", "attends_to", "positive_examples", "negative_examples"):
        assert f'"{key}"' in EXPLAIN_SYSTEM


def test_simulation_detection_refinement_messages_exact():
    sim = simulation_messages(EX, ["<|endoftext|>", " a", "\n"])
    assert sim[0] == {"role": "system", "content": SIMULATE_SYSTEM}
    assert sim[1]["content"] == (
        "Head description: Copies the token after an earlier copy of the current token.\n"
        "Attends from: repeated tokens\nAttends to: the token after the previous occurrence\n\n"
        "Text (3 tokens):\n1\t<|endoftext|>\n2\t a\n3\t\u23ce\n\nGive the 3 activations.")
    det = detection_messages(EX, [["x", " y"], ["a", " b", " a"]])
    assert det[0] == {"role": "system", "content": DETECT_SYSTEM}
    assert det[1]["content"] == (
        "Head description: Copies the token after an earlier copy of the current token.\n"
        "Attends from: repeated tokens\nAttends to: the token after the previous occurrence\n\n"
        "Texts:\n1. x[[ y]]\n2. a b[[ a]]\n\n"
        "Which of the 2 texts is the head strongly active on, at the marked token?")
    assert '"probabilities"' in detection_messages(EX, [["x"]], probabilities=True)[0]["content"]
    ref = refinement_messages("L1H0", EX, [(E1, 8.0, 1.5)])
    assert ref[0] == {"role": "system", "content": REFINE_SYSTEM}
    assert ref[1]["content"] == (
        "Attention head L1H0.\n\nCurrent explanation:\n{\n"
        ' "explanation": "Copies the token after an earlier copy of the current token.",\n'
        ' "attends_from": "repeated tokens",\n'
        ' "attends_to": "the token after the previous occurrence",\n'
        ' "positive_examples": [\n  "a b c a b c"\n ],\n'
        ' "negative_examples": [\n  "a b c d e f"\n ]\n}\n\n'
        "Texts it got wrong (activation at the marked query, 0-10):\n"
        "1. predicted 8.0, actual 1.5: {<|endoftext|>|0.20}The{ cat|0.62} sat.\u23ce[[ The]]\n\n"
        "Write the revised explanation, in the JSON format given.")
    rejected = Explanation("Fires on punctuation.", source="llm:m")
    again = refinement_messages("L1H0", EX, [(E1, 8.0, 1.5)], rejected=[rejected])
    assert again[1]["content"] == ref[1]["content"].replace(
        "\n\nWrite the revised",
        "\n\nYour previous revision(s) below scored no better than the current explanation on "
        "other texts; do not repeat them, write a clearly different revision:\n"
        'Rejected revision 1: "Fires on punctuation."\n\nWrite the revised')
    with pytest.raises(TypeError, match=r"rejected\[0\]"):
        refinement_messages("L1H0", EX, [], rejected=["text"])
    with pytest.raises(ValueError, match="event_tokens"):
        simulation_messages(EX, [])
    with pytest.raises(ValueError, match="contexts"):
        detection_messages(EX, [])


# --------------------------------------------------------------------------------------------
# Shrink to fit
# --------------------------------------------------------------------------------------------

def _long_events(n: int = 8) -> list[Event]:
    events = []
    for i in range(n):
        tokens = ["<|endoftext|>"] + [f" w{i}_{j}" for j in range(40)]
        kind = "top" if i < n // 2 else "random"
        events.append(Event(1, 0, i, 40, float(n - i), kind, tokens, [(39, 0.7)]))
    return events


def _size(messages) -> int:
    return sum(len(m["content"]) for m in messages)


def test_shrink_to_fit_shortens_contexts_then_drops_weakest_events():
    events = _long_events(8)
    full = explanation_messages("L1H0", events, max_prompt_tokens=10**6, count_tokens=len)
    assert "\u2026" in full[1]["content"]  # 41 tokens > 32: cut on the left already
    assert full[1]["content"].count("activation ") == 8 + 1  # 8 events + the note's one mention
    # Enough room for all events with shorter contexts: nothing dropped, contexts shorter.
    limit = _size(full) - 200
    shorter = explanation_messages("L1H0", events, max_prompt_tokens=limit, count_tokens=len)
    assert _size(shorter) <= limit
    assert shorter[1]["content"].count("activation ") == 9
    assert " w0_10" in full[1]["content"] and " w0_10" not in shorter[1]["content"]
    # Less room: events go, weakest first, keeping both groups, never below min_events.
    at8 = explanation_messages("L1H0", events[:3], max_prompt_tokens=10**6, count_tokens=len,
                               max_context=8, min_events=3)
    limit = _size(at8) + 300
    dropped = explanation_messages("L1H0", events, max_prompt_tokens=limit, count_tokens=len, min_events=3)
    user = dropped[1]["content"]
    assert _size(dropped) <= limit
    kept = user.count("activation ") - 1
    assert 3 <= kept < 8
    assert "activation 8.00" in user and "activation 1.00" not in user  # strongest top stays, weakest random goes
    assert "Random positions" in user and "Top-activating" in user
    with pytest.raises(ValueError, match="max_prompt_tokens=100 is too small"):
        explanation_messages("L1H0", events, max_prompt_tokens=100, count_tokens=len, min_events=3)
    with pytest.raises(ValueError, match="min_events=3"):
        explanation_messages("L1H0", events[:2], min_events=3)


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------

GOOD = {"explanation": "Attends to the previous token.", "attends_from": "every token",
        "attends_to": "the token before", "positive_examples": ["a b c"], "negative_examples": ["x"]}


@pytest.mark.parametrize("wrap", [
    lambda s: s,
    lambda s: f"```json\n{s}\n```",
    lambda s: f"Sure! Here is my analysis.\n\n{s}\n\nHope this helps.",
    lambda s: f"Thinking {{not json}} first.\n```\n{s}\n```",
])
def test_parse_explanation_tolerates_fences_and_prose(wrap):
    explanation = parse_explanation(wrap(json.dumps(GOOD)), source="llm:m")
    assert explanation == Explanation("Attends to the previous token.", "every token", "the token before",
                                      ["a b c"], ["x"], source="llm:m", round=0)


def test_parse_explanation_defaults_for_optional_fields():
    explanation = parse_explanation('{"explanation": " Copies tokens. "}', source="s")
    assert (explanation.text, explanation.attends_from, explanation.positive_examples) == ("Copies tokens.", "", [])


@pytest.mark.parametrize("content, reason", [
    (None, "empty answer"),
    ("   ", "empty answer"),
    ("I think this head attends to commas.", "no JSON object"),
    ('{"text": "x"}', "no 'explanation'"),
    ('{"explanation": 3}', "'explanation' is int"),
    ('{"explanation": "  "}', "'explanation' is empty"),
    ('{"explanation": "x", "positive_examples": "a b"}', "'positive_examples'"),
    ('{"explanation": "x", "negative_examples": [1, 2]}', "'negative_examples'"),
    ('{"explanation": "x", "attends_to": ["a"]}', "'attends_to' is list"),
    ('["explanation"]', "no JSON object"),
])
def test_parse_explanation_errors(content, reason):
    with pytest.raises(ParseError, match=reason) as info:
        parse_explanation(content, source="s")
    assert str(info.value) == info.value.reason


def test_parse_simulation():
    assert parse_simulation('{"activations": [0, 3, 10]}', 3) == [0.0, 3.0, 10.0]
    assert parse_simulation("Here:\n```json\n[1, 2.5, 12]\n```", 3) == [1.0, 2.5, 10.0]  # clipped
    assert parse_simulation("The\t0\n cat\t7\n\u23ce\t-1\n", 3) == [0.0, 7.0, 0.0]  # tab fallback
    assert parse_simulation('{"activations": ["4", 0]}', 2) == [4.0, 0.0]
    for content, n, reason in [('{"activations": [0, 3]}', 3, "expected 3 activations, got 2"),
                               ('{"activations": [0, "high"]}', 2, "activation 2 is 'high'"),
                               ('{"activations": [0, true]}', 2, "activation 2 is True"),
                               ('{"values": [0]}', 1, "no 'activations'"),
                               ("The\t0\n cat\t7", 3, "expected 3 'token<TAB>value' lines, got 2"),
                               ("The\tzero", 1, "not a number"),
                               ("no numbers here", 1, "no JSON"),
                               (None, 1, "empty answer")]:
        with pytest.raises(ParseError, match=reason):
            parse_simulation(content, n)
    with pytest.raises(ValueError, match="n_tokens=0"):
        parse_simulation("[1]", 0)


def test_parse_detection():
    assert parse_detection('{"fires": [1, 3]}', 4) == [1.0, 0.0, 1.0, 0.0]
    assert parse_detection('{"fires": []}', 2) == [0.0, 0.0]
    assert parse_detection("Answer: [2]", 2) == [0.0, 1.0]
    # prose with a bracketed aside before the object: the object wins, not the aside
    assert parse_detection('Text [2] looks active, so: {"fires": [2, 4]}', 4) == [0.0, 1.0, 0.0, 1.0]
    assert parse_detection('See [1] and [3]. Final: {"probabilities": [0.2, 0.9, 0.1]}', 3) == \
        [0.2, 0.9, 0.1]
    assert parse_detection("Texts [bad then [1, 3]", 3) == [1.0, 0.0, 1.0]  # arrays still found
    assert parse_detection('{"probabilities": [0.1, 0.9]}', 2) == [0.1, 0.9]
    for content, reason in [('{"fires": [0]}', "not one of 1..3"), ('{"fires": [4]}', "not one of 1..3"),
                            ('{"fires": [1.5]}', "not one of"), ('{"probabilities": [0.1]}', "expected 3 probabilities"),
                            ('{"probabilities": [0.1, 2, 0]}', "not all in"), ('{"yes": [1]}', "neither 'fires'"),
                            ("texts 1 and 2", "no JSON")]:
        with pytest.raises(ParseError, match=reason):
            parse_detection(content, 3)


def _entry(token: str, top: list[tuple[str, float]] | None = None) -> dict:
    top = top if top is not None else [(token, 1.0)]
    return {"token": token, "logprob": math.log(top[0][1]),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}


def test_expected_values_from_logprobs_json_and_tab():
    logprobs = [_entry('{"'), _entry("activations"), _entry('":'), _entry(" ["),
                _entry("0", [("0", 0.5), ("2", 0.5)]), _entry(","),
                _entry(" 10", [(" 10", 0.6), (" 8", 0.2), (" x", 0.2)]), _entry("]}")]
    values = expected_values_from_logprobs(logprobs, 2)
    assert values == pytest.approx([1.0, (10 * 0.6 + 8 * 0.2) / 0.8])
    # the sampled answer parses to the argmax values; the expectation differs (that is the point)
    assert parse_simulation("".join(e["token"] for e in logprobs), 2) == [0.0, 10.0]
    tab = [_entry("The"), _entry("\t"), _entry("3", [("3", 0.25), ("5", 0.75)]), _entry("\n"),
           _entry(" cat"), _entry("\t"), _entry("9", [("9", 0.9), ("unknown", 0.1)])]
    assert expected_values_from_logprobs(tab, 2) == pytest.approx([4.5, 9.0])
    assert expected_values_from_logprobs(logprobs, 3) is None           # wrong count
    assert expected_values_from_logprobs(None, 2) is None
    assert expected_values_from_logprobs([], 2) is None
    no_top = [dict(e, top_logprobs=[]) for e in logprobs]
    assert expected_values_from_logprobs(no_top, 2) is None             # nothing to take an expectation over
    no_digits = [_entry('{"activations": ['), _entry("7", [("seven", 0.9), ("x", 0.1)]), _entry("]}")]
    assert expected_values_from_logprobs(no_digits, 1) is None


def test_expected_values_only_where_the_token_is_the_whole_number():
    # a tokenizer that writes "10" as "1", "0" and "3.5" as "3", ".", "5": the alternatives of
    # the first piece are not values (the old code read 0.9 for a written 10); those positions
    # get None so the written value is used, the whole-number positions keep the expectation
    split = [_entry('{"activations": ['), _entry("1", [("1", 0.9), ("0", 0.1)]), _entry("0"),
             _entry(","), _entry(" 3", [(" 3", 0.5), (" 5", 0.5)]), _entry(","),
             _entry("3", [("3", 0.8), ("4", 0.2)]), _entry("."), _entry("5"), _entry("]}")]
    content = "".join(e["token"] for e in split)
    assert parse_simulation(content, 3) == [10.0, 3.0, 3.5]
    assert expected_values_from_logprobs(split, 3) == [None, pytest.approx(4.0), None]
    # a whole-number token, with JSON punctuation stuck to it, still counts
    whole = [_entry('{"activations":'), _entry("[10", [("[10", 0.5), ("[8", 0.5)]), _entry("]}")]
    assert expected_values_from_logprobs(whole, 1) == [pytest.approx(9.0)]
    # only split numbers: nothing to take an expectation over
    assert expected_values_from_logprobs(split[:4] + [_entry(" 7]}")], 2) is None


# --------------------------------------------------------------------------------------------
# LLMExplainer against a real local server
# --------------------------------------------------------------------------------------------

def _explainer_responder(body: dict) -> str:
    user = body["messages"][-1]["content"]
    if "Attention head L1H0." in user:
        return "Here you go:\n```json\n" + json.dumps(GOOD) + "\n```"
    if "Attention head L0H1." in user:
        return "This head is interesting but I would rather not say."
    if "Attention head L0H2." in user:
        raise LocalServerHTTPError(400, "this prompt is not allowed")
    return json.dumps({"explanation": "   "})


def test_llm_explainer_explanations_and_failures(tmp_path):
    events = [E1, E2, E3]
    with LocalOpenAIServer(responder=_explainer_responder) as server:
        client = LLMClient(model="test-model", base_url=server.url, api_key="x", cache_dir=tmp_path,
                           progress=False, max_retries=0)
        heads = {(1, 0): events, (0, 1): events, (0, 2): events, (0, 3): events, (1, 1): events[:2]}
        out = LLMExplainer(client).explain_many(heads)
        assert list(out) == list(heads)
        explanation, failure = out[(1, 0)]
        assert failure is None and explanation.text == GOOD["explanation"]
        assert explanation.source == "llm:test-model" and explanation.positive_examples == ["a b c"]
        assert out[(0, 1)][0] is None and out[(0, 1)][1].startswith("unparseable: no JSON object")
        assert out[(0, 2)][0] is None and out[(0, 2)][1].startswith("request failed:")
        assert out[(0, 3)] == (None, "unparseable: 'explanation' is empty")
        assert out[(1, 1)][0] is None and out[(1, 1)][1].startswith("prompt: events has 2 events")
        # the head with too few events is never sent
        assert not any("L1H1" in r["messages"][-1]["content"] for r in server.requests)
        sent = [r for r in server.requests if "L1H0" in r["messages"][-1]["content"]][0]
        assert sent["messages"] == explanation_messages("L1H0", events)
        assert sent["response_format"] == {"type": "json_object"}
