"""The versions a result depends on, and whether they are the ones this release was tested with.

Numbers from this library can change with the versions of torch, transformers and
TransformerLens underneath it (a transformers release once made exact patching silently wrong).
So every run records :func:`environment`, and :func:`check_environment` says, in one warning,
when the running versions lie outside the ranges declared in ``pyproject.toml`` (the ranges CI
tests: the locked set and the newest versions they allow) or differ from ``requirements.lock``
(the exact set CI's main job ran).

    >>> il.environment()["packages"]["transformers"]
    '5.24.0'
    >>> il.check_environment()        # [] when in range; otherwise also one EnvironmentWarning
"""

from __future__ import annotations

import platform
import re
import sys
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from .paths import _PACKAGE, repo_root

DISTRIBUTION = "interp-lib"
# The packages whose versions change what an analysis computes or how it runs.
KEY_PACKAGES = ("torch", "transformers", "transformer-lens", "tokenizers", "safetensors", "numpy", "scipy",
                "scikit-learn", "pandas", "sentence-transformers", "umap-learn", "openai", "papermill", "gguf")
LOCK_NAME = "requirements.lock"
# Packages Colab provides in its own (CUDA) builds: never pinned on Colab, never compared with the lock.
PLATFORM_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


# What google-colab pins exactly (googlecolab/colabtools setup.py) or Colab's frontend needs at the
# runtime's version (notebook 6.5.7 needs jupyter-client < 8): an install on Colab keeps the
# runtime's own versions of these and of PLATFORM_PACKAGES (the notebooks' install cell pins them
# from `pip freeze`), so Colab constraints never list them.
COLAB_PINNED = ("google-colab", "google-auth", "ipykernel", "ipython", "ipyparallel", "pandas", "requests",
                "tornado", "jupyter-server", "jupyter-client", "notebook", "portpicker")
COLAB_KEPT = re.compile(PLATFORM_PACKAGES.pattern[:-2] + "|" + "|".join(COLAB_PINNED) + ")$")
COLAB_RUNTIME = "colab/runtime-2026-08-19.txt"

# ``name[extras]==version`` at the start of a lock / constraints line (markers and hashes follow)
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")


