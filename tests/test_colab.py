"""Colab: the constraints generated from Colab's published freeze, the install cell and badges
written from one repository URL (`make colab`), and the simulated runtime's comparison logic
(`make colab-sim` runs the simulation itself; these tests are the cheap, offline part)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from interp_lib import versions as V

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab = _load("colab")
sim = _load("colab_sim")
RUNTIME = (ROOT / V.COLAB_RUNTIME).read_text()


# --------------------------------------------------------------------------------------------
# Constraints from Colab's freeze
# --------------------------------------------------------------------------------------------

def test_constraints_take_colabs_versions_and_never_list_what_colab_keeps():
    lock = "numpy==2.4.6\n    # via x\ncircuitsvis==1.43.3\ntorch==2.13.0\nnvidia-cublas==13.0\nipykernel==7.4.0\n" \
           "Jupyter_Client==8.10.0\nsetuptools==84.2.1\n"
    runtime = "# Source: backend-info commit abc1234 of 2026-01-01\nnumpy==2.1.3\ntorch==2.11.0+cu128\n" \
              "ipykernel==6.17.1\njupyter_client==7.4.9\nsetuptools==75.2.0\ngoogle-colab @ file:///x.tar.gz\n"
    out = V.colab_constraints(lock, runtime, "colab/runtime-x.txt")
    pins = [line for line in out.splitlines() if not line.startswith("#")]
    # Colab's numpy and setuptools (torch 2.11 needs setuptools<82: the lock's 84.2.1 would replace torch)
    assert pins == ["numpy==2.1.3", "circuitsvis==1.43.3", "setuptools==75.2.0"]
    assert "backend-info commit abc1234 of 2026-01-01" in out and "colab/runtime-x.txt" in out
    with pytest.raises(ValueError, match="Source"):
        V.colab_constraints(lock, "numpy==2.1.3\n")


def test_committed_colab_constraints_are_generated_from_the_lock_and_colabs_freeze():
    committed = (ROOT / "colab" / "constraints.txt").read_text()
    expected = V.colab_constraints((ROOT / "requirements.lock").read_text(), RUNTIME, V.COLAB_RUNTIME)
    assert committed == expected, "colab/constraints.txt is stale: run make lock"
    assert "commit a724079 of 2026-08-19" in committed
    runtime = V.read_pins(RUNTIME)
    pins = V.read_pins(committed)
    assert not [name for name in pins if V.COLAB_KEPT.match(name)]
    # Colab's version wherever Colab ships the package
    assert {n: v for n, v in pins.items() if n in runtime and runtime[n] != v} == {}
    assert pins["setuptools"] == "75.2.0" and pins["transformers"] == "5.15.0" and pins["ipywidgets"] == "7.7.1"


def test_colabs_versions_lie_in_pyprojects_ranges():
    """The install on Colab keeps Colab's versions: pyproject's ranges must accept them (they are
    tested by `make colab-sim`)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    runtime = V.read_pins(RUNTIME)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    outside = [f"{r.name} {runtime[V._canonical(r.name)]} not in {r.specifier}" for r in map(Requirement, declared)
               if V._canonical(r.name) in runtime
               and not r.specifier.contains(Version(runtime[V._canonical(r.name)].split("+")[0]))]
    assert outside == []


# --------------------------------------------------------------------------------------------
# Badges and install cells from one URL
# --------------------------------------------------------------------------------------------

def test_every_notebook_is_written_from_pyprojects_repository_url():
    """`make colab` would change nothing: every badge and install cell comes from the one URL, and
    all notebooks carry the same install block."""
    url = colab.repository_url()
    paths = colab.colab_notebooks()
    assert len(paths) == len(list((ROOT / "notebooks").glob("[0-9]*.ipynb"))) + 1
    stale = [p.name for p in paths if colab.rendered(p, url) != p.read_text()]
    assert stale == [], "run make colab"
    blocks = {code[code.index("if IN_COLAB:"):] for code in map(colab.install_cell_code, paths[:-1])}
    assert len(blocks) == 1
    for path in paths:
        text = path.read_text()
        assert colab.badge(url, path.relative_to(ROOT).as_posix()) in text
        assert len(re.findall(r"github\.com/([\w.-]+/[\w.-]+?)(?:\.git|/blob/|\"|\))", text)) >= 1
        assert set(re.findall(r"github(?:usercontent)?\.com/([\w-]+/[\w-]+)", text)) == {url[19:]}, path.name


