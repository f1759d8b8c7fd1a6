"""Logits that never sit in memory all at once, and work sizes that fit the memory there is.

A language model's next-token logits are ``[positions, vocabulary]``: 4,032 positions of a
262,144-token vocabulary are 3.9 GiB of float32. The analyses keep per-position summaries
instead, and where they need the whole distribution again (temperature scaling evaluates the
validation NLL at every optimiser step) they read the logits back from a :class:`LogitStore`:
the exact float32 values, spilled to a file a batch at a time and read back a block of rows at a
time with plain file reads (not a memory map, whose pages would count as resident memory). So
the memory stays flat in the vocabulary and the results equal those computed from the logits in
memory.

:func:`available_memory_bytes` and :func:`auto_rows` size the work: how many rows of a
``[rows, row_bytes]`` working set fit a memory budget, and a one-line error naming the parameter
and the largest size that fits when a requested size does not.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LogitStore", "available_memory_bytes", "auto_rows", "block_rows_for", "BLOCK_BYTES"]

#: Bytes of one block of rows read back from a store (and of one chunk of logits worked on).
BLOCK_BYTES = 64 * 2 ** 20
SPILL_DIR_ENV = "INTERP_LIB_SPILL_DIR"


def block_rows_for(row_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows of ``row_bytes`` each that fit ``block_bytes`` (at least 1)."""
    return max(1, int(block_bytes) // max(1, int(row_bytes)))


class _SpillFile:
    """A temporary file deleted when the last store reading it is garbage collected."""

    def __init__(self, directory: str | os.PathLike | None):
        directory = directory or os.environ.get(SPILL_DIR_ENV) or None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="interp_lib_logits_", suffix=".f32", dir=directory)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink, self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class LogitStore:
    """Float32 ``[n_rows, n_classes]`` logits kept in a temporary file, read a block at a time.

    Build it with :meth:`append` (one ``[rows, n_classes]`` block at a time), then read it with
    :meth:`blocks`. :meth:`subset` gives a view of some rows (sharing the file). The file is
    deleted when the last store using it is garbage collected (``$INTERP_LIB_SPILL_DIR`` or
    ``directory`` chooses where it goes; the system temporary folder otherwise).
    """

    def __init__(self, n_classes: int, directory: str | os.PathLike | None = None):
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise ValueError(f"n_classes={n_classes!r}: expected a positive integer")
        self.n_classes = int(n_classes)
        self._file = _SpillFile(directory)
        self._n_file_rows = 0
        self._rows: np.ndarray | None = None  # None: every file row in order; else the file rows of this view

    # ---- writing
    def append(self, block: Tensor) -> None:
        """Append ``[rows, n_classes]`` logits (stored as float32)."""
        if self._rows is not None:
            raise ValueError("this LogitStore is a subset view; append to the store it was taken from")
        if not isinstance(block, Tensor) or block.ndim != 2 or block.shape[1] != self.n_classes:
            shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise ValueError(f"block is {shape}; expected a [rows, {self.n_classes}] tensor of logits")
        array = block.detach().to("cpu", torch.float32).contiguous().numpy()
        with open(self._file.path, "ab") as f:
            f.write(memoryview(array).cast("B"))
        self._n_file_rows += array.shape[0]

    # ---- shape
    def __len__(self) -> int:
        return self._n_file_rows if self._rows is None else len(self._rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.n_classes)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def nbytes(self) -> int:
        return len(self) * self.n_classes * 4

    def numel(self) -> int:
        return len(self) * self.n_classes

    def __repr__(self) -> str:
        return f"LogitStore({len(self)} x {self.n_classes} float32, {self.nbytes / 2 ** 20:.1f} MiB on disk)"

    # ---- reading
    def _read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.n_classes
        array = np.fromfile(self._file.path, dtype=np.float32, count=count, offset=start * self.n_classes * 4)
        if array.size != count:
            raise RuntimeError(f"{self._file.path} holds fewer rows than recorded ({array.size} of {count} values "
                               "read); was the spill file truncated?")
        return array.reshape(stop - start, self.n_classes)

    def blocks(self, block_rows: int | None = None) -> Iterator[Tensor]:
        """Consecutive float32 blocks of at most ``block_rows`` rows (default: ~64 MiB each), in row order."""
        block_rows = block_rows or block_rows_for(self.n_classes * 4)
        for start in range(0, len(self), block_rows):
            yield self.rows(start, min(len(self), start + block_rows))

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of this store as a float32 tensor."""
        if self._rows is None:
            return torch.from_numpy(self._read(start, stop))
        wanted = self._rows[start:stop]
        if len(wanted) == 0:
            return torch.empty(0, self.n_classes)
        low, high = int(wanted.min()), int(wanted.max()) + 1
        if high - low <= 4 * len(wanted):  # near-contiguous: one read, then pick
            return torch.from_numpy(np.ascontiguousarray(self._read(low, high)[wanted - low]))
        return torch.from_numpy(np.stack([self._read(int(r), int(r) + 1)[0] for r in wanted]))

    def __getitem__(self, index: Any) -> Tensor:
        """Rows by an integer, a slice, indices or a boolean mask (small reads; use :meth:`blocks` to scan)."""
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {index} out of range for {len(self)} rows")
            return self.rows(i, i + 1)[0]
        return self.subset(index).to_tensor()

    def subset(self, rows: Any) -> "LogitStore":
        """A view of the given rows (indices, a boolean mask or a slice); shares the file."""
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        if isinstance(rows, Tensor):
            rows = rows.cpu().numpy()
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"boolean rows has shape {rows.shape}; expected ({len(self)},)")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        rows = rows % max(1, len(self))
        base = np.arange(self._n_file_rows) if self._rows is None else self._rows
        view = object.__new__(LogitStore)
        view.n_classes, view._file, view._n_file_rows, view._rows = self.n_classes, self._file, self._n_file_rows, base[rows]
        return view

    def to_tensor(self) -> Tensor:
        """All rows as one float32 tensor: ``nbytes`` of memory (only for small stores)."""
        parts = list(self.blocks())
        return torch.cat(parts) if parts else torch.empty(0, self.n_classes)


# --------------------------------------------------------------------------------------------
# Memory: what is free, and how many rows fit
# --------------------------------------------------------------------------------------------

def available_memory_bytes() -> int:
    """Memory the system can still give this process: ``MemAvailable`` from /proc/meminfo (Linux),
    else psutil's ``available``, else 4 GiB (said in the sizes' reasons)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 (psutil absent or unsupported platform)
        return 4 * 2 ** 30


