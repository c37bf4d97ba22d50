"""The commands: fold (the main job), sweep and export (inspect: cli/inspect.py); each parses
nothing and computes nothing itself: it calls the library and renders the result."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from onnxfold.config import DEFAULTS, FIELDS, FoldConfig
from onnxfold.errors import UserError, WordedError, worded
from onnxfold.files import (
    FoldReport,
    Reporter,
    check_data_files,
    check_fold_request,
    check_writable,
    default_output,
    fold_file,
    read_for_model,
)
from onnxfold.genai import FolderReport, check_folder_request, fold_folder, is_genai_folder
from onnxfold.groups.discover import discover
from onnxfold.model.load import load_model
from onnxfold.pipeline import calibration_inputs
from onnxfold.runtime.feeds import check_arrays, input_specs, match_inputs
from onnxfold.runtime.inputs import (
    InputOptions,
    unlabelled,
    warn_if_same,
)
from onnxfold.runtime.session import session

from . import report
from .progress import Progress, Step

if TYPE_CHECKING:
    from onnxfold.search import SearchResult


def in_flags(error: UserError) -> str:
    """A library error as the command line says it: configuration fields named as flags."""
    return error.words(as_flags=True) if isinstance(error, WordedError) else str(error)


def config_from(args: argparse.Namespace) -> FoldConfig:
    """The FoldConfig the parsed flags describe (flags named like its fields)."""
    values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    values["exclude"] = tuple(values.get("exclude", ()))
    if values.get("ratio") is None:  # searched (default_search) or the kinds' own ratios
        values["ratio"] = DEFAULTS.ratio
    return FoldConfig(**values)


def default_search(args: argparse.Namespace) -> bool:
    """True when the fold was given no ratio of any kind and no target: it searches the largest
    ratio graded ok (search.DEFAULT_TARGET)."""
    return args.target is None and all(
        getattr(args, name, None) is None for name in ("ratio", "head_ratio", "mlp_ratio")
    )


def input_options(args: argparse.Namespace) -> InputOptions:
    """The InputOptions the image and text flags describe (--image-size, --tokenizer, ...)."""
    return InputOptions(
        image_size=args.image_size,
        layout=args.layout,
        channel_order=args.channel_order,
        pixel_range=args.pixel_range,
        mean=args.mean,
        std=args.std,
        resize=args.resize,
        labels_from_folders=args.labels_from_folders,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        max_samples=args.max_samples,
    )


class TerminalReporter(Reporter):
    """Steps and counters on stderr (silent with -q)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def step(self, name: str):
        return Step(name, not self.quiet)

    def counter(self, label: str):
        return Progress(label, not self.quiet)


def fold(args: argparse.Namespace) -> int:
    """Fold, validate with onnxruntime, write atomically, and report."""
    config = config_from(args)
    if args.fail_on and args.no_validate:
        raise UserError("--fail-on needs validation: drop --no-validate")
    if args.report:
        check_writable(args.report, "--report")
    model = _model_file(args, config)
    searched = None
    if args.target or default_search(args):
        output = args.output or default_output(args.input)
        if model == args.input:
            check_fold_request(model, output, config, args.data, args.calib, input_options(args))
        searched = _search(args, config, model)
    if searched is not None and searched.best is None:
        if args.report:  # what the search walked, though no model was written
            walked = {"input": args.input, "output": None, "options": config, "search": searched}
            report.write_json(args.report, walked)
        return 3
    if searched is not None:
        config = dataclasses.replace(config, ratio=searched.best.ratio)
    folded, in_folder = _fold(args, config, searched.sensitivity if searched is not None else None)
    _print_report(args, folded)
    if in_folder is not None and not args.quiet:
        print(_folder_text(in_folder))
    if args.report:
        payload = report.payload(folded)
        payload["search"] = searched
        payload["inputs"] = folded.inputs
        if in_folder is not None:
            payload["genai"] = _folder_payload(in_folder)
        report.write_json(args.report, payload)
    return _verdict_exit(args.fail_on, folded)


