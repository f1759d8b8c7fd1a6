"""Run the notebook series with papermill, as a grid of configurations and seeds, and aggregate
the headline metrics.

What ``interp-lib run`` does, as importable pieces (metrics are recorded and read by
``interp_lib.artifacts``: ``record_metrics``, ``load_metrics``; aggregated by
``interp_lib.results``: ``aggregate``, ``aggregate_runs``; one notebook is executed by
``interp_lib.tasks.execute_task``; all re-exported here under their old names):

* ``plan_grid`` -- the sweep: models (``--model a b``) x parameter values (``-p KEY V1 -p KEY
  V2``: a key repeated with different values is a grid dimension; one value per argument, so
  values holding commas or lists stay unambiguous) x seeds x notebooks. A notebook that does not
  declare a grid key runs once per value of the keys it does declare.
* ``run_series`` -- execute the sweep with an executor (``local``: one after another here;
  ``ray``: one task each on a Ray cluster, see ``interp_lib.cluster``) and write the run folder::

      OUT/run.json                     argv, config, grid, start / finish and, per run: notebook,
                                       config, model, params, seed, status, seconds, attempts,
                                       error (one line) and failure (type, whole message,
                                       failing cell's index and source)
      OUT/metrics.csv                  every recorded metric with its configuration
      OUT/aggregate.csv, aggregate.md  two or more seeds or configurations: one row per
                                       (notebook, model, params, metric)
      OUT/summary.md                   one seed and configuration: its metrics
      OUT/results.md                   the headline numbers said in words (il.results)
      (both markdown files end with the failed notebooks, their error and failing cell)
      OUT/[<config>/]seed-<s>/<stem>.ipynb   the executed copy (kept when the notebook fails);
                                       <config> names what varies, e.g. model=toy-lm,n_bins=10
                                       (absent when nothing varies: OUT/seed-<s>/)
      OUT/[<config>/]seed-<s>/metrics/<stem>.json  written by the notebook (record_metrics)

``OUT`` may be an fsspec URL (``s3://bucket/run``, ``gs://...``, ``file://...``) where the
filesystem's package is installed: each notebook then runs in a local scratch folder (on the
Ray worker, with the ray executor) whose files are uploaded when it ends, and the driver stages
run.json and the tables locally and uploads them as they change. No run lock there: object
stores have no atomic create.

Notebook contract (see notebooks/README.md): the cell tagged ``parameters`` declares at least
``model_name``, ``seed`` and ``output_dir``. The runner passes ``seed``, ``output_dir`` (the
absolute ``OUT/[<config>/]seed-<s>`` folder) and, with ``--model``, ``model_name``; ``-p KEY VALUE`` goes
only to the notebooks that declare ``KEY`` and is refused before anything runs when none does.

Parameter checks, all before a kernel starts: every name the parameters cell assigns is
declared (papermill's inference, completed from the cell's own Python where papermill skips a
line); for the notebooks of the series, a value must fit the schema declared in
``interp_lib.notebook_params`` (type, range or choices; converted to the declared type, so
``-p n_prompts 8`` arrives as 8 where the default is "auto"). For other notebooks, a value must
have the declared default's type (bool, int, float, str, list; a ``None``
default takes any literal) and respect a range the line's comment states in words ("at least
1", "more than 0", "at most 10", "less than 1") or a choice list the comment opens with
(``"auto | tfidf | openai"``, when the default is one of them). A parameter whose name or value
looks like a credential (``api_key``, ``token``, ``sk-...``, a URL with user-info, the value of
a credential environment variable) is refused with a pointer to ``$INTERP_LIB_API_KEY``: run.json
and the executed notebooks would otherwise keep it.

One writer per run folder: the run holds ``OUT/.lock`` (``interp_lib.checkpoint.RunLock``); a
second run into the same folder stops at once with a one-line error.

Failure policy: a notebook that raises is recorded as ``failed`` (its executed copy, with the
error, stays in place) and the run goes on -- with the remaining notebooks of the same seed,
since the notebooks of the series are independent (each loads its own model and keeps its own
checkpoints), and with the other seeds. ``fail_fast`` stops at the first failure instead and
marks the rest ``skipped``. Metrics of failed notebooks are left out of the aggregate.

Kernels: papermill starts ``kernel_name`` (default ``python3``: ipykernel's spec, which
jupyter_client resolves to this interpreter) in the notebook's folder. When running from a
source checkout the runner puts the checkout first on the kernels' ``PYTHONPATH``, so the
notebooks import the same ``interp_lib`` as the runner, installed or not.
"""

from __future__ import annotations

