"""The notebooks' warning filter silences named third-party packages only: interp_lib's own
warnings (EnvironmentWarning, IGConvergenceWarning) stay visible (issue 26)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

import interp_lib as il
from interp_lib.probing import IGConvergenceWarning
from interp_lib.versions import EnvironmentWarning

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_library_warnings_stay_visible_and_named_packages_are_quiet():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        il.notebook.quiet_third_party_warnings()
        # the library's own warning, raised for real by a version check that must fail
        assert il.check_environment(requirements=["numpy<1"])
        # the warning's module decides: UserWarnings as umap / sklearn / torch issue them
        for module, message in (("umap.umap_", "n_jobs value 1 overridden"), ("sklearn.utils", "x"),
                                ("torch", "y"), ("interp_lib.probing", "IG has not converged"),
                                ("torchvision.io", "not torch itself"), ("mypackage", "someone else's")):
            category = IGConvergenceWarning if module.startswith("interp_lib") else UserWarning
            warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    shown = [(type(w.message) if not isinstance(w.message, type) else w.message, str(w.message)) for w in caught]
    kinds = [k for k, _ in shown]
    messages = [m for _, m in shown]
    assert EnvironmentWarning in kinds and IGConvergenceWarning in kinds
    assert "not torch itself" in messages and "someone else's" in messages
    assert not {"n_jobs value 1 overridden", "x", "y"} & set(messages)


def test_quiet_third_party_warnings_rejects_bad_input():
    with pytest.raises(ValueError, match="modules="):
        il.notebook.quiet_third_party_warnings("umap")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_silences_every_user_warning(path):
    for cell in json.loads(path.read_text())["cells"]:
        source = "".join(cell["source"])
        for call in re.findall(r"filterwarnings\([^)]*\)|simplefilter\([^)]*\)", source):
            assert "module=" in call or "UserWarning" not in call and "Warning" in call, \
                f"{path.name}: {call} silences warnings interp_lib raises too; use il.notebook.quiet_third_party_warnings()"
