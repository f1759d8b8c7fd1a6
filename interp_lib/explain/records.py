"""Typed records of the head explainer. Every artifact round-trips through JSON.

One ``HeadRecord`` per attention head carries its events, its explanation (or why there is
none), its scores by scorer, its refinement history, its causal check and, once clustered, its
family. Records carry their own provenance (``source`` on explanations, ``scorer`` on scores).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head_label(label: str) -> tuple[int, int]:
    """``"L3H7"`` -> ``(3, 7)``; raises ValueError naming the bad label."""
    text = str(label).strip().upper()
    if text.startswith("L") and "H" in text:
        layer, _, head = text[1:].partition("H")
        if layer.isdigit() and head.isdigit():
            return int(layer), int(head)
    raise ValueError(f"head label {label!r} is not of the form 'L<layer>H<head>' (e.g. 'L1H0')")


def _clean_float(value: Any) -> Any:
    # JSON has no NaN / inf: store them as None so files stay standard JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    return _clean_float(value)


@dataclass
class Event:
    """One query position of one head in one text window.

    ``tokens`` is the window's text as token strings up to and including the query position
    (so an explainer never sees the future); ``attended`` lists ``(source position, weight)``
    pairs, strongest first, for the sources the head attends to from the query.
    """

    layer: int
    head: int
    window: int          # index of the text window in the sampled corpus
    position: int        # query position inside the window
    activation: float    # salience: ||z|| at the query (or ||z W_O||, see EventSet.salience)
    kind: str = "top"    # "top" | "random" | "quantile"
    tokens: list[str] = field(default_factory=list)
    attended: list[tuple[int, float]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

    @property
    def query_token(self) -> str:
        return self.tokens[self.position] if 0 <= self.position < len(self.tokens) else ""

    def to_dict(self) -> dict:
        return _jsonable(self)

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
        return _jsonable(self)

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
        return _jsonable(self)

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
        return _jsonable(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RefinementStep":
        data = dict(data)
        data["explanation"] = Explanation.from_dict(data["explanation"])
        return cls(**data)


@dataclass
class HeadRecord:
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
    stats: dict[str, float] = field(default_factory=dict)  # attention statistics of the head

    @property
    def label(self) -> str:
        return head_label(self.layer, self.head)

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
        data = _jsonable(self)
        data["label"] = self.label
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "HeadRecord":
        data = {k: v for k, v in data.items() if k != "label"}
        for key in ("explanation", "heuristic"):
            if data.get(key) is not None:
                data[key] = Explanation.from_dict(data[key])
        data["scores"] = {k: ScoreResult.from_dict(v) for k, v in data.get("scores", {}).items()}
        data["refinement"] = [RefinementStep.from_dict(s) for s in data.get("refinement", [])]
        data["top_events"] = [Event.from_dict(e) for e in data.get("top_events", [])]
        return cls(**data)


def save_records(records: list[HeadRecord], path: str | Path, meta: dict | None = None) -> Path:
    """Write records as one JSON document ``{"schema": 1, "meta": ..., "heads": [...]}``."""
    from ..checkpoint import _atomic_write  # atomic: a killed run never leaves half a file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"schema": SCHEMA_VERSION, "meta": _jsonable(meta or {}),
                "heads": [r.to_dict() for r in records]}
    payload = json.dumps(document, indent=1, allow_nan=False).encode()
    _atomic_write(path, lambda handle: handle.write(payload))
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
