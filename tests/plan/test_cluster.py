"""k-means (onnxfold.plan.kmeans) and array backends (onnxfold.plan.backends)."""

import importlib.util

import numpy as np
import pytest

from onnxfold.errors import UserError
from onnxfold.plan import backends
from onnxfold.plan import kmeans as cluster
from onnxfold.plan.backends import BackendUnavailable, array_module, resolve_backend
from onnxfold.plan.kmeans import KMeansResult, kmeans


def weights(n, d, rank, dup=0, seed=0):
    """Conv-filter-like rows: low rank + noise, per-row scale, `dup` rows copied from others."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank)
    x += 0.3 * rng.standard_normal((n, d))
    x *= rng.uniform(0.5, 2.0, (n, 1))
    if dup:
        x[rng.choice(n, dup, replace=False)] = x[rng.choice(n, dup, replace=False)]
    return x.astype(np.float32)


def brute_inertia(x, labels, k):
    x = x.astype(np.float64)
    centers = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
    return float(((x - centers[labels]) ** 2).sum()), centers


def check_result(res, n, k, d):
    assert isinstance(res, KMeansResult)
    assert res.labels.shape == (n,) and res.labels.dtype == np.int64
    assert res.centers.shape == (k, d) and res.centers.dtype == np.float32
    assert isinstance(res.inertia, float) and res.inertia >= 0
    assert res.labels.min() >= 0 and res.labels.max() < k
    assert np.bincount(res.labels, minlength=k).min() >= 1, "empty cluster"


# (n, d, rank, k, duplicated rows): conv-like d > n, narrow n > d, k from n/50 to 3n/4
SKLEARN_CASES = [
    (64, 576, 8, 32, 4),
    (96, 3000, 8, 48, 0),
    (128, 1152, 16, 40, 8),
    (300, 64, 8, 30, 20),
    (200, 32, 6, 150, 10),
    (500, 100, 10, 10, 0),
    (256, 27, 4, 64, 16),
]


@pytest.mark.parametrize("n,d,rank,k,dup", SKLEARN_CASES)
def test_inertia_matches_sklearn(n, d, rank, k, dup):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = weights(n, d, rank, dup)
    ref = sklearn_cluster.KMeans(n_clusters=k, n_init=3, random_state=0).fit(x)
    res = kmeans(x, k, n_init=3)
    check_result(res, n, k, d)
    assert res.inertia == pytest.approx(
        brute_inertia(x, res.labels, k)[0], rel=1e-4
    )  # a real partition's
    assert res.inertia <= 1.01 * ref.inertia_, (
        res.inertia,
        ref.inertia_,
    )  # never worse by more than 1%


@pytest.mark.parametrize("engine", ["gram", "points"])
@pytest.mark.parametrize("n,d,k", [(80, 700, 30), (600, 8, 300), (300, 20, 7)])
def test_engines_report_original_space_inertia_and_means(engine, n, d, k):
    x = weights(n, d, 4, dup=5) + 3.0  # an offset: the engines centre the data internally
    res = cluster._kmeans(x, k, engine=engine)
    check_result(res, n, k, d)
    inertia, centers = brute_inertia(x, res.labels, k)
    assert res.inertia == pytest.approx(inertia, rel=1e-4)
    np.testing.assert_allclose(res.centers, centers, rtol=1e-4, atol=1e-4)


def test_engines_agree_with_each_other():
    x = weights(120, 900, 8, dup=6, seed=3)
    gram = cluster._kmeans(x, 50, engine="gram")
    points = cluster._kmeans(x, 50, engine="points")
    assert gram.inertia == pytest.approx(points.inertia, rel=1e-3)


def test_hartigan_refinement_lowers_inertia():
    x = weights(200, 300, 8, seed=1)
    lloyd = cluster._kmeans(x, 100, refine=False)
    refined = cluster._kmeans(x, 100, refine=True)
    assert refined.inertia < 0.97 * lloyd.inertia


def test_engine_choice():
    assert cluster._gram_pays(512, 20000, 256)  # wide conv features: the Gram engine
    assert cluster._gram_pays(11008, 4096, 5504)
    assert not cluster._gram_pays(100000, 64, 50)  # Gram would not fit
    assert not cluster._gram_pays(11008, 4096, 4)  # few clusters: plain GEMMs are cheaper


def test_torch_backend_equals_numpy():
    pytest.importorskip("torch")
    for n, d, k in [(64, 576, 32), (300, 40, 12)]:
        x = weights(n, d, 6, dup=4, seed=2)
        ref = kmeans(x, k, backend="numpy")
        got = kmeans(x, k, backend="torch")
        check_result(got, n, k, d)
        assert np.array_equal(got.labels, ref.labels) or got.inertia == pytest.approx(
            ref.inertia, rel=1e-4
        )
        assert got.inertia == pytest.approx(ref.inertia, rel=1e-4)


@pytest.mark.parametrize("engine", ["gram", "points"])
def test_duplicated_rows_are_recovered(engine):
    rng = np.random.default_rng(0)
    unique = rng.standard_normal((12, 40)).astype(np.float32)
    reps = rng.integers(1, 6, 12)
    x = np.repeat(unique, reps, axis=0)
    perm = rng.permutation(len(x))
    x, owner = x[perm], np.repeat(np.arange(12), reps)[perm]
    res = cluster._kmeans(x, 12, engine=engine)
    check_result(res, len(x), 12, 40)
    assert res.inertia == pytest.approx(0.0, abs=1e-6 * float((x**2).sum()))
    for u in range(12):
        assert len(set(res.labels[owner == u])) == 1


def test_k_equals_n_is_identity():
    x = weights(10, 7, 3, seed=4)
    res = kmeans(x.astype(np.float64), 10)
    assert np.array_equal(res.labels, np.arange(10))
    assert res.inertia == 0.0
    np.testing.assert_array_equal(res.centers, x)


def test_k_equals_one_is_the_mean():
    x = weights(50, 9, 3, seed=5)
    res = kmeans(x, 1)
    assert np.array_equal(res.labels, np.zeros(50, dtype=np.int64))
    np.testing.assert_allclose(
        res.centers[0], x.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6
    )
    assert res.inertia == pytest.approx(brute_inertia(x, res.labels, 1)[0], rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_no_empty_cluster_with_many_identical_points(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.ones((20, 5)), rng.standard_normal((6, 5)), np.zeros((4, 5))]).astype(
        np.float32
    )
    x = x[rng.permutation(len(x))]
    for k in (len(x) - 1, len(x) - 3, 12, 9):
        for engine in ("gram", "points"):
            res = cluster._kmeans(x, k, seed=seed, engine=engine)
            check_result(res, len(x), k, 5)
            assert res.inertia == pytest.approx(
                brute_inertia(x, res.labels, k)[0], rel=1e-4, abs=1e-5
            )


def test_fill_empty_takes_farthest_point_of_a_non_singleton_cluster():
    labels = np.array([1, 1, 3, 3, 3, 4])
    dist = np.array(
        [9.0, 1.0, 2.0, 5.0, 1.0, 8.0]
    )  # point 0 is farthest, then point 5 (a singleton)
    out = cluster._fill_empty(labels.copy(), 5, dist)
    assert np.bincount(out, minlength=5).min() == 1
    assert out[5] == 4 and set(out[[0, 3]]) == {0, 2}  # 0 and 3 moved, the singleton 5 did not


def test_lloyd_pass_that_empties_a_cluster_refills_it():
    x = np.array([[-1.0], [1.0], [-1.4], [-2.4], [1.4], [2.4], [0.1]], dtype=np.float32)
    labels = np.array(
        [0, 0, 1, 1, 2, 2, 3]
    )  # centres 0, -1.9, 1.9, 0.1: cluster 0 loses both points
    for engine in (cluster._GramEngine, cluster._PointEngine):
        eng = engine(array_module("numpy"), x)
        st = cluster._State(eng, labels.copy(), 4)
        eps = cluster._MOVE_EPS * (eng.sq_host + eng.sq_host.mean())
        new = cluster._lloyd_step(st, eps)
        assert np.bincount(new, minlength=4).min() >= 1
        st.apply(new)
        assert st.own_d.sum() == pytest.approx(brute_inertia(x, new, 4)[0], rel=1e-5)


@pytest.mark.parametrize("engine", ["gram", "points"])
def test_incremental_updates_match_a_full_recompute(engine, monkeypatch):
    """After every move batch, the cached distances equal those of a state built from scratch."""
    checked, apply = [], cluster._State.apply

    def checked_apply(self, labels):
        apply(self, labels)
        ref = cluster._State(self.eng, labels.copy(), self.k)
        scale = 1e-4 * self.eng.sq_host.mean()
        np.testing.assert_allclose(self.own_d, ref.own_d, atol=scale)
        np.testing.assert_allclose(self.hart.v, ref.hart.v, atol=scale)
        if self.lloyd:
            np.testing.assert_allclose(self.near.v, ref.near.v, atol=scale)
        checked.append(len(labels))

    monkeypatch.setattr(cluster._State, "apply", checked_apply)
    x = weights(240, 30, 5, dup=20, seed=8)
    res = cluster._kmeans(x, 110, engine=engine, n_init=1)
    check_result(res, 240, 110, 30)
    assert len(checked) > 5


def test_all_points_identical():
    res = kmeans(np.full((7, 3), 2.5, dtype=np.float32), 4, seed=1)
    check_result(res, 7, 4, 3)
    assert res.inertia == 0.0
    np.testing.assert_array_equal(res.centers, np.full((4, 3), 2.5, dtype=np.float32))


def test_batched_seeding_for_large_k_on_point_engine():
    x = weights(700, 6, 3, seed=6)
    seeds = cluster._seed(
        cluster._PointEngine(array_module("numpy"), x), 400, np.random.default_rng(0)
    )
    assert len(seeds) == 400 and len(set(seeds.tolist())) == 400


def test_deterministic_and_dtype_agnostic():
    x = weights(150, 30, 5, seed=7)
    a, b = kmeans(x, 20, seed=3), kmeans(x.astype(np.float64), 20, seed=3)
    assert np.array_equal(a.labels, b.labels) and a.inertia == pytest.approx(b.inertia, rel=1e-6)
    c = kmeans((x * 100).astype(np.int32), 20, seed=3, max_iter=1)
    check_result(c, 150, 20, 30)


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((np.zeros((5, 3)), 8), {}, "n_samples=5 should be >= n_clusters=8"),
        ((np.zeros((5, 3)), 0), {}, "n_clusters=0 should be >= 1"),
        ((np.zeros((5, 3)), 2.5), {}, "n_clusters must be an int, got 2.5"),
        ((np.zeros((5, 3)), True), {}, "n_clusters must be an int, got True"),
        ((np.zeros(5), 2), {}, "Expected 2D array, got 1D array"),
        ((np.zeros((0, 3)), 1), {}, r"shape=\(0, 3\)"),
        ((np.array([[1.0, np.nan], [0.0, 1.0]]), 1), {}, "NaN or infinity"),
        ((np.array([["a", "b"]]), 1), {}, "real numeric array, got dtype <U1"),
        ((np.zeros((5, 3)), 2), {"n_init": 0}, "n_init=0 should be >= 1"),
        ((np.zeros((5, 3)), 2), {"max_iter": 0}, "max_iter=0 should be >= 1"),
        ((np.zeros((5, 3)), 2), {"tol": -1.0}, "tol=-1.0 should be a finite number >= 0"),
        ((np.zeros((5, 3)), 2), {"seed": -2}, "seed=-2 should be >= 0"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kmeans(*args, **kwargs)


# ----------------------------------------------------------------------------- backends


def _gpu_library_present():
    if importlib.util.find_spec("cupy") is not None:
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def test_auto_is_numpy_without_a_gpu():
    if _gpu_library_present():
        pytest.skip("a GPU library with CUDA is present here")
    assert resolve_backend("auto") == "numpy"
    assert resolve_backend() == "numpy"
    assert kmeans(weights(20, 4, 2), 3, backend="auto").labels.shape == (20,)


def test_auto_falls_back_to_numpy_when_the_gpu_probe_fails(monkeypatch):
    monkeypatch.setattr(backends, "_cuda_driver_loads", lambda: True)
    monkeypatch.setattr(
        backends, "_gpu_probe", lambda lib: (False, "RuntimeError: no kernel image")
    )
    assert resolve_backend("auto") == "numpy"
    monkeypatch.setattr(backends, "_gpu_probe", lambda lib: (lib == "torch", ""))
    assert resolve_backend("auto") == "torch"


def test_cupy_unavailable_raises_one_clear_line():
    if importlib.util.find_spec("cupy") is not None and backends._gpu_probe("cupy")[0]:
        pytest.skip("CuPy works here")
    with pytest.raises(BackendUnavailable, match="cupy") as info:
        resolve_backend("cupy")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendUnavailable, match="unknown backend 'jax'.*numpy.*torch.*cupy"):
        resolve_backend("jax")
    with pytest.raises(BackendUnavailable):
        kmeans(weights(10, 3, 2), 2, backend="jax")


def test_torch_backend_resolution(monkeypatch):
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(BackendUnavailable, match="torch"):
            resolve_backend("torch")
        return
    assert resolve_backend("torch") == "torch"
    assert resolve_backend(" Torch ") == "torch"
    ops = array_module("torch")
    assert ops.device == ("cuda" if backends._gpu_probe("torch")[0] else "cpu")
    monkeypatch.setattr(backends, "_installed", lambda lib: False)
    with pytest.raises(BackendUnavailable, match="pip install torch"):
        resolve_backend("torch")


def test_probe_result_is_cached_and_reports_missing_library():
    if importlib.util.find_spec("cupy") is None:
        assert backends._gpu_probe("cupy") == (False, "cupy is not installed")
    assert backends._gpu_probe("cupy") is backends._gpu_probe("cupy")


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_adapter_grouped_row_sums(name):
    if name == "torch":
        pytest.importorskip("torch")
    ops = array_module(name)
    rng = np.random.default_rng(0)
    groups = np.sort(np.r_[rng.integers(0, 6, 50), np.full(40, 7)])  # group 7 is large
    rows = rng.standard_normal((90, 4)).astype(np.float32)
    acc = ops.zeros((9, 4))
    ops.add_rows(acc, ops.asarray(rows), groups)
    want = np.zeros((9, 4))
    np.add.at(want, groups, rows)
    np.testing.assert_allclose(ops.to_numpy(acc), want, rtol=1e-5, atol=1e-5)
    vals, rows_idx = ops.argmin0(
        ops.asarray(np.array([[3.0, 1.0, 2.0], [1.0, 1.0, 5.0], [1.0, 0.0, 2.0]]))
    )
    np.testing.assert_array_equal(ops.to_numpy(rows_idx), [1, 2, 0])
    np.testing.assert_array_equal(ops.to_numpy(vals), [1.0, 0.0, 2.0])
