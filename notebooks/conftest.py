"""pytest / nbval configuration for the notebooks: each test session gets a fresh, empty run
root, so nbval executes every stage instead of loading checkpoints left by an earlier run."""

import os
import tempfile

os.environ["INTERP_LIB_RUNS"] = tempfile.mkdtemp(prefix="interp_lib_nbval_runs_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
