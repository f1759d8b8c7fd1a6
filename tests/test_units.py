"""Unit identities: one label format, one parser, equal to the plain pairs older code keys by."""

import json
import pickle

import pytest

from interp_lib import units
from interp_lib.units import Head, Neuron, parse_unit, parse_units


def test_labels_and_round_trip():
    assert Head(1, 3).label == "L1H3" == units.head_label(1, 3) == str(Head(1, 3))
    assert Neuron(0, 17).label == "L0N17"
    for unit in (Head(2, 5), Neuron(11, 3071)):
        assert parse_unit(unit.label, unit.kind) == unit
        assert type(parse_unit(unit.label.lower(), unit.kind)) is type(unit)
        assert pickle.loads(pickle.dumps(unit)) == unit
        assert json.loads(json.dumps(unit)) == list(unit)


def test_heads_equal_plain_pairs_but_not_neurons():
    assert Head(1, 2) == (1, 2) and hash(Head(1, 2)) == hash((1, 2))
    assert {(1, 2): "x"}[Head(1, 2)] == "x"
    assert Head(1, 2) != Neuron(1, 2)
    both = {Head(1, 2): "head", Neuron(1, 2): "neuron"}
    assert len(both) == 2 and both[Neuron(1, 2)] == "neuron"
    layer, head = Head(4, 7)
    assert (layer, head) == (4, 7) and Head(4, 7).index == 7 and Neuron(4, 7).index == 7


@pytest.mark.parametrize("bad, message", [
    ("x", "expected a label like 'L1H0'"),
    ("L0N1", "names a neuron: expected a head"),
    ((1,), "expected a label"),
    ((1.0, 2), "of integers"),
    ((True, 2), "of integers"),
])
def test_bad_units_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_unit(bad, "head")


def test_parse_units_all_lists_and_range():
    assert parse_units("all", 2, 2) == [Head(0, 0), Head(0, 1), Head(1, 0), Head(1, 1)]
    assert parse_units(" L1H0, l0h1 ", 2, 2) == [Head(0, 1), Head(1, 0)]
    assert parse_units((1, 1), 2, 2) == [Head(1, 1)]
    assert parse_units([Neuron(0, 3), "L0N3", (0, 1)], 1, 4, "neuron") == [Neuron(0, 1), Neuron(0, 3)]
    with pytest.raises(ValueError, match=r"heads=\[\]"):
        parse_units([], 2, 2, name="heads")
    with pytest.raises(ValueError, match="head L2H0 .* out of range: this model has layers 0..1 and heads 0..1"):
        parse_units(["L2H0"], 2, 2)
    with pytest.raises(ValueError, match="kind='latent'"):
        parse_units("all", 2, 2, "latent")


def test_one_frame_schema():
    frame = units.unit_frame([(Head(1, 3), {"score": 0.5}), (Neuron(0, 2), {"score": 0.1})])
    assert list(frame.columns[:4]) == list(units.UNIT_COLUMNS)
    assert frame.to_dict("records") == [
        {"unit": "L1H3", "layer": 1, "index": 3, "kind": "head", "score": 0.5},
        {"unit": "L0N2", "layer": 0, "index": 2, "kind": "neuron", "score": 0.1}]