import ast
import datetime as _dt
import difflib
import json
import math
import os
import re
import secrets
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .artifacts import (METRICS_COLUMNS, RUNNER_PARAMETERS, atomic_write_text, load_metrics, markdown_table,
                        params_text, record_metrics, write_run_manifest)
from .errors import RunInputError, UsageError, first_line
from .notebook_params import parse_param_value
from .paths import repo_root
from .results import aggregate, aggregate_runs
from .tasks import (_ATTEMPTS_DIR, DEFAULT_KERNEL, attempt_pids, execute_task, failure_detail, is_url,
                    kernel_environment, url_filesystem)

__all__ = ["RunConfig", "NotebookPlan", "NotebookTask", "RunInputError", "UsageError", "run_series",
           "plan_grid", "plan_parameters", "select_notebooks", "find_series", "inspect_notebooks",
           "record_metrics", "load_metrics", "aggregate", "aggregate_runs", "markdown_table",
           "execute_task", "kernel_environment", "attempt_pids", "is_url", "url_filesystem",
           "failure_detail", "METRICS_COLUMNS", "RUNNER_PARAMETERS", "DEFAULT_KERNEL"]

SERIES_GLOB = "[0-9][0-9]_*.ipynb"
REQUIRED_PARAMETERS = ("model_name", "seed", "output_dir")
DEFAULT_OUT = Path("runs") / "series"
_MAX_SEED = 2**32 - 1  # numpy's limit; torch accepts it too


# --------------------------------------------------------------------------------------------
# Selecting notebooks and planning parameters
# --------------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    """Everything that defines a series run; ``interp-lib run`` builds it, run.json stores it."""

    notebooks: list[str] = field(default_factory=list)
    """Selectors: number prefix (``00``), stem (``00_tour``), file name or path; empty = all."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One execution of every selected notebook per seed (the ``seed`` parameter)."""
    params: list[tuple[str, str]] = field(default_factory=list)
    """``-p KEY VALUE`` pairs as typed; values are parsed as JSON / Python literals when they can
    be (kept as text for a parameter whose declared default is a string). A key given several
    times with different values is a grid dimension: one configuration per value."""
    out: str = str(DEFAULT_OUT)
    """Run folder (``[<configuration>/]seed-<s>/`` per run, run.json, aggregate tables)."""
    models: list[str] = field(default_factory=list)
    """Passed as ``model_name``, one configuration per model; empty keeps each notebook's own
    default."""
    notebooks_dir: str | None = None
    """Where the series lives; None = the checkout's ``notebooks/`` (or ``./notebooks``)."""
    timeout: int | None = None
    """Per-cell execution timeout in seconds (papermill ``execution_timeout``); None = none."""
    kernel: str = DEFAULT_KERNEL
    """Jupyter kernel name the notebooks run in."""
    fail_fast: bool = False
    """Stop at the first failed notebook instead of running the rest."""
    progress: bool = True
    """Show tqdm bars (the series and papermill's cells); status lines print either way."""
    executor: str = "local"
    """``local`` (one notebook after another in this process) or ``ray`` (one Ray task per
    notebook and configuration; needs the ``[cluster]`` extra)."""
    address: str | None = None
    """Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); None joins the one
    ``$RAY_ADDRESS`` names, else starts a local one."""
    cpus_per_task: float = 1.0
    """CPUs each Ray task declares (the notebook's kernel and its torch threads)."""
    gpus_per_task: float = 0.0
    """GPUs each Ray task declares (e.g. 1 for notebooks that run a model on a GPU)."""
    max_retries: int = 2
    """How often Ray re-runs a task whose worker process died (the notebook restarts and
    resumes from its own checkpoints); a notebook's own exception is never retried."""


@dataclass
class NotebookPlan:
    """One selected notebook: where it is and what its parameters cell declares."""

    path: Path
    declared: dict[str, dict]  # papermill.inspect_notebook's answer

    @property
    def stem(self) -> str:
        return self.path.stem


def default_notebooks_dir() -> Path | None:
    """The checkout's ``notebooks/``, else ``./notebooks``, else None."""
    root = repo_root()
    for candidate in ([root / "notebooks"] if root else []) + [Path.cwd() / "notebooks"]:
        if candidate.is_dir():
            return candidate
    return None


