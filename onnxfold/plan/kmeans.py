"""k-means for channel folding: greedy k-means++ seeds, Lloyd passes, then batch Hartigan moves.

Same code for every array backend. Distances live only in (clusters x points) blocks of p_ji =
|c_j|^2 - 2 <c_j, x_i>, from _GramEngine (G = x x^T only: <c_j, x_i> = sum_{l in C_j} G_il / |C_j|,
|c_j|^2 = sum_{l,m in C_j} G_lm / |C_j|^2; O(n^2 + nk) a sweep whatever d, the exact reduction for d
> n) or _PointEngine (explicit centres, chunked GEMMs against x; small k or huge n). _State caches
per point the own, nearest and best Hartigan target; after a few moves only the changed clusters and
the points whose choice they touch are recomputed. Random choices come from one host numpy
Generator."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .backends import array_module, resolve_backend

_BLOCK_FLOATS = 1 << 22  # elements of one distance block (16 MiB of float32)
_GRAM_MAX_BYTES = 1 << 30  # n x n float32 Gram matrix allowed up to n = 16384
_GREEDY_MAX_K = 256  # point engine: greedy k-means++ up to this k, batched k-means++ above
_BATCHED_ROUNDS = 32  # batched k-means++: one GEMM pass per round
_ITERS_GUESS = 20  # sweeps per restart assumed by the engine cost model
_MOVE_EPS = 1e-6  # a point moves only when that saves more than this x (|x_i|^2 + mean |x|^2)
_FULL_SWEEP = 0.3  # recompute everything when more than this fraction of the clusters changed
_HARTIGAN_BATCHES = 10  # at most this x max_iter Hartigan batches per restart
_SUM_CACHE_MIN = 8  # member sums of clusters this big are cached and updated by the moves...
_SUM_CACHE_AGE = 32  # ...and recomputed from scratch after this many updates


@dataclass(frozen=True)
class KMeansResult:
    """labels (n,) int64 in [0, k), every cluster non-empty; centers (k, d) float32 numpy cluster
    means; inertia: sum of squared distances of the points to their centers (float64 sum)."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 100,
    tol: float = 1e-4,
    backend: str = "numpy",
) -> KMeansResult:
    """Cluster the rows of x (n, d) into k groups; the best of n_init restarts.

    Each restart: greedy k-means++ seeds, <= max_iter Lloyd passes (until no point moves or the
    inertia drops by <= tol x mean per-feature variance), then batches of Hartigan single-point
    moves until none lowers the inertia. ValueError on bad input; BackendUnavailable for a backend
    that cannot run here."""
    return _kmeans(x, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol, backend=backend)


def _kmeans(
    x, k, *, seed=0, n_init=3, max_iter=100, tol=1e-4, backend="numpy", engine="auto", refine=True
):
    """kmeans() with the internal knobs: engine ('auto', 'gram', 'points'), refine (Hartigan
    moves)."""
    x = _validate(x, k, seed, n_init, max_iter, tol)
    n = x.shape[0]
    if k == n:
        return KMeansResult(np.arange(n, dtype=np.int64), x.copy(), 0.0)
    ops = array_module(resolve_backend(backend))
    gram = engine == "gram" or engine == "auto" and _gram_pays(*x.shape, k)
    eng = _GramEngine(ops, x) if gram else _PointEngine(ops, x)
    if k == 1:
        return _finish(eng, np.zeros(n, dtype=np.int64), 1)
    rng = np.random.default_rng(seed)
    runs = [_fit_once(eng, k, rng, max_iter, tol, refine) for _ in range(n_init)]
    eng.src = eng.sq = None  # centres come from x alone: free the Gram matrix first
    best = None
    # the first lowest inertia; one (k, d) centre array kept besides the current one
    for labels in runs:
        result = _finish(eng, labels, k)
        best = result if best is None or result.inertia < best.inertia else best
    return best


