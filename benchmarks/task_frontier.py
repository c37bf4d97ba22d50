"""Task frontiers on real graphs we did not write: the task metric (relative to the dense model,
1.0 = dense) against the MACs reduction, for onnxfold's methods and onnxsim's structured pruning.

Protocol. For each model (benchmarks.tasks: loaders, held-out splits and metrics), evaluation inputs
are disjoint from the 32 calibration inputs (64 calibration sequences for SmolLM2; the split is
printed in each result file). Methods, each at a grid of channel ratios, each data-free ("free":
no calibration input; `repair="auto"`, which is Fold-AR where the graph keeps BatchNorm statistics
and nothing otherwise) and with calibration ("calib": `repair="data"` for the fold methods, the
calibration feeds as `calib=`; prune-act reads its activations from them):
- `fold`: FoldConfig(ratio=r), one ratio in every group;
- `fold-alloc`: FoldConfig(ratio=r, allocate=True);
- `fold-measure`: FoldConfig(ratio=r, measure=True), the groups' sensitivity measured ONCE per model
  and calibration setting at the largest ratio (onnxfold.pipeline.model_sensitivity, as the --target
  search does; data-free it measures on 32 random inputs) and reused for every ratio;
- `prune-act`: FoldConfig(ratio=r, method="prune", importance="act");
- `fold-refit`, `prune-refit` (with calibration only): `fold` with `repair="data"` and
  `prune-act`, each with `refit=True` (every folded group's MatMul/Gemm/ungrouped-Conv consumer
  re-solved by ridge least squares to the dense model's output on the calibration inputs);
- `prune-measure` (with calibration only): `prune-refit` with `measure=True`, its sensitivity
  measured once per model at the largest ratio as for `fold-measure`; it spends MACs
  (`cost="macs"`) except on SmolLM2, whose targets are parameters;
- `prune-latency` (with calibration only): `prune-measure` spending onnxruntime CPU time
  (`cost="latency"`: each group's share of the dense model's profiled layer times);
- `onnxsim`: onnxsim 0.8.1's `apply_structured_pruning` (L2, data-free) and, with calibration,
  `apply_structured_wanda_pruning` (calibration feeds in batches of 8), at sparsity = r. A call that
  raises or prunes nothing is recorded as such.
For every point: parameters and MACs (onnxfold.check.count at the real evaluation input size, one
sample), onnxruntime CPU latency of one sample (median over interleaved dense/folded runs in the
same process; "speed-up" = dense median / folded median), the task metric on the evaluation
inputs, and onnxfold's verdict (onnxfold.check.compare.compare on the evaluation inputs, or a
fixed-size subset of them where the task runs samples one by one, with the dense graph's output
roles and a causal LM's perplexity as validation reads them; points measured before 2026-12-07
were judged without them). The summary takes, for each
method, the point with the largest MACs reduction (parameter reduction for SmolLM2) whose task
metric is >= 99% and >= 95% of dense.

SmolLM2-135M runs `fold`, `fold-alloc`, `prune-act`, `prune-refit` and `prune-measure` only, at
10% and 20% of all parameters removed (channel ratio solved by benchmarks.smollm2.channel_ratio_for
over the MLPs of layers 1-28, heads kept, the configuration of results/smollm2.md), 16 evaluation
windows of 512 tokens.

Results are cached row by row in benchmarks/.cache/frontier/<model>.json (a rerun skips the
points already measured and reuses the dense model's task outputs; --fresh drops both) and
written to benchmarks/results/frontier_<model>.md and .png after every point, and the combined
benchmarks/results/frontier.md at the end.

Usage: python -m benchmarks.task_frontier [--models efficientnet_lite0,ppocr_det,...]
           [--methods fold,fold-alloc,fold-measure,prune-act,fold-refit,prune-refit,prune-measure,
                      prune-latency,onnxsim]
           [--calib free,calib]
           [--ratios 0.02,0.05,...] [--skip fold-measure:calib] [--rounds 15]
           [--fresh [--keep-sensitivity]]
           [--summary-only | --floor-only]

Each model's file and the summary also give the task metric's noise floor (Frontier.floor): what
the dense model scores against itself after changes that are lossless in practice (weights rounded
to float16 precision; 0.1% multiplicative weight noise), so a drop of that size is read as
rounding, not damage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import time
import traceback
from collections import Counter

import numpy as np
import onnx

from benchmarks.tasks import CACHE, ROOT, TASKS, Task

RESULTS = os.path.join(ROOT, "benchmarks", "results")
STORE = os.path.join(CACHE, "frontier")
METHODS = [
    "fold",
    "fold-alloc",
    "fold-measure",
    "prune-act",
    "fold-refit",
    "prune-refit",
    "prune-measure",
    "prune-latency",
    "onnxsim",
]
# least-squares refit of the folded groups' consumers (--refit) needs calibration inputs
CALIB_ONLY = ("fold-refit", "prune-refit", "prune-measure", "prune-latency")
SETTINGS = ["free", "calib"]
LABEL = {
    "fold": "fold (uniform)",
    "fold-alloc": "fold --allocate",
    "fold-measure": "fold --measure",
    "prune-act": "prune --importance act",
    "fold-refit": "fold --refit",
    "prune-refit": "prune --importance act --refit",
    "prune-measure": "prune --importance act --measure --refit",
    "prune-latency": "prune ... --measure --refit --budget latency",
    "onnxsim": "onnxsim structured",
}
SMOL_SCOPE = dict(head_ratio=0.0, layers="1-28")


# measuring ---------------------------------------------------------------------------------------


def latency(dense, folded, feeds: dict, rounds: int) -> tuple[float, float]:
    """(dense ms, folded ms): medians of interleaved single runs after 2 warm-ups each: at least
    `rounds`, more (up to 400) for fast models, about 1.5 s of dense runs in all."""
    for _ in range(2):
        t = time.perf_counter()
        dense.run(None, feeds)
        once = time.perf_counter() - t
        folded.run(None, feeds)
    rounds = int(min(400, max(rounds, 1.5 / max(once, 1e-4))))
    d, f = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        dense.run(None, feeds)
        d.append(time.perf_counter() - t)
        t = time.perf_counter()
        folded.run(None, feeds)
        f.append(time.perf_counter() - t)
    return 1e3 * float(np.median(d)), 1e3 * float(np.median(f))


FLOOR_SEEDS = 3  # noise draws whose median is the noise floor


def perturbed_weights(path: str, how: str, seed: int = 0) -> bytes:
    """The model at `path`, serialised, with every float32 tensor of at least 16 entries
    (initializers and Constant values: weights, biases, BatchNorm statistics) changed by an amount
    that is lossless in practice. how="fp16": each value rounded to float16 precision in float32's
    range (onnxfold.model.precision, so PP-OCRv4 det's 1e8 entries do not overflow); how="noise":
    each value times (1 + 1e-3 N(0, 1)), draws from `seed`."""
    from onnx import numpy_helper

    from onnxfold.model.precision import float_tensors, round_float32

    model = onnx.load(path)
    rng = np.random.default_rng(seed)
    for t in float_tensors(model.graph):
        a = numpy_helper.to_array(t)
        if a.size < 16:
            continue
        if how == "fp16":
            b = round_float32(a)
        else:
            b = (a * (1 + 1e-3 * rng.standard_normal(a.shape))).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(b, t.name))
    return model.SerializeToString()


def engine_commit() -> str:
    """HEAD's short hash, '+dirty' when onnxfold/ has uncommitted changes (the engine changes
    under a long run: each model's file says which engine measured it)."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        "+dirty" if git("status", "--porcelain", "onnxfold") else ""
    )


