"""The environment record, the lock and the tested version range."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import interp_lib as il
from interp_lib import versions as V

ROOT = Path(__file__).resolve().parents[1]


def test_environment_reports_the_installed_versions():
    env = il.environment()
    for name in ("torch", "transformers", "transformer-lens", "numpy"):
        assert env["packages"][name] == metadata.version(name)
    assert env["interp_lib"] == il.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["device"] == "cpu"
    line = V.describe(env)
    assert "\n" not in line and f"transformers {metadata.version('transformers')}" in line


def test_out_of_range_and_missing_packages_are_named():
    installed = metadata.version("numpy")
    problems = V.version_problems([f"numpy<{installed}", "numpy>=1", "not-a-real-package-xyz>=1",
                                   "pytest>=1; extra == 'dev'"])
    assert problems == [f"numpy {installed} is outside the tested range <{installed}",
                        "not-a-real-package-xyz is not installed (required: >=1)"]
    with pytest.warns(V.EnvironmentWarning, match=f"not tested with these versions.*numpy {installed}") as caught:
        assert V.check_environment(requirements=[f"numpy<{installed}"])[0].startswith("numpy")
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert V.check_environment(requirements=["numpy>=1"]) == V.lock_differences()


def test_lock_is_read_and_compared(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nnumpy==0.0.1\n    # via x\ntorch==0.1.0\nPyYAML[extra]==6.0 ; python_version >= '3'\n")
    assert V.read_lock(lock) == {"numpy": "0.0.1", "torch": "0.1.0", "pyyaml": "6.0"}
    assert V.lock_differences(["numpy", "torch"], lock) == [f"numpy {metadata.version('numpy')} (lock: 0.0.1)"]
    assert "torch" not in V.constraints_from_lock(lock.read_text())   # Colab keeps its own CUDA torch


def test_committed_lock_satisfies_pyproject_and_colab_constraints_are_current():
    """A pyproject edit without `make lock`, or a hand-edited Colab constraints file, fails here."""
    pins = V.read_lock(ROOT / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    for requirement in map(Requirement, declared):
        name = V._canonical(requirement.name)
        assert name in pins, f"{requirement.name} is declared but not locked: run make lock"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), \
            f"locked {name}=={pins[name]} is outside pyproject's {requirement}: run make lock"
    constraints = (ROOT / "colab" / "constraints.txt").read_text()
    expected = V.colab_constraints((ROOT / "requirements.lock").read_text(), (ROOT / V.COLAB_RUNTIME).read_text())
    assert constraints == expected, "colab/constraints.txt is stale: run make lock"
    assert not any(line.startswith(("torch==", "nvidia-", "triton==")) for line in constraints.splitlines())


def test_installed_environment_is_the_lock():
    """`make venv` installs requirements.lock: the tests run on exactly the locked versions."""
    out = subprocess.run([sys.executable, "-m", "interp_lib.versions", "--check-lock"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "installed at their locked versions" in out.stdout


def test_notebook_setup_records_the_environment(tmp_path, capsys):
    import json

    il.notebook.setup("99_probe", "toy-lm", tmp_path, seed=0)
    printed = capsys.readouterr().out
    assert f"transformers {metadata.version('transformers')}" in printed
    saved = json.loads((tmp_path / "environment" / "99_probe.json").read_text())
    assert saved["packages"]["transformer-lens"] == metadata.version("transformer-lens")


def test_colab_installs_use_the_tested_constraints():
    """Every notebook's Colab install cell (and the series launcher) installs with
    colab/constraints.txt, the file `make lock` writes (tests/test_colab.py checks the rest)."""
    url = "https://raw.githubusercontent.com/interp-lib/interp_lib/main/colab/constraints.txt"
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        text = path.read_text()
        assert f"-c {url}" in text and "%pip install -q -c /tmp/colab-runtime.txt {source}" in text, path.name
    launcher = (ROOT / "colab" / "run_series.ipynb").read_text()
    assert '\\"-c\\", str(checkout / \\"colab\\" / \\"constraints.txt\\")' in launcher
    assert (ROOT / url.split("/main/")[1]).is_file()