def _model_file(args: argparse.Namespace, config: FoldConfig) -> str:
    """The model file to fold: the input, or the decoder model of an onnxruntime-genai folder
    (whose fold is checked first: genai.check_folder_request)."""
    if not is_genai_folder(args.input):
        return args.input
    options = input_options(args)
    return check_folder_request(args.input, args.output, config, args.data, args.calib, options)


def _fold(
    args: argparse.Namespace, config: FoldConfig, sensitivity
) -> tuple[FoldReport, FolderReport | None]:
    """fold_file on the input model, or fold_folder on an onnxruntime-genai folder (then also its
    FolderReport)."""
    options = dict(
        calib=args.calib,
        data=args.data,
        validate=not args.no_validate,
        reporter=TerminalReporter(args.quiet),
        inputs=input_options(args),
        sensitivity=sensitivity,
    )
    if is_genai_folder(args.input):
        in_folder = fold_folder(args.input, args.output, config, **options)
        return in_folder.fold, in_folder
    return fold_file(args.input, args.output, config, **options), None


def _folder_text(folded: FolderReport) -> str:
    """What a genai folder fold wrote besides the model: the config's changes, the copied files,
    onnxruntime-genai's check."""
    changes = folded.before.changes(folded.after)
    said = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "unchanged"
    return (
        f"{folded.output}: genai_config.json {said}; copied {', '.join(folded.copied) or 'nothing'}"
        f"; {folded.genai_check}"
    )


def _folder_payload(folded: FolderReport) -> dict:
    """The --report entry of a genai folder fold."""
    return {
        "input": folded.input,
        "output": folded.output,
        "before": dataclasses.asdict(folded.before),
        "after": dataclasses.asdict(folded.after),
        "copied": folded.copied,
        "genai_check": folded.genai_check,
    }


def _search(args: argparse.Namespace, config: FoldConfig, model: str):
    """The --target search (onnxfold.search) on the model file `model`, its frontier printed;
    None-best: said on stderr."""
    from onnxfold.check.count import count_params_file
    from onnxfold.search import (
        DEFAULT_TARGET,
        TARGET_METRICS,
        Target,
        format_frontier,
        search_file,
    )

    if args.target is None:  # the default: neither --ratio nor --target
        target = DEFAULT_TARGET
        if args.no_validate:
            raise UserError(
                "without --ratio the ratio is searched on validation runs (--target ok): give "
                "--ratio R with --no-validate"
            )
    else:
        target = Target.parse(args.target)
        if not args.data:
            raise UserError("--target needs --data: the target is measured on real inputs")
        if args.no_validate:
            raise UserError("--target needs validation: drop --no-validate")
    progress = Progress("trying", not args.quiet, delay=0.0)
    searched = search_file(
        model, config, target, args.data, args.calib, progress, input_options(args)
    )
    progress.done()
    dense = count_params_file(model)
    if not args.quiet:
        where = args.data or "random inputs (give --data for a verified verdict)"
        what = f"{target}: {TARGET_METRICS['ok'][0]}" if target.metric == "ok" else target
        print(f"search for {what} on {where} ({searched.seconds:.1f} s):")
        print(format_frontier(searched, dense))
    if searched.best is None:
        removing = [c for c in searched.frontier if c.params < dense]
        first = (removing or searched.frontier)[0]
        gives = first.why if target.metric == "ok" else f"{first.value:.4f}"
        smaller = " (smaller ones remove nothing)" if len(removing) < len(searched.frontier) else ""
        hint = "; give --ratio R to fold anyway" if args.target is None else ""
        print(
            f"onnxfold: no ratio tried meets {target} (the smallest that removes parameters, "
            f"{first.ratio:.4f}, gives {gives}{smaller}){_rounding_text(searched)}; nothing "
            f"written{hint}",
            file=sys.stderr,
        )
    return searched