def macs(model: onnx.ModelProto, feeds: dict) -> int | None:
    """onnxfold.check.count.count_macs at the feeds' size; where onnx shape inference leaves a
    MatMul's shapes unknown (the PP-OCR cls graph), the same per-node count on the shapes
    onnxruntime observes when it runs one sample (observed_macs)."""
    from onnxfold.check.count import count_macs

    n = count_macs(model, feeds)
    return n if n is not None else observed_macs(model, feeds)


def observed_macs(model: onnx.ModelProto, feeds: dict) -> int | None:
    """MACs per sample counted by onnxfold.check.count's per-node rule on the shapes of every
    main-graph tensor as onnxruntime produces them on `feeds` (one sample); needs the weights."""
    import onnxruntime as ort

    from onnxfold.check.count import _node_macs, _NotCounted

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    names = [o for n in m.graph.node for o in n.output if o and o not in known]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - MACs stay unknown
        return None
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for n in m.graph.node:
        shapes.update({n.output[0]: list(a.t.dims) for a in n.attribute if a.name == "value"})
    shapes.update({o.name: list(np.shape(v)) for o, v in zip(sess.get_outputs(), outs)})
    shapes.update({k: list(np.shape(v)) for k, v in feeds.items()})
    try:
        return sum(_node_macs(n, shapes) for n in m.graph.node)
    except _NotCounted:
        return None


def config_for(method: str, setting: str, ratio: float, task: Task):
    from onnxfold import FoldConfig

    options: dict = {}
    if method == "fold-alloc":
        options["allocate"] = True
    elif method == "fold-measure":
        options["measure"] = True
    elif method in ("prune-act", "prune-refit", "prune-measure", "prune-latency"):
        measure = method in ("prune-measure", "prune-latency")
        options.update(method="prune", importance="act", measure=measure)
    if method in CALIB_ONLY:
        options["refit"] = True
    if setting == "calib" and options.get("method") != "prune":
        options["repair"] = "data"
    if task.budget == "params":
        options.update(SMOL_SCOPE)
    elif method == "prune-measure":  # the MACs the uniform ratio removes, spent where cheapest
        options["cost"] = "macs"
    elif method == "prune-latency":  # the same with onnxruntime CPU time per group as the cost
        options["cost"] = "latency"
    return FoldConfig(ratio=ratio, **options)