def test_rewriting_from_another_url_is_complete_and_idempotent(tmp_path):
    for sub in ("notebooks", "colab"):
        (tmp_path / sub).mkdir()
    paths = colab.colab_notebooks()
    for path in paths:
        shutil.copy(path, tmp_path / path.parent.name / path.name)
    copies = colab.colab_notebooks(tmp_path)
    before = {p.name: json.loads(p.read_text()) for p in copies}
    url = "https://github.com/someone/fork"
    assert all(colab.rewrite_notebook(p, url, tmp_path) for p in copies)
    assert not any(colab.rewrite_notebook(p, url, tmp_path) for p in copies)   # idempotent
    for path in copies:
        text = path.read_text()
        assert "interp-lib/interp_lib" not in text and "someone/fork" in text, path.name
        after = json.loads(text)
        changed = [i for i, (a, b) in enumerate(zip(before[path.name]["cells"], after["cells"])) if a != b]
        # only the badge cell and the install cell (the launcher: the badge and its repo_url cell)
        assert len(after["cells"]) == len(before[path.name]["cells"])
        assert changed[0] == 0 and len(changed) == 2, path.name
    with pytest.raises(ValueError, match="OWNER/NAME"):
        bad = tmp_path / "pyproject.toml"
        bad.write_text('[project]\nurls = {Repository = "https://gitlab.com/x/y"}\n')
        colab.repository_url(bad)


def test_install_cell_is_valid_ipython_and_keeps_exactly_colabs_own_packages():
    from IPython.core.inputtransformer2 import TransformerManager

    code = colab.install_cell_code(ROOT / "notebooks" / "00_tour.ipynb")
    python = TransformerManager().transform_cell(code)
    compile(python, "install cell", "exec")
    assert "run_line_magic('pip', 'install -q -c /tmp/colab-runtime.txt {source}')" in python
    keep = re.compile(re.search(r'keep = re.compile\(r"([^"]+)"', code).group(1), re.I)
    lines = [line for line in RUNTIME.splitlines() if "==" in line and not line.startswith("#")]
    kept = {V._canonical(line.split("==")[0]) for line in lines if keep.match(line)}
    expected = {V._canonical(line.split("==")[0]) for line in lines if V.COLAB_KEPT.match(V._canonical(line.split("==")[0]))}
    assert kept == expected
    assert {"torch", "triton", "ipykernel", "ipython", "pandas", "jupyter-client", "notebook", "tornado",
            "requests", "nvidia-cublas-cu12"} <= kept
    assert not {"numpy", "transformers", "torchmetrics", "ipywidgets"} & kept


# --------------------------------------------------------------------------------------------
# The simulation's comparison
# --------------------------------------------------------------------------------------------

def test_diff_and_violations_name_what_the_install_must_not_do():
    before = {"ipykernel": "6.17.1", "numpy": "2.1.3", "torch": "2.11.0+cu128", "requests": "2.32.4", "six": "1.17.0"}
    after = {"ipykernel": "7.4.0", "numpy": "2.1.3", "torch": "2.15.0", "six": "1.16.0",
             "nvidia-cublas": "13.1", "interp-lib": "0.1.0"}
    diff = sim.diff_freezes(before, after)
    assert diff == {"changed": [("ipykernel", "6.17.1", "7.4.0"), ("six", "1.17.0", "1.16.0"),
                                ("torch", "2.11.0+cu128", "2.15.0")],
                    "added": [("interp-lib", "0.1.0"), ("nvidia-cublas", "13.1")],
                    "removed": [("requests", "2.32.4")]}
    problems = sim.violations(diff, "old problem\n", "old problem\nnotebook 6.5.7 has requirement jupyter-client<8\n")
    assert problems == ["ipykernel changed 6.17.1 -> 7.4.0 (Colab's runtime must keep it)",
                        "torch changed 2.11.0+cu128 -> 2.15.0 (Colab's runtime must keep it)",
                        "requests 2.32.4 removed (Colab's runtime must keep it)",
                        "nvidia-cublas 13.1 added (a torch / CUDA package Colab ships in its own build)",
                        "pip check: notebook 6.5.7 has requirement jupyter-client<8"]
    harmless = sim.diff_freezes(before, {**before, "interp-lib": "0.1.0", "six": "1.16.0"})
    assert sim.violations(harmless, "No broken requirements found.\n", "No broken requirements found.\n") == []
    rows = sim.table(diff).splitlines()
    assert rows[0] == "3 changed, 2 added, 1 removed"
    assert "| ipykernel (pinned by google-colab) | 6.17.1 | 7.4.0 |" in rows
    assert "| nvidia-cublas (torch / CUDA) | (added) | 13.1 |" in rows


