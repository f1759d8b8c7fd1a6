"""A simulated Colab runtime: does the notebooks' install cell leave Colab's packages intact, and
do the notebooks run on Colab's versions? (`make colab-sim`)

1. ``build``: a virtual environment on this machine's Python with Colab's published versions
   (``interp_lib.versions.COLAB_RUNTIME``, googlecolab/backend-info's GPU freeze) of every package
   on interp-lib's dependency path (the lock's packages), every package google-colab pins and
   Colab's Jupyter stack, with pip at Colab's version and the CPU wheel of Colab's torch release
   in place of its CUDA build. Packages that are CUDA builds, or that have no wheel for this
   Python at Colab's version, are skipped and listed.
2. ``install``: runs the setup cell of the notebooks (all notebooks carry the same one; checked)
   in IPython inside that environment, with a stand-in for ``google.colab.drive`` (Colab's own
   package does not install outside Colab), the Drive folder replaced by a local folder holding
   the ``make colab-bundle`` wheel, and the repository URLs replaced by this checkout. First as
   ``pip install --dry-run --report`` for both sources (the repository and the Drive wheel), then
   for real from the Drive wheel. ``pip freeze`` and ``pip check`` before / after give the table
   of changed and added packages; it fails when a package google-colab pins or a torch / CUDA
   package changed, when ``pip check`` reports something new, or when interp_lib does not read
   its data from the installed wheel.
3. ``test``: installs the test tools (pytest, nbval, torchmetrics: constrained the same way, again
   checked to change nothing of Colab's) and runs the given notebooks under nbval and, with
   ``--oracle``, the oracle tests, in that environment (from a copy of tests/ and notebooks/ outside
   the checkout, so that interp_lib comes from the installed wheel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import colab  # noqa: E402
from interp_lib.versions import COLAB_KEPT, COLAB_PINNED, COLAB_RUNTIME, PLATFORM_PACKAGES, _canonical, read_pins  # noqa: E402

# Colab's Jupyter stack: what the frontend integration runs on (beside google-colab's pins)
JUPYTER_STACK = ("notebook", "jupyter-client", "jupyter-core", "ipywidgets", "widgetsnbextension",
                 "jupyterlab-widgets", "traitlets", "pip", "setuptools", "wheel")
# CUDA builds (Colab's own; a CPU torch of the same release stands in for torch)
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|.*-cu1\d.*|cupy-cuda.*|jax-cuda.*|triton|torchvision|torchaudio)$")
TEST_TOOLS = ("pytest", "nbval", "pytest-timeout", "torchmetrics")
PIP = ["-m", "pip", "--disable-pip-version-check"]


# --------------------------------------------------------------------------------------------
# The comparison (pure functions: tests/test_colab.py)
# --------------------------------------------------------------------------------------------

def diff_freezes(before: dict[str, str], after: dict[str, str]) -> dict[str, list]:
    """``{"changed": [(name, old, new)], "added": [(name, new)], "removed": [(name, old)]}``
    between two ``{name: version}`` maps (names canonical)."""
    return {
        "changed": sorted((n, before[n], after[n]) for n in before.keys() & after.keys() if before[n] != after[n]),
        "added": sorted((n, after[n]) for n in after.keys() - before.keys()),
        "removed": sorted((n, before[n]) for n in before.keys() - after.keys()),
    }


def violations(diff: dict[str, list], check_before: str, check_after: str, ignore=("interp-lib",)) -> list[str]:
    """What the install must never do: change or remove a package google-colab pins or a torch /
    CUDA package (:data:`COLAB_KEPT`), or add a line to ``pip check``'s report."""
    problems = [f"{name} changed {old} -> {new} (Colab's runtime must keep it)"
                for name, old, new in diff["changed"] if COLAB_KEPT.match(name) and name not in ignore]
    problems += [f"{name} {old} removed (Colab's runtime must keep it)"
                 for name, old in diff["removed"] if COLAB_KEPT.match(name)]
    problems += [f"{name} {new} added (a torch / CUDA package Colab ships in its own build)"
                 for name, new in diff["added"] if PLATFORM_PACKAGES.match(name)]
    old = set(check_before.splitlines())
    problems += [f"pip check: {line}" for line in check_after.splitlines()
                 if line not in old and line.strip() and not line.startswith("No broken requirements")]
    return problems


def table(diff: dict[str, list]) -> str:
    """The diff as a Markdown table, google-colab-pinned and torch / CUDA packages marked."""
    def mark(name):
        return " (pinned by google-colab)" if name in COLAB_PINNED else \
            " (torch / CUDA)" if PLATFORM_PACKAGES.match(name) else ""
    rows = [f"| {n}{mark(n)} | {o} | {v} |" for n, o, v in diff["changed"]]
    rows += [f"| {n}{mark(n)} | (added) | {v} |" for n, v in diff["added"]]
    rows += [f"| {n}{mark(n)} | {o} | (removed) |" for n, o in diff["removed"]]
    head = (f"{len(diff['changed'])} changed, {len(diff['added'])} added, {len(diff['removed'])} removed\n\n"
            "| package | Colab's runtime | after the install cell |\n|---|---|---|")
    return "\n".join([head, *rows])