def calibration(config, task: Task, setting: str):
    """The calibration feeds a fold reads (onnxfold.pipeline.calibration_inputs), or None."""
    from onnxfold.pipeline import calibration_inputs

    if setting == "free":
        return None
    return calibration_inputs(config, task.path, task.calib)


class Frontier:
    """One model's measured points, cached in STORE/<key>.json."""

    def __init__(self, task: Task, rounds: int, fresh: bool, keep_sensitivity: bool = False):
        self.task, self.rounds, self.fresh = task, rounds, fresh
        os.makedirs(STORE, exist_ok=True)
        self.file = os.path.join(STORE, f"{task.key}.json")
        self.data = {"rows": [], "sensitivity": {}, "channel_ratio": {}}
        if os.path.exists(self.file):
            with open(self.file) as f:
                cached = json.load(f)
            if not fresh:
                self.data = cached
            elif keep_sensitivity:
                self.data["sensitivity"] = cached.get("sensitivity", {})
        if fresh and not keep_sensitivity:
            for setting in SETTINGS:
                stale = os.path.join(STORE, f"{task.key}_sensitivity_{setting}.pkl")
                if os.path.exists(stale):
                    os.remove(stale)
        self.done = {(r["method"], r["setting"], r["ratio"]) for r in self.data["rows"]}
        self._sensitivity: dict = {}
        self._dense_sess = None
        self.commit = engine_commit()  # recorded in every point measured

    def save(self) -> None:
        with open(self.file, "w") as f:
            json.dump(self.data, f, indent=1)

    # dense ---------------------------------------------------------------------------------------
    def dense(self):
        from onnxfold.check.compare import language_text, output_roles
        from onnxfold.check.count import count_params
        from onnxfold.runtime.session import session

        if self._dense_sess is None:
            t = self.task
            self._dense_sess = session(t.path)
            skeleton = onnx.load(t.path, load_external_data=False)
            # what the verdict reads of the dense graph, as validation reads it
            self._roles = output_roles(skeleton)
            self._text = language_text(skeleton, self._dense_sess, t.verdict_feeds)
            start = time.perf_counter()
            cached = os.path.join(STORE, f"{t.key}_dense.pkl")
            reused = os.path.exists(cached) and not self.fresh
            if reused:  # the dense task outputs of an earlier run (same inputs)
                with open(cached, "rb") as f:
                    self._dense_out = pickle.load(f)
            else:
                self._dense_out = t.evaluate(t.path)
                with open(cached, "wb") as f:
                    pickle.dump(self._dense_out, f)
            seconds = time.perf_counter() - start
            self._dense_verdict_out = None
            d = self.data.setdefault("dense", {})
            if not reused:
                d["eval_seconds"] = seconds
            d.update(
                params=count_params(skeleton),
                macs=macs(skeleton, t.sample_feeds),
                split=t.split,
                metric_name=t.metric_name,
            )
            dense_figures = t.metric(self._dense_out, self._dense_out)
            d["figures"] = {k: v for k, v in dense_figures.items() if k != "task"}
            self.save()
        return self._dense_sess

    def floor(self) -> dict:
        """The task metric's noise floor, measured once and cached: the dense model scored against
        itself with its weights rounded to float16 precision ("fp16") and with 0.1% multiplicative
        noise ("noise", median over FLOOR_SEEDS draws). A fold whose metric drops by about as
        much has lost nothing the metric can tell apart from rounding."""
        if "floor" not in self.data:
            self.dense()
            t = self.task

            def score(how: str, seed: int = 0) -> dict:
                changed = t.evaluate(perturbed_weights(t.path, how, seed))
                return t.metric(self._dense_out, changed)

            fp16, noise = score("fp16"), [score("noise", seed) for seed in range(FLOOR_SEEDS)]
            floor = {}
            for name in ["task", *t.also_summarise]:
                drawn = [float(n[name]) for n in noise]
                floor[name] = {"fp16": float(fp16[name]), "noise": float(np.median(drawn))}
                floor[name]["noise_all"] = drawn
            self.data["floor"] = {**floor.pop("task"), "figures": floor}
            self.save()
        return self.data["floor"]

    # one point -----------------------------------------------------------------------------------
    def point(self, method: str, setting: str, ratio: float) -> dict | None:
        if (method, setting, ratio) in self.done:
            return None
        self.dense()
        row = {"method": method, "setting": setting, "ratio": ratio, "commit": self.commit}
        start = time.perf_counter()
        try:
            if method == "onnxsim":
                proto, note = self._onnxsim(setting, ratio)
                row["note"] = note
                row["repair"] = "-"
            else:
                proto, result = self._fold(method, setting, ratio)
                row["repair"] = result.repair
                if result.nothing_folded:
                    row["note"] = "nothing folded: " + result.nothing_folded
            row["fold_seconds"] = time.perf_counter() - start
            if proto is not None:
                row.update(self._measure(proto))
        except Exception as e:  # noqa: BLE001 - a failing point is a result
            text = str(e).strip().splitlines()
            row["error"] = f"{type(e).__name__}: {text[0][:300] if text else ''}"
            row["traceback"] = traceback.format_exc()[-4000:]
            row["fold_seconds"] = time.perf_counter() - start
        self.data["rows"].append(row)
        self.done.add((method, setting, ratio))
        self.save()
        return row

    def _channel_ratio(self, target: float) -> float:
        from benchmarks.smollm2 import channel_ratio_for

        key = str(target)
        if key not in self.data["channel_ratio"]:
            ratio, removed = channel_ratio_for(self.task.path, target, **SMOL_SCOPE)
            self.data["channel_ratio"][key] = [ratio, removed]
            self.save()
        return self.data["channel_ratio"][key][0]

    def _fold(self, method: str, setting: str, ratio: float):
        from onnxfold.pipeline import fold_model

        channel = self._channel_ratio(ratio) if self.task.budget == "params" else ratio
        config = config_for(method, setting, channel, self.task)
        calib = calibration(config, self.task, setting)
        sensitivity = None
        if config.measure:
            sensitivity = self._measured(method, setting, config, calib)
        result = fold_model(self.task.path, config, calib=calib, sensitivity=sensitivity)
        return result.to_proto(), result

    def _measured(self, method: str, setting: str, config, calib):
        """model_sensitivity at the largest ratio of the grid, once per method and calibration
        setting (pickled beside the JSON; fold-measure's under the setting alone, as before)."""
        from onnxfold.pipeline import model_sensitivity

        key = setting if method == "fold-measure" else f"{method}_{setting}"
        if key in self._sensitivity:
            return self._sensitivity[key]
        path = os.path.join(STORE, f"{self.task.key}_sensitivity_{key}.pkl")
        top = max(self.task.ratios)
        if self.task.budget == "params":
            top = self._channel_ratio(top)
        if os.path.exists(path):
            with open(path, "rb") as f:
                sens = pickle.load(f)
        else:
            start = time.perf_counter()
            sens = model_sensitivity(self.task.path, dataclasses.replace(config, ratio=top), calib)
            self.data["sensitivity"][key] = {
                "seconds": time.perf_counter() - start,
                "ratio": top,
                "emulated": sens.emulated,
                "groups": len(sens.points),
            }
            self.save()
            try:
                with open(path, "wb") as f:
                    pickle.dump(sens, f)
            except Exception:  # noqa: BLE001 - caching is optional
                os.remove(path)
        self._sensitivity[key] = sens
        return sens

    def _onnxsim(self, setting: str, ratio: float):
        from onnxsim import pruning

        model = onnx.load(self.task.path)
        if setting == "free":
            out = pruning.apply_structured_pruning(model, sparsity=ratio, importance_norm="l2")
            note = "apply_structured_pruning (L2)"
        else:
            if not hasattr(pruning, "apply_structured_wanda_pruning"):
                return None, "onnxsim has no apply_structured_wanda_pruning"
            name, x = next(iter(self.task.calib.items()))
            batches = [{name: x[i : i + 8]} for i in range(0, len(x), 8)]
            out = pruning.apply_structured_wanda_pruning(
                model, calibration_data=batches, sparsity=ratio
            )
            note = "apply_structured_wanda_pruning"
        from onnxfold.check.count import count_params

        if count_params(out) >= self.data["dense"]["params"]:
            return None, f"onnxsim: prunes 0 channels ({note})"
        return out, note

    def _measure(self, proto: onnx.ModelProto) -> dict:
        from onnxfold.check.compare import compare
        from onnxfold.check.count import count_params
        from onnxfold.runtime.session import session

        t, dense = self.task, self.data["dense"]
        blob = proto.SerializeToString()
        folded = session(blob)
        params, m = count_params(proto), macs(proto, t.sample_feeds)
        d_ms, f_ms = latency(self._dense_sess, folded, t.sample_feeds, self.rounds)
        start = time.perf_counter()
        figures = t.metric(self._dense_out, t.evaluate(blob))
        eval_s = time.perf_counter() - start
        if self._dense_verdict_out is None:
            from onnxfold.check.compare import run_dense

            self._dense_verdict_out = run_dense(self._dense_sess, t.verdict_feeds, "evaluation")
        cmp = compare(
            self._dense_sess,
            folded,
            t.verdict_feeds,
            None,
            "evaluation inputs",
            d_out=self._dense_verdict_out,
            roles=self._roles,
            text=self._text,
        )
        return {
            "params": params,
            "macs": m,
            "params_red": 1 - params / dense["params"],
            "macs_red": (1 - m / dense["macs"]) if m and dense["macs"] else None,
            "dense_ms": d_ms,
            "folded_ms": f_ms,
            "speedup": d_ms / f_ms,
            "figures": figures,
            "verdict": cmp.verdict,
            "verdict_why": cmp.verdict_why,
            "eval_seconds": eval_s,
        }


