"""Shared fixtures. Bundled models are loaded once per session; run outputs go to a temp dir."""

from __future__ import annotations

import os
import tempfile

import pytest

# Notebook kernels started by nbval inherit this environment: keep their checkpoints and
# metrics out of the working tree.
os.environ["INTERP_LIB_RUNS"] = tempfile.mkdtemp(prefix="interp_lib_test_runs_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def toy_lm():
    import interp_lib as il

    return il.load_model("toy-lm", device="cpu")


@pytest.fixture(scope="session")
def toy_2l():
    import interp_lib as il

    return il.load_model("toy-2l", device="cpu")


@pytest.fixture(scope="session")
def toy_1l():
    import interp_lib as il

    return il.load_model("toy-1l", device="cpu")


@pytest.fixture
def make_server():
    """Start real local OpenAI-compatible servers (``LocalOpenAIServer(**kwargs)``); all are
    stopped when the test ends."""
    from interp_lib.explain.local_server import LocalOpenAIServer

    servers = []

    def make(**kwargs):
        server = LocalOpenAIServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