class EnvironmentWarning(UserWarning):
    """Installed versions lie outside the tested range (or differ from the lock)."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "unknown (torch not importable)"
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def environment() -> dict:
    """Versions that matter for reproducing a result: Python, platform, device, interp_lib and
    :data:`KEY_PACKAGES`, and the differences from the tested versions (:func:`version_problems`)."""
    from . import __version__

    return {
        "interp_lib": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": _device(),
        "packages": {name: installed_version(name) for name in KEY_PACKAGES},
        "outside_tested_range": version_problems(),
        "differs_from_lock": lock_differences(),
    }


def summary(packages=("torch", "transformers", "transformer-lens")) -> str:
    """``torch X, transformers Y, transformer-lens Z``: for messages about version-dependent behaviour."""
    return ", ".join(f"{name} {installed_version(name) or '(not installed)'}" for name in packages)


def describe(env: dict | None = None) -> str:
    """One line: ``torch 2.13.0+cpu, transformers 5.24.0, ... on python 3.11.7, cpu``."""
    env = env or environment()
    main = ("torch", "transformers", "transformer-lens", "numpy")
    parts = [f"{name} {env['packages'].get(name) or 'missing'}" for name in main]
    return f"interp_lib {env['interp_lib']}: " + ", ".join(parts) + f"; python {env['python']}, {env['device']}"


def _requirements(declared: list[str] | None = None) -> list:
    """Requirements without extras: ``declared`` strings, by default interp-lib's own as its
    installed package metadata declares them."""
    from packaging.requirements import Requirement

    declared = metadata.requires(DISTRIBUTION) or [] if declared is None else declared
    return [r for r in map(Requirement, declared) if r.marker is None or r.marker.evaluate({"extra": ""})]


def version_problems(requirements: list[str] | None = None) -> list[str]:
    """``["transformers 6.0.1 is outside the tested range <6,>=5.9", ...]`` for installed
    ``requirements`` (default: interp-lib's declared ones; a missing package is listed too);
    empty when everything is in range or when interp_lib runs from a never-installed tree."""
    try:
        requirements = _requirements(requirements)
    except metadata.PackageNotFoundError:
        return []
    from packaging.version import InvalidVersion, Version

    problems = []
    for requirement in requirements:
        version = installed_version(requirement.name)
        if version is None:
            problems.append(f"{requirement.name} is not installed (required: {requirement.specifier or 'any'})")
            continue
        try:
            ok = requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            problems.append(f"{requirement.name} {version} is outside the tested range {requirement.specifier}")
    return problems


def lock_path() -> Path | None:
    """``requirements.lock`` of the source checkout, or the copy packed into the wheel."""
    root = repo_root()
    for candidate in ([root / LOCK_NAME] if root else []) + [_PACKAGE / "_data" / LOCK_NAME]:
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=4)
def read_lock(path: Path | None = None) -> dict[str, str]:
    """``{package: version}`` pinned by the lock file (``name==version`` lines; comments, hashes
    and markers ignored)."""
    path = path or lock_path()
    if path is None:
        return {}
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[_canonical(match.group(1))] = match.group(3)
    return pins


def _same_release(installed: str, locked: str) -> bool:
    return installed.split("+")[0] == locked.split("+")[0]   # 2.13.0+cpu is the locked 2.13.0


def lock_differences(packages=KEY_PACKAGES, lock: Path | None = None) -> list[str]:
    """``["transformers 5.25.0 (lock: 5.24.0)", ...]`` for ``packages`` that differ from the lock
    (default :func:`lock_path`; platform packages such as a CUDA torch excluded); empty when
    there is no lock to compare."""
    pins = read_lock(lock)
    differences = []
    for name in packages:
        key = _canonical(name)
        if key not in pins or PLATFORM_PACKAGES.match(key):
            continue
        version = installed_version(name)
        if version is None or not _same_release(version, pins[key]):
            differences.append(f"{name} {version or 'missing'} (lock: {pins[key]})")
    return differences


def check_environment(warn: bool = True, requirements: list[str] | None = None) -> list[str]:
    """Problems with the running versions (outside the tested range first, then lock
    differences); with ``warn`` one :class:`EnvironmentWarning` lists them and says how to fix.
    ``requirements``: the ranges to check (default: interp-lib's declared ones)."""
    outside, differs = version_problems(requirements), lock_differences()
    if warn and outside:
        warnings.warn("interp_lib was not tested with these versions, results may differ: " + "; ".join(outside)
                      + ". Install the tested set: pip install -c <interp_lib>/requirements.lock <interp_lib>",
                      EnvironmentWarning, stacklevel=2)
    elif warn and differs:
        warnings.warn("versions differ from requirements.lock (within the tested range): " + "; ".join(differs),
                      EnvironmentWarning, stacklevel=2)
    return outside + differs


def constraints_from_lock(lock: str, drop=PLATFORM_PACKAGES) -> str:
    """A pip constraints file from the lock's text without the packages matched by ``drop``
    (Colab's own CUDA torch and friends)."""
    kept = []
    for line in lock.splitlines():
        match = _PIN.match(line)
        if match and not drop.match(_canonical(match.group(1))):
            kept.append(line.split("\\")[0].rstrip())
    return "\n".join(kept) + "\n"


def read_pins(text: str) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a lock or ``pip freeze``
    text (``name @ URL`` lines, comments and markers ignored)."""
    return {_canonical(m.group(1)): m.group(3) for m in map(_PIN.match, text.splitlines()) if m}


def provenance(runtime: str) -> str:
    """Where and when a Colab runtime freeze was taken: its first line, ``# Source: ...``."""
    first = runtime.split("\n", 1)[0]
    if not first.startswith("# Source:"):
        raise ValueError("the Colab runtime freeze does not start with a '# Source: ...' line saying where it "
                         f"came from; got {first[:80]!r}")
    return first[2:].split(";")[0].strip()


def colab_constraints(lock: str, runtime: str, runtime_name: str = COLAB_RUNTIME) -> str:
    """Pip constraints for the notebooks' Colab install: for every package of the lock, Colab's
    version where the ``runtime`` freeze ships it, the lock's otherwise; never torch / triton /
    nvidia-* / cuda-* or what google-colab pins (:data:`COLAB_KEPT`: the install keeps the
    running runtime's own). The header names the freeze and its provenance."""
    colab = read_pins(runtime)
    lines, from_colab = [], 0
    for name, version in read_pins(lock).items():
        if COLAB_KEPT.match(name):
            continue
        from_colab += name in colab
        lines.append(f"{name}=={colab.get(name, version).split('+')[0]}")
    header = [
        "# pip constraints for the notebooks' Colab install cell. Generated by `make lock`; do not edit.",
        f"# From requirements.lock and {runtime_name}:",
        f"#   {provenance(runtime)}",
        f"# Colab's version for the {from_colab} packages its runtime ships, the lock's for the other "
        f"{len(lines) - from_colab}.",
        "# Never listed: torch, triton, nvidia-*, cuda-* and what google-colab pins (the install cell",
        "# keeps the runtime's own versions of those).",
    ]
    return "\n".join(header + lines) + "\n"


def main(argv=None) -> int:
    """``python -m interp_lib.versions``: print the environment; ``--colab-constraints LOCK
    OUT`` writes the Colab constraints file; exit 1 when versions are outside the tested range."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--colab-constraints", nargs=2, metavar=("LOCK", "OUT"))
    parser.add_argument("--colab-runtime", default=COLAB_RUNTIME, metavar="FREEZE",
                        help="Colab's published pip freeze the constraints follow (default %(default)s)")
    parser.add_argument("--check-lock", action="store_true",
                        help="exit 1 unless every package the lock pins is installed at its version")
    args = parser.parse_args(argv)
    if args.check_lock:
        pins = read_lock()
        if not pins:
            print(f"no {LOCK_NAME} found", file=sys.stderr)
            return 1
        differences = lock_differences(sorted(pins))
        if differences:
            print(f"installed versions differ from {lock_path()}: " + "; ".join(differences), file=sys.stderr)
            return 1
        print(f"all {len(pins)} packages of {lock_path()} installed at their locked versions; {summary()}")
        return 0
    if args.colab_constraints:
        lock, out = map(Path, args.colab_constraints)
        out.write_text(colab_constraints(lock.read_text(), Path(args.colab_runtime).read_text(), args.colab_runtime))
        return 0
    env = environment()
    print(json.dumps(env, indent=2))
    return 1 if env["outside_tested_range"] else 0


if __name__ == "__main__":
    sys.exit(main())