# writing -----------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ok(row: dict) -> bool:
    return "figures" in row and row["figures"].get("task") is not None


def best(rows: list[dict], threshold: float, by: str, figure: str = "task") -> dict | None:
    """The row with the largest `by` reduction whose `figure` (the task metric) is >=
    threshold."""
    meeting = [
        r for r in rows if _ok(r) and r["figures"].get(figure, -1) >= threshold and r.get(by)
    ]
    return max(meeting, key=lambda r: r[by]) if meeting else None


def _point(r: dict | None, by: str, figure: str = "task") -> str:
    if r is None:
        return "none"
    return (
        f"MACs {_red(r['macs_red'])}, params {_red(r['params_red'])}, "
        f"{r['speedup']:.2f}x speed (r={r['ratio']:g}, {r['figures'][figure]:.3f})"
    )


def _red(v) -> str:
    """A reduction as a signed change: 0.123 -> '-12.3%', -0.01 -> '+1.0%'."""
    return "-" if v is None else f"{-100 * v:+.1f}%"


def _order(r: dict) -> tuple:
    return (METHODS.index(r["method"]), SETTINGS.index(r["setting"]), r["ratio"])


def _measured_line(key: str, entry: dict) -> str:
    """One sensitivity measurement for the table's header: 'fold-measure calib: ratio 0.2, 95 s
    (12 of 24 groups emulated)'."""
    method, _, setting = key.rpartition("_")
    emulated = (
        f" ({entry['emulated']} of {entry['groups']} groups emulated)" if "groups" in entry else ""
    )
    return (
        f"{method or 'fold-measure'} {setting}: ratio {entry['ratio']:g}, "
        f"{entry['seconds']:.0f} s{emulated}"
    )