def find_series(notebooks_dir: str | os.PathLike) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in ``notebooks_dir``, sorted."""
    return sorted(p for p in Path(notebooks_dir).expanduser().absolute().glob(SERIES_GLOB)
                  if p.is_file())


def select_notebooks(series: Sequence[Path], selectors: Sequence[str]) -> list[Path]:
    """Resolve selectors against the series, in the order given (duplicates dropped).

    A selector is a number prefix (``00`` or ``0``), a stem (``00_tour``), a file name
    (``00_tour.ipynb``) or the path of any notebook file. Raises RunInputError for one that
    matches nothing (listing what is available) or several.
    """
    if not selectors:
        return list(series)
    available = ", ".join(p.stem for p in series) or "none"
    chosen: list[Path] = []
    for selector in selectors:
        as_path = Path(selector).expanduser()
        if selector.endswith(".ipynb") and as_path.is_file():
            matches = [as_path.resolve()]
        else:
            stem = as_path.name[:-len(".ipynb")] if as_path.name.endswith(".ipynb") else as_path.name
            matches = [p for p in series if p.stem == stem]
            if not matches and stem.isdigit():
                matches = [p for p in series if int(p.stem[:2]) == int(stem)]
        if not matches:
            raise RunInputError(f"unknown notebook {selector!r} (available: {available})")
        if len(matches) > 1:
            raise RunInputError(f"notebook {selector!r} is ambiguous: "
                                + ", ".join(p.name for p in matches))
        if matches[0].resolve() not in [c.resolve() for c in chosen]:
            chosen.append(matches[0])
    stems = [p.stem for p in chosen]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise RunInputError(f"two selected notebooks share the name {clash[0]!r}: their outputs "
                            "would overwrite each other")
    return chosen


def _cell_assignments(path: Path) -> dict[str, dict]:
    """Every top-level ``name = value`` of the notebook's cell tagged ``parameters``, in
    papermill's layout (name, inferred_type_name, default, help); {} if there is none or it is
    not valid Python. Completes papermill's inference, which skips a line with a second ``=``
    (e.g. in its comment)."""
    import io
    import tokenize

    try:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        cell = next(c for c in notebook.get("cells", [])
                    if "parameters" in (c.get("metadata", {}).get("tags") or []))
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        tree = ast.parse(source)
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                    if tok.type == tokenize.COMMENT}
    except (OSError, ValueError, StopIteration, KeyError, TypeError, SyntaxError,
            tokenize.TokenError):
        return {}
    found: dict[str, dict] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 \
            else node.target if isinstance(node, ast.AnnAssign) and node.value is not None else None
        if isinstance(target, ast.Name):
            found[target.id] = {"name": target.id, "inferred_type_name": "None",
                                "default": ast.get_source_segment(source, node.value) or "",
                                "help": comments.get(node.end_lineno, "")}
    return found


def inspect_notebooks(paths: Sequence[Path]) -> list[NotebookPlan]:
    """Read each notebook's parameters cell; RunInputError when one breaks the contract."""
    import papermill

    plans = []
    for path in paths:
        try:
            declared = papermill.inspect_notebook(str(path))
        except Exception as exc:  # nbformat / JSON errors of many kinds: name the file
            raise RunInputError(f"cannot read notebook {path}: {type(exc).__name__}: "
                                f"{first_line(exc)}") from None
        for name, spec in _cell_assignments(path).items():
            declared.setdefault(name, spec)
        missing = [name for name in REQUIRED_PARAMETERS if name not in declared]
        if missing:
            raise RunInputError(
                f"{path.name} does not follow the notebook contract: its cell tagged 'parameters' "
                f"must declare {', '.join(REQUIRED_PARAMETERS)} (missing: {', '.join(missing)})")
        plans.append(NotebookPlan(path, declared))
    return plans


_NOT_LITERAL = object()


def _declared_default(spec: dict, missing: Any = None) -> Any:
    """The literal default of a declared parameter (``missing`` when it is not a plain
    literal)."""
    try:
        return ast.literal_eval(spec.get("default") or "")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return missing


_BOUND_RE = re.compile(r"\b(at least|more than|at most|less than)\s+(-?\d+(?:\.\d+)?)\b")
_CHOICES_RE = re.compile(r"^\s*([\w.-]+(?:\s*\|\s*[\w.-]+)+)(?:\s|$|[;,(])")
_BOUND_TESTS = {"at least": lambda v, b: v >= b, "more than": lambda v, b: v > b,
                "at most": lambda v, b: v <= b, "less than": lambda v, b: v < b}