def test_dry_run_report_and_runtime_selection():
    report = {"install": [{"metadata": {"name": "Jupyter_Client", "version": "8.10.0"}},
                          {"metadata": {"name": "gguf", "version": "0.18.0"}}]}
    diff = sim.report_diff(report, {"jupyter-client": "7.4.9", "numpy": "2.1.3"})
    assert diff["changed"] == [("jupyter-client", "7.4.9", "8.10.0")] and diff["added"] == [("gguf", "0.18.0")]
    runtime = V.read_pins(RUNTIME)
    chosen, skipped = sim.runtime_selection(runtime, V.read_pins((ROOT / "requirements.lock").read_text()))
    assert chosen["ipykernel"] == "6.17.1" and chosen["notebook"] == "6.5.7" and chosen["pandas"] == "2.2.3"
    assert "torch" not in chosen and "tensorflow" not in chosen and all(runtime[n] == v for n, v in chosen.items())
    chosen, skipped = sim.runtime_selection(
        {"torch": "2.11.0+cu128", "triton": "3.6.0", "nvidia-nccl-cu12": "2.27", "numpy": "2.1.3", "jax": "0.7"},
        {"torch": "2.13.0", "triton": "3.7.0", "nvidia-nccl-cu12": "2.28", "numpy": "2.4.6", "gguf": "0.18.0"})
    assert chosen == {"numpy": "2.1.3"} and skipped == {"triton": "a CUDA build", "nvidia-nccl-cu12": "a CUDA build"}


# --------------------------------------------------------------------------------------------
# Python 3.13 (Colab's)
# --------------------------------------------------------------------------------------------

def test_the_lock_resolves_for_python_3_13_with_the_same_versions_and_wheels_only():
    """`make lock` resolves pyproject for Python 3.11 (requirements.lock) and 3.13
    (requirements-py313.lock), both accepting wheels only (a package without a wheel for either
    Python fails `make lock`); the 3.13 resolution must keep the 3.11 lock's versions, so CI's
    tested set is the one Colab's Python can install. torch / CUDA packages may differ (Colab
    keeps its own)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    lock311 = V.read_pins((ROOT / "requirements.lock").read_text())
    text313 = (ROOT / "requirements-py313.lock").read_text()
    assert "Python 3.13, wheels only" in text313.splitlines()[1]
    lock313 = V.read_pins(text313)
    platform = V.PLATFORM_PACKAGES
    differ = {n: (v, lock313.get(n)) for n, v in lock311.items() if not platform.match(n) and lock313.get(n) != v}
    extra = {n: v for n, v in lock313.items() if n not in lock311 and not platform.match(n)}
    assert differ == {} and extra == {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        assert requirement.specifier.contains(Version(lock313[V._canonical(requirement.name)].split("+")[0]))
    makefile = (ROOT / "Makefile").read_text()
    assert "WHEELS_ONLY := --only-binary :all: $(addprefix --no-binary ,$(SDIST_ONLY))" in makefile
    assert makefile.count("$(WHEELS_ONLY)") == 2 and "SDIST_ONLY := transformers-stream-generator\n" in makefile