def _rounding_text(searched: SearchResult) -> str:
    """What the dense model with float16-precision weights gives on the same inputs, and whether
    the target is then stricter than rounding."""
    r = searched.rounded
    if r is None:
        return ""
    gives = ("ok" if r.met else r.why) if searched.target.metric == "ok" else f"{r.value:.4f}"
    if r.met:
        return f"; the dense model with its weights rounded to float16 precision gives {gives}"
    return (
        f"; even the dense model with its weights rounded to float16 precision gives {gives}: "
        "the target is stricter than rounding on these inputs (loosen it, or give more --data)"
    )


FAILING = {"degraded": ("degraded", "broken"), "broken": ("broken",)}


def _verdict_exit(fail_on: str | None, folded: FoldReport) -> int:
    """3 (with one line on stderr) when the verdict is as bad as --fail-on names, else 0."""
    if fail_on is None:
        return 0
    comparison = folded.validation.comparison
    if comparison.verdict in FAILING[fail_on]:
        print(
            f"onnxfold: verdict {comparison.verdict} ({comparison.verdict_why}): exit 3 as "
            f"--fail-on {fail_on} asks; {folded.output} was written",
            file=sys.stderr,
        )
        return 3
    return 0


def _print_report(args, folded: FoldReport) -> None:
    say = (lambda *a: None) if args.quiet else print
    result, config = folded.result, folded.config
    comparison = folded.validation.comparison if folded.validation else None
    folded_groups = len(result.plans)
    frozen = sum(1 for g in result.groups if g.frozen)
    say(f"onnxfold: {folded.input} -> {folded.output}")
    say(
        f"groups: {len(result.groups)} found, {folded_groups} folded, {frozen} frozen "
        f"| {_ratio_text(config, result.groups)}"
        f"{' allocated by Ward error' if config.allocate else ''}"
        f"{' | importance: activations' if config.importance == 'act' else ''} | k-means on "
        f"{result.backend} "
        f"| fold time {result.seconds:.2f} s"
    )
    say(f"method: {config.method} | repair: {result.repair} ({result.repair_why})")
    for note in result.notes:
        say(f"  {note}")
    if not args.quiet:
        say(report.format_groups(report.group_rows(result)))
    if result.nothing_folded:
        say(
            f"nothing was folded: {worded(result.nothing_folded, as_flags=True)}; the output is "
            f"{'a copy of the input' if folded.copied else 'the input model, re-serialised'}"
        )
    if comparison is not None:
        say(f"verdict: {comparison.verdict.upper()} ({comparison.verdict_why})")
        say(f"validation on {comparison.source}:")
        for note in comparison.notes:
            say(f"  {note}")
    timing = folded.validation.timing if folded.validation else None
    say(report.format_table(folded.dense, folded.folded, comparison, timing))
    print(report.summary_line(folded.output, folded.dense, folded.folded, comparison))


def _ratio_text(config: FoldConfig, groups) -> str:
    """The ratios in effect for the kinds of group the graph has: 'ratio 0.5', or per kind when
    --head-ratio / --mlp-ratio make them differ."""
    ratios = {
        "heads": config.ratio if config.head_ratio is None else config.head_ratio,
        "channels": config.ratio if config.mlp_ratio is None else config.mlp_ratio,
    }
    present = {kind: r for kind, r in ratios.items() if any(g.kind == kind for g in groups)}
    if len(set(present.values())) == 1:
        return f"ratio {next(iter(present.values()))}"
    if not present:
        return f"ratio {config.ratio}"
    return "ratio: " + ", ".join(f"{kind} {r}" for kind, r in present.items())