def check_parameter_value(notebook: str, key: str, value: Any, spec: dict) -> None:
    """RunInputError unless ``value`` fits the declaration ``spec`` of ``key`` in ``notebook``:
    the default's type, and the range / choices its comment states (module docstring)."""
    default = _declared_default(spec, _NOT_LITERAL)
    shown = spec.get("default")
    help_text = str(spec.get("help") or "")

    def refuse(expected: str) -> None:
        raise RunInputError(f"parameter {key!r}: {notebook} expects {expected} (declared "
                            f"default {shown}), got {value!r}")

    if default is _NOT_LITERAL or default is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            refuse("true or false")
        return
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            refuse("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            refuse("a finite number")
    elif isinstance(default, str):
        if not isinstance(value, str):
            refuse("text")
        match = _CHOICES_RE.match(help_text)
        if match:
            choices = [c.strip() for c in match.group(1).split("|")]
            if default in choices and value not in choices:
                refuse("one of " + ", ".join(repr(c) for c in choices))
        return
    elif isinstance(default, (list, tuple)):
        if not isinstance(value, list):
            refuse("a list like " + str(shown))
        return
    else:
        return
    for phrase, bound in _BOUND_RE.findall(help_text):
        if not _BOUND_TESTS[phrase](value, float(bound)):
            refuse(f"{'an integer' if isinstance(default, int) else 'a number'} {phrase} {bound}")


_SECRET_VALUE_RE = re.compile(
    r"\b(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9-]+"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,})|^\s*(Bearer|Basic)\s+\S+")
_URL_USERINFO_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")


def _credential_reason(key: str, text: str) -> str | None:
    """Why ``-p key text`` looks like a credential, or None."""
    from urllib.parse import urlsplit

    from .checkpoint import is_secret_key, secret_env_values

    if is_secret_key(key):
        return f"its name {key!r} is a credential's"
    if _URL_USERINFO_RE.match(text.strip()):
        return "the URL carries user-info (user:key@host); give the URL without it"
    if "://" in text:
        # any query string or fragment may carry a credential (?auth=, ?sig=, ?X-Amz-Signature=,
        # #token=...): the same rule as `interp-lib explain`, which keeps only public_url(url)
        try:
            parts = urlsplit(text.strip())
            carries = bool(parts.query or parts.fragment or "@" in parts.netloc)
        except ValueError:
            carries = True
        if carries:
            return ("the URL carries a query string, a fragment or user-info, any of which may "
                    "hold a key; give the URL without them")
    if _SECRET_VALUE_RE.search(text):
        return "its value has the form of an API key or token"
    if text and any(secret in text for secret in secret_env_values()):
        return "its value holds the value of a credential environment variable"
    return None


