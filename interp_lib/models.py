"""Load GPT-2-family models (hub, bundled toy models, local HF directories) as TransformerBridges.

Every model goes through the same path: HF weights -> ``TransformerBridge.boot_transformers``
-> (by default) ``enable_compatibility_mode()``, so hook names, ``ActivationCache`` methods and
numerics (LayerNorm folded, writing weights centred, unembedding centred) are those a
TransformerLens ``HookedTransformer`` user expects.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from .paths import data_dir

if TYPE_CHECKING:  # heavy import, done lazily in load_model
    from transformer_lens.model_bridge import TransformerBridge

BUNDLED_MODELS = {
    "toy-lm": "4-layer GPT-2-architecture language model trained on the bundled corpus",
    "toy-2l": "2-layer attention-only-style model with a previous-token head and induction heads",
    "toy-1l": "1-layer attention-only-style model trained on the same data: no induction possible",
}
DEFAULT_MODEL = "toy-lm"
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The requested device, or the best available one: cuda > mps > cpu."""
    if device is not None:
        try:
            chosen = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device={device!r} is not a torch device (expected 'cpu', 'cuda', 'cuda:0', 'mps')") from error
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available here; use device='cpu' or None")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(set(_DTYPES))} or a torch.dtype")


def bundled_model_path(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"{name!r} is not a bundled model; bundled models: {', '.join(BUNDLED_MODELS)}")
    return data_dir() / "models" / name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_repo_id(name)


def _is_hub_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def _official_hub_name(name: str) -> str | None:
    """The hub repository id TransformerLens knows ``name`` by, or None if it does not know it."""
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    official = resolve_model_alias(name) or name
    return official if official in OFFICIAL_MODEL_NAMES else None


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Return (kind, location): kind is 'local' (a directory) or 'hub' (a repository id)."""
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name_or_path={name_or_path!r}: expected a model name or a directory")
    if name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name!r} is missing at {path}; rebuild it with "
                                 f"`python scripts/train_toy_models.py {name}`")
        return "local", str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"name_or_path={name!r} is not a model directory: expected a folder "
                             "with config.json and weights (as written by save_pretrained)")
        return "local", str(path)
    if _looks_like_path(name):
        raise ValueError(f"name_or_path={name!r}: no such directory")
    official = _official_hub_name(name)
    if official is None and not _is_hub_repo_id(name):
        raise ValueError(
            f"unknown model name {name!r}: bundled models are {', '.join(BUNDLED_MODELS)}; "
            f"hub names include {', '.join(GPT2_SIZES)} and any TransformerLens-supported name; "
            "or pass a local Hugging Face model directory")
    return "hub", official or name


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, compatibility_mode: bool = True
               ) -> "TransformerBridge":
    """Load a model as a TransformerLens ``TransformerBridge``.

    Args:
        name_or_path: a bundled name (``toy-lm``, ``toy-2l``, ``toy-1l``), a hub name known to
            TransformerLens (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ...), or a
            local Hugging Face model directory. All take the same
            ``TransformerBridge.boot_transformers`` path.
        device: ``None`` picks cuda > mps > cpu.
        dtype: ``None`` means float32; also ``"float16"``, ``"bfloat16"`` or a torch dtype.
        compatibility_mode: True (default) calls ``enable_compatibility_mode()``, giving
            HookedTransformer numerics: LayerNorm folded into the following weights, writing
            weights and the unembedding centred (logits differ from raw HF by a per-position
            constant; probabilities are unchanged). False keeps raw HF numerics.

    Raises:
        ValueError: an unknown name, or a path that is not a model directory.
        ModelLoadError: a hub model that is neither cached nor downloadable (no network).
    """
    kind, location = _resolve(name_or_path)
    chosen_device = select_device(device)
    chosen_dtype = resolve_dtype(dtype)
    if kind == "hub" and not _in_hf_cache(location) and not _hub_reachable():
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: the Hugging Face hub is unreachable and the model is "
            "not in the local cache. Run once with network access (e.g. on Colab) to cache it, "
            "point HF_HOME at a cache that has it, pass a local model directory, or use a bundled "
            f"model ({', '.join(BUNDLED_MODELS)}).")

    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        bridge = TransformerBridge.boot_transformers(location, device=chosen_device, dtype=chosen_dtype)
    except OSError as error:
        raise ModelLoadError(f"cannot load {name_or_path!r} from {location}: {error}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    if compatibility_mode:
        bridge.enable_compatibility_mode()
    bridge.eval()
    bridge.cfg.model_name = os.fspath(name_or_path) if kind == "hub" else Path(location).name
    return bridge
