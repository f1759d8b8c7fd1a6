"""The LLM answer cache: one store that many processes (Ray workers, notebooks, reruns) share.

Layout under the cache folder (``OUT/llm_cache``)::

    answers/<host>-<pid>-<random>.jsonl   one append-only log per writing process: one JSON
                                          object per line, {"kind", "key", "value"}
    answers/merged-<random>.jsonl         what ``compact`` made of earlier logs
    chat/<k2>/<key>.json, embed/...       the old layout (one file per request): still read,
                                          never written; ``migrate`` copies it into a log

Why per-writer logs and not SQLite: a writer only ever appends to its own file, so concurrent
writers -- processes on one machine, or on several machines sharing a folder -- never touch the
same file and need no lock. SQLite's WAL mode needs shared memory between its clients (one host,
no network filesystem) and its locks are unreliable on Google Drive's FUSE mount, where Colab
keeps this cache; a few growing files also suit Drive far better than one file per request.

Readers index every log once (``refresh``), then read only what was appended since (the bytes
after each file's last complete line), so a worker sees the answers other workers stored while
it ran. A line cut short by a killed process, or damaged, is skipped (the request is simply
sent again); the first complete value stored for a key wins. Values are plain JSON.

Every line is signed (``"sig"``: HMAC of kind, key and value under the user's key, see
``interp_lib.signing``): a line edited elsewhere, or copied from another user's cache, does not
verify and is ignored with a warning (the request is sent again). Lines of logs written before
signing have no signature and are still used (``unsigned_lines`` counts them).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

LOG_DIR = "answers"
LEGACY_KINDS = ("chat", "embed")


class AnswerStore:
    """Answers keyed by (kind, key) under ``root``; see the module docstring.

    ``get`` answers from the in-memory index (``refresh`` reads what other processes appended
    since), ``put`` appends one line to this process's own log. Thread-safe within a process;
    any number of processes may use the same ``root`` at once.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[tuple[str, str], Any] = {}
        self._offsets: dict[str, int] = {}  # log file name -> bytes consumed (complete lines)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._log_name: str | None = None
        self.skipped_lines = 0
        self.unsigned_lines = 0  # lines of logs written before signing (used, unverified)
        self.untrusted_lines = 0  # lines whose signature does not verify (ignored)
        self.refresh()

    # -- reading -------------------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.root / LOG_DIR

    def log_files(self) -> list[Path]:
        """Every log of the store, in name order."""
        if not self.log_dir.is_dir():
            return []
        return sorted(p for p in self.log_dir.glob("*.jsonl") if p.is_file())

    def refresh(self) -> int:
        """Read what was appended to any log since the last refresh; returns the number of new
        entries. Never raises for an unreadable file (logged, retried at the next refresh)."""
        added = 0
        with self._lock:
            for path in self.log_files():
                start = self._offsets.get(path.name, 0)
                try:
                    with open(path, "rb") as handle:
                        handle.seek(start)
                        data = handle.read()
                except OSError as exc:
                    log.warning("cannot read cache log %s (%s)", path, exc)
                    continue
                end = data.rfind(b"\n") + 1  # only complete lines; a line being written waits
                for line in data[:end].splitlines():
                    added += self._add_line(line, path)
                self._offsets[path.name] = start + end
        return added

    def _add_line(self, line: bytes, path: Path) -> int:
        if not line.strip():
            return 0
        try:
            entry = json.loads(line)
            kind, key, value = entry["kind"], entry["key"], entry["value"]
            if not isinstance(kind, str) or not isinstance(key, str):
                raise TypeError("kind and key must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            self.skipped_lines += 1
            log.warning("skipping a damaged line of cache log %s (%s)", path, type(exc).__name__)
            return 0
        if (kind, key) in self._index:
            return 0
        from ..signing import verify_json

        if "sig" not in entry:
            self.unsigned_lines += 1  # written before signing existed: still used
        elif not verify_json([kind, key, value], entry["sig"]):
            self.untrusted_lines += 1
            log.warning("ignoring an entry of cache log %s whose signature does not verify "
                        "(produced elsewhere, or edited): the request is sent again", path)
            return 0
        self._index[(kind, key)] = value
        return 1

    def legacy_path(self, kind: str, key: str) -> Path:
        """Where the old one-file-per-request layout kept (kind, key)."""
        return self.root / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str, legacy: bool = True) -> Any | None:
        """The stored value, else (``legacy``) the old layout's file as parsed JSON, else None."""
        with self._lock:
            if (kind, key) in self._index:
                return self._index[(kind, key)]
        if legacy and (self.root / kind).is_dir():
            path = self.legacy_path(kind, key)
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable cache file %s (%s)", path, type(exc).__name__)
        return None

    def __contains__(self, item: tuple[str, str]) -> bool:
        with self._lock:
            return item in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def items(self) -> Iterator[tuple[tuple[str, str], Any]]:
        with self._lock:
            return iter(list(self._index.items()))

    # -- writing -------------------------------------------------------------------------------
    def _open_log(self) -> int:
        if self._fd is not None and self._fd_pid == os.getpid():
            return self._fd
        # a fork (or the first write) gets a log of its own
        host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:40]
        self._log_name = f"{host}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.log_dir / self._log_name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._fd_pid = os.getpid()
        return self._fd

    def put(self, kind: str, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under (kind, key): one line appended to this
        process's log, written whole with one ``write``. OSError when the folder cannot be
        written (the caller keeps its answer and only loses the cache entry)."""
        from ..signing import sign_json

        signature = sign_json([kind, key, value])
        line = json.dumps({"kind": kind, "key": key, "value": value, "sig": signature},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        with self._lock:
            fd = self._open_log()
            view = memoryview(line)
            while view:  # os.write may write less than asked (e.g. a signal); finish the line
                written = os.write(fd, view)
                view = view[written:]
            self._index.setdefault((kind, key), value)
            # our own bytes need not be read back: skip them at the next refresh
            if self._log_name is not None:
                self._offsets[self._log_name] = self._offsets.get(self._log_name, 0) + len(line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    # -- maintenance ---------------------------------------------------------------------------
    def migrate(self, remove: bool = False) -> int:
        """Copy every entry of the old one-file-per-request layout into this process's log
        (those already stored are skipped); ``remove`` deletes the old files afterwards.
        Returns the number of entries copied. Unreadable old files are skipped and kept."""
        self.refresh()
        copied = 0
        for kind in LEGACY_KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob("*/*.json")):
                key = path.stem
                try:
                    value = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if (kind, key) not in self:
                    self.put(kind, key, value)
                    copied += 1
                if remove:
                    path.unlink()
        return copied

    def compact(self) -> Path | None:
        """Merge every log into one ``merged-*.jsonl`` and delete the logs merged. Run it when
        no process is writing to the store (e.g. after a run): a process writing meanwhile
        keeps its own log, which is never deleted while open here, but may lose lines appended
        between the merge and the deletion. Returns the merged file (None when empty)."""
        self.close()
        sources = self.log_files()
        self.refresh()
        if not self._index:
            return None
        merged = self.log_dir / f"merged-{secrets.token_hex(4)}.jsonl"
        tmp = merged.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            from ..signing import sign_json

            for (kind, key), value in self.items():
                handle.write(json.dumps({"kind": kind, "key": key, "value": value,
                                         "sig": sign_json([kind, key, value])},
                                        ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, merged)
        for path in sources:
            path.unlink(missing_ok=True)
        with self._lock:
            self._offsets = {merged.name: merged.stat().st_size}
        return merged
