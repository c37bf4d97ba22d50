"""Array backends for clustering: numpy always; CuPy or PyTorch (CUDA or CPU) when asked for.

GPU libraries are imported lazily, inside functions only. Whether a GPU really works is probed once
(a tiny kernel must run) and the answer cached for the process.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys

import numpy as np

from ..errors import UserError

VALID_BACKENDS = ("auto", "numpy", "torch", "cupy")
_RAGGED_MAX = 32  # numpy grouped row sums: groups larger than this are summed one by one
_BLOCK_FLOATS = 1 << 22  # grouped sums gather at most this many elements at once


class BackendUnavailable(UserError):
    """The requested array backend cannot run here (library missing, no working GPU, unknown
    name)."""


def resolve_backend(name: str = "auto") -> str:
    """Map a user-facing backend name to one that can run here: 'numpy', 'torch' or 'cupy'.

    'auto' gives 'cupy' or 'torch' only when a tiny GPU computation really succeeds, else 'numpy'.
    'torch' needs torch installed (it runs on CUDA when that works, else on the CPU); 'cupy' needs
    CuPy and a working GPU. Raises BackendUnavailable (one line) otherwise, or for unknown names.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "numpy":
        return "numpy"
    if key == "auto":
        return _auto_backend()
    if key == "torch":
        if not _installed("torch"):
            raise BackendUnavailable(
                "backend 'torch' needs PyTorch: pip install torch (or use --backend numpy)"
            )
        return "torch"
    if key == "cupy":
        _require_cupy()
        return "cupy"
    raise BackendUnavailable(
        f"unknown backend {name!r}; valid backends: {', '.join(VALID_BACKENDS)}"
    )


def array_module(backend: str):
    """The array adapter (NumpyOps, CupyOps or TorchOps) for a backend name (resolved first)."""
    backend = resolve_backend(backend)
    if backend == "numpy":
        return NumpyOps()
    if backend == "cupy":
        import cupy

        return CupyOps(cupy)
    import torch

    return TorchOps(torch, "cuda" if _gpu_probe("torch")[0] else "cpu")


def _auto_backend() -> str:
    if not _cuda_driver_loads():
        return "numpy"
    for lib in ("cupy", "torch"):
        if _gpu_probe(lib)[0]:
            return lib
    return "numpy"


def _require_cupy() -> None:
    if not _installed("cupy"):
        raise BackendUnavailable(
            "backend 'cupy' needs CuPy and an NVIDIA GPU: pip install cupy-cuda12x"
        )
    ok, why = _gpu_probe("cupy")
    if not ok:
        raise BackendUnavailable(
            f"backend 'cupy': CuPy is installed but no working CUDA GPU was found ({why})"
        )


def _installed(lib: str) -> bool:
    return lib in sys.modules or importlib.util.find_spec(lib) is not None


@functools.lru_cache(maxsize=None)
def _cuda_driver_loads() -> bool:
    """Cheap pre-check before importing a GPU library: can the CUDA driver library be loaded at
    all?"""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=None)
def _gpu_probe(lib: str) -> tuple[bool, str]:
    """(True, '') when `lib` ('cupy' or 'torch') runs a tiny matmul on a CUDA device, else (False,
    why)."""
    if not _installed(lib):
        return False, f"{lib} is not installed"
    try:
        ok = _probe_cupy() if lib == "cupy" else _probe_torch()
        return ok, "" if ok else "no CUDA device"
    except Exception as e:  # driver / runtime errors come in many types
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


def _probe_cupy() -> bool:
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        return False
    a = cupy.arange(4, dtype=cupy.float32)
    return float((a @ a).get()) == 14.0


def _probe_torch() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    a = torch.arange(4, dtype=torch.float32, device="cuda")
    return float((a @ a).item()) == 14.0


