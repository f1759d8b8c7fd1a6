"""Sign what a run writes, so that a run folder (or an answer cache) edited elsewhere is noticed.

A plain SHA-256 in a manifest only catches accidents: whoever edits a stage file can edit the
manifest's hash too. What a run writes is therefore signed with HMAC-SHA256 under a key that is
kept *outside* every run folder:

* ``$INTERP_LIB_SIGNING_KEY_DIR/signing.key`` when that variable is set (tests use a temp dir);
* on Colab with Drive mounted, ``MyDrive/.config/interp_lib/signing.key`` (the VM's home is
  lost at every restart; the key must outlive it, as the run folders on Drive do);
* else ``$XDG_CONFIG_HOME/interp_lib/signing.key`` (``~/.config/interp_lib/signing.key``).

The key (32 random bytes, hex) is created on first use with mode 0600, its folder 0700. Someone
who can read that file can forge signatures: it protects run folders and caches that are shared,
copied or downloaded, not against the account that owns the key.

What is signed, and what a failed check does (the user chooses with ``untrusted=``, on the
command line ``--untrusted``):

* checkpoint stages (``interp_lib.checkpoint``): each manifest entry's stage, file name, params
  hash, size and SHA-256. A signature that does not verify -> a one-line warning naming the
  folder as produced elsewhere, and the stage is **recomputed** (``untrusted="recompute"``, the
  default) or **loaded and marked unverified** (``untrusted="load"``);
* answer-cache lines (``interp_lib.explain.cache``): kind, key and value. A line whose signature
  does not verify is ignored (the request is sent again), with a warning naming the log.

Entries written before signing existed (no signature at all) still load, with a warning that
they are unsigned: old run folders stay usable, and the warning says they are unverified.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

__all__ = ["KEY_DIR_ENV", "KEY_FILE", "UNTRUSTED_CHOICES", "key_path", "signing_key", "sign", "verify",
           "sign_json", "verify_json", "check_untrusted"]

KEY_DIR_ENV = "INTERP_LIB_SIGNING_KEY_DIR"
KEY_FILE = "signing.key"
UNTRUSTED_CHOICES = ("recompute", "load")

_lock = threading.Lock()
_cache: dict[Path, bytes] = {}


def key_path() -> Path:
    """Where the signing key lives (see the module docstring)."""
    explicit = os.environ.get(KEY_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser() / KEY_FILE
    from .runtime import DRIVE_HOME, in_colab

    if in_colab() and DRIVE_HOME.is_dir():
        return DRIVE_HOME / ".config" / "interp_lib" / KEY_FILE
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "interp_lib" / KEY_FILE


def signing_key() -> bytes:
    """This user's key, created (mode 0600) on first use."""
    path = key_path()
    with _lock:
        if path in _cache:
            return _cache[path]
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
        if len(text) < 64:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = secrets.token_hex(32)
            try:  # O_EXCL: two processes creating it at once agree on the first one's key
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                text = path.read_text(encoding="ascii").strip()
            else:
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(fresh + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                text = fresh
        key = bytes.fromhex(text[:64])
        _cache[path] = key
        return key


def sign(data: bytes) -> str:
    """HMAC-SHA256 of ``data`` under this user's key (hex)."""
    return hmac.new(signing_key(), data, hashlib.sha256).hexdigest()


def verify(data: bytes, signature: Any) -> bool:
    """Whether ``signature`` is this user's signature of ``data`` (constant-time compare)."""
    return isinstance(signature, str) and hmac.compare_digest(sign(data), signature)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=True).encode("ascii")


def sign_json(value: Any) -> str:
    """The signature of a JSON value (canonical form: sorted keys, no spaces)."""
    return sign(_canonical(value))


def verify_json(value: Any, signature: Any) -> bool:
    return verify(_canonical(value), signature)


def check_untrusted(value: Any, name: str = "untrusted") -> str:
    """``value`` if it is one of ``UNTRUSTED_CHOICES``; else a one-line ValueError."""
    if value not in UNTRUSTED_CHOICES:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, UNTRUSTED_CHOICES))} "
                         "(what to do with a result whose signature does not verify)")
    return value
