"""The two commands: fold (the main job) and inspect."""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time

from onnxfold import validate
from onnxfold.errors import UserError
from onnxfold.fold import FoldOptions, FoldResult, fold_graph
from onnxfold.groups import discover
from onnxfold.importance import token_id_limits
from onnxfold.load import load_model
from onnxfold.save import check_data_target, save_graph

from . import report
from .progress import Progress, Step


def default_output(path: str) -> str:
    base = path[:-5] if path.lower().endswith(".onnx") else path
    return base + ".folded.onnx"


def fold(args: argparse.Namespace) -> int:
    """Load, fold, validate with onnxruntime, write atomically, and report."""
    options = FoldOptions(args.ratio, args.multiple_of, tuple(args.exclude), args.repair, args.backend, args.seed,
                          method=args.method, prune_norm=args.prune_norm, head_ratio=args.head_ratio,
                          mlp_ratio=args.mlp_ratio, layers=args.layers,
                          allocate=args.allocate, importance=args.importance, compensate=args.compensate,
                          refit=args.refit)
    options.check()
    output = args.output or default_output(args.input)
    _check_paths(args.input, output, args.data, args.calib)
    data = validate.read_npz(args.data) if args.data else None
    calib_data = _read_calib(args)
    steps: dict = {}
    with Step("loading", not args.quiet), _measured(steps, "load"):
        # Weights in external-data files stay on disk until used, unless a repair exports the graph to run it.
        loaded = load_model(args.input, lazy=args.repair not in ("data", "dir") and args.importance != "act")
        check_data_target(output, loaded.data_files)
    with Step("folding", not args.quiet), _measured(steps, "fold"):
        calib = _calibration_inputs(args, calib_data)
        progress = Progress("clustering group", not args.quiet)
        result = fold_graph(loaded.graph, loaded.opset, options, progress, calib, args.input)
        progress.done()
    validation: dict = {}
    with Step("validating and writing", not args.quiet), _measured(steps, "write_and_validate"):
        one_at_a_time = loaded.file_bytes >= validate.ONE_AT_A_TIME_BYTES
        checker = None if args.no_validate else (lambda tmp: validation.update(
            _validate(args.input, tmp, args.data, data, args.seed, one_at_a_time, token_id_limits(loaded.graph))))
        skeleton, size = save_graph(loaded.graph, loaded.opset, output, loaded.external_data, checker,
                                    loaded.data_files)
    with _measured(steps, "metrics"):
        dense = _metrics(loaded.skeleton, loaded.file_bytes, validation.get("feeds"),
                         validation.get("latency", [None])[0])
        folded = _metrics(skeleton, size, validation.get("feeds"), validation.get("latency", [None, None])[1])
    if one_at_a_time and not args.no_validate:
        result.notes.append(f"input over {validate.ONE_AT_A_TIME_BYTES >> 30} GiB: dense and folded models "
                            f"validated one after the other (latencies timed separately, not interleaved)")
    _print_report(args, output, result, dense, folded, validation.get("comparison"))
    if args.report:
        report.write_json(args.report, _payload(args, output, options, result, dense, folded, validation, steps))
    return 0


