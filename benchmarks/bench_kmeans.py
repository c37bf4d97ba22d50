"""onnxfold.plan.kmeans.kmeans against scikit-learn's KMeans on weight-like matrices (time and
inertia).

Matrices are seeded random low-rank-plus-noise float32 (rank min(n, d) / 8): conv-like features
(64x576, 256x2304, 512x4608), an MLP-like 3072x768 and a Llama-MLP-like 11008x4096, at k = n/2 (and
k = 0.8 n for the 11008 one). Both get the same float32 input and n_init.

sklearn's greedy k-means++ on float32 input costs ~1.6 s per centre at 11008x4096 on 2 cores (hours
per fit), so by default the 11008 rows time only a sample of sklearn's seeding and report a lower
bound on its time (seeding alone), and compare the inertia with onnxfold's own Lloyd-only mode
(sklearn's algorithm: greedy k-means++ then Lloyd), marked '*'. --sklearn-full runs sklearn for
real.

Usage: python -m benchmarks.bench_kmeans [--quick] [--sklearn-full] [--n-init 3] [--backend
numpy]"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

from onnxfold.plan import kmeans

CASES = [  # (name, n, d, k)
    ("conv 64x576", 64, 576, 32),
    ("conv 256x2304", 256, 2304, 128),
    ("conv 512x4608", 512, 4608, 256),
    ("mlp 3072x768", 3072, 768, 1536),
    ("mlp 11008x4096", 11008, 4096, 5504),
    ("mlp 11008x4096", 11008, 4096, 8806),
]
BIG = 11008
SEEDING_SAMPLE = 16  # centres of sklearn's k-means++ timed to extrapolate its seeding cost


def weights(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32: rank min(n, d)/8 structure plus noise, per-row scale, like trained
    filters."""
    rng = np.random.default_rng(seed)
    rank = max(4, min(n, d) // 8)
    low = rng.standard_normal((n, rank), dtype=np.float32) @ rng.standard_normal(
        (rank, d), dtype=np.float32
    )
    x = low / np.sqrt(rank) + 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    return (x * rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)).astype(np.float32)


def timed(fn, repeats: int):
    """(median seconds, last result) over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sklearn_fit(x: np.ndarray, k: int, n_init: int):
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=n_init, random_state=0)
    start = time.perf_counter()
    km.fit(x)
    return time.perf_counter() - start, float(km.inertia_)


def sklearn_seeding_lower_bound(x: np.ndarray, k: int, n_init: int) -> float:
    """Seconds sklearn's fit spends at least: n_init x k x (time per greedy k-means++ centre)."""
    from sklearn.cluster import kmeans_plusplus

    trials = 2 + int(math.log(k))  # what KMeans(n_clusters=k) uses
    start = time.perf_counter()
    kmeans_plusplus(x, SEEDING_SAMPLE, random_state=0, n_local_trials=trials)
    return (time.perf_counter() - start) / SEEDING_SAMPLE * k * n_init


def run_case(name, n, d, k, args) -> dict:
    x = weights(n, d)
    repeats = 1 if n >= BIG else args.repeats
    ours_s, ours = timed(
        lambda: kmeans.kmeans(x, k, n_init=args.n_init, backend=args.backend), repeats
    )
    row = {
        "name": name,
        "n": n,
        "d": d,
        "k": k,
        "ours_s": ours_s,
        "ours_inertia": ours.inertia,
        "mark": "",
    }
    if n < BIG or args.sklearn_full:
        row["sk_s"], row["sk_inertia"] = sklearn_fit(x, k, args.n_init)
    else:
        row["sk_s"] = sklearn_seeding_lower_bound(x, k, args.n_init)
        lloyd = kmeans._kmeans(x, k, n_init=args.n_init, backend=args.backend, refine=False)
        row["sk_inertia"], row["mark"] = lloyd.inertia, "*"
    return row


def print_table(rows) -> None:
    head = f"{'case':<16}{'k':>6}{'onnxfold s':>12}{'sklearn s':>12}{'speedup':>10}"
    print(head + f"{'onnxfold inertia':>18}{'sklearn inertia':>18}{'ratio':>8}")
    for r in rows:
        bound = ">=" if r["mark"] else ""
        sk_s = f"{bound}{r['sk_s']:.2f}"
        speed = f"{bound}{r['sk_s'] / r['ours_s']:.1f}x"
        ratio = r["ours_inertia"] / r["sk_inertia"]
        print(
            f"{r['name']:<16}{r['k']:>6}{r['ours_s']:>12.3f}{sk_s:>12}{speed:>10}"
            f"{r['ours_inertia']:>18.1f}{r['sk_inertia']:>17.1f}{r['mark']:1}{ratio:>8.4f}"
        )
    if any(r["mark"] for r in rows):
        print(
            "* sklearn not run (hours): time = lower bound from its seeding alone; inertia = "
            "onnxfold's"
            " Lloyd-only mode (sklearn's algorithm). Use --sklearn-full to run it."
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 11008x4096 cases")
    ap.add_argument(
        "--sklearn-full", action="store_true", help="really run sklearn on 11008x4096 (hours)"
    )
    ap.add_argument("--n-init", type=int, default=3)
    ap.add_argument(
        "--repeats", type=int, default=3, help="onnxfold timing: median of this many runs"
    )
    ap.add_argument("--backend", default="numpy")
    args = ap.parse_args()
    import sklearn

    print(
        f"{os.cpu_count()} CPUs, numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
        f"n_init={args.n_init}, backend={args.backend}, float32 input, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    rows = []
    for name, n, d, k in CASES:
        if args.quick and n >= BIG:
            continue
        rows.append(run_case(name, n, d, k, args))
        print(f"  done {name} k={k}", file=sys.stderr, flush=True)
    print_table(rows)
    print(
        f"load average at the end (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