def verdict_size(task: Task) -> str:
    x = next(iter(task.verdict_feeds.values()))
    return f"{x.shape[0]} samples of shape {list(x.shape[1:])}"


def model_markdown(task: Task, data: dict) -> list[str]:
    d = data.get("dense", {})
    rows = sorted(data["rows"], key=_order)
    by = "params_red" if task.budget == "params" else "macs_red"
    figs = ", ".join(f"{k} {v:.4g}" for k, v in d.get("figures", {}).items())
    extra = task.extra_names
    lines = [
        f"# Task frontier: {task.title}",
        "",
        f"Model: `{os.path.relpath(task.path, ROOT) if task.path.startswith(ROOT) else task.path}`"
        f", {d.get('params', 0) / 1e6:.2f} M parameters, "
        f"{(d.get('macs') or 0) / 1e6:.1f} M MACs per sample at the evaluation size"
        + (f"; dense {figs}" if figs else "")
        + ".",
        "",
        f"Inputs: {task.split}.",
        "",
        engine_line(data),
        "",
        f"Task metric: {task.metric_name} (1.0 = dense). Latency: one sample, onnxruntime CPU, "
        "median of interleaved dense/folded runs in the same process; speed-up = dense / folded "
        "(2 shared CPU cores: differences under ~10% are noise). Verdict: onnxfold.check.compare "
        f"on {verdict_size(task)} of the evaluation inputs. free = no calibration input "
        "(repair auto); calib = the calibration inputs (fold: --repair data; prune-act: "
        "activations; onnxsim: Wanda).",
        "",
    ]
    if "floor" in data:
        lines += [floor_sentence(data["floor"]), ""]
    sens = data.get("sensitivity", {})
    if sens:
        lines += [
            "--measure: sensitivity measured once per method and setting, at the largest ratio: "
            + "; ".join(_measured_line(k, v) for k, v in sens.items())
            + ".",
            "",
        ]
    if data.get("channel_ratio"):
        lines += [
            "Parameter targets -> channel ratio over the MLPs of layers 1-28 (heads kept): "
            + ", ".join(f"{k}: {v[0]:.3f}" for k, v in data["channel_ratio"].items())
            + ".",
            "",
        ]
    head = "| method | calib | ratio | params | MACs | speed-up | task |"
    head += "".join(f" {e} |" for e in extra) + " verdict | fold s | note |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = f"{r['ratio']:g}" + (" params" if task.budget == "params" else "")
        if not _ok(r):
            why = r.get("error") or r.get("note") or "?"
            lines.append(
                f"| {LABEL[r['method']]} | {r['setting']} | {ratio} | - | - | - | - |"
                + " - |" * len(extra)
                + f" - | {r.get('fold_seconds', 0):.0f} | {why} |"
            )
            continue
        f = r["figures"]
        lines.append(
            f"| {LABEL[r['method']]} | {r['setting']} | {ratio} | {_red(r['params_red'])} | "
            f"{_red(r['macs_red'])} | {r['speedup']:.2f}x | {f['task']:.3f} |"
            + "".join(f" {f.get(e, float('nan')):.3f} |" for e in extra)
            + f" {r['verdict']} | {r['fold_seconds']:.0f} | {r.get('note', '') or ''} |"
        )
    missing = [
        f"{LABEL[m]} {s}"
        for m in (task.methods or METHODS)
        for s in SETTINGS
        if not (m in CALIB_ONLY and s == "free")
        and not any(r["method"] == m and r["setting"] == s for r in rows)
    ]
    if missing:
        lines += ["", "Not run: " + ", ".join(missing) + " (see benchmarks/README.md)."]
    lines += ["", "## Best point at >= 99% and >= 95% of dense", ""]
    lines += ["| method | calib | >= 99% | >= 95% |", "|---|---|---|---|"]
    for m, s, sel in by_method(rows):
        lines.append(
            f"| {LABEL[m]} | {s} | {_point(best(sel, 0.99, by), by)} | "
            f"{_point(best(sel, 0.95, by), by)} |"
        )
    for figure in task.also_summarise:
        lines += [
            "",
            f"The same on `{figure}` instead of the task metric:",
            "",
            "| method | calib | >= 0.99 | >= 0.95 |",
            "|---|---|---|---|",
        ]
        for m, s, sel in by_method(rows):
            lines.append(
                f"| {LABEL[m]} | {s} | {_point(best(sel, 0.99, by, figure), by, figure)} "
                f"| {_point(best(sel, 0.95, by, figure), by, figure)} |"
            )
    lines += ["", *comparison(rows, by), ""]
    return lines


