"""The ``interp-lib`` command: a thin argparse layer over the library.

Each subcommand is one ``_add_<name>_command(subparsers)`` function that declares its options and
sets ``handler``; the handler imports its module only when it runs, so ``interp-lib --help``
stays quick. A handler returns the exit status; bad input is raised as ``UsageError`` and
reported as one ``error: ...`` line with exit status 2 (no traceback).

    interp-lib run [NOTEBOOK ...] [--seeds 0 1 2] [-p KEY VALUE ...] [--out DIR] [--model NAME ...]
                   [--executor local|ray [--address ADDR]]
    interp-lib aggregate DIR [DIR ...] [--out DIR]
    interp-lib results DIR [DIR ...] [--to FILE]
    interp-lib explain --model NAME --out DIR [--explainer MODEL --base-url URL] [--heads ...]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, Sequence

from .errors import UsageError


@contextlib.contextmanager
def _usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Bad input found by the library (``kinds`` raised inside) becomes a UsageError: one
    ``error: ...`` line and exit status 2, no traceback."""
    try:
        yield
    except kinds as error:
        raise UsageError(str(error)) from None


def _add_ray_options(parser: argparse.ArgumentParser, task: str) -> None:
    """The Ray options ``run`` and ``explain`` share; ``task`` says what one Ray task runs."""
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --executor ray: the Ray cluster to join (ray://HOST:10001, "
                             "HOST:6379, auto); default: $RAY_ADDRESS, else a local cluster. OUT "
                             "must be a folder every worker can reach")
    parser.add_argument("--cpus-per-task", type=float, default=1.0, metavar="N",
                        help=f"with --executor ray: CPUs each {task} declares (default: 1)")
    parser.add_argument("--gpus-per-task", type=float, default=0.0, metavar="N",
                        help=f"with --executor ray: GPUs each {task} declares (default: 0)")


def _add_untrusted_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--untrusted", choices=["recompute", "load"], default=None,
                        help="a checkpointed stage whose signature does not verify (the folder was "
                             "produced elsewhere or edited): recompute it, or load it marked "
                             "unverified; either way a warning names it (default: "
                             "$INTERP_LIB_UNTRUSTED, else recompute)")


def _apply_untrusted(args: argparse.Namespace) -> None:
    """--untrusted reaches every Checkpointer of the run (notebook kernels included) through
    $INTERP_LIB_UNTRUSTED."""
    import os

    if getattr(args, "untrusted", None) is not None:
        os.environ["INTERP_LIB_UNTRUSTED"] = args.untrusted