def sweep(args: argparse.Namespace) -> int:
    """Run every method at every ratio; print the table; write CSV, JSON and the PNG figure."""
    from onnxfold import sweep as sw

    ratios = _ratio_list(args.ratios)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in sw.METHODS]
    if unknown:
        raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(sw.METHODS)}")
    options = input_options(args)
    check_data_files(args.data, inputs=options)
    check_data_files(args.calib, inputs=unlabelled(options))
    FoldConfig(seed=args.seed, allocate=args.allocate, measure=args.measure).check()
    prefix = (
        args.output or (args.input[:-5] if args.input.endswith(".onnx") else args.input) + ".sweep"
    )
    for suffix in (".csv", ".json") + ((".png",) if not args.no_plot else ()):
        check_writable(prefix + suffix, "sweep output")
    graph = load_model(args.input, lazy=True).graph
    dense = session(args.input)
    specs = input_specs(dense)
    data_in = read_for_model(args.data, specs, options, graph)
    check_arrays(data_in.arrays, data_in.labels, specs, args.data)
    feeds, labels = match_inputs(data_in.arrays, dense, args.data), data_in.labels
    calib_in = read_for_model(args.calib, specs, unlabelled(options), graph)
    calib = None
    if calib_in:
        check_arrays(calib_in.arrays, None, specs, args.calib)
        calib = match_inputs(calib_in.arrays, dense, args.calib)
    warn_if_same(args.data, data_in, args.calib, calib_in)
    for what, found in (("evaluation", data_in), ("calibration", calib_in)):
        if found and found.description:
            print(f"{what} inputs: {found.description}", file=sys.stderr)
    data_methods = [m for m in methods if sw.METHODS[m][1] == "data"]
    if calib is None:
        for method in data_methods:
            _say_skip(method, "no --calib given")
            methods.remove(method)
    dir_methods = [m for m in methods if sw.METHODS[m][1] == "dir"]
    synth = _synthetic(args, dir_methods) if dir_methods else None
    if synth is None:
        methods = [m for m in methods if m not in dir_methods]
    progress = Progress("sweep run", True, delay=0.0)
    rows = sw.run_sweep(
        args.input,
        feeds,
        labels,
        ratios,
        methods,
        calib,
        synth,
        progress,
        args.measure,
        seed=args.seed,
        allocate=args.allocate,
        importance=args.importance,
    )
    progress.done()
    print(sw.format_rows(rows))
    sw.write_csv(prefix + ".csv", rows)
    sw.write_json(prefix + ".json", rows)
    written = [prefix + ".csv", prefix + ".json"]
    if not args.no_plot:
        sw.plot(prefix + ".png", rows, os.path.basename(args.input), args.x_axis)
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


def _synthetic(args, methods: list[str]):
    """Fold-DIR inputs synthesised once from the dense model (None, with a note per method in
    `methods`, when DIR cannot run)."""
    config = FoldConfig(
        repair="dir",
        seed=args.seed,
        dir_batch=args.dir_batch,
        dir_iters=args.dir_iters,
        dir_size=args.dir_size,
    )
    try:
        with Step("synthesising calibration inputs (Fold-DIR)"):
            return calibration_inputs(config, args.input, None)
    except UserError as e:
        for method in methods:
            _say_skip(method, in_flags(e))
        return None


def export(args: argparse.Namespace) -> int:
    """Export a Hugging Face folder to ONNX, then list what onnxfold can fold in it."""
    # torch and transformers: imported only for this command
    from onnxfold.export.hf import export_hf

    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        raise UserError(f"{args.output}: output directory '{out_dir}' does not exist")
    with Step("exporting"):
        output_name = export_hf(args.model_dir, args.output, args.opset, args.with_past)
    loaded = load_model(args.output)
    groups = discover(loaded.graph, loaded.opset)
    kinds = [g.kind for g in groups if g.foldable]
    print(
        f"wrote {args.output} (output '{output_name}'): {kinds.count('heads')} attention-head "
        "groups and "
        f"{kinds.count('channels')} other foldable groups; next: onnxfold {args.output}"
    )
    return 0
