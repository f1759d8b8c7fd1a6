"""Typed records of the head explainer. Every artifact round-trips through JSON.

One ``HeadRecord`` per attention head carries its events, its explanation (or why there is
none), its scores by scorer, its refinement history, its causal check and, once clustered, its
family. Records carry their own provenance (``source`` on explanations, ``scorer`` on scores).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import atomic_write, jsonable
from ..units import Head, Neuron, Unit, head_label, parse_unit

SCHEMA_VERSION = 1


def parse_head_label(label: str) -> Head:
    """``"L3H7"`` -> ``Head(3, 7)`` (equal to the pair ``(3, 7)``); raises ValueError naming the bad label."""
    return parse_unit(str(label), "head")


def parse_unit_label(label: str) -> Unit:
    """``"L3H7"`` -> ``Head(3, 7)``, ``"L0N17"`` -> ``Neuron(0, 17)`` (the label's letter decides)."""
    text = str(label).strip()
    kind = "neuron" if len(text) > 1 and "N" in text[1:].upper() else "head"
    return parse_unit(text, kind)


def make_unit(layer: int, index: int, unit_kind: str = "head") -> Unit:
    """The unit ``(layer, index)`` of ``unit_kind`` (``"head"`` / ``"neuron"``)."""
    if unit_kind not in ("head", "neuron"):
        raise ValueError(f"unit_kind={unit_kind!r}: expected 'head' or 'neuron'")
    return (Head if unit_kind == "head" else Neuron)(int(layer), int(index))


class _UnitIdentity:
    """``unit`` / ``index`` / ``label`` of a record that stores ``layer``, ``head`` (the unit's
    index, named so for saved files) and ``unit_kind``."""

    layer: int
    head: int
    unit_kind: str

    @property
    def unit(self) -> Unit:
        return make_unit(self.layer, self.head, self.unit_kind)

    @property
    def index(self) -> int:
        return self.head

    @property
    def label(self) -> str:
        return self.unit.label


@dataclass
class Event(_UnitIdentity):
    """One position of one unit (an attention head or an MLP neuron) in one text window.

    ``head`` is the unit's index in its layer (the head, or the neuron when ``unit_kind`` is
    ``"neuron"``); ``unit`` gives it as a typed :class:`~interp_lib.units.Head` / ``Neuron``.
    ``tokens`` is the window's text as token strings up to and including the position (so an
    explainer never sees the future); for a head, ``attended`` lists ``(source position,
    weight)`` pairs, strongest first, for the sources it attends to from the query (a neuron
    attends to nothing: empty).
    """

    layer: int
    head: int
    window: int          # index of the text window in the sampled corpus
    position: int        # query position inside the window
    activation: float    # salience (see EventSet.salience): a head's, or a neuron's activation
    kind: str = "top"    # "top" | "random" | "quantile"
    tokens: list[str] = field(default_factory=list)
    attended: list[tuple[int, float]] = field(default_factory=list)
    unit_kind: str = "head"  # "head" | "neuron"

    @property
    def query_token(self) -> str:
        return self.tokens[self.position] if 0 <= self.position < len(self.tokens) else ""

    def to_dict(self) -> dict:
        return jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Event":
        data = dict(data)
        data["attended"] = [(int(p), float(w)) for p, w in data.get("attended", [])]
        data["activation"] = float("nan") if data.get("activation") is None else float(data["activation"])
        return cls(**data)


@dataclass
class Explanation:
    """What the explainer said about a head (structured, as parsed from its JSON answer)."""

    text: str
    attends_from: str = ""
    attends_to: str = ""
    positive_examples: list[str] = field(default_factory=list)
    negative_examples: list[str] = field(default_factory=list)
    source: str = "heuristic"       # "heuristic" or "llm:<model name>"
    round: int = 0                  # refinement round that produced it (0 = first explanation)

    def to_dict(self) -> dict:
        return jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Explanation":
        return cls(**data)


@dataclass
class ScoreResult:
    """One scorer's verdict on one explanation of one head.

    ``score`` is None when nothing could be scored; ``n_unparseable`` counts LLM answers that
    could not be parsed (they are excluded, never counted as a zero), ``n`` the items scored.
    """

    scorer: str                     # "contrastive" | "simulation" | "detection" | ...
    score: float | None
    n: int = 0
    n_unparseable: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None      # why score is None, if it is

    def to_dict(self) -> dict:
        return jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScoreResult":
        data = dict(data)
        if data.get("score") is not None:
            data["score"] = float(data["score"])
        return cls(**data)


@dataclass
class RefinementStep:
    round: int
    explanation: Explanation
    score: float | None
    previous_score: float | None
    kept: bool
    failure: str | None = None      # why the revision could not be scored (request / parse)

    def to_dict(self) -> dict:
        return jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RefinementStep":
        data = dict(data)
        data["explanation"] = Explanation.from_dict(data["explanation"])
        return cls(**data)


@dataclass
class UnitRecord(_UnitIdentity):
    """Everything the explainer found about one unit (``HeadRecord`` is the same class).

    ``head`` is the unit's index in its layer (head or neuron, see ``unit_kind``); ``unit``
    gives it typed and ``label`` as ``"L1H0"`` / ``"L0N17"``."""

    layer: int
    head: int
    explanation: Explanation | None = None
    failure: str | None = None      # why there is no explanation (e.g. "unparseable: ...")
    heuristic: Explanation | None = None   # the no-LLM baseline, always present once explained
    scores: dict[str, ScoreResult] = field(default_factory=dict)
    refinement: list[RefinementStep] = field(default_factory=list)
    causal_effect: float | None = None     # ablation effect on next-token loss over top events
    top_events: list[Event] = field(default_factory=list)
    family: int | None = None       # taxonomy family; -1 = unclustered
    family_label: str | None = None
    stats: dict[str, float] = field(default_factory=dict)  # heuristic statistics of the unit
    unit_kind: str = "head"  # "head" | "neuron"

    def best_score(self, scorer: str | None = None) -> float | None:
        """The preferred score: ``scorer`` if given, else the refined explanation's held-out
        score, then simulation > detection > contrastive."""
        order = [scorer] if scorer else ["refined", "simulation", "detection", "contrastive"]
        for name in order:
            result = self.scores.get(name)
            if result is not None and result.score is not None:
                return result.score
        return None

    def to_dict(self) -> dict:
        data = jsonable(self)
        data["label"] = self.label
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "UnitRecord":
        data = {k: v for k, v in data.items() if k != "label"}
        for key in ("explanation", "heuristic"):
            if data.get(key) is not None:
                data[key] = Explanation.from_dict(data[key])
        data["scores"] = {k: ScoreResult.from_dict(v) for k, v in data.get("scores", {}).items()}
        data["refinement"] = [RefinementStep.from_dict(s) for s in data.get("refinement", [])]
        data["top_events"] = [Event.from_dict(e) for e in data.get("top_events", [])]
        return cls(**data)


HeadRecord = UnitRecord  # the name records had when only heads were explained


def save_records(records: list[HeadRecord], path: str | Path, meta: dict | None = None) -> Path:
    """Write records as one JSON document ``{"schema": 1, "meta": ..., "heads": [...]}``."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA_VERSION, "meta": jsonable(meta or {}),
                "heads": [r.to_dict() for r in records]}
    payload = json.dumps(document, indent=1, allow_nan=False).encode()
    atomic_write(path, lambda handle: handle.write(payload))  # a killed run never leaves half a file
    return path


def load_records(path: str | Path) -> tuple[list[HeadRecord], dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"records file {str(path)!r} does not exist")
    document = json.loads(path.read_text())
    if not isinstance(document, dict) or "heads" not in document:
        raise ValueError(f"records file {str(path)!r} is not an explainer records document "
                         "(expected a JSON object with a 'heads' list)")
    return [HeadRecord.from_dict(h) for h in document["heads"]], document.get("meta", {})