def report_diff(report: dict, before: dict[str, str]) -> dict[str, list]:
    """The diff a ``pip install --dry-run --report`` report announces."""
    after = dict(before)
    for item in report.get("install", []):
        meta = item["metadata"]
        after[_canonical(meta["name"])] = meta["version"]
    return diff_freezes(before, after)


def runtime_selection(runtime: dict[str, str], lock: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(``{name: version}`` to install in the simulated runtime, ``{name: reason}`` skipped) from
    Colab's freeze: the lock's packages, google-colab's pins and the Jupyter stack, at Colab's
    versions; torch / CUDA builds skipped (a CPU torch is installed first)."""
    wanted = (set(lock) | set(COLAB_PINNED) | set(JUPYTER_STACK)) & set(runtime)
    chosen, skipped = {}, {}
    for name in sorted(wanted):
        if name == "torch":
            continue
        if CUDA_ONLY.match(name):
            skipped[name] = "a CUDA build"
        else:
            chosen[name] = runtime[name]
    return chosen, skipped


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------

def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(map(str, cmd))[:300], file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), text=True, **kwargs)


def freeze(python: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every installed distribution (those installed from a
    file or URL too, which ``pip freeze`` shows without a version)."""
    out = _run([python, *PIP, "list", "--format", "json"], capture_output=True, check=True).stdout
    return {_canonical(item["name"]): item["version"] for item in json.loads(out)}


def pip_check(python: Path) -> str:
    return _run([python, *PIP, "check"], capture_output=True).stdout


def build(venv: Path, runtime_path: Path) -> None:
    runtime_text = runtime_path.read_text()
    runtime = read_pins(runtime_text)
    lock = read_pins((ROOT / "requirements.lock").read_text())
    chosen, skipped = runtime_selection(runtime, lock)
    torch = runtime["torch"].split("+")[0]
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    _run([python, *PIP, "install", "-q", f"pip=={runtime['pip']}"], check=True)
    _run([python, *PIP, "install", "-q", f"torch=={torch}"], check=True)   # the CPU wheel of Colab's release
    constraints = venv / "colab-runtime-constraints.txt"
    for _ in range(10):
        pins = {n: v for n, v in runtime.items() if n not in skipped and not CUDA_ONLY.match(n)}
        pins["torch"] = torch
        constraints.write_text("".join(f"{n}=={v.split('+')[0]}\n" for n, v in sorted(pins.items())))
        out = _run([python, *PIP, "install", "-q", "--only-binary", ":all:", "-c", constraints,
                    *(f"{n}=={v}" for n, v in chosen.items())], capture_output=True)
        if out.returncode == 0:
            break
        missing = re.findall(r"(?:No matching distribution found for|version that satisfies the requirement) "
                             r"([A-Za-z0-9._-]+)", out.stderr)
        if not missing:
            sys.exit(f"building the simulated runtime failed:\n{out.stderr[-3000:]}")
        for name in missing:
            skipped[_canonical(name)] = f"no wheel of {runtime.get(_canonical(name))} for Python {sys.version_info.major}.{sys.version_info.minor}"
            chosen.pop(_canonical(name), None)
    else:
        sys.exit("building the simulated runtime: gave up after 10 rounds of skipping packages")
    installed = freeze(python)
    differs = {n: (runtime[n], v) for n, v in installed.items() if n in runtime and n != "torch"
               and not CUDA_ONLY.match(n) and runtime[n].split("+")[0] != v}
    for name in runtime:   # Colab's CUDA stack: replaced by the torch above
        if CUDA_ONLY.match(name) and name not in skipped:
            skipped[name] = "a CUDA build"
    others = sorted(set(runtime) - set(chosen) - set(skipped) - {"torch"} - set(installed))
    (venv / "colab-sim.json").write_text(json.dumps({"runtime": str(runtime_path), "skipped": skipped,
                                                      "not_colab_versions": differs}, indent=1))
    cuda = sorted(n for n in installed if CUDA_ONLY.match(n))
    torch_note = (f"torch {installed['torch']}, a CPU build" if not cuda else
                  f"torch {installed['torch']}, the registry's build with {len(cuda)} CUDA packages (no CPU wheel of "
                  f"{torch} was installable; it runs on the CPU here)")
    print(f"simulated Colab runtime in {venv}: {len(installed)} packages from {runtime_path.name} "
          f"({torch_note}, in place of Colab's {runtime['torch']}); skipped {len(skipped)}: "
          + ", ".join(f"{n} ({why})" for n, why in sorted(skipped.items())))
    print(f"not simulated: {len(others)} more packages of Colab's runtime, not on interp-lib's dependency path "
          f"(e.g. {', '.join(others[:8])}, ...)")
    if differs:
        print("installed at other versions than Colab's (pip chose them): "
              + ", ".join(f"{n} {v} (Colab {c})" for n, (c, v) in sorted(differs.items())))


def cell_code(work: Path, source: str) -> str:
    """The notebooks' setup cell, checked to be the same in every notebook, with the Colab paths
    and URLs replaced: Drive's interp_lib folder by ``work/drive``, the repository by this
    checkout, the keep file by ``work/colab-runtime.txt``; ``source`` "checkout" hides the Drive wheel."""
    cells = {path.name: colab.install_cell_code(path) for path in colab.colab_notebooks()[:-1]}
    codes = {code[code.index("if IN_COLAB:"):] for code in cells.values()}
    if len(codes) != 1:
        sys.exit("the notebooks' Colab install cells differ: run make colab")
    code = codes.pop()
    url = colab.repository_url()
    slug = url.removeprefix("https://github.com/")
    drive = work / ("drive" if source == "wheel" else "empty-drive")
    drive.mkdir(exist_ok=True)
    replacements = {
        colab.DRIVE_DIR: str(drive),
        f"git+{url}.git": (ROOT.as_uri()),
        f"https://raw.githubusercontent.com/{slug}/main/colab/constraints.txt": str(ROOT / "colab" / "constraints.txt"),
        colab.KEEP_FILE: str(work / "colab-runtime.txt"),
    }
    for old, new in replacements.items():
        if old not in code:
            sys.exit(f"the install cell no longer contains {old!r}: update scripts/colab_sim.py")
        code = code.replace(old, new)
    return "import sys\nIN_COLAB = 'google.colab' in sys.modules\n" + code


# google.colab cannot be installed outside Colab: a stand-in module whose drive.mount records the call
_IPYTHON_RUNNER = """
import sys, types
colab = types.ModuleType("google.colab")
colab.drive = types.SimpleNamespace(mount=lambda path: print("[colab-sim] drive.mount", path))
try:
    import google
except ImportError:
    google = sys.modules["google"] = types.ModuleType("google")
google.colab = colab
sys.modules["google.colab"] = colab
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
result = shell.run_cell(open(sys.argv[1]).read())
sys.exit(0 if result.success else 1)
"""


def run_cell(python: Path, code: str, work: Path, name: str) -> None:
    path = work / f"{name}.ipy"
    path.write_text(code)
    runner = work / "run_cell.py"
    runner.write_text(_IPYTHON_RUNNER)
    _run([python, runner, path], check=True, cwd=work)


def baseline_dry_run(python: Path, work: Path, ref: str, before: dict[str, str]) -> dict[str, list]:
    """What the install command of git ``ref`` (before the install cell kept Colab's packages:
    ``pip install -c colab/constraints.txt "interp-lib @ <checkout>"``) would change, as a dry run."""
    tree = work.resolve() / f"baseline-{ref}"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    report = work / f"dry-run-{ref}.json"
    _run([python, *PIP, "install", "-q", "--dry-run", "--report", report, "-c", tree / "colab" / "constraints.txt",
          f"interp-lib @ {tree.as_uri()}"], check=True)
    return report_diff(json.loads(report.read_text()), before)


def install(venv: Path, work: Path, wheel_dir: Path | None, baseline: str | None = None) -> list[str]:
    python = venv / "bin" / "python"
    work.mkdir(parents=True, exist_ok=True)
    drive = work / "drive"
    if drive.exists():
        shutil.rmtree(drive)
    wheel = colab.bundle(drive) if wheel_dir is None else None
    if wheel_dir is not None:
        drive.mkdir()
        for item in wheel_dir.iterdir():
            shutil.copy(item, drive / item.name)
    before, check_before = freeze(python), pip_check(python)
    (work / "runtime-freeze.json").write_text(json.dumps(before, indent=1))
    problems = []
    if baseline:
        old = baseline_dry_run(python, work, baseline, before)
        print(f"\n## before: the install command of {baseline} (dry run)\n\n{table(old)}\n")
    for source in ("checkout", "wheel"):
        report = work / f"dry-run-{source}.json"
        code = cell_code(work, source).replace("%pip install ", f"%pip install --dry-run --report {report} ")
        run_cell(python, code, work, f"dry-run-{source}")
        planned = report_diff(json.loads(report.read_text()), before)
        print(f"\n## dry run, source {source} ({'Drive wheel' if source == 'wheel' else 'repository'}): "
              + table(planned).split("\n")[0])
        problems += [f"dry run ({source}): {p}" for p in violations(planned, "", "")]
    start = time.time()
    run_cell(python, cell_code(work, "wheel"), work, "install")
    after, check_after = freeze(python), pip_check(python)
    diff = diff_freezes(before, after)
    print(f"\n## the install cell on the simulated Colab runtime (Drive wheel, {time.time() - start:.0f} s)\n")
    print(table(diff))
    print(f"\npip check before:\n{check_before.strip()}\npip check after:\n{check_after.strip()}")
    (work / "install-diff.json").write_text(json.dumps({"diff": diff, "pip_check_before": check_before,
                                                        "pip_check_after": check_after}, indent=1))
    problems += violations(diff, check_before, check_after)
    if "interp-lib" not in after:
        problems.append("interp-lib is not installed after the install cell")
    # the package and its data come from the installed wheel, not this checkout
    where = _run([python, "-c", "import interp_lib, interp_lib.paths as p; print(interp_lib.__file__); "
                  "print(p.data_dir()); print(p.repo_root())"], capture_output=True, cwd=work)
    lines = where.stdout.split()
    site = str(venv.resolve())
    if where.returncode or len(lines) != 3 or not all(line.startswith(site) for line in lines[:2]) \
            or lines[2] != "None":
        problems.append(f"interp_lib does not run from the installed wheel: {where.stdout} {where.stderr[-500:]}")
    else:
        print(f"interp_lib from the wheel: {lines[0]}; data: {lines[1]}")
    return problems


def test(venv: Path, work: Path, notebooks: list[str], oracle: bool) -> int:
    python = venv / "bin" / "python"
    before, check_before = freeze(python), pip_check(python)
    _run([python, *PIP, "install", "-q", "-c", work / "colab-runtime.txt", "-c", ROOT / "colab" / "constraints.txt",
          *TEST_TOOLS], check=True)
    diff = diff_freezes(before, freeze(python))
    problems = violations(diff, check_before, pip_check(python))
    print(f"test tools: {table(diff).splitlines()[0]} ("
          + ", ".join(f"{n} {v}" for n, v in diff["added"]) + ")")
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    # a copy outside the checkout: interp_lib must come from the installed wheel
    copy = work / "tree"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir()
    for name in ("tests", "notebooks", "scripts", "colab", "pyproject.toml", "Makefile", "requirements.lock",
                 "requirements-py313.lock"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, copy / name)
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    rc = 0
    if notebooks:
        rc |= _run([python, "-m", "pytest", "-p", "no:cacheprovider", "--nbval-lax", "-q",
                    *(f"notebooks/{n}" for n in notebooks)], cwd=copy, env=env).returncode
    if oracle:
        rc |= _run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "oracle", "tests"],
                   cwd=copy, env=env).returncode
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # no `choices` with nargs="*": Python 3.11's argparse checks the list default against them
    parser.add_argument("steps", nargs="*", help="build, install and / or test (default: all three)")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-colab")
    parser.add_argument("--runtime", type=Path, default=ROOT / COLAB_RUNTIME)
    parser.add_argument("--wheel-dir", type=Path, help="a `make colab-bundle` folder (default: build one)")
    parser.add_argument("--notebooks", default="all", help="'all' or comma-separated notebook files for nbval")
    parser.add_argument("--oracle", action="store_true", help="also run the oracle tests (-m oracle)")
    parser.add_argument("--baseline", metavar="GIT_REF",
                        help="also show what the install command of this commit would change (dry run)")
    args = parser.parse_args(argv)
    args.steps = args.steps or ["build", "install", "test"]
    unknown = sorted(set(args.steps) - {"build", "install", "test"})
    if unknown:
        parser.error(f"steps={unknown}: expected build, install or test")
    args.venv = args.venv.resolve()
    work = args.venv / "colab-sim"
    start = time.time()
    if "build" in args.steps:
        build(args.venv, args.runtime)
        print(f"[colab-sim] built at +{time.time() - start:.0f} s", flush=True)
    if "install" in args.steps:
        problems = install(args.venv, work, args.wheel_dir, args.baseline)
        print(f"[colab-sim] installed at +{time.time() - start:.0f} s", flush=True)
        if problems:
            print("\nthe install cell would harm Colab's runtime:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        print("0 google-colab-pinned packages changed, 0 torch / CUDA packages changed, nothing new from pip check")
    if "test" in args.steps:
        names = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb")) if args.notebooks == "all" \
            else [n.strip() for n in args.notebooks.split(",") if n.strip()]
        rc = test(args.venv, work, names, args.oracle)
        print(f"[colab-sim] tests {'passed' if rc == 0 else 'FAILED'} at +{time.time() - start:.0f} s", flush=True)
        return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
