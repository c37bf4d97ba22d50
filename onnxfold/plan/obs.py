"""Which channels a least-squares refit can best do without (`--importance obs`): the Optimal Brain
Surgeon order of a consumer's input entries, removed one channel at a time.

A group's consumer computes y = x W + b from its input x (rows, m), m = n * repeat entries (a
channel's entries are c*repeat ... (c+1)*repeat - 1). When channels S are dropped and the kept rows
are solved again by least squares (what rewrite.refit does, with an intercept), the output error
left is, with H the centered scatter of x (each diagonal entry raised by DAMP of itself),

    E(S) = min over W' with W'_S = 0 of tr((W' - W)^T H (W' - W))

With Hinv the inverse of H, removing one more channel (entries B) from the current solution adds
tr(W_B^T (Hinv_BB)^-1 W_B) and moves the kept rows by -Hinv_:B (Hinv_BB)^-1 W_B (OBS, Hassibi &
Stork 1993; structured as in ZipLM, Kurtic et al. 2023). Greedy elimination to the last channel
ranks them: the k channels kept at ratio 1 - k/n are the last k survivors, the set the refit will
solve again. For a k x k Conv the weight rows of a channel hold all its kernel taps and H is the
channel covariance (taps taken as independent: a Kronecker approximation of the patch covariance
the refit uses)."""

from __future__ import annotations

import numpy as np

# damping: H_jj += DAMP x H_jj keeps the inverse stable where channels are collinear (a channel's
# copy then costs DAMP x its activation-x-weight energy instead of 0). Relative to each entry, not
# to the mean diagonal as GPTQ damps: a few loud channels (an LLM's massive activations) would
# otherwise swamp the quiet ones and the order would fall back to weight norms. The order measures
# the plain least-squares error, not the refit's stronger ridge (whose shrinkage toward the dense
# rows favours keeping loud copies)
DAMP = 0.01
FLOOR = 1e-6  # x the mean diagonal, added to every diagonal entry: H's condition stays below 1e6 m
LAZY = 64  # rank-one updates of the inverse gathered before one product applies them


def removal_order(
    scatter: np.ndarray, weights: np.ndarray, repeat: int = 1, damp: float = DAMP
) -> np.ndarray:
    """Rank (n,) float64 of each channel: the step at which greedy OBS elimination removes it
    (0 first, n - 1 the last survivor). scatter (m, m): centered scatter of the consumer's input
    entries; weights (m, d): the consumer's weight row of each entry; m = n * repeat."""
    m = len(scatter)
    hinv = np.linalg.inv(damped(scatter, damp))
    w = weights.astype(np.float64).reshape(m, -1).copy()
    if repeat == 1:
        return _channel_order(hinv, w)
    return _block_order(hinv, w, repeat)


def damped(scatter: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """scatter (m, m) as float64 with each diagonal entry raised by `damp` of itself and by FLOOR
    of the mean diagonal (entries that never vary, e.g. a ReLU6 channel stuck at 6, would make the
    inverse overflow)."""
    h = scatter.astype(np.float64)  # a copy
    diag = np.diag(h).copy()
    floor = FLOOR * max(float(diag.mean()) if len(diag) else 0.0, 1e-30)
    h[np.diag_indices_from(h)] = diag * (1.0 + damp) + floor
    return h


def _channel_order(hinv: np.ndarray, w: np.ndarray) -> np.ndarray:
    """removal_order for one entry per channel. The inverse's rank-one updates are kept as columns
    u (hinv now = hinv - U U^T) and applied, with the removed rows dropped, LAZY steps at a time:
    one matrix product instead of a pass over the whole inverse per step."""
    n = len(hinv)
    rank = np.zeros(n)
    alive = np.arange(n)  # channel ids of the working arrays' rows
    lazy = np.empty((n, LAZY))
    diag = np.diag(hinv).copy()
    live = np.ones(n, bool)
    used = 0
    for step in range(n - 1):
        costs = np.where(live, np.einsum("ij,ij->i", w, w) / np.maximum(diag, 1e-300), np.inf)
        j = int(np.argmin(costs))
        column = hinv[:, j] - lazy[:, :used] @ lazy[j, :used]
        u = column / np.sqrt(max(column[j], 1e-300))
        w -= np.outer(column / max(column[j], 1e-300), w[j])
        diag -= u * u
        lazy[:, used] = u
        used += 1
        live[j] = False
        rank[alive[j]] = step
        if used == LAZY:
            hinv -= lazy[:, :used] @ lazy[:, :used].T
            hinv, w, diag, alive = hinv[np.ix_(live, live)], w[live], diag[live], alive[live]
            lazy, live, used = np.empty((len(alive), LAZY)), np.ones(len(alive), bool), 0
    rank[alive[live]] = n - 1
    return rank


def _block_order(hinv: np.ndarray, w: np.ndarray, repeat: int) -> np.ndarray:
    """removal_order for channels of `repeat` entries (attention heads: few, small blocks)."""
    n = len(hinv) // repeat
    rank = np.zeros(n)
    alive = np.arange(n)
    for step in range(n - 1):
        index = np.arange(len(alive))[:, None] * repeat + np.arange(repeat)
        inverses = np.linalg.pinv(hinv[index[:, :, None], index[:, None, :]], hermitian=True)
        rows = w[index]  # (blocks, r, d)
        j = int(np.argmin(np.einsum("brd,brs,bsd->b", rows, inverses, rows)))
        block = index[j]
        lift = hinv[:, block] @ inverses[j]  # (m', r)
        w -= lift @ w[block]
        hinv -= lift @ hinv[block, :]
        rank[alive[j]] = step
        entries = np.ones(len(hinv), bool)
        entries[block] = False
        hinv, w, alive = hinv[np.ix_(entries, entries)], w[entries], np.delete(alive, j)
    rank[alive] = n - 1
    return rank
