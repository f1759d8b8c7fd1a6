"""Identities of the units analyses and the explainer talk about: one label, one parser, one schema.

``Head(layer, head)`` is an attention head, ``Neuron(layer, index)`` an MLP neuron (the
post-activation ``blocks.{layer}.mlp.hook_post[..., index]``). Both are small named tuples, so a
``Head`` unpacks as ``layer, head = unit`` and equals / hashes like the plain pair ``(layer,
head)`` that older code and saved files use as keys; a ``Head`` and a ``Neuron`` with the same
numbers are *not* equal to each other, so one mapping can hold both kinds.

Labels: ``"L1H3"`` (head 3 of layer 1), ``"L0N17"`` (neuron 17 of layer 0). :func:`parse_unit`
reads either (case-insensitive, surrounding blanks ignored); :func:`parse_units` reads ``"all"``,
comma-separated labels, pairs or unit objects and checks them against a model's range.

DataFrames that list units use one schema (:data:`UNIT_COLUMNS`): ``unit`` (the label),
``layer`` (int), ``index`` (the head or neuron index, int) and ``kind`` (``"head"`` /
``"neuron"``); :func:`unit_columns` gives those values for one unit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Head", "Neuron", "Unit", "UNIT_KINDS", "UNIT_COLUMNS", "parse_unit", "parse_units", "unit_columns",
           "unit_frame", "head_label", "all_units", "unit_count"]

UNIT_KINDS = ("head", "neuron")
UNIT_COLUMNS = ("unit", "layer", "index", "kind")

_LABEL_RE = re.compile(r"L(\d+)([HN])(\d+)", re.IGNORECASE)


class _UnitBase(tuple):
    """Shared behaviour of the unit named tuples (equality by kind, label, ordering)."""

    __slots__ = ()
    kind: str = ""
    letter: str = ""

    @property
    def label(self) -> str:
        return f"L{self[0]}{self.letter}{self[1]}"

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self[0]}, {self[1]})"

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, _UnitBase) and other.kind != self.kind:
            return False
        return tuple.__eq__(self, other)

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)

    __hash__ = tuple.__hash__  # equal to the plain pair's hash, so (layer, head) keys still find it

    @classmethod
    def parse(cls, value):
        """A unit of this kind from a label, a unit or a ``(layer, index)`` pair (:func:`parse_unit`)."""
        return parse_unit(value, kind=cls.kind)


class Head(_UnitBase, NamedTuple("_Head", [("layer", int), ("head", int)])):
    """Attention head ``head`` of layer ``layer`` (its activation source: ``interp_lib.patching.unit_source``)."""

    __slots__ = ()
    kind = "head"
    letter = "H"

    @property
    def index(self) -> int:
        return self.head


class Neuron(_UnitBase, NamedTuple("_Neuron", [("layer", int), ("index", int)])):
    """MLP neuron ``index`` of layer ``layer`` (the post-activation, ``interp_lib.patching.unit_source``)."""

    __slots__ = ()
    kind = "neuron"
    letter = "N"


Unit = Head | Neuron
_CLASSES = {"head": Head, "neuron": Neuron}


def head_label(layer: int, head: int) -> str:
    """``head_label(1, 3) == "L1H3"`` (the one head label format; ``Head(1, 3).label``)."""
    return Head(int(layer), int(head)).label


def _check_kind(kind: str) -> type:
    if kind not in _CLASSES:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(UNIT_KINDS)}")
    return _CLASSES[kind]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def parse_unit(value, kind: str = "head") -> Unit:
    """One unit from a label (``"L1H3"``, ``"l0n17"``), a unit object, or a ``(layer, index)``
    pair read as ``kind``. A label's letter decides its kind; it must match ``kind``. Raises a
    one-line ValueError naming the bad value."""
    cls = _check_kind(kind)
    expected = f"a label like '{cls(1, 0).label}' or a (layer, {'head' if kind == 'head' else 'index'}) pair"
    if isinstance(value, _UnitBase):
        if value.kind != kind:
            raise ValueError(f"unit {value.label} is a {value.kind}: expected a {kind}")
        return value
    if isinstance(value, str):
        match = _LABEL_RE.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{kind} label {value!r}: expected {expected}")
        found = "head" if match[2].upper() == "H" else "neuron"
        if found != kind:
            raise ValueError(f"unit label {value!r} names a {found}: expected a {kind} ({cls(1, 0).label})")
        return cls(int(match[1]), int(match[3]))
    try:
        layer, index = value
    except (TypeError, ValueError):
        raise ValueError(f"unit {value!r}: expected {expected}") from None
    if not (_is_int(layer) and _is_int(index)):
        raise ValueError(f"unit {value!r}: expected {expected} of integers")
    return cls(int(layer), int(index))


def unit_count(model, kind: str = "head") -> tuple[int, int]:
    """``(n_layers, units per layer)`` of ``model`` for ``kind`` (heads: n_heads; neurons: d_mlp)."""
    _check_kind(kind)
    cfg = model.cfg
    if kind == "head":
        return int(cfg.n_layers), int(cfg.n_heads)
    d_mlp = getattr(cfg, "d_mlp", None)
    if not d_mlp:
        raise ValueError("this model has no MLP neurons (cfg.d_mlp is not set): kind='neuron' does not apply")
    return int(cfg.n_layers), int(d_mlp)


def all_units(n_layers: int, per_layer: int, kind: str = "head") -> list[Unit]:
    cls = _check_kind(kind)
    return [cls(layer, index) for layer in range(n_layers) for index in range(per_layer)]


def parse_units(units, n_layers: int, per_layer: int, kind: str = "head", *, name: str = "units") -> list[Unit]:
    """``"all"``, comma-separated labels, a list of labels / pairs / units, or one pair / unit ->
    the sorted unique units of ``kind``, each checked against ``n_layers`` x ``per_layer``.
    ``name`` is the argument named in errors (e.g. ``heads``)."""
    cls = _check_kind(kind)
    if isinstance(units, str):
        if units.strip().lower() == "all":
            return all_units(n_layers, per_layer, kind)
        units = [part for part in units.split(",") if part.strip()]
    if isinstance(units, _UnitBase) or (isinstance(units, tuple) and len(units) == 2 and all(_is_int(x) for x in units)):
        units = [units]
    try:
        items = list(units)
    except TypeError:
        raise ValueError(f"{name}={units!r}: expected 'all', a list of labels like '{cls(1, 0).label}' or "
                         "(layer, index) pairs") from None
    if not items:
        raise ValueError(f"{name}=[]: expected 'all' or at least one {kind}")
    out = []
    for item in items:
        unit = parse_unit(item, kind)
        what = "heads" if kind == "head" else "neurons"
        if not (0 <= unit[0] < n_layers and 0 <= unit[1] < per_layer):
            raise ValueError(f"{kind} {unit.label} ({item!r}) is out of range: this model has layers 0..{n_layers - 1} "
                             f"and {what} 0..{per_layer - 1}")
        out.append(unit)
    return sorted(set(out))


def unit_columns(unit: Unit) -> dict[str, Any]:
    """The schema's columns for one unit: ``{"unit": "L1H3", "layer": 1, "index": 3, "kind": "head"}``."""
    return {"unit": unit.label, "layer": int(unit[0]), "index": int(unit[1]), "kind": unit.kind}


def unit_frame(rows: Iterable[tuple[Unit, dict]]):
    """A DataFrame with the unit schema's columns first, from ``(unit, other columns)`` pairs."""
    import pandas as pd

    records = [{**unit_columns(unit), **extra} for unit, extra in rows]
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        frame = pd.DataFrame(columns=list(UNIT_COLUMNS))
    return frame