class _Ops:
    """Composite operations shared by every adapter, written with the adapter's own primitives."""

    def host64(self, a) -> np.ndarray:
        """Backend array -> float64 numpy copy."""
        return self.to_numpy(a).astype(np.float64)

    def two_smallest0(self, a):
        """(m, n) -> host (smallest (n,) float64, its first row (n,), second smallest (n,)
        float64)."""
        m1, r1 = self.argmin0(a)
        cols = self.index(np.arange(a.shape[1]))
        a[r1, cols] = np.inf
        m2 = self.min0(a)
        a[r1, cols] = m1
        return self.host64(m1), self.to_numpy(r1), self.host64(m2)

    def grouped_sum(self, src, pts: np.ndarray, groups: np.ndarray, m: int):
        """(m, width): row g sums the rows pts (host) of src (., width) with groups == g
        (sorted)."""
        acc = self.zeros((m, src.shape[1]))
        step = max(1, _BLOCK_FLOATS // src.shape[1])
        for a in range(0, len(pts), step):
            self.add_rows(acc, self.rows(src, self.index(pts[a : a + step])), groups[a : a + step])
        return acc


class NumpyOps(_Ops):
    """Array operations on numpy arrays (the reference backend); CupyOps reuses them on CuPy."""

    name = "numpy"

    def __init__(self, xp=np):
        self.xp = xp

    def asarray(self, a: np.ndarray):
        """Host array -> backend float32 array (contiguous)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=self.xp.float32))

    def index(self, a: np.ndarray):
        """Host integer array -> backend int64 index array."""
        return self.xp.asarray(a, dtype=self.xp.int64)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape):
        return self.xp.zeros(shape, dtype=self.xp.float32)

    def copy(self, a):
        return a.copy()

    def rows(self, a, idx):
        """a[idx] for a device index array idx (m,) -> (m, ...)."""
        return self.xp.take(a, idx, axis=0)

    def row_sqnorms(self, a):
        """(m, d) -> (m,) squared row norms."""
        return (a * a).sum(axis=1)

    def diagonal(self, a):
        return self.xp.ascontiguousarray(self.xp.diagonal(a))

    def transposed(self, a):
        """(m, n) -> contiguous (n, m) copy."""
        return self.xp.ascontiguousarray(a.T)

    def minimum(self, a, b):
        return self.xp.minimum(a, b)

    def clip_min(self, a, lo: float):
        """In place: a = max(a, lo)."""
        return self.xp.maximum(a, lo, out=a)

    def row_sums(self, a):
        """(m, n) -> (m,) float64 sums."""
        return a.sum(axis=1, dtype=self.xp.float64)

    def total(self, a) -> float:
        """Sum of all elements, accumulated in float64."""
        return float(a.sum(dtype=self.xp.float64))

    def min0(self, a):
        """(m, n) -> (n,) column minima."""
        return a.min(axis=0)

    def argmin0(self, a):
        """(m, n) -> (values (n,), first row of each column minimum (n,))."""
        vals = a.min(axis=0)  # numpy's argmin over axis 0 is strided and ~10x slower than this
        return vals, self.xp.argmax(a == vals, axis=0)

    def add_rows(self, acc, rows, groups: np.ndarray) -> None:
        """acc[groups[r]] += rows[r] for every r; `groups` (host int64) must be non-decreasing."""
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        sizes = np.diff(np.r_[starts, len(groups)])
        for s in np.flatnonzero(sizes > _RAGGED_MAX):  # big groups: contiguous row sums
            acc[groups[starts[s]]] += rows[starts[s] : starts[s] + sizes[s]].sum(axis=0)
        small = np.flatnonzero(sizes <= _RAGGED_MAX)
        if len(small):
            self._add_runs(acc, rows, groups[starts[small]], starts[small], sizes[small])

    def _add_runs(self, acc, rows, dest, starts, sizes) -> None:
        """acc[dest[i]] += rows[starts[i] + r] for r < sizes[i], one row after the other, the r-th
        rows of all runs at once: the same additions in the same order as adding into acc row by
        row, in one (runs, width) array. Runs go longest first, so those still going at row r are a
        prefix, and their r-th rows are gathered together, r by r, in one take."""
        order = np.argsort(-sizes, kind="stable")
        dest, starts, sizes = dest[order], starts[order], sizes[order]
        steps = np.arange(int(sizes[0]))[:, None]
        live = np.count_nonzero(steps < sizes[None, :], axis=1)  # runs going at row r
        taken = self.rows(rows, self.index((starts[None, :] + steps)[steps < sizes[None, :]]))
        total = acc[dest] + taken[: len(dest)]
        for r, at in enumerate(np.cumsum(live)[:-1], start=1):
            total[: live[r]] += taken[at : at + live[r]]
        acc[dest] = total


class CupyOps(NumpyOps):
    """The numpy adapter on CuPy arrays, with a GPU scatter-add for grouped sums."""

    name = "cupy"

    def to_numpy(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def add_rows(self, acc, rows, groups: np.ndarray) -> None:
        import cupyx

        cupyx.scatter_add(acc, self.index(groups), rows)


class TorchOps(_Ops):
    """The same array operations on torch tensors, on 'cuda' or 'cpu'."""

    name = "torch"

    def __init__(self, torch, device: str):
        self.torch = torch
        self.device = device

    def asarray(self, a):
        return self.torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=self.device)

    def index(self, a):
        return self.torch.as_tensor(np.asarray(a, dtype=np.int64), device=self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def copy(self, a):
        return a.clone()

    def rows(self, a, idx):
        return a.index_select(0, idx)

    def row_sqnorms(self, a):
        return (a * a).sum(dim=1)

    def diagonal(self, a):
        return self.torch.diagonal(a).contiguous()

    def transposed(self, a):
        return a.T.contiguous()

    def minimum(self, a, b):
        return self.torch.minimum(a, b)

    def clip_min(self, a, lo: float):
        return a.clamp_min_(lo)

    def row_sums(self, a):
        return a.sum(dim=1, dtype=self.torch.float64)

    def total(self, a) -> float:
        return float(a.sum(dtype=self.torch.float64))

    def min0(self, a):
        return a.amin(dim=0)

    def argmin0(self, a):
        vals, rows = self.torch.min(a, dim=0)
        return vals, rows

    def add_rows(self, acc, rows, groups: np.ndarray) -> None:
        acc.index_add_(0, self.index(groups), rows)