def _validate(x, k, seed, n_init, max_iter, tol) -> np.ndarray:
    """The public edge: sklearn-style ValueErrors quoting the values; returns x as float32 (n,
    d)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"x must be a real numeric array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"Expected 2D array, got {x.ndim}D array instead (shape={x.shape})")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(
            f"Found array with shape={x.shape}; at least 1 sample and 1 feature are required"
        )
    for name, value, low in (
        ("n_clusters", k, 1),
        ("n_init", n_init, 1),
        ("max_iter", max_iter, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name}={value} should be >= {low}")
    if x.shape[0] < k:
        raise ValueError(f"n_samples={x.shape[0]} should be >= n_clusters={k}.")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol={tol!r} should be a finite number >= 0")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValueError("Input x contains NaN or infinity (or values too large for float32)")
    return x32


def _gram_pays(n: int, d: int, k: int) -> bool:
    """True when the n x n Gram fits and a rough flop count of the Gram engine is lower."""
    trials = 2 + int(math.log(k))
    gram = n * n * d / 2 + _ITERS_GUESS * (n * n + 4 * n * k) + 4 * k * trials * n
    seeding = k * trials * n * d if k <= _GREEDY_MAX_K else n * k * d
    return 4 * n * n <= _GRAM_MAX_BYTES and gram <= _ITERS_GUESS * n * k * d + seeding


@dataclass
class _Cache:
    """What a restart keeps between sweeps: cc (k,) |c_j|^2; sums: cluster -> (member row sum,
    updates since it was computed); moved: (points, old labels, new labels) of the last moves, or
    None after a full sweep; c (k, d): explicit centres (point engine only)."""

    cc: np.ndarray
    sums: dict = field(default_factory=dict)
    moved: tuple | None = None
    c: object = None


class _Grouping:
    """A partition as point indices sorted by cluster (points labelled -1 left out): order, counts
    (k,)."""

    def __init__(self, labels: np.ndarray, k: int):
        self.order = np.argsort(labels, kind="stable")[np.count_nonzero(labels < 0) :]
        self.counts = np.bincount(labels[labels >= 0], minlength=k)
        self.offsets = np.concatenate(([0], np.cumsum(self.counts)))

    def members(self, js: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Members of clusters js (m,) and the position in js of each member's cluster (m,)."""
        lens = self.counts[js]
        local = np.repeat(np.arange(len(js)), lens)
        first = np.repeat(self.offsets[js] - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        return self.order[first + np.arange(len(local))], local


class _Engine:
    """src (G, or the centred float32 x (n, d) on the device) summed over members, sq (n,) = |x_i|^2
    after centring; raw: the caller's x (host), kept instead of a centred copy by the Gram
    engine."""

    gram = False

    def __init__(self, ops, x: np.ndarray):
        self.ops, (self.n, self.d), gram = ops, x.shape, self.gram
        self.mean = x.mean(axis=0, dtype=np.float64)
        self.raw, centre = x, self.mean.astype(np.float32)
        self.x = None if gram else ops.asarray(x - centre)
        self.src = _centred_gram(ops, x, centre) if gram else self.x
        self.sq = ops.diagonal(self.src) if gram else ops.row_sqnorms(self.x)
        self.sq_host = np.maximum(ops.host64(self.sq), 0.0)

    def point_dists(self, idx: np.ndarray):
        """Squared distances (m, n) from points idx (m,) to all points; exactly 0 at the points
        themselves."""
        ops, rows = self.ops, self.ops.index(idx)
        dots = self._dots(rows)
        dots *= -2.0
        dots += self.sq[None, :]
        dots += self.sq[rows][:, None]
        ops.clip_min(dots, 0.0)
        dots[ops.index(np.arange(len(idx))), rows] = 0.0
        return dots

    def member_sums(self, grp: _Grouping, js: np.ndarray, cache: _Cache):
        """(len(js), width) src row sums over the members of clusters js (big ones cached, updated
        by moves)."""
        sums, moved = cache.sums, cache.moved
        hit = np.array(
            [
                moved is not None and sums.get(j, (0, _SUM_CACHE_AGE))[1] < _SUM_CACHE_AGE
                for j in js.tolist()
            ],
            dtype=bool,
        )
        out, miss = self.ops.zeros((len(js), self.src.shape[1])), np.flatnonzero(~hit)
        out[self.ops.index(miss)] = self.ops.grouped_sum(
            self.src, *grp.members(js[miss]), len(miss)
        )
        for t in np.flatnonzero(hit):  # moved = (points, old labels, new labels)
            out[t] = (
                sums[js[t]][0]
                + self._sum(moved[0][moved[2] == js[t]])
                - self._sum(moved[0][moved[1] == js[t]])
            )
        for t, j in enumerate(js.tolist()):
            if grp.counts[j] >= _SUM_CACHE_MIN:
                sums[j] = (self.ops.copy(out[t]), sums[j][1] + 1 if hit[t] else 0)
            else:
                sums.pop(j, None)
        return out

    def _sum(self, pts: np.ndarray):
        return self.ops.rows(self.src, self.ops.index(pts)).sum(0)

    def _scale(self, st, cnt: np.ndarray, cc: np.ndarray):
        """Member sums of <x_l, x_i> (m, c) -> p = |c|^2 - 2 <c, x_i>, in place."""
        st *= self.ops.asarray(-2.0 / cnt)[:, None]
        st += self.ops.asarray(cc)[:, None]
        return st


def _centred_gram(ops, x: np.ndarray, centre: np.ndarray):
    """(n, n) Gram matrix of the rows of x (n, d) minus centre (d,), from blocks of centred rows, so
    no centred copy of x is ever held (x can be the largest array of a fold); symmetric by
    construction."""
    n, rows = len(x), max(256, _BLOCK_FLOATS * 4 // max(1, x.shape[1]))
    g = ops.zeros((n, n))
    starts = range(0, n, rows)
    for a in starts:
        xa = ops.asarray(x[a : a + rows] - centre)
        for c in (c for c in starts if c <= a):
            xc = xa if c == a else ops.asarray(x[c : c + rows] - centre)
            g[a : a + rows, c : c + rows] = xa @ xc.T
            if c != a:
                g[c : c + rows, a : a + rows] = g[a : a + rows, c : c + rows].T
    return g


class _GramEngine(_Engine):
    """Blocks from the Gram matrix G = src (n, n) of the centred data."""

    gram = True

    def _dots(self, rows):
        return self.ops.rows(self.src, rows)

    def refresh(self, grp: _Grouping, js: np.ndarray, cache: _Cache):
        """p block (len(js), n) of clusters js against all points; updates cache.cc[js] =
        |c_j|^2."""
        pts, local = grp.members(js)
        st = self.member_sums(grp, js, cache)
        own = self.ops.host64(st[self.ops.index(local), self.ops.index(pts)])
        cnt = grp.counts[js].astype(np.float64)
        cache.cc[js] = np.bincount(local, weights=own, minlength=len(js)) / cnt**2
        return self._scale(st, cnt, cache.cc[js])

    def against(self, grp: _Grouping, pts: np.ndarray, cache: _Cache):
        """p block (k, len(pts)) of all clusters against points pts (cached |c|^2)."""
        cols = self.ops.transposed(self.ops.rows(self.src, self.ops.index(pts)))  # G is symmetric
        k = len(grp.counts)
        st = self.ops.grouped_sum(cols, grp.order, np.repeat(np.arange(k), grp.counts), k)
        return self._scale(st, grp.counts.astype(np.float64), cache.cc)


class _PointEngine(_Engine):
    """Blocks from explicit centres (cache.c, k x d) and GEMMs against x (n, d)."""

    def _dots(self, rows):
        return self.ops.rows(self.x, rows) @ self.x.T

    def refresh(self, grp: _Grouping, js: np.ndarray, cache: _Cache):
        """p block (len(js), n) of clusters js against all points; updates their cached centres."""
        ops = self.ops
        c = self.member_sums(grp, js, cache)
        c /= ops.asarray(grp.counts[js])[:, None]
        if cache.c is None:
            cache.c = ops.zeros((len(grp.counts), self.d))
        cache.c[ops.index(js)] = c
        cache.cc[js] = ops.host64(ops.row_sqnorms(c))
        return self._scale(c @ self.x.T, np.ones(len(js)), cache.cc[js])

    def against(self, grp: _Grouping, pts: np.ndarray, cache: _Cache):
        """p block (k, len(pts)) of all clusters against points pts (cached centres)."""
        dots = cache.c @ self.ops.rows(self.x, self.ops.index(pts)).T
        return self._scale(dots, np.ones(len(grp.counts)), cache.cc)


def _seed(eng: _Engine, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct seeds (k,): greedy k-means++ (2 + ln k candidates by D^2, keep the best), or for
    large k on the point engine batches of k / _BATCHED_ROUNDS points drawn by D^2, added
    together."""
    ops, batched = eng.ops, isinstance(eng, _PointEngine) and k > _GREEDY_MAX_K
    # a (batch, n) block at most
    batch = max(1, min(-(-k // _BATCHED_ROUNDS), _BLOCK_FLOATS // eng.n))
    seeds, taken = [int(rng.integers(eng.n))], np.zeros(eng.n, dtype=bool)
    taken[seeds[0]] = True
    closest = eng.point_dists(np.array(seeds))[0]
    while len(seeds) < k:
        if batched:
            cand = _draw(rng, ops.host64(closest), taken, min(batch, k - len(seeds)))
            cand = np.unique(cand[~taken[cand]])
            closest = ops.minimum(closest, ops.min0(eng.point_dists(cand)))
        else:
            cand = _draw(rng, ops.host64(closest), taken, 2 + int(math.log(k)))
            mins = ops.minimum(eng.point_dists(cand), closest[None, :])
            best = int(np.argmin(ops.to_numpy(ops.row_sums(mins))))
            cand, closest = cand[best : best + 1], mins[best]
        seeds.extend(cand.tolist())
        taken[cand] = True
    return np.array(seeds, dtype=np.int64)


def _draw(rng: np.random.Generator, weights: np.ndarray, taken: np.ndarray, m: int) -> np.ndarray:
    """m indices drawn with probability proportional to weights (n,), or one untaken index if all
    are 0."""
    cum = np.cumsum(weights)
    if not cum[-1] > 0:
        return np.array([rng.choice(np.flatnonzero(~taken))])
    return np.minimum(np.searchsorted(cum, rng.random(m) * cum[-1], side="right"), len(weights) - 1)


class _Best:
    """Per point (n,): best cost v at cluster j, lower bound lb on every other (v <= lb: j surely
    best)."""

    def __init__(self, n: int):
        self.v, self.lb, self.j = (
            np.full(n, np.inf),
            np.full(n, np.inf),
            np.zeros(n, dtype=np.int64),
        )

    def forget(self, pts) -> None:
        self.v[pts], self.lb[pts] = np.inf, np.inf

    def merge(self, pts: np.ndarray, m1: np.ndarray, j1: np.ndarray, m2: np.ndarray) -> None:
        """Fold in a block's column minimum m1 (at cluster j1) and second minimum m2 (ties keep the
        old)."""
        v, take = self.v[pts], m1 < self.v[pts]
        self.lb[pts] = np.minimum(np.minimum(self.lb[pts], m2), np.where(take, v, m1))
        self.v[pts], self.j[pts] = np.where(take, m1, v), np.where(take, j1, self.j[pts])


class _State:
    """labels (n,) (-1 unassigned) and per point: own_d, distance to the own centre; near, the
    nearest centre (kept while `lloyd`); hart, the best Hartigan target j != own, cost
    |C_j|/(|C_j|+1) d(x_i, c_j)."""

    def __init__(self, eng: _Engine, labels: np.ndarray, k: int):
        self.eng, self.k, self.lloyd = eng, k, True
        self.cache = _Cache(np.zeros(k))
        self._set_labels(labels)
        self._sweep()

    def _set_labels(self, labels: np.ndarray) -> None:
        self.labels, self.grp = labels, _Grouping(labels, self.k)
        self.counts = self.grp.counts

    def _sweep(self) -> None:
        """Recompute everything, block by block of clusters."""
        self.cache.sums, self.cache.moved = {}, None
        self.own_d, self.near, self.hart = (
            np.full(self.eng.n, np.inf),
            _Best(self.eng.n),
            _Best(self.eng.n),
        )
        self._refresh(np.arange(self.k))

    def _refresh(self, js: np.ndarray) -> None:
        step, every = max(1, _BLOCK_FLOATS // self.eng.n), np.arange(self.eng.n)
        for a in range(0, len(js), step):
            self._merge(
                self.eng.refresh(self.grp, js[a : a + step], self.cache), js[a : a + step], every
            )

    def apply(self, labels: np.ndarray) -> None:
        """Move to labels: recompute changed clusters for all points, all clusters for uncertain
        points."""
        moved, old = labels != self.labels, self.labels
        touched = np.concatenate((old[moved], labels[moved]))
        changed = np.zeros(self.k, dtype=bool)
        changed[touched[touched >= 0]] = True
        self._set_labels(labels)
        if changed.sum() > _FULL_SWEEP * self.k:
            return self._sweep()
        for best in (self.near, self.hart):
            best.v[changed[best.j]] = np.inf
        self.cache.moved = (np.flatnonzero(moved), old[moved], labels[moved])
        self._refresh(np.flatnonzero(changed))
        pts = np.flatnonzero(
            moved | (self.near.v > self.near.lb) & self.lloyd | (self.hart.v > self.hart.lb)
        )
        self.near.forget(pts)
        self.hart.forget(pts)
        step = max(1, _BLOCK_FLOATS // self.k)
        for part in (pts[a : a + step] for a in range(0, len(pts), step)):
            self._merge(self.eng.against(self.grp, part, self.cache), np.arange(self.k), part)

    def _merge(self, p, js: np.ndarray, pts: np.ndarray) -> None:
        """Fold block p (len(js), len(pts)) into the caches of points pts."""
        ops, sq = self.eng.ops, self.eng.sq_host[pts]
        pos = np.full(self.k, -1)
        pos[js] = np.arange(len(js))
        rows = np.where(self.labels[pts] >= 0, pos[self.labels[pts]], -1)
        own = np.flatnonzero(rows >= 0)
        r, c = ops.index(rows[own]), ops.index(own)
        self.own_d[pts[own]] = np.maximum(ops.host64(p[r, c]) + sq[own], 0.0)
        if self.lloyd:
            m1, r1, m2 = ops.two_smallest0(p)
            self.near.merge(pts, m1 + sq, js[r1], m2 + sq)
        p += self.eng.sq[ops.index(pts)][None, :]
        ops.clip_min(p, 0.0)
        p *= ops.asarray(self.counts[js] / (self.counts[js] + 1.0))[:, None]
        p[r, c] = np.inf
        m1, r1, m2 = ops.two_smallest0(p)
        self.hart.merge(pts, m1, js[r1], m2)


def _fit_once(
    eng: _Engine, k: int, rng: np.random.Generator, max_iter: int, tol: float, refine: bool
):
    """Labels (n,) of one restart: seeds, Lloyd passes, then Hartigan batches when refine."""
    labels = np.full(eng.n, -1, dtype=np.int64)
    labels[_seed(eng, k, rng)] = np.arange(k)
    st = _State(eng, labels, k)
    eps = _MOVE_EPS * (eng.sq_host + eng.sq_host.mean())
    tol_abs = tol * eng.sq_host.sum() / (eng.n * eng.d)  # tol x mean per-feature variance
    st.apply(_lloyd_step(st, eps))  # first pass: every point to its nearest seed
    prev = np.inf
    for _ in range(max_iter - 1):
        sse, new = st.own_d.sum(), _lloyd_step(st, eps)
        if np.array_equal(new, st.labels):
            break
        st.apply(new)
        if prev - sse <= tol_abs:
            break
        prev = sse
    st.lloyd = False
    for _ in range(_HARTIGAN_BATCHES * max_iter if refine else 0):
        new = _hartigan_step(st, eps)
        if np.array_equal(new, st.labels):
            break
        st.apply(new)
    return st.labels


def _lloyd_step(st: _State, eps: np.ndarray) -> np.ndarray:
    """Labels after moving every point to its nearest centre (when clearly closer), no cluster
    empty."""
    moved = st.near.v < st.own_d - eps
    labels = np.where(moved, st.near.j, st.labels)
    return _fill_empty(labels, st.k, np.where(moved, st.near.v, st.own_d))


def _fill_empty(labels: np.ndarray, k: int, dist: np.ndarray) -> np.ndarray:
    """Give each empty cluster the point farthest from its centre among clusters with >= 2
    points."""
    counts = np.bincount(labels, minlength=k)
    empty = list(np.flatnonzero(counts == 0))
    for i in np.argsort(-dist, kind="stable") if empty else ():
        if counts[labels[i]] > 1:
            counts[labels[i]] -= 1
            labels[i] = empty.pop()
            if not empty:
                break
    return labels


def _hartigan_step(st: _State, eps: np.ndarray) -> np.ndarray:
    """Labels after single-point moves a -> b that lower the inertia by |a|/(|a|-1) d(x_i, c_a) -
    |b|/(|b|+1) d(x_i, c_b), best first, each cluster touched once (so the gains add up exactly)."""
    size = st.counts[st.labels]
    gain = np.where(size > 1, size / np.maximum(size - 1.0, 1.0) * st.own_d - st.hart.v, -np.inf)
    cand = np.flatnonzero(gain > eps)
    touched, labels = np.zeros(st.k, dtype=bool), st.labels.copy()
    for i in cand[np.argsort(-gain[cand], kind="stable")]:
        a, b = labels[i], st.hart.j[i]
        if not (touched[a] or touched[b]):
            touched[a] = touched[b] = True
            labels[i] = b
    return labels


def _finish(eng: _Engine, labels: np.ndarray, k: int) -> KMeansResult:
    """Centres as cluster means of x and the inertia in the original space (float64 sum)."""
    ops, grp = eng.ops, _Grouping(labels, k)
    # uncentred or centred rows: same differences
    x = ops.asarray(eng.raw) if eng.x is None else eng.x
    centers = ops.grouped_sum(x, grp.order, np.repeat(np.arange(k), grp.counts), k)
    centers /= ops.asarray(grp.counts)[:, None]
    inertia, step = 0.0, max(1, _BLOCK_FLOATS // eng.d)
    for a in range(0, eng.n, step):
        diff = x[a : a + step] - ops.rows(centers, ops.index(labels[a : a + step]))
        inertia += ops.total(ops.row_sqnorms(diff))
    out = np.asarray(ops.to_numpy(centers), dtype=np.float32)  # in place: no float64 copy of k x d
    if eng.x is not None:
        out += eng.mean.astype(np.float32)
    return KMeansResult(labels.astype(np.int64), out, float(inertia))