def plan_parameters(plans: Sequence[NotebookPlan], params: Sequence[tuple[str, str]],
                    model: str | None = None) -> dict[str, dict[str, Any]]:
    """The extra parameters each notebook gets (stem -> {name: value}), before seed and
    output_dir. RunInputError for a name the runner sets or no selected notebook declares, and
    for a value its schema (``interp_lib.notebook_params``) does not allow."""
    from .notebook_params import ParameterError, coerce_and_check, declared

    typed: dict[str, str] = {}
    for key, text in params:
        if key in RUNNER_PARAMETERS:
            raise RunInputError(f"parameter {key!r} is set by the runner: use "
                                f"{RUNNER_PARAMETERS[key]} instead of -p {key}")
        if not key.isidentifier():
            raise RunInputError(f"parameter {key!r} is not a Python name")
        reason = _credential_reason(key, text)
        if reason is not None:  # the value is never echoed
            raise RunInputError(
                f"parameter {key!r} looks like a credential ({reason}): credentials are never "
                "passed with -p, since run.json and the executed notebooks would keep them; set "
                "$INTERP_LIB_API_KEY (or $OPENAI_API_KEY for OpenAI) in the environment instead")
        typed[key] = text  # the last -p for a key wins
    for key in typed:
        if not any(key in plan.declared for plan in plans):
            declared = "; ".join(f"{plan.path.name} declares: {', '.join(plan.declared)}"
                                 for plan in plans)
            close = difflib.get_close_matches(key, {n for p in plans for n in p.declared}, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RunInputError(f"parameter {key!r} is not declared by any selected notebook "
                                f"({declared}){hint}")
    per_notebook = {}
    for plan in plans:
        chosen: dict[str, Any] = {}
        if model is not None:
            chosen["model_name"] = model
        for key, text in typed.items():
            if key not in plan.declared:
                continue
            schema = declared(plan.stem)
            if schema is not None:  # a notebook of the series: its declared schema decides
                if key not in schema:
                    raise RunInputError(f"parameter {key!r}: {plan.path.name} assigns it but "
                                        "interp_lib.notebook_params declares no type or range for it")
                try:
                    chosen[key] = coerce_and_check(plan.stem, key, text, schema[key], model,
                                                   plan.declared[key].get("default"))
                except ParameterError as exc:
                    raise RunInputError(str(exc)) from None
                continue
            default = _declared_default(plan.declared[key])
            # A notebook whose default is a string gets the text as typed (-p prompt 123).
            value = text if isinstance(default, str) else parse_param_value(text)
            if isinstance(default, (bool, int, float)) and isinstance(value, str):
                raise RunInputError(
                    f"parameter {key!r}: {plan.path.name} declares a {type(default).__name__} "
                    f"(default {plan.declared[key]['default']}), got text {text!r}")
            check_parameter_value(plan.path.name, key, value, plan.declared[key])
            chosen[key] = value
        per_notebook[plan.stem] = chosen
    return per_notebook


def grid_alternatives(params: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """``-p`` pairs as key -> alternatives, in the order given: a key repeated with different
    values is a grid dimension (``-p n_bins 10 -p n_bins 15``). RunInputError for a value
    given twice for the same key."""
    alternatives: dict[str, list[str]] = {}
    for key, text in params:
        values = alternatives.setdefault(key, [])
        if text in values:
            raise RunInputError(f"-p {key} {text}: this value is given twice")
        values.append(text)
    return alternatives


@dataclass
class NotebookTask:
    """One execution of the sweep: one notebook, one configuration, one seed. Plain data (it
    travels to Ray workers and into run.json)."""

    notebook: str
    """The notebook's stem."""
    path: str
    """The notebook file (absolute)."""
    seed: int
    config: str
    """The configuration's folder under the run folder; ``""`` when the run has one."""
    model: str | None
    """``model_name`` as passed; None: the notebook's own default."""
    params: dict[str, Any]
    """The ``-p`` parameters this notebook gets (the configuration, without the runner's)."""
    parameters: dict[str, Any]
    """Everything papermill passes: params, model_name, seed, output_dir."""
    output_dir: str
    """The notebook's output folder (absolute): ``OUT/[<config>/]seed-<s>``."""
    output: str
    """The executed copy, relative to the run folder."""

    @property
    def metrics(self) -> str:
        """Where record_metrics writes, relative to the run folder."""
        return str(Path(self.output).parent / "metrics" / f"{self.notebook}.json")


_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,-]+")


def _config_label(parts: Sequence[str]) -> str:
    """A folder name for one configuration: its varying settings, file-name safe."""
    label = _LABEL_UNSAFE.sub("_", ",".join(parts)).lstrip(".")
    if len(label) > 96:
        import hashlib

        label = label[:87] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return label


def plan_grid(plans: Sequence[NotebookPlan], params: Sequence[tuple[str, str]],
              models: Sequence[str], seeds: Sequence[int], out: Path | str) -> list[NotebookTask]:
    """Every (notebook, configuration, seed) of the sweep, in run order: models, then the
    parameter grid, then seeds, then notebooks. A notebook that does not declare a grid key runs
    once per value of the keys it does declare (no duplicate executions). A configuration lives
    in ``OUT/<label>/seed-<s>/`` where the label names what varies (``model=toy-lm,n_bins=10``);
    a run without a grid keeps ``OUT/seed-<s>/``. RunInputError as ``plan_parameters``."""
    import itertools

    alternatives = grid_alternatives(params)
    keys = list(alternatives)
    models = list(models)
    for model in models:
        if models.count(model) > 1:
            raise RunInputError(f"--model: {model!r} is listed more than once")
    model_choices: list[str | None] = list(models) or [None]
    varying = [key for key in keys if len(alternatives[key]) > 1]
    many_models = len(model_choices) > 1
    tasks: list[NotebookTask] = []
    seen: set[tuple] = set()
    owners: dict[str, tuple] = {}  # label -> the configuration it names (collisions get a hash)
    for model in model_choices:
        for combo in itertools.product(*(alternatives[key] for key in keys)):
            chosen = dict(zip(keys, combo))
            per_notebook = plan_parameters(plans, list(chosen.items()), model)
            for seed in seeds:
                for plan in plans:
                    extra = per_notebook[plan.stem]
                    nb_params = {k: v for k, v in extra.items() if k != "model_name"}
                    identity = (plan.stem, model, params_text(nb_params), seed)
                    if identity in seen:
                        continue
                    seen.add(identity)
                    shown_model = Path(model).name if model and ("/" in model or os.sep in model) \
                        else model
                    parts = [f"model={shown_model}"] if many_models else []
                    parts += [f"{key}={chosen[key]}" for key in varying if key in plan.declared]
                    label = _config_label(parts)
                    owner = (model, tuple((key, chosen[key]) for key in varying if key in plan.declared))
                    if owners.setdefault(label, owner) != owner:
                        import hashlib

                        label += "-" + hashlib.sha1(repr(owner).encode()).hexdigest()[:8]
                        owners.setdefault(label, owner)
                    folder = Path(label) / f"seed-{seed}" if label else Path(f"seed-{seed}")
                    output_dir = (f"{out.rstrip('/')}/{folder.as_posix()}" if is_url(out)
                                  else str(Path(out) / folder))
                    tasks.append(NotebookTask(
                        notebook=plan.stem, path=str(plan.path.resolve()), seed=seed, config=label,
                        model=model, params=nb_params,
                        parameters={**extra, "seed": seed, "output_dir": output_dir},
                        output_dir=output_dir, output=str(folder / f"{plan.stem}.ipynb")))
    return tasks


def validate_seeds(seeds: Sequence[int]) -> list[int]:
    """Seeds as given; RunInputError for none, a repeat or one numpy cannot take."""
    seeds = list(seeds)
    if not seeds:
        raise RunInputError("--seeds: give at least one seed")
    for seed in seeds:
        if not 0 <= seed <= _MAX_SEED:
            raise RunInputError(f"--seeds: {seed} is out of range (0 .. {_MAX_SEED})")
        if seeds.count(seed) > 1:
            raise RunInputError(f"--seeds: {seed} is listed more than once")
    return seeds


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and prove it writable with a temp file; RunInputError
    naming the path otherwise. Returns the absolute path."""
    path = path.expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RunInputError(f"output folder {path} is not writable: "
                            f"{exc.strerror or exc}") from None
    return path


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")



_URL_USERINFO_SUB = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*@")


class _Run:
    """State of one series run and its run.json (rewritten atomically after every notebook, so
    an interrupted run still says what finished)."""

    def __init__(self, config: RunConfig, argv: Sequence[str] | None, out: Path,
                 plans: Sequence[NotebookPlan], tasks: Sequence[NotebookTask],
                 remote: str | None = None):
        from . import __version__
        from .versions import environment

        self.out = out
        self.remote = remote
        grid = grid_alternatives(config.params)
        self.configs = sorted({t.config for t in tasks})
        self.record: dict[str, Any] = {
            "argv": [_URL_USERINFO_SUB.sub(r"\1", a) for a in argv] if argv is not None else None,
            "seeds": list(config.seeds),
            "params": {k: parse_param_value(v[0]) for k, v in grid.items() if len(v) == 1},
            "grid": {k: [parse_param_value(x) for x in v] for k, v in grid.items()},
            "model": config.models[0] if len(config.models) == 1 else None,
            "models": list(config.models),
            "configurations": self.configs,
            "executor": config.executor,
            "notebooks": [plan.stem for plan in plans],
            "notebook_paths": [str(plan.path.resolve()) for plan in plans],
            "config": asdict(config),
            "interp_lib": __version__,
            "environment": environment(),
            "python": sys.executable,
            "started": _now(),
            "finished": None,
            "status": "running",
            "runs": [
                {"seed": t.seed, "notebook": t.notebook, "config": t.config, "model": t.model,
                 "params": t.params, "status": "pending", "seconds": None, "peak_rss_mib": None, "attempts": 0,
                 "output": t.output, "metrics": None, "error": None, "failure": None,
                 "parameters": t.parameters}
                for t in tasks
            ],
        }

    def save(self) -> None:
        write_run_manifest(self.out, self.record)
        self.upload("run.json")

    def upload(self, *names: str) -> None:
        """Copy files of the local staging folder to the run's URL (a no-op for a folder)."""
        if self.remote is None:
            return
        fs, root = url_filesystem(self.remote)
        for name in names:
            if (self.out / name).is_file():
                fs.put_file(str(self.out / name), f"{root}/{name}")

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.record["runs"] if r["status"] == "failed"]

    def finish_entry(self, index: int, result: dict[str, Any]) -> dict[str, Any]:
        entry = self.record["runs"][index]
        if self.remote is not None and result.get("metrics") and result.get("metrics_record"):
            # the worker uploaded its files; the tables are built from this staged copy
            atomic_write_text(self.out / result["metrics"], json.dumps(result["metrics_record"]))
        record = result.get("metrics_record") or {}
        entry.update(status=result["status"], error=result["error"], failure=result["failure"],
                     seconds=result["seconds"], metrics=result["metrics"],
                     peak_rss_mib=record.get("peak_rss_mib"), attempts=result.get("attempt", 1))
        self.save()
        return entry