def auto_rows(name: str, requested: Any, row_bytes: int, budget_bytes: int, *, upper: int | None = None,
              what: str = "rows") -> tuple[int, str]:
    """A work size: ``requested`` when it is an int that fits ``budget_bytes`` at ``row_bytes`` per
    row, or the largest that fits when ``requested == "auto"`` (capped by ``upper``).

    Returns ``(size, reason)``: ``reason`` says why, in one line, for a notebook to print. A
    requested size that does not fit raises ``ValueError`` naming ``name`` and the largest size
    that fits.
    """
    fits = max(1, int(budget_bytes) // max(1, int(row_bytes)))
    cap = fits if upper is None else min(fits, int(upper))
    mib = row_bytes / 2 ** 20
    if requested == "auto":
        reason = (f"{name}={cap}: {cap} {what} x {mib:.1f} MiB each fit the {budget_bytes / 2 ** 30:.2f} GiB "
                  f"budget" + (f" (capped at {upper})" if upper is not None and cap == upper else ""))
        return cap, reason
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
        raise ValueError(f"{name}={requested!r}: expected 'auto' or a positive integer")
    if requested > fits:
        raise ValueError(f"{name}={requested} needs {requested * row_bytes / 2 ** 30:.2f} GiB ({mib:.1f} MiB per "
                         f"{what[:-1] if what.endswith('s') else what}) > the {budget_bytes / 2 ** 30:.2f} GiB budget; "
                         f"the largest {name} that fits is {fits}")
    return int(requested), f"{name}={int(requested)} (requested; fits the {budget_bytes / 2 ** 30:.2f} GiB budget)"