def engine_line(data: dict) -> str:
    """Which onnxfold commits measured the points: each point records its own; older points
    predate that, and only the commit at which their model's last such run began is known."""
    counts = Counter(r.get("commit", "") for r in data["rows"])
    older = counts.pop("", 0)
    parts = [f"commit {c}: {n} point{'s' * (n != 1)}" for c, n in counts.items()]
    if older:
        parts.append(
            f"{older} point{'s' * (older != 1)} measured before points recorded their commit, at "
            f"or before {data.get('dense', {}).get('commit', '?')} (where the last run that "
            "measured them began)"
        )
    return (
        "Engine (onnxfold): "
        + "; ".join(parts)
        + ". Points are cached across runs; a rerun adds only the missing ones."
    )


def floor_sentence(floor: dict) -> str:
    """The noise floor (Frontier.floor) as one sentence of a results file."""
    others = "".join(
        f"; on `{name}` {f['fp16']:.3f} and {f['noise']:.3f}"
        for name, f in floor.get("figures", {}).items()
    )
    return (
        f"Noise floor of the task metric: the dense model itself scores {floor['fp16']:.3f} with "
        f"its weights rounded to float16 precision and {floor['noise']:.3f} with 0.1% "
        f"multiplicative weight noise (median of {len(floor['noise_all'])} draws{others}): a "
        "drop of that size is rounding, not damage."
    )


def by_method(rows: list[dict]):
    """(method, setting, its rows) for every method and setting that has rows, in table order."""
    for m in METHODS:
        for s in SETTINGS:
            sel = [r for r in rows if r["method"] == m and r["setting"] == s]
            if sel:
                yield m, s, sel


def comparison(rows: list[dict], by: str) -> list[str]:
    """onnxfold's best against onnxsim's, per calibration setting, at 99% / 95% and point by
    point (is every onnxsim point dominated by an onnxfold point: >= reduction and >= metric?)."""
    out = []
    for s in SETTINGS:
        ours = [r for r in rows if r["setting"] == s and r["method"] != "onnxsim" and _ok(r)]
        sim = [r for r in rows if r["setting"] == s and r["method"] == "onnxsim"]
        if not sim:
            continue
        sim_ok = [r for r in sim if _ok(r)]
        parts = []
        for thr in (0.99, 0.95):
            a, b = best(ours, thr, by), best(sim_ok, thr, by)
            av, bv = (a[by] if a else None), (b[by] if b else None)
            wins = av is not None and (bv is None or av > bv)
            sim_text = "no point" if bv is None else _red(bv)
            ours_text = "no point" if av is None else _red(av)
            parts.append(
                f"at >= {thr:.0%}: onnxfold {ours_text} vs onnxsim {sim_text} "
                + (
                    "(neither reaches it)"
                    if av is None and bv is None
                    else f"({'onnxfold ahead' if wins else 'onnxfold NOT ahead'})"
                )
            )
        dominated = [
            r
            for r in sim_ok
            if any(o[by] >= r[by] and o["figures"]["task"] >= r["figures"]["task"] for o in ours)
        ]
        not_run = [r for r in sim if not _ok(r)]
        why = (not_run[0].get("note") or not_run[0].get("error")) if not_run else ""
        parts.append(
            f"onnxsim points beaten (an onnxfold point with at least its reduction and metric): "
            f"{len(dominated)} of {len(sim_ok)}"
            + (f"; {len(not_run)} onnxsim points gave no model: {why}" if not_run else "")
        )
        out.append(f"- {s}: " + "; ".join(parts) + ".")
    return out


