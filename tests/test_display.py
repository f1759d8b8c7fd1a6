"""il.display.table: numbers, integers, missing values, units, wrapped full text, Markdown."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from interp_lib.display import MISSING, format_number, markdown, markdown_inline, table

LONG = ("Induction head: attends from a repeated token to the token that followed its earlier "
        "occurrence and copies it, which can be checked on random repeated sequences of any length.")


@pytest.mark.parametrize("value, digits, expected", [
    (0.018340912, 3, "0.0183"), (123.456, 3, "123"), (1234.5678, 3, "1235"), (0.5, 3, "0.500"),
    (-2.8234, 3, "-2.82"), (1e-7, 3, "1.00e-07"), (3.2e9, 2, "3.2e+09"), (0.0, 3, "0"),
    (7, 3, "7"), (np.int64(12), 3, "12"), (None, 3, MISSING), (float("nan"), 3, MISSING),
    (float("inf"), 3, "∞"), (True, 3, "yes"), (0.99996, 3, "1.00"), (-0.0004, 1, "-4e-04"), (0.00123, 2, "0.0012"),
])
def test_format_number(value, digits, expected):
    assert format_number(value, digits) == expected
    if isinstance(value, float) and math.isfinite(value) and value != 0 and 1e-3 <= abs(value) < 1e6:
        # the text holds the value to `digits` significant figures (relative error)
        assert abs(float(expected) - value) <= 0.5 * 10 ** (math.floor(math.log10(abs(value))) - digits + 1) + 1e-12


def test_table_formats_numbers_integers_missing_and_units():
    frame = pd.DataFrame({"k": [3.0, 5.0, np.nan], "n_cells": [8, 16, 4], "ece": [0.0123456, 0.2, None],
                          "accuracy": [1.0, 0.0, 1.0], "label": ["a", None, "c"]})
    shown = table(frame, units={"ece": "probability"}, digits=2)
    assert list(shown.cells.columns) == ["k", "n cells", "ece (probability)", "accuracy", "label"]
    assert shown.cells["k"].tolist() == ["3", "5", MISSING]          # whole floats beside a NaN
    assert shown.cells["n cells"].tolist() == ["8", "16", "4"]
    assert shown.cells["ece (probability)"].tolist() == ["0.012", "0.20", MISSING]
    assert shown.cells["accuracy"].tolist() == ["1.0", "0", "1.0"]    # a 0/1 rate stays a rate
    counts = table(pd.DataFrame({"precision": [1.0, 0.5], "tp": [3.0, 1.0], "fp": [0.0, 1.0]},
                                index=["induction", "previous_token"]))
    assert list(counts.cells.columns) == ["", "precision", "tp", "fp"]   # unnamed row labels: blank header
    assert counts.cells["fp"].tolist() == ["0", "1"] and counts.cells["precision"].tolist() == ["1.00", "0.500"]
    assert shown.cells["label"].tolist() == ["a", MISSING, "c"]
    assert "None" not in shown.to_html() and "nan" not in shown.to_text()


def test_table_keeps_full_text_wraps_it_and_renders_markdown():
    frame = pd.DataFrame({"head": ["L1H0", "L0H2"], "explanation": [LONG, "**previous** token: `x[i-1]`\n- bullet"],
                          "html": ["<script>alert(1)</script>", "a & b"]})
    shown = table(frame, markdown=["explanation"], wrap=40)
    page = shown.to_html()
    assert LONG in page                                    # never cut
    assert "max-width:40ch;min-width:30ch" in page and "white-space:normal" in page   # the long column wraps
    assert "<strong>previous</strong> token: <code>x[i-1]</code><br>• bullet" in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "a &amp; b" in page
    text = shown.to_text()
    assert LONG in text and "\\" not in text
    assert text.splitlines()[0].split() == ["head", "explanation", "html"]
    assert shown._repr_html_() == page and repr(shown) == text
    md = shown.to_markdown().splitlines()
    assert md[0] == "| head | explanation | html |" and len(md) == 4


def test_table_index_columns_and_errors():
    frame = pd.DataFrame({"drop": [0.1, -0.25]}, index=pd.Index(["L0H0", "L0H1"], name="head"))
    shown = table(frame, units={"drop": "nats"}, names={"drop": "loss drop"})
    assert list(shown.cells.columns) == ["head", "loss drop (nats)"]
    assert shown.cells["loss drop (nats)"].tolist() == ["0.100", "-0.250"]
    assert table([{"a": 1, "b": 2.5}], columns=["b"]).cells.columns.tolist() == ["b"]
    with pytest.raises(ValueError, match="columns=.*'zz'"):
        table(frame, columns=["zz"])
    with pytest.raises(ValueError, match="units: \\['x'\\] not in the table"):
        table(frame, units={"x": "nats"})
    with pytest.raises(ValueError, match="two columns would show as 'a b'"):
        table(pd.DataFrame({"a_b": [1], "a b": [2]}))
    with pytest.raises(ValueError, match="digits=0"):
        format_number(1.5, 0)


def test_markdown_helpers():
    assert markdown_inline("[docs](https://example.org) and [bad](javascript:alert(1))") == (
        '<a href="https://example.org">docs</a> and [bad](javascript:alert(1))')
    rendered = markdown("# Title\n\n*text*")
    assert rendered._repr_markdown_() == "# Title\n\n*text*"
    with pytest.raises(TypeError, match="str of Markdown"):
        markdown(3)
