"""Configuration of the head-explainer pipeline (no heavy imports: the CLI builds its flags
from these fields)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .records import parse_head_label

STAGES = ("sample", "events", "heuristic", "explain", "score", "refine", "causal", "taxonomy",
          "report")
LLM_SCORERS = ("simulation", "detection")
UNIT_CHOICES = ("heads", "neurons")
ALL_SCORERS = ("contrastive", *LLM_SCORERS)


@dataclass
class ExplainConfig:
    """Everything an explainer run depends on. Field help texts become the CLI's ``--help``.

    ``units="heads"`` (the default) explains attention heads (``heads`` selects them);
    ``units="neurons"`` explains MLP neurons (``neurons`` selects them: ``"auto"`` takes a
    seeded random sample of ``neuron_budget`` neurons spread evenly over the layers -- 64 by
    default, because a real model has thousands (GPT-2 small: 36,864; toy-lm: 2,048) and each one
    costs an LLM request per stage -- ``"all"`` every neuron, or labels like ``"L0N5,L1N17"``)."""

    model: str = field(default="auto", metadata={"help": "model: bundled toy name, hub name (gpt2, gpt2-medium, ...) or local HF directory; 'auto' = gpt2 on Colab, toy-2l elsewhere"})
    units: str = field(default="heads", metadata={"help": "what to explain: heads (attention heads, --heads) or neurons (MLP neurons, --neurons)"})
    heads: str = field(default="all", metadata={"help": "'all' or comma-separated labels like L0H1,L1H0"})
    neurons: str = field(default="auto", metadata={"help": "with --units neurons: 'auto' (a seeded random sample of --neuron-budget neurons, spread evenly over the layers), 'all' (every neuron: thousands on real models) or labels like L0N5,L1N17"})
    neuron_budget: int = field(default=64, metadata={"help": "with --units neurons --neurons auto: how many neurons to explain"})
    dataset: str = field(default="auto", metadata={"help": "text source: auto (WikiText-103 when reachable, else the bundled corpus), bundled, wikitext, code"})
    windows: int = field(default=256, metadata={"help": "number of text windows to sample"})
    window_len: int = field(default=64, metadata={"help": "tokens per window (BOS included)"})
    top_k: int = field(default=20, metadata={"help": "top salient events kept per head"})
    n_random: int = field(default=10, metadata={"help": "random events kept per head (for scoring)"})
    n_quantile: int = field(default=10, metadata={"help": "events spread over the activation quantiles per head"})
    salience: str = field(default="next_token_effect", metadata={"help": "event salience: next_token_effect (the head's direct effect on the logit of the actual next token, (z W_O) . centred W_U[:, next]), z_norm (||z||) or resid_write_norm (||z W_O||)"})
    explainer: str | None = field(default=None, metadata={"help": "explainer LLM (e.g. gpt-4o-mini); unset = heuristic explainer, no LLM"})
    simulator: str | None = field(default=None, metadata={"help": "simulator / detector LLM (default: the explainer)"})
    base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint (default: OpenAI's); the key comes from $INTERP_LIB_API_KEY, or for OpenAI $OPENAI_API_KEY / the Colab secret"})
    scorers: tuple[str, ...] = field(default=ALL_SCORERS, metadata={"help": "scorers to run: contrastive, simulation, detection"})
    refine_rounds: int = field(default=1, metadata={"help": "refinement rounds (0 = none); a revision is kept only if its held-out score improves"})
    holdout_fraction: float = field(default=0.5, metadata={"help": "fraction of each head's events held out for scoring (never shown to the explainer)"})
    concurrency: int = field(default=16, metadata={"help": "LLM requests in flight at once"})
    timeout: float = field(default=60.0, metadata={"help": "seconds per LLM request before it is retried; "
                                                   "6 timeouts in a row with no answer between them stop "
                                                   "the run (exit 1): a hanging endpoint"})
    max_retries: int = field(default=5, metadata={"help": "retries per LLM request (429 / 5xx / timeouts)"})
    prices: str | None = field(default=None, metadata={"help": "JSON file {model: [USD per 1M prompt tokens, USD per 1M completion tokens]} overriding the built-in price table"})
    max_cost_usd: float | None = field(default=None, metadata={"help": "spending cap in USD: the run stops sending requests when reached"})
    dry_run: bool = field(default=False, metadata={"help": "count the LLM calls and estimate their cost, send nothing"})
    batch_api: bool = field(default=False, metadata={"help": "send the scoring requests (simulation, detection, refinement's scores) through OpenAI's Batch API: half the price, answers within 24 h; the run waits for them, and a killed run collects the same batch when rerun"})
    causal_method: str = field(default="zero", metadata={"help": "ablation for the causal check (interp_lib.patching's one definition): zero, mean (the per-position mean over the windows) or resample (another window's activation at the same position)"})
    min_cluster_size: int = field(default=3, metadata={"help": "HDBSCAN min cluster size for the taxonomy"})
    embedding: str = field(default="sentence-transformers", metadata={"help": "taxonomy embeddings: sentence-transformers (all-MiniLM-L6-v2, offline; an error says what to install if it cannot load), openai, or tfidf (weak, only when asked for: warns and is recorded); auto = sentence-transformers"})
    batch_timeout: float = field(default=26 * 3600.0, metadata={"help": "with --batch-api: seconds to wait for a batch before the run stops with its requests failed (a rerun collects the same batch)"})
    batch_size: int = field(default=16, metadata={"help": "windows per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, splits and clustering"})

    def __post_init__(self) -> None:
        if isinstance(self.scorers, str):
            self.scorers = tuple(s.strip() for s in self.scorers.split(",") if s.strip())
        self.scorers = tuple(self.scorers)
        bad = [s for s in self.scorers if s not in ALL_SCORERS]
        if bad:
            raise ValueError(f"scorers={list(self.scorers)!r}: unknown {bad}; valid: {list(ALL_SCORERS)}")
        if self.units not in UNIT_CHOICES:
            raise ValueError(f"units={self.units!r}: expected one of {', '.join(UNIT_CHOICES)}")
        for name in ("windows", "window_len", "top_k", "concurrency", "batch_size", "min_cluster_size",
                     "neuron_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        for name in ("n_random", "n_quantile", "refine_rounds", "max_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r}: expected a non-negative integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed!r}: expected an integer from 0 to {2**32 - 1}")
        if isinstance(self.batch_timeout, bool) or not isinstance(self.batch_timeout, (int, float)) \
                or not 0 < float(self.batch_timeout) < float("inf"):
            raise ValueError(f"batch_timeout={self.batch_timeout!r}: expected a positive number of seconds")
        if self.window_len < 4:
            raise ValueError(f"window_len={self.window_len!r}: expected at least 4 tokens")
        if not 0.0 < float(self.holdout_fraction) < 1.0:
            raise ValueError(f"holdout_fraction={self.holdout_fraction!r}: expected a number in (0, 1)")
        if self.salience not in ("next_token_effect", "z_norm", "resid_write_norm"):
            raise ValueError(f"salience={self.salience!r}: expected 'next_token_effect', 'z_norm' or "
                             "'resid_write_norm'")
        if self.embedding not in ("auto", "sentence-transformers", "openai", "tfidf"):
            raise ValueError(f"embedding={self.embedding!r}: expected 'auto', 'sentence-transformers', "
                             "'openai' or 'tfidf'")
        if self.causal_method not in ("zero", "mean", "resample"):
            raise ValueError(f"causal_method={self.causal_method!r}: expected 'zero', 'mean' or 'resample'")
        if self.max_cost_usd is not None and not float(self.max_cost_usd) > 0:
            raise ValueError(f"max_cost_usd={self.max_cost_usd!r}: expected a positive number or None")
        if self.base_url is not None:
            self._check_base_url()
        if self.heads != "all":
            for label in str(self.heads).split(","):
                parse_head_label(label)
        if str(self.neurons).strip().lower() not in ("auto", "all"):
            from ..units import parse_unit

            for label in str(self.neurons).split(","):
                parse_unit(label, "neuron")

    def _check_base_url(self) -> None:
        from urllib.parse import urlsplit

        from .client import public_url

        url = self.base_url
        shown = public_url(url) if isinstance(url, str) else url
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
            port_ok = parts is not None and (parts.port is None or parts.port > 0)
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise ValueError(f"base_url={shown!r}: expected an http(s) URL with a host, like "
                             "'http://127.0.0.1:8000/v1' (or leave it unset for OpenAI)")

    @property
    def uses_llm(self) -> bool:
        return bool(self.explainer)

    @property
    def base_url_with_credentials(self) -> str | None:
        """``base_url`` as given, user-info included (only the LLM client gets this; it sends the
        key as a Bearer token and stores the URL without it)."""
        return self.base_url

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values, ``base_url`` without user-info or query (for saving)."""
        from .client import public_url

        data = dataclasses.asdict(self)
        data["scorers"] = list(self.scorers)
        data["base_url"] = public_url(self.base_url)
        return data

    @property
    def unit_kind(self) -> str:
        """``"head"`` or ``"neuron"`` (``units`` in the singular)."""
        return self.units[:-1]

    def params(self, *names: str) -> dict[str, Any]:
        """The fields a stage depends on (its checkpoint params)."""
        data = self.to_dict()
        return {name: data[name] for name in names}