def plot(task: Task, data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = "params_red" if task.budget == "params" else "macs_red"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(METHODS, [f"C{i}" for i in range(len(METHODS))]))
    for m in METHODS:
        for s in SETTINGS:
            pts = sorted(
                (100 * r[by], r["figures"]["task"])
                for r in data["rows"]
                if r["method"] == m and r["setting"] == s and _ok(r) and r.get(by) is not None
            )
            if not pts:
                continue
            xs, ys = zip(*([(0.0, 1.0)] + pts))
            ax.plot(
                xs,
                ys,
                "o-" if s == "calib" else "s--",
                color=colors[m],
                ms=3,
                label=f"{LABEL[m]}, {s}",
            )
    for y in (0.99, 0.95):
        ax.axhline(y, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("parameter reduction (%)" if by == "params_red" else "MACs reduction (%)")
    ax.set_ylabel(f"task metric / dense ({task.metric_name})"[:70])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{task.title}: task metric vs reduction")
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_model(task: Task, data: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"frontier_{task.key}.md"), "w") as f:
        f.write("\n".join(model_markdown(task, data)) + "\n")
    if any(_ok(r) for r in data["rows"]):
        plot(task, data, os.path.join(RESULTS, f"frontier_{task.key}.png"))


def combined(keys: list[str]) -> list[str]:
    """The summary over every model with cached results."""
    lines = [
        "# Task frontiers on real models: summary",
        "",
        "Written by `python -m benchmarks.task_frontier` from the per-model results "
        "(`frontier_<model>.md`, protocol in the script's docstring). Each cell: the largest MACs "
        "reduction (SmolLM2: parameter reduction) whose task metric is at least 99% / 95% of "
        "dense, with that point's parameter reduction and speed-up.",
        "",
        "| model | method | calib | >= 99% | >= 95% |",
        "|---|---|---|---|---|",
    ]
    targets = ["", "## The issue's targets", ""]
    for key in keys:
        path = os.path.join(STORE, f"{key}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        title = TITLES.get(key, key)
        by = "params_red" if key == "smollm2" else "macs_red"
        rows = sorted(data["rows"], key=_order)
        for m, s, sel in by_method(rows):
            lines.append(
                f"| {title} | {LABEL[m]} | {s} | {_point(best(sel, 0.99, by), by)} | "
                f"{_point(best(sel, 0.95, by), by)} |"
            )
        targets += target_lines(title, key, rows) + floor_lines(title, data.get("floor"), rows)
    return lines + targets


def _ours(rows: list[dict]) -> list[dict]:
    """The rows of onnxfold's methods that measured a model."""
    return [r for r in rows if r["method"] != "onnxsim" and _ok(r)]


def floor_lines(title: str, floor: dict | None, rows: list[dict]) -> list[str]:
    """The model's noise floor (Frontier.floor) and, for each other figure it was measured on
    (the task's also_summarise), the calibrated point removing most MACs at >= 0.95 on it."""
    if floor is None:
        return []
    out = [
        f"- {title}: noise floor of the task metric {floor['fp16']:.3f} (float16-precision "
        f"weights) / {floor['noise']:.3f} (0.1% weight noise)."
    ]
    for figure in floor.get("figures", {}):
        cal = [r for r in _ours(rows) if r["setting"] == "calib" and r["figures"][figure] >= 0.95]
        if cal:
            b = max(cal, key=lambda r: r["macs_red"] or 0)
            out.append(
                f"- {title}, judged on `{figure}` instead (not the issue's metric), 32 "
                f"calibration inputs, >= 95%: most MACs removed {_red(b['macs_red'])} "
                f"({LABEL[b['method']]} r={b['ratio']:g}, {b['figures'][figure]:.3f}, "
                f"{b['speedup']:.2f}x)."
            )
    return out


def target_lines(title: str, key: str, rows: list[dict]) -> list[str]:
    ours = _ours(rows)
    if key == "smollm2":
        out = []
        for s, limit in (("calib", 1.5), ("free", 2.0)):
            at = [r for r in ours if r["setting"] == s and abs(r["ratio"] - 0.2) < 1e-9]
            if not at:
                continue
            b = min(at, key=lambda r: r["figures"]["x dense ppl"])
            x = b["figures"]["x dense ppl"]
            out.append(
                f"- {title}, {s}, 20% fewer parameters: best {x:.2f}x dense perplexity "
                f"({LABEL[b['method']]}); target <= {limit}x: {'met' if x <= limit else 'NOT met'}."
            )
        return out
    out = []
    cal = [r for r in ours if r["setting"] == "calib" and r["figures"]["task"] >= 0.95]
    hit = sorted(
        (r for r in cal if (r["macs_red"] or 0) >= 0.2 and r["speedup"] >= 1.2),
        key=lambda r: -r["macs_red"],
    )
    if cal:
        b = max(cal, key=lambda r: r["macs_red"] or 0)
        fast = max(cal, key=lambda r: r["speedup"])
        out.append(
            f"- {title}, 32 calibration inputs, >= 95%: most MACs removed {_red(b['macs_red'])} "
            f"({LABEL[b['method']]}, {b['speedup']:.2f}x), fastest {fast['speedup']:.2f}x "
            f"({_red(fast['macs_red'])} MACs); target >= 20% fewer MACs and >= 1.2x faster: "
            + ("met (" + LABEL[hit[0]["method"]] + f" r={hit[0]['ratio']:g})" if hit else "NOT met")
            + "."
        )
    elif any(r["setting"] == "calib" for r in ours):
        out.append(
            f"- {title}, 32 calibration inputs, >= 95%: no calibrated point reaches it; target "
            ">= 20% fewer MACs and >= 1.2x faster: NOT met."
        )
    free = [r for r in ours if r["setting"] == "free" and r["figures"]["task"] >= 0.95]
    if free or cal:
        b = max(free, key=lambda r: r["macs_red"] or 0) if free else None
        red = b["macs_red"] if b else 0.0
        out.append(
            f"- {title}, data-free, >= 95%: most MACs removed {_red(red)}"
            + (f" ({LABEL[b['method']]})" if b else "")
            + f"; target >= 10%: {'met' if red >= 0.1 else 'NOT met'}."
        )
    return out


TITLES = {
    "efficientnet_lite0": "EfficientNet-Lite0",
    "ppocr_det": "PP-OCRv4 det",
    "ppocr_rec": "PP-OCRv4 rec",
    "ppocr_cls": "PP-OCR mobile v2 cls",
    "craft": "CRAFT",
    "minilm": "all-MiniLM-L6-v2",
    "smollm2": "SmolLM2-135M",
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib", default=",".join(SETTINGS), help="free, calib or both")
    p.add_argument("--ratios", default=None, help="override the model's grid")
    p.add_argument(
        "--skip",
        default="",
        help="method:setting pairs not run, e.g. fold-measure:calib (recorded as skipped)",
    )
    p.add_argument("--rounds", type=int, default=15, help="fewest latency runs per point")
    p.add_argument("--windows", type=int, default=16, help="SmolLM2 evaluation windows")
    p.add_argument("--fresh", action="store_true", help="drop cached points first")
    p.add_argument(
        "--keep-sensitivity",
        action="store_true",
        help="with --fresh: keep the pickled --measure sensitivities",
    )
    p.add_argument("--summary-only", action="store_true")
    p.add_argument(
        "--floor-only",
        action="store_true",
        help="measure each model's noise floor (cached) and rewrite its file; no new points",
    )
    args = p.parse_args(argv)
    keys = args.models.split(",")
    if not args.summary_only:
        for key in keys:
            start = time.perf_counter()
            task = TASKS[key](args.windows) if key == "smollm2" else TASKS[key]()
            frontier = Frontier(task, args.rounds, args.fresh, args.keep_sensitivity)
            ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else task.ratios
            methods = [m for m in args.methods.split(",") if not task.methods or m in task.methods]
            frontier.dense()
            print(f"== {task.title}: dense {frontier.data['dense']}", flush=True)
            print(f"== {task.title}: noise floor {frontier.floor()}", flush=True)
            if args.floor_only:
                write_model(task, frontier.data)
                continue
            skip = {tuple(x.split(":")) for x in args.skip.split(",") if x}
            for m in methods:
                for s in args.calib.split(","):
                    if (m, s) in skip:
                        print(f"{key} {m} {s}: skipped (--skip)", flush=True)
                        continue
                    if m in CALIB_ONLY and s == "free":
                        continue
                    for r in ratios:
                        row = frontier.point(m, s, r)
                        if row is None:
                            continue
                        fig = row.get("figures", {})
                        print(
                            f"{key} {m} {s} {r:g}: "
                            + (
                                f"params -{_pct(row['params_red'])} MACs -{_pct(row['macs_red'])} "
                                f"{row['speedup']:.2f}x task {fig['task']:.3f} {row['verdict']} "
                                if _ok(row)
                                else f"{row.get('error') or row.get('note')} "
                            )
                            + f"({row['fold_seconds']:.0f} s)",
                            flush=True,
                        )
                        write_model(task, frontier.data)
            write_model(task, frontier.data)
            print(f"== {task.title}: {time.perf_counter() - start:.0f} s", flush=True)
    else:  # rewrite every model's file from its cached points
        for key in keys:
            if os.path.exists(os.path.join(STORE, f"{key}.json")):
                task = TASKS[key](args.windows) if key == "smollm2" else TASKS[key]()
                with open(os.path.join(STORE, f"{key}.json")) as f:
                    write_model(task, json.load(f))
    with open(os.path.join(RESULTS, "frontier.md"), "w") as f:
        f.write("\n".join(combined(list(TASKS))) + "\n")


if __name__ == "__main__":
    main()