def _add_run_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="execute the notebook series with papermill (optionally across seeds)",
        description=(
            "Execute the numbered notebooks (notebooks/NN_*.ipynb) with papermill, once per\n"
            "configuration (models x -p values) and seed. Each notebook gets seed, output_dir\n"
            "(OUT/[<configuration>/]seed-<s>) and, with --model, model_name; -p KEY VALUE goes to\n"
            "the notebooks whose parameters cell declares KEY (a KEY that no selected notebook\n"
            "declares is refused before anything runs).\n\n"
            "Writes the executed copies, OUT/run.json (every run with its model, params, seed,\n"
            "status, error and failing cell), OUT/metrics.csv and, with two or more seeds or\n"
            "configurations, OUT/aggregate.csv and aggregate.md (n, mean, std, 95% CI per\n"
            "configuration and metric); otherwise OUT/summary.md. A failing notebook is recorded\n"
            "and the run goes on; the exit status is then 1. Bad input: 2.\n"
            "`interp-lib aggregate DIR [DIR ...]` merges run folders made anywhere."),
        epilog=(
            "examples:\n"
            "  interp-lib run                                  # whole series, seed 0\n"
            "  interp-lib run --seeds 0 1 2 --out runs/seeds   # batch rerun + aggregate table\n"
            "  interp-lib run 00 --model toy-2l -p top_k 10    # one notebook, other parameters\n"
            "  interp-lib run 01 --model toy-lm toy-2l -p n_bins 10 -p n_bins 15 --seeds 0 1\n"
            "      # a grid: 2 models x 2 values x 2 seeds, in OUT/model=toy-lm,n_bins=10/seed-0/ ...\n"
            "  interp-lib run ... --executor ray --address ray://head:10001 --out /shared/runs/x\n"
            "put NOTEBOOK selectors before --seeds / --model (which take every word after them)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "notebooks", nargs="*", metavar="NOTEBOOK",
        help="number prefix (00), stem (00_tour) or path of a notebook; default: the whole series")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="run every notebook once per seed (default: 0)")
    parser.add_argument("-p", "--param", nargs=2, action="append", default=[],
                        metavar=("KEY", "VALUE"), dest="params",
                        help="set a notebook parameter; VALUE is parsed as JSON / a Python "
                             "literal when it can be (64, 0.5, true, [1, 2]), else kept as text. "
                             "Repeat -p KEY with other values for a grid: -p n_bins 10 -p n_bins 15")
    parser.add_argument("--out", default="runs/series", metavar="DIR",
                        help="run folder (default: runs/series under the current directory), "
                             "or an fsspec URL (s3://, gs://, file://) where its package is installed")
    parser.add_argument("--model", nargs="+", default=[], metavar="NAME", dest="models",
                        help="model_name for every notebook (bundled toy name, hub name or local "
                             "HF directory); several names: one configuration each; default: "
                             "each notebook's 'auto'")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: one notebook after another (default); ray: one Ray task per "
                             "notebook, configuration and seed (pip install 'interp-lib[cluster]')")
    _add_ray_options(parser, "notebook task")
    parser.add_argument("--max-retries", type=int, default=2, metavar="N",
                        help="re-runs of a Ray task whose worker died (default: 2)")
    parser.add_argument("--notebooks-dir", default=None, metavar="DIR",
                        help="folder holding the series (default: the checkout's notebooks/)")
    parser.add_argument("--timeout", type=int, default=None, metavar="SECONDS",
                        help="per-cell execution timeout (default: none)")
    parser.add_argument("--kernel", default="python3", metavar="NAME",
                        help="Jupyter kernel to execute in (default: python3, this interpreter)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first failing notebook (default: run the rest)")
    _add_untrusted_option(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (status lines still print)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .runner import RunConfig, run_series

    _apply_untrusted(args)
    config = RunConfig(
        notebooks=list(args.notebooks), seeds=list(args.seeds),
        params=[(key, value) for key, value in args.params], out=args.out,
        models=list(args.models), notebooks_dir=args.notebooks_dir, timeout=args.timeout,
        kernel=args.kernel, fail_fast=args.fail_fast, progress=args.progress,
        executor=args.executor, address=args.address, cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task, max_retries=args.max_retries)
    return run_series(config, argv=["interp-lib", *argv])


def _add_aggregate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aggregate",
        help="merge run folders into aggregate tables (n, mean, std, CI per configuration)",
        description=(
            "Merge the metrics of any set of `interp-lib run` folders (shards of one sweep, runs\n"
            "made on other machines) and aggregate them per configuration (notebook, model,\n"
            "params) and metric: n, mean, sample std, Student-t CI of the mean over seeds.\n"
            "Prints the table; with --out writes OUT/metrics.csv (with the source folder of each\n"
            "row), OUT/aggregate.csv and OUT/aggregate.md. Two folders holding the same\n"
            "(configuration, seed, notebook) are refused."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folders to merge")
    parser.add_argument("--out", default=None, metavar="DIR", help="write the merged tables here")
    parser.add_argument("--confidence", type=float, default=0.95, metavar="LEVEL",
                        help="confidence level of the interval (default: 0.95)")
    parser.set_defaults(handler=_aggregate)


def _aggregate(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from .artifacts import atomic_write_text, markdown_table
    from .results import aggregate_runs
    from .runner import ensure_writable_dir

    with _usage_errors(FileNotFoundError, ValueError):
        metrics, table = aggregate_runs(args.run_dirs, args.confidence)
    text = markdown_table(table)
    print(text, end="")
    if args.out is not None:
        out = ensure_writable_dir(Path(args.out))
        atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
        atomic_write_text(out / "aggregate.csv", table.to_csv(index=False))
        title = f"Metrics merged from {len(args.run_dirs)} run folder(s)"
        sources = "".join(f"- {d}\n" for d in args.run_dirs)
        atomic_write_text(out / "aggregate.md", f"# {title}\n\n{sources}\n{text}")
        print(f"merged {len(metrics)} values from {len(args.run_dirs)} folder(s) into {out} "
              "(metrics.csv, aggregate.csv, aggregate.md)")
    return 0


def _add_results_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "results",
        help="write the results page (headline numbers in words) of run folders",
        description=(
            "Write the results page of one or more `interp-lib run` folders: per model, each\n"
            "notebook's headline numbers said in words (means over seeds, with their range), and\n"
            "every recorded metric below. `interp-lib run` writes OUT/results.md by itself; this\n"
            "command rewrites it, or merges several folders into one page."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="DIR", help="run folders")
    parser.add_argument("--to", default=None, metavar="FILE",
                        help="page to write (default: results.md in the first folder)")
    parser.set_defaults(handler=_results)


def _results(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .results import write_results_page

    with _usage_errors(FileNotFoundError, ValueError):
        path = write_results_page(args.run_dirs, args.to)
    print(f"results page written to {path}")
    return 0


def _add_explain_command(subparsers: argparse._SubParsersAction) -> None:
    import dataclasses
    import typing

    from .explain.config import STAGES, ExplainConfig

    parser = subparsers.add_parser(
        "explain",
        help="name what every attention head or MLP neuron does (events -> explanations -> scores -> report)",
        description=(
            "Run the explainer pipeline (attention heads, or MLP neurons with --units neurons) into\n"
            "OUT, stage by stage: " + ", ".join(STAGES) + ".\n"
            "Finished stages are loaded from OUT/checkpoints, answered LLM requests from\n"
            "OUT/llm_cache, so a killed or repeated run resumes without recomputing or resending.\n"
            "With no --explainer the heuristic (no-LLM) explainer names the units and the LLM\n"
            "scorers are skipped (said in the report). The API key is read from\n"
            "$INTERP_LIB_API_KEY, or for OpenAI itself $OPENAI_API_KEY (or the Colab secret),\n"
            "never from the command line, and is written nowhere (a key in --base-url's user-info\n"
            "is sent as the Bearer key and stripped from every saved URL).\n\n"
            "Exit status: 0 done; 1 the endpoint is unusable (refused, 401 / 403, not JSON: one\n"
            "error line naming it), some LLM requests failed (those stages are not saved as\n"
            "finished: rerun to retry them), or another run holds OUT; 2 bad input."),
        epilog=(
            "examples:\n"
            "  interp-lib explain --model toy-2l --out runs/explain-toy          # offline, heuristic\n"
            "  interp-lib explain --model toy-lm --units neurons --out runs/neurons  # 64 sampled MLP neurons\n"
            "  interp-lib explain --model gpt2 --heads all --dataset wikitext --windows 1500 \\\n"
            "      --window-len 192 --top-k 200 --explainer gpt-4o-mini --out runs/explain-gpt2\n"
            "  interp-lib explain ... --dry-run                 # count calls, estimate cost\n"
            "  interp-lib explain ... --skip refine taxonomy    # leave stages out"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(ExplainConfig)
    for item in dataclasses.fields(ExplainConfig):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "") + f" (default: {item.default})"
        kind = hints[item.name]
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action="store_true", help=help_text)
        elif item.name == "scorers":
            parser.add_argument(flag, dest=item.name, nargs="+", default=list(item.default),
                                metavar="NAME", help=help_text)
        else:
            base = next((t for t in (int, float, str) if t is kind or t in typing.get_args(kind)), str)
            parser.add_argument(flag, dest=item.name, type=base, default=item.default,
                                metavar=item.name.upper(), help=help_text)
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder")
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                        help="run only these stages (earlier results are loaded, or computed if missing)")
    parser.add_argument("--skip", nargs="+", default=None, metavar="STAGE",
                        help="leave these stages out")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: one process (default); ray: the heads / neurons split into --shards "
                             "ranges, one Ray task each, merged into one run in OUT "
                             "(pip install 'interp-lib[cluster]')")
    parser.add_argument("--shards", type=int, default=2, metavar="N",
                        help="with --executor ray: unit ranges run as separate tasks (default: 2)")
    _add_ray_options(parser, "shard")
    _add_untrusted_option(parser)
    parser.set_defaults(handler=_explain)


def _explain(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import dataclasses

    from .checkpoint import RunFolderBusyError
    from .explain.client import EndpointError
    from .explain.pipeline import ExplainConfig, run_explainer
    from .explain.report import unit_noun
    from .models import ModelLoadError

    _apply_untrusted(args)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExplainConfig)}
    with _usage_errors(ValueError):
        config = ExplainConfig(**values)
    if not config.uses_llm:
        print("no --explainer given: using the heuristic (no-LLM) explainer; LLM scorers are skipped")
    if args.executor == "ray":
        return _explain_on_ray(args, config)
    if args.address is not None or args.shards != 2:
        raise UsageError("--address / --shards: only used with --executor ray")
    try:  # ValueError: bad heads / stages / dataset, found after the model loaded
        with _usage_errors(ModelLoadError, ValueError):
            run = run_explainer(config, args.out, stages=args.stages, skip=args.skip, progress=args.progress)
    except (EndpointError, RunFolderBusyError) as error:  # nothing of the failed stage is saved
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = [r.label for r in run.records if r.explanation is None]
    retried = (f" ({len(run.retried)} retried after failing in an earlier run)"
               if run.retried else "")
    noun = unit_noun(run.records)
    print(f"explained {len(run.records) - len(failed)} of {len(run.records)} {noun}s{retried}"
          + (f"; failed: {', '.join(failed)} (reasons in the report)" if failed else "")
          + f"; outputs in {run.out}")
    if run.unfinished:
        stages = ", ".join(f"{name} ({why})" for name, why in run.unfinished.items())
        print(f"error: LLM requests failed, so these stages were not saved as finished: {stages}; "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _explain_on_ray(args: argparse.Namespace, config) -> int:
    from .cluster import explain_sharded
    from .explain.report import unit_noun
    from .models import ModelLoadError

    if args.stages or args.skip or config.dry_run:
        raise UsageError("--executor ray runs every stage: --stages, --skip and --dry-run are "
                         "for --executor local")
    with _usage_errors(ModelLoadError, ValueError):  # ValueError: bad heads, found once the model loaded
        run = explain_sharded(config, args.out, shards=args.shards, address=args.address,
                              cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                              progress=args.progress)
    records = run["records"]
    failed = [r.label for r in records if r.explanation is None]
    print(f"explained {len(records) - len(failed)} of {len(records)} {unit_noun(records)}s in "
          f"{args.shards} shard(s)" + (f"; failed: {', '.join(failed)}" if failed else "")
          + f"; outputs in {run['out']}")
    if run["unfinished"]:
        why = "; ".join(f"{k} ({v})" for k, v in run["unfinished"].items())
        print(f"error: not finished: {why}; rerun the same command to resume those shards",
              file=sys.stderr)
        return 1
    return 0


# Subcommands, in the order --help lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_run_command, _add_aggregate_command, _add_results_command, _add_explain_command]


def build_parser() -> argparse.ArgumentParser:
    """The ``interp-lib`` argument parser with every subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="interp-lib",
        description="Run the interp_lib notebook series and pipelines from the command line.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``interp-lib``; returns the exit status (argparse errors: 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse's own usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return args.handler(args, argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; finished stages and batch ids are kept
        print(f"interrupted: finished stages, cached answers and submitted batch ids are kept; rerun "
              f"the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m interp_lib.cli`
    sys.exit(main())