def _failed_table(failures: Sequence[dict[str, Any]]) -> str:
    """The markdown section listing failed notebooks with their error and failing cell."""
    if not failures:
        return ""
    lines = ["", "## Failed notebooks", "",
             "| notebook | configuration | seed | error | cell | executed copy |", "|---|---|---:|---|---:|---|"]
    for entry in failures:
        failure = entry.get("failure") or {}
        cell = failure.get("cell_index")
        cells = [entry["notebook"], entry.get("config") or "-", str(entry["seed"]),
                 entry.get("error") or "", "" if cell is None else str(cell), entry["output"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write_tables(out: Path, run: _Run, seeds: Sequence[int]) -> str:
    """metrics.csv plus aggregate.csv / aggregate.md (two or more seeds or configurations) or
    summary.md (one of each), from the notebooks that succeeded; both list the failed ones.
    Returns the markdown table written."""
    metrics = load_metrics(out)  # run.json: only the notebooks that succeeded
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    several_configs = len(run.configs) > 1
    failed = _failed_table(run.failures())
    if len(seeds) >= 2 or several_configs:
        table = aggregate(metrics)
        atomic_write_text(out / "aggregate.csv", table.to_csv(index=False))
        shown = table if several_configs else table.drop(columns=["model", "params"])
        text = markdown_table(shown)
        title = f"Metrics across seeds {', '.join(map(str, seeds))}"
        if several_configs:
            title += f" and {len(run.configs)} configurations"
        note = ("mean, sample std (ddof=1) and Student-t 95% CI of the mean over seeds, per "
                "configuration; failed notebooks are left out.\n")
        atomic_write_text(out / "aggregate.md", f"# {title}\n\n{note}\n{text}{failed}")
    else:
        text = markdown_table(metrics[["notebook", "metric", "value"]])
        atomic_write_text(out / "summary.md", f"# Metrics, seed {seeds[0]}\n\n{text}{failed}")
    if metrics.empty:
        text = "(no metrics recorded by a notebook that succeeded)\n"
    return text


EXECUTORS = ("local", "ray")


def run_series(config: RunConfig, argv: Sequence[str] | None = None) -> int:
    """Execute the selected notebooks once per configuration and seed (see the module docstring
    for the layout and failure policy). Returns the exit status: 0 all succeeded, 1 some
    notebook failed, 130 interrupted. Raises RunInputError for bad input, before executing
    anything."""
    seeds = validate_seeds(config.seeds)
    if config.timeout is not None and config.timeout <= 0:
        raise RunInputError(f"--timeout: expected a positive number of seconds, got {config.timeout}")
    if config.executor not in EXECUTORS:
        raise RunInputError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {config.executor!r}")
    if config.executor == "local" and config.address:
        raise RunInputError("--address: only used with --executor ray")
    if config.cpus_per_task < 0 or config.gpus_per_task < 0 or config.max_retries < 0:
        raise RunInputError("--cpus-per-task, --gpus-per-task, --max-retries: expected numbers >= 0")
    if config.executor == "ray":
        from .cluster import import_ray

        import_ray()  # one-line error now, before any planning, when ray is not installed
    if config.notebooks_dir is not None:
        notebooks_dir = Path(config.notebooks_dir).expanduser()
        if not notebooks_dir.is_dir():
            raise RunInputError(f"notebooks folder {notebooks_dir} does not exist")
    else:
        notebooks_dir = default_notebooks_dir()
    series = find_series(notebooks_dir) if notebooks_dir is not None else []
    only_paths = config.notebooks and all(s.endswith(".ipynb") and Path(s).expanduser().is_file()
                                          for s in config.notebooks)
    if not series and not only_paths:
        where = (f"in {notebooks_dir.absolute()}" if notebooks_dir is not None
                 else "(not in a source checkout and no ./notebooks; pass --notebooks-dir)")
        raise RunInputError(f"no notebooks found {where}: expected files named like 00_name.ipynb")
    plans = inspect_notebooks(select_notebooks(series, config.notebooks))
    if is_url(config.out):  # an fsspec URL: tables staged here, uploaded as they change
        import shutil

        remote = config.out.rstrip("/")
        _check_writable_url(remote)
        tasks = plan_grid(plans, config.params, config.models, seeds, remote)
        staging = Path(tempfile.mkdtemp(prefix="interp-lib-run-"))
        try:  # no RunLock: object stores have no atomic create; one writer is the user's job
            return _run_locked(config, argv, staging, plans, tasks, seeds, remote=remote)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    out_path = Path(config.out).expanduser().absolute()
    tasks = plan_grid(plans, config.params, config.models, seeds, out_path)
    out = ensure_writable_dir(Path(config.out))
    from .artifacts import RunFolderLinkError, check_run_folder

    try:  # a link planted in the folder would receive an executed notebook, run.json, ...
        check_run_folder(out)
    except RunFolderLinkError as exc:
        raise RunInputError(str(exc)) from None
    from .checkpoint import RunFolderBusyError, RunLock

    lock = RunLock(out, "interp-lib run")
    try:
        lock.acquire()
    except RunFolderBusyError as exc:
        raise RunInputError(str(exc)) from None
    try:
        return _run_locked(config, argv, out, plans, tasks, seeds)
    finally:
        lock.release()


def _check_writable_url(url: str) -> None:
    fs, root = url_filesystem(url)
    probe = f"{root}/.write-test-{secrets.token_hex(4)}"
    try:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except Exception as exc:  # every filesystem raises its own kinds
        raise RunInputError(f"output folder {url} is not writable: {type(exc).__name__}: "
                            f"{first_line(exc)}") from None


def _run_locked(config: RunConfig, argv: Sequence[str] | None, out: Path,
                plans: Sequence[NotebookPlan], tasks: Sequence[NotebookTask],
                seeds: list[int], remote: str | None = None) -> int:
    import shutil

    shutil.rmtree(out / _ATTEMPTS_DIR, ignore_errors=True)  # attempt counts are per run
    if remote is not None:
        fs, root = url_filesystem(remote)
        if fs.exists(f"{root}/{_ATTEMPTS_DIR}"):
            fs.rm(f"{root}/{_ATTEMPTS_DIR}", recursive=True)
    shown = remote or str(out)  # where results are, for the messages
    run = _Run(config, argv, out, plans, tasks, remote=remote)
    run.save()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="series", unit="notebook", position=0,
               disable=not config.progress)
    status = 0

    def report(index: int, result: dict[str, Any]) -> bool:
        """Record one finished task; True when the run should stop (fail_fast)."""
        nonlocal status
        entry = run.finish_entry(index, result)
        bar.update()
        where = f"seed {entry['seed']}" + (f", {entry['config']}" if entry["config"] else "")
        line = f"[{where}] {entry['notebook']}: {entry['status']} in {entry['seconds']:.1f} s"
        if entry.get("peak_rss_mib") is not None:
            line += f", peak memory {entry['peak_rss_mib']:.0f} MiB"
        if entry["attempts"] > 1:
            line += f" (attempt {entry['attempts']})"
        if entry["status"] == "failed":
            status = 1
            line += f" -- {entry['error']} (see {shown}/{entry['output']})"
        elif entry["metrics"] is None:
            line += " (recorded no metrics)"
        bar.write(line, file=sys.stdout)
        return bool(status and config.fail_fast)

    try:
        with kernel_environment():
            if config.executor == "ray":
                from .cluster import run_tasks_on_ray

                def started(index: int) -> None:
                    run.record["runs"][index]["status"] = "running"

                run.record["ray"] = run_tasks_on_ray(
                    [asdict(t) for t in tasks], remote or str(out), kernel=config.kernel,
                    timeout=config.timeout, address=config.address,
                    num_cpus=config.cpus_per_task, num_gpus=config.gpus_per_task,
                    max_retries=config.max_retries, on_done=report, on_submit=started)
            else:
                for index, task in enumerate(tasks):
                    if status and config.fail_fast:
                        break
                    bar.set_postfix_str(f"seed {task.seed} {task.notebook}")
                    run.record["runs"][index]["status"] = "running"
                    run.save()
                    report(index, execute_task(asdict(task), remote or str(out), config.kernel,
                                               config.timeout, config.progress))
            for entry in run.record["runs"]:
                if entry["status"] in ("pending", "running"):
                    entry["status"] = "skipped"  # fail_fast
    except KeyboardInterrupt:
        bar.close()
        for entry in run.record["runs"]:
            if entry["status"] in ("running", "pending"):
                entry["status"] = "interrupted" if entry["status"] == "running" else "skipped"
        run.record.update(finished=_now(), status="interrupted")
        run.save()
        print(f"error: interrupted; partial results in {shown}", file=sys.stderr)
        return 130
    bar.close()
    run.save()

    try:
        table = _write_tables(out, run, seeds)
    except ValueError as exc:  # a metrics file a notebook wrote by hand, malformed
        print(f"error: {exc}", file=sys.stderr)
        status = 1
        table = ""
    run.record.update(finished=_now(), status="failed" if status else "ok")
    run.save()
    if not status or table:
        from .results import write_results_page

        write_results_page(out)  # the headline numbers said in words
    run.upload("metrics.csv", "aggregate.csv", "aggregate.md", "summary.md", "results.md")

    if table:
        print("\n" + table, end="")
    several = len(seeds) >= 2 or len(run.configs) > 1
    files = ("run.json, aggregate.csv, aggregate.md" if several else "run.json, summary.md") + ", results.md"
    layout = "<configuration>/seed-*/" if any(run.configs) else "seed-*/"
    print(f"results in {shown} ({files}, {layout})")
    for entry in run.failures():
        where = f"seed {entry['seed']}" + (f", {entry['config']}" if entry["config"] else "")
        print(f"error: {entry['notebook']} failed for {where} ({entry['error']}); "
              f"executed copy: {shown}/{entry['output']}", file=sys.stderr)
    return status
