"""Colab badges and install cells, written from one place (`make colab`); the Drive bundle
(`make colab-bundle`).

The repository URL lives in ``pyproject.toml`` (``[project.urls] Repository``) and nowhere else
by hand: every notebook's badge (first cell) and install cell (the ``IN_COLAB`` setup cell), and
``colab/run_series.ipynb``'s badge and ``repo_url``, are rewritten from it. Only those cells are
touched, and rewriting twice changes nothing.

    python scripts/colab.py                 # rewrite notebooks/*.ipynb and colab/run_series.ipynb
    python scripts/colab.py --check         # exit 1 (naming the files) if any is out of date
    python scripts/colab.py --bundle dist/colab   # wheel + constraints for MyDrive/interp_lib/

The install cell installs the wheel of ``make colab-bundle`` from Drive's ``MyDrive/interp_lib/``
when it is there (no repository needed), else the repository; either way with Colab's own
packages pinned at the running runtime's versions (torch / CUDA builds and what google-colab
pins: ``interp_lib.versions.COLAB_KEPT``) and the rest constrained by colab/constraints.txt.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from interp_lib.versions import COLAB_PINNED, PLATFORM_PACKAGES  # noqa: E402

DRIVE_DIR = "/content/drive/MyDrive/interp_lib"
KEEP_FILE = "/tmp/colab-runtime.txt"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")
_INSTALL_MARK = 'IN_COLAB = "google.colab" in sys.modules'


def repository_url(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """``https://github.com/OWNER/NAME`` from pyproject's ``[project.urls] Repository``."""
    url = tomllib.loads(pyproject.read_text())["project"].get("urls", {}).get("Repository", "")
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(\.git)?/?", url)
    if not match:
        raise ValueError(f"pyproject.toml [project.urls] Repository must be https://github.com/OWNER/NAME; got {url!r}")
    return f"https://github.com/{match.group(1)}/{match.group(2)}"


def _slug(url: str) -> str:
    return url.removeprefix("https://github.com/")


def badge(url: str, path: str, branch: str = "main") -> str:
    return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/{_slug(url)}/blob/{branch}/{path})"


def kept_pattern() -> str:
    """The regex of ``pip freeze`` lines the install cell pins at the runtime's versions: the
    names of ``interp_lib.versions.COLAB_KEPT`` (``-`` may be written ``_`` or ``.`` in a freeze)."""
    names = PLATFORM_PACKAGES.pattern[2:-2].split("|") + list(COLAB_PINNED)
    return "(" + "|".join(name.replace("-", "[-_.]") for name in names) + ")=="


def install_code(url: str, branch: str = "main") -> str:
    """The body of the ``if IN_COLAB:`` block of every notebook's setup cell."""
    raw = f"https://raw.githubusercontent.com/{_slug(url)}/{branch}/colab/constraints.txt"
    return f'''    # Written by `make colab` (pyproject's Repository URL); edit scripts/colab.py, not this cell.
    # Installs the wheel of `make colab-bundle` from Drive's MyDrive/interp_lib/ when it is there,
    # else the repository. Colab's own packages stay at the runtime's versions (torch and CUDA
    # builds, what google-colab pins); the rest follows colab/constraints.txt (Colab's versions).
    import glob, re, subprocess
    from google.colab import drive

    drive.mount("/content/drive")
    wheels = sorted(glob.glob("{DRIVE_DIR}/interp_lib-*.whl"))
    source = (f'"{{wheels[-1]}}" -c {DRIVE_DIR}/constraints.txt' if wheels else
              '"interp-lib @ git+{url}.git" -c {raw}')
    keep = re.compile(r"{kept_pattern()}", re.I)
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    with open("{KEEP_FILE}", "w") as file:
        file.writelines(line + "\\n" for line in freeze.splitlines() if keep.match(line))
    %pip install -q -c {KEEP_FILE} {{source}}
'''


def launcher_install_code() -> str:
    """The install cell of colab/run_series.ipynb: clone ``repo_url`` (its parameters cell) and
    install the checkout, keeping Colab's own packages as in :func:`install_code`."""
    return f'''import os, re, subprocess, sys
from pathlib import Path

from google.colab import drive

drive.mount("/content/drive")
checkout = Path("/content/interp_lib")
if not checkout.exists():
    subprocess.run(["git", "clone", "--depth", "1", "--branch", branch, repo_url, str(checkout)], check=True)
# Written by `make colab`; edit scripts/colab.py, not this cell. Colab's own packages stay at the
# runtime's versions (torch and CUDA builds, what google-colab pins); the rest follows
# colab/constraints.txt (Colab's versions where it ships them, else the lock's).
keep = re.compile(r"{kept_pattern()}", re.I)
freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
Path("{KEEP_FILE}").write_text("".join(line + "\\n" for line in freeze.splitlines() if keep.match(line)))
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", "{KEEP_FILE}",
                "-c", str(checkout / "colab" / "constraints.txt"), "-e", str(checkout)], check=True)
os.environ["INTERP_LIB_RUNS"] = str(Path(out).parent / "runs")'''