@contextlib.contextmanager
def _measured(steps: dict, name: str):
    """Record the block's wall time and the process's peak RSS so far (bytes) as steps[name]."""
    start = time.perf_counter()
    yield
    steps[name] = {"seconds": time.perf_counter() - start,
                   "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _read_calib(args):
    if args.repair == "data" and not args.calib:
        raise UserError("--repair data needs --calib FILE.npz (a few dozen representative inputs)")
    if args.refit and not args.calib and args.repair != "dir":
        raise UserError("--refit needs calibration inputs: --calib FILE.npz, or --repair dir (synthesised)")
    return validate.read_npz(args.calib) if args.calib else None


def _calibration_inputs(args, calib_data):
    """Feeds for --repair data and --importance act (from --calib) or dir (synthesised from the dense model's
    BN statistics)."""
    if args.repair == "data" or (args.importance == "act" or args.refit) and args.calib:
        return validate.match_inputs(calib_data[0], validate.session(args.input), args.calib)
    if args.repair == "dir":
        from onnxfold.dir import synthesize_inputs
        size = (args.dir_size, args.dir_size) if args.dir_size else None
        with Step("synthesising calibration inputs (Fold-DIR)", not args.quiet):
            synth = synthesize_inputs(args.input, batch=args.dir_batch, iters=args.dir_iters, size=size,
                                      seed=args.seed, progress=Progress("deep inversion step", not args.quiet))
        return {validate.session(args.input).get_inputs()[0].name: synth.inputs}
    return None


def _check_paths(src: str, out: str, data: str | None, calib: str | None = None) -> None:
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise UserError(f"output {out} is the input file; onnxfold never overwrites its input (use -o)")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UserError(f"{out}: output directory '{out_dir}' does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"{out}: cannot write into '{out_dir}'")
    _check_data_files(data, calib)


def _check_data_files(*paths: str | None) -> None:
    for path in paths:
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{path}: no such data file")


def _validate(dense_path: str, folded_path: str, data_path: str | None, data, seed: int,
              one_at_a_time: bool = False, id_limits: dict[str, int] | None = None) -> dict:
    def make_feeds(dense, dims=None):
        if data is not None:
            feeds = validate.match_inputs(data[0], dense, data_path)
            return feeds, data[1], f"{data_path} ({len(next(iter(feeds.values())))} samples)"
        return validate.random_feeds(dense, seed=seed, dims=dims, id_limits=id_limits), None, f"8 random samples (seed {seed})"

    return validate.validate_files(dense_path, folded_path, make_feeds, one_at_a_time)


def _metrics(skeleton, file_bytes: int, feeds, latency) -> dict:
    """Parameters and MACs counted on the model without its weight data, file size and latency."""
    macs = validate.count_macs(skeleton, feeds) if feeds is not None else None
    return {"params": validate.count_params(skeleton), "macs": macs, "file_bytes": file_bytes,
            "latency_ms": latency}


def _print_report(args, output: str, result: FoldResult, dense: dict, folded: dict, comparison) -> None:
    say = (lambda *a: None) if args.quiet else print
    folded_groups = len(result.plans)
    frozen = sum(1 for g in result.groups if g.frozen)
    say(f"onnxfold: {args.input} -> {output}")
    say(f"groups: {len(result.groups)} found, {folded_groups} folded, {frozen} frozen "
        f"| ratio {args.ratio}{' allocated by Ward error' if args.allocate else ''}"
        f"{' | importance: activations' if args.importance == 'act' else ''} | k-means on {result.backend} | fold time {result.seconds:.2f} s")
    say(f"method: {args.method} | repair: {result.repair} ({result.repair_why})")
    for note in result.notes:
        say(f"  {note}")
    if not args.quiet:
        say(report.format_groups(report.group_rows(result)))
    if not folded_groups:
        say("nothing could be folded: every group is frozen or too small (see the reasons above); "
            "the output is an unchanged copy")
    if comparison is not None:
        say(f"validation on {comparison.source}:")
        for note in comparison.notes:
            say(f"  {note}")
    say(report.format_table(dense, folded, comparison))
    print(report.summary_line(output, dense, folded, comparison))


def _payload(args, output, options, result: FoldResult, dense, folded, validation, steps=None) -> dict:
    """The --report JSON; each group row carries its clustering time (seconds) when it was folded, and
    steps the wall time and peak RSS after loading, folding, writing and validating, and counting."""
    rows = report.group_rows(result)
    for row, g in zip(rows, result.groups):
        row["seconds"] = result.group_seconds.get(g.gid)
    return {"input": args.input, "output": output, "options": options, "backend": result.backend,
            "repair": {"method": result.repair, "why": result.repair_why}, "importance": args.importance,
            "fold_seconds": result.seconds,
            "groups": rows, "dense": dense, "folded": folded,
            "comparison": validation.get("comparison"), "steps": steps or {}}


def inspect(args: argparse.Namespace) -> int:
    """Print every group (channels, members) and every frozen group's tensors with the reason."""
    loaded = load_model(args.input)
    groups = discover(loaded.graph, loaded.opset)
    foldable = [g for g in groups if g.foldable]
    print(f"{args.input}: {len(groups)} channel groups, {len(foldable)} foldable, opset {loaded.opset}")
    for i, g in enumerate(groups):
        state = "foldable" if g.foldable else ("frozen" if g.frozen else "not foldable (single channel)")
        print(f"\ngroup {i}: {g.size} channels, {state}")
        for reason in g.frozen:
            print(f"  reason: {reason}")
        print(f"  tensors: {', '.join(g.tensors[:8])}" + (f" (+{len(g.tensors) - 8})" if len(g.tensors) > 8 else ""))
        for m in g.members:
            extra = f" offset {m.offset}" * bool(m.offset) + f" x{m.repeat}" * (m.repeat > 1)
            print(f"  member: {m.tensor.name}[axis {m.axis}] {m.role}{' ' + m.tag if m.tag else ''}{extra}")
    if args.json:
        report.write_json(args.json, {"input": args.input, "groups": [_group_json(g) for g in groups]})
    return 0


def _group_json(g) -> dict:
    return {"channels": g.size, "foldable": g.foldable, "frozen_reasons": g.frozen, "tensors": g.tensors,
            "members": [{"tensor": m.tensor.name, "axis": m.axis, "role": m.role, "offset": m.offset,
                         "repeat": m.repeat, "tag": m.tag} for m in g.members]}


def sweep(args: argparse.Namespace) -> int:
    """Run every method at every ratio; print the table; write CSV, JSON and the PNG figure."""
    from onnxfold import sweep as sw

    ratios = _ratio_list(args.ratios)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in sw.METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(sw.METHODS)}")
    _check_data_files(args.data, args.calib)
    load_model(args.input)
    dense = validate.session(args.input)
    feeds_data, labels = validate.read_npz(args.data)
    feeds = validate.match_inputs(feeds_data, dense, args.data)
    calib = validate.match_inputs(validate.read_npz(args.calib)[0], dense, args.calib) if args.calib else None
    data_methods = [m for m in methods if sw.METHODS[m][1] == "data"]
    if calib is None:
        for method in data_methods:
            _say_skip(method, "no --calib given")
            methods.remove(method)
    dir_methods = [m for m in methods if sw.METHODS[m][1] == "dir"]
    synth = _synthetic(args, dense, dir_methods) if dir_methods else None
    if synth is None:
        methods = [m for m in methods if m not in dir_methods]
    progress = Progress("sweep run", True, delay=0.0)
    rows = sw.run_sweep(args.input, feeds, labels, ratios, methods, calib, synth, progress, seed=args.seed,
                        allocate=args.allocate, importance=args.importance)
    progress.done()
    print(sw.format_rows(rows))
    prefix = args.output or (args.input[:-5] if args.input.endswith(".onnx") else args.input) + ".sweep"
    sw.write_csv(prefix + ".csv", rows)
    sw.write_json(prefix + ".json", rows)
    written = [prefix + ".csv", prefix + ".json"]
    if not args.no_plot:
        sw.plot(prefix + ".png", rows, os.path.basename(args.input))
        written.append(prefix + ".png")
    print("wrote " + ", ".join(written))
    return 0


def _ratio_list(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ratios {text!r} is not a comma-separated list of numbers") from None
    bad = [r for r in ratios if not 0.0 <= r < 1.0]
    if not ratios or bad:
        raise UserError(f"--ratios {text!r}: every ratio must be in [0, 1)")
    return ratios


def _say_skip(method: str, why: str) -> None:
    print(f"skipping {method}: {why}", file=sys.stderr)


def _synthetic(args, dense, methods: list[str]):
    """Fold-DIR inputs synthesised once from the dense model (None, with a note per method in `methods`, when
    DIR cannot run)."""
    try:
        from onnxfold.dir import synthesize_inputs
        size = (args.dir_size, args.dir_size) if args.dir_size else None
        with Step("synthesising calibration inputs (Fold-DIR)"):
            synth = synthesize_inputs(args.input, batch=args.dir_batch, iters=args.dir_iters, size=size,
                                      seed=args.seed)
    except UserError as e:
        for method in methods:
            _say_skip(method, str(e))
        return None
    return {dense.get_inputs()[0].name: synth.inputs}


def export(args: argparse.Namespace) -> int:
    """Export a Hugging Face folder to ONNX, then list what onnxfold can fold in it."""
    from onnxfold.export import export_hf

    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f"{args.output}: output directory '{out_dir}' does not exist")
    with Step("exporting"):
        output_name = export_hf(args.model_dir, args.output, args.opset, args.with_past)
    loaded = load_model(args.output)
    groups = discover(loaded.graph, loaded.opset)
    kinds = [g.kind for g in groups if g.foldable]
    print(f"wrote {args.output} (output '{output_name}'): {kinds.count('heads')} attention-head groups and "
          f"{kinds.count('channels')} other foldable groups; next: onnxfold {args.output}")
    return 0