def _lines(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    if lines and lines[-1].endswith("\n"):
        lines[-1] = lines[-1][:-1]
    return lines


def rewrite_install_cell(source: str, url: str) -> str:
    """A setup cell's source with its ``if IN_COLAB:`` block replaced by :func:`install_code`
    (the lines before it kept; the block ends at the first unindented line after it)."""
    lines = source.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith("if IN_COLAB:")), None)
    if start is None:
        raise ValueError("the setup cell has no 'if IN_COLAB:' block")
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    after = "".join(lines[end:])
    return "".join(lines[:start + 1]) + install_code(url) + ("\n" + after if after.strip() else "")


def rendered(path: Path, url: str, root: Path = ROOT) -> str:
    """The text of one notebook with its badge and install cell (for colab/run_series.ipynb: its
    badge, ``repo_url`` and install cell) written from ``url``; other cells as they are."""
    text = path.read_text()
    notebook = json.loads(text)
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    cells = notebook["cells"]
    first = "".join(cells[0]["source"])
    if cells[0]["cell_type"] != "markdown" or not _BADGE.search(first):
        raise ValueError(f"{relative}: the first cell has no Open In Colab badge")
    cells[0]["source"] = _lines(_BADGE.sub(lambda _: badge(url, relative), first, count=1))
    code = [c for c in cells if c["cell_type"] == "code"]
    if path.parent.name == "notebooks":
        setup = [c for c in code if _INSTALL_MARK in "".join(c["source"])]
        if len(setup) != 1:
            raise ValueError(f"{relative}: expected one setup cell with {_INSTALL_MARK!r}, found {len(setup)}")
        setup[0]["source"] = _lines(rewrite_install_cell("".join(setup[0]["source"]), url))
    else:
        params = [c for c in code if re.search(r'^repo_url = "', "".join(c["source"]), re.M)]
        install = [c for c in code if "drive.mount(" in "".join(c["source"])]
        if len(params) != 1 or len(install) != 1:
            raise ValueError(f"{relative}: expected one cell setting repo_url and one mounting Drive")
        params[0]["source"] = _lines(re.sub(r'^repo_url = "[^"]*"', f'repo_url = "{url}.git"',
                                            "".join(params[0]["source"]), flags=re.M))
        install[0]["source"] = _lines(launcher_install_code())
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def rewrite_notebook(path: Path, url: str, root: Path = ROOT) -> bool:
    """Write :func:`rendered` to ``path``; True when the file changed."""
    new = rendered(path, url, root)
    if new == path.read_text():
        return False
    path.write_text(new)
    return True


def colab_notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9]*.ipynb")) + [root / "colab" / "run_series.ipynb"]


def install_cell_code(path: Path) -> str:
    """The ``if IN_COLAB:`` setup cell of a notebook, as its source text."""
    cells = json.loads(path.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and _INSTALL_MARK in "".join(c["source"]))


def bundle(out: Path, root: Path = ROOT) -> Path:
    """Build the wheel (bundled data included) into ``out`` with colab/constraints.txt beside it:
    the two files to copy to Drive's ``MyDrive/interp_lib/``. Returns the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("interp_lib-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(root)], check=True)
    shutil.copy(root / "colab" / "constraints.txt", out / "constraints.txt")
    (wheel,) = out.glob("interp_lib-*.whl")
    return wheel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook is out of date; change nothing")
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="build the Drive bundle into DIR")
    args = parser.parse_args(argv)
    if args.bundle:
        wheel = bundle(args.bundle)
        print(f"{wheel} and {args.bundle / 'constraints.txt'}: copy both to Google Drive's MyDrive/interp_lib/")
        return 0
    url = repository_url()
    stale = []
    for path in colab_notebooks():
        if args.check:
            if rendered(path, url) != path.read_text():
                stale.append(path)
        elif rewrite_notebook(path, url):
            print(f"rewrote {path.relative_to(ROOT)}")
    if stale:
        print("out of date (run make colab): " + ", ".join(str(p.relative_to(ROOT)) for p in stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
