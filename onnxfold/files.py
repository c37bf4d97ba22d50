"""fold_file: the whole job on files, as the command line runs it: check the paths and inputs, load,
fold (pipeline.fold_graph), write atomically once onnx.checker and onnxruntime accepted the result
(check.compare), count both models, and return a typed FoldReport. The input is never modified.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .check.compare import ONE_AT_A_TIME_BYTES, FeedSource, Validation, validate_files
from .check.count import ModelFigures, figures
from .config import FoldConfig
from .errors import ConfigError, UserError
from .model.load import LoadedModel, load_model
from .model.save import check_data_target, copy_atomic, save_graph
from .pipeline import FoldResult, calibration_inputs, calibration_source, fold_graph
from .plan.sensitivity import Sensitivity
from .repair import repair_class
from .runtime.feeds import check_arrays, proto_input_specs
from .runtime.hints import input_hints
from .runtime.inputs import (
    InputOptions,
    Inputs,
    check_source,
    check_token_ids,
    input_kind,
    needs_specs,
    read_inputs,
    unlabelled,
    warn_if_same,
)
from .runtime.tokens import empty_caches, token_id_limits

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs


@dataclass
class StepCost:
    """Wall time (s) of one step of fold_file and the process's peak RSS (bytes) after it."""

    seconds: float
    peak_rss_bytes: int


@dataclass
class FoldReport:
    """Everything fold_file did: the fold, where it wrote, the dense and folded figures, the
    validation (None with validate=False) and the cost of each step (load, fold, write_and_validate,
    metrics); `copied`: nothing was folded, the output is a byte copy of the input; `inputs`: what
    the --data ("data") and --calib ("calib") inputs given were (a description, or the .npz
    path)."""

    input: str
    output: str
    config: FoldConfig
    result: FoldResult
    dense: ModelFigures
    folded: ModelFigures
    validation: Validation | None
    steps: dict[str, StepCost]
    copied: bool = False  # nothing was folded and the output is a byte copy of the input
    inputs: dict[str, str] = field(default_factory=dict)


class Reporter:
    """What fold_file shows while it works; this one shows nothing. step(name) is a context manager
    around one step; counter(label) gives a callable (i, total, text) for per-item progress, or
    None."""

    def step(self, name: str):
        return contextlib.nullcontext()

    def counter(self, label: str):
        return None


def default_output(path: str) -> str:
    """INPUT.folded.onnx beside the input."""
    base = path[:-5] if path.lower().endswith(".onnx") else path
    return base + ".folded.onnx"


def fold_file(
    input: str,
    output: str | None = None,
    config: FoldConfig | None = None,
    *,
    calib: str | None = None,
    data: str | None = None,
    validate: bool = True,
    reporter: Reporter | None = None,
    inputs: InputOptions | None = None,
    sensitivity: Sensitivity | None = None,
) -> FoldReport:
    """Fold the model file `input` into `output` (default INPUT.folded.onnx), written atomically
    after onnx.checker and (validate) onnxruntime accepted it; the input is never modified. `calib`:
    calibration inputs; `data`: validation inputs with optional labels (default: random inputs);
    each an .npz, a folder of images or a text file (read as `inputs` say, see runtime.inputs).
    `sensitivity`: with --measure, measurements to allocate from (search.SearchResult's) instead
    of measuring again. UserError (one line) for bad input, before any folding."""
    config, reporter = config or FoldConfig(), reporter or Reporter()
    output = output or default_output(input)
    check_fold_request(input, output, config, data, calib, inputs)
    data_in = read_inputs(data, None, inputs) if data and not needs_specs(data) else None
    calib_in = read_inputs(calib, None) if calib and not needs_specs(calib) else None
    steps: dict[str, StepCost] = {}
    with reporter.step("loading"), _measured(steps, "load"):
        # External-data weights stay on disk until used, unless a step exports the graph to run it.
        repair = repair_class(config.repair, config.method, calib is not None)
        lazy = not repair.needs_calibration and config.importance != "act"
        loaded = load_model(input, lazy=lazy)
        check_data_target(output, loaded.data_files)
        specs = proto_input_specs(loaded.skeleton.graph)  # the inputs as the file declares them
        hints = input_hints(loaded.graph)  # read before folding forgets the inferred shapes
        data_in = read_for_model(data, specs, inputs, loaded.graph, data_in)
        calib_in = read_for_model(calib, specs, unlabelled(inputs), loaded.graph, calib_in)
        if data_in:
            check_arrays(data_in.arrays, data_in.labels, specs, data)
        if calib_in:
            check_arrays(calib_in.arrays, None, specs, calib)
        warn_if_same(data, data_in, calib, calib_in)
    calib_arrays = calib_in.arrays if calib_in else None
    with reporter.step("folding"), _measured(steps, "fold"):
        result = _fold_loaded(loaded, config, calib_arrays, calib, reporter, sensitivity)
    if calib_in and calib_in.description:
        result.notes.append(f"calibration inputs: {calib_in.description}")
    validator = _Validator(
        input,
        FeedSource(
            data_in.arrays if data_in else None,
            data_in.labels if data_in else None,
            data,
            config.seed,
            hints,
            described=data_in.description if data_in else None,
        ),
        loaded.file_bytes,
    )
    copied = not result.plans and not loaded.external_data
    if not result.plans and loaded.external_data:  # unchanged: a graph no repair has touched
        loaded = load_model(input, lazy=True)
    with reporter.step("validating and writing"), _measured(steps, "write_and_validate"):
        check = validator if validate else None
        if copied:
            skeleton, size = loaded.skeleton, copy_atomic(input, output, check)
        else:
            skeleton, size = save_graph(
                loaded.graph, loaded.opset, output, loaded.external_data, check, loaded.data_files
            )
    checked = validator.result
    with _measured(steps, "metrics"):
        feeds, latency = (checked.feeds, checked.timing.ms) if checked else (None, (None, None))
        # MACs inference cannot count are counted on a run of the files, when they are small
        small = loaded.file_bytes < ONE_AT_A_TIME_BYTES
        dense = figures(
            loaded.skeleton, loaded.file_bytes, feeds, latency[0], input if small else None
        )
        folded = figures(skeleton, size, feeds, latency[1], output if small else None)
    if validator.one_at_a_time and validate:
        result.notes.append(
            f"input over {ONE_AT_A_TIME_BYTES >> 30} GiB: dense and folded models validated one "
            f"after the other (latencies timed separately, not interleaved)"
        )
    given = {"data": (data, data_in), "calib": (calib, calib_in)}
    described = {k: found.description or path for k, (path, found) in given.items() if path}
    return FoldReport(
        input, output, config, result, dense, folded, checked, steps, copied, described
    )


def _fold_loaded(
    loaded: LoadedModel,
    config: FoldConfig,
    calib_arrays,
    calib_path: str | None,
    reporter: Reporter,
    sensitivity: Sensitivity | None = None,
) -> FoldResult:
    """fold_graph on a loaded file, with its calibration inputs (synthesised in a step of its
    own)."""
    synthesised = calibration_source(config, calib_arrays) == "synthesised"
    with (
        reporter.step("synthesising calibration inputs (Fold-DIR)")
        if synthesised
        else contextlib.nullcontext()
    ):
        feeds = calibration_inputs(
            config, loaded.path, calib_arrays, calib_path, reporter.counter("deep inversion step")
        )
    counter = reporter.counter("clustering group")
    result = fold_graph(
        loaded.graph, loaded.opset, config, counter, feeds, loaded.path, sensitivity=sensitivity
    )
    getattr(counter, "done", lambda: None)()
    return result


class _Validator:
    """save_graph's check on the written file before it is renamed into place: compares it with the
    dense model at `dense_path` on `source`'s inputs (one model at a time when the dense files reach
    ONE_AT_A_TIME_BYTES); keeps the Validation in `result`."""

    def __init__(self, dense_path: str, source: FeedSource, dense_bytes: int):
        self.dense_path, self.source = dense_path, source
        self.one_at_a_time = dense_bytes >= ONE_AT_A_TIME_BYTES
        self.result: Validation | None = None

    def __call__(self, folded_path: str) -> None:
        self.result = validate_files(self.dense_path, folded_path, self.source, self.one_at_a_time)


@contextlib.contextmanager
def _measured(steps: dict[str, StepCost], name: str):
    """Record the block's wall time and the process's peak RSS so far as steps[name]."""
    start = time.perf_counter()
    yield
    steps[name] = StepCost(
        time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def read_for_model(
    path: str | None,
    specs,
    options: InputOptions | None,
    graph: gs.Graph,
    found: Inputs | None = None,
) -> Inputs | None:
    """The inputs at `path` (or `found`, already read from it) for the model whose declared inputs
    are `specs` and whose graph is `graph`: text token ids checked against the model's embedding
    tables (UserError), and past caches the graph can start empty (a KV-cache decoder's first
    step, runtime.tokens.empty_caches) given as zeros when the inputs hold none of them."""
    if not path:
        return None
    caches = empty_caches(graph, 0)
    if found is None:
        found = read_inputs(path, [s for s in specs if s.name not in caches], options)
    if input_kind(path) == "text":
        check_token_ids(found.arrays, token_id_limits(graph), path)
    return _with_empty_caches(found, caches, path)


def _with_empty_caches(found: Inputs, caches: dict[str, np.ndarray], path: str) -> Inputs:
    """`found` with zeros (samples, heads, 0, head size) for every cache in `caches` (input name ->
    an empty cache of 0 samples) when it holds none of them and its other arrays agree on a sample
    count (else as it is)."""
    counts = {len(a) for n, a in found.arrays.items() if n not in caches and np.ndim(a) > 0}
    if not caches or any(n in found.arrays for n in caches) or len(counts) != 1:
        return found
    count = counts.pop()
    zeros = {n: np.zeros((count, *a.shape[1:]), a.dtype) for n, a in caches.items()}
    said = found.description or f"{path} ({count} samples)"
    note = f"{said}; empty past caches for the {len(caches)} cache inputs"
    return Inputs({**found.arrays, **zeros}, found.labels, note)


def check_fold_request(
    input: str,
    output: str,
    config: FoldConfig,
    data: str | None = None,
    calib: str | None = None,
    inputs: InputOptions | None = None,
) -> None:
    """UserError (one line) for what a fold of `input` into `output` would fail on before it
    reads the model: the configuration, the paths (check_paths), missing calibration inputs."""
    config.check()
    check_paths(input, output, data, calib, inputs)
    _check_calib(config, calib)


def _check_calib(config: FoldConfig, path: str | None) -> None:
    """Check that the chosen methods have the calibration inputs they need."""
    repair = repair_class(config.repair, config.method, path is not None)
    if repair.reads_calib and not path:
        raise ConfigError(
            "repair", config.repair, "needs {calib} FILE.npz (a few dozen representative inputs)"
        )
    if config.refit and not path and not repair.synthesizes:
        raise ConfigError(
            "refit",
            None,
            "needs calibration inputs: {calib} FILE.npz, or {repair} dir (synthesised)",
        )


def check_paths(
    src: str,
    out: str,
    data: str | None = None,
    calib: str | None = None,
    inputs: InputOptions | None = None,
) -> None:
    """UserError when the output would replace the input or cannot be written, or a data source is
    missing or unusable (runtime.inputs.check_source)."""
    if os.path.exists(out) and os.path.exists(src) and os.path.samefile(src, out):
        raise ConfigError(
            "output", out, "is the input file; onnxfold never overwrites its input (name another)"
        )
    check_writable(out, "output")
    check_data_files(data, inputs=inputs)
    check_data_files(calib, inputs=unlabelled(inputs))


def check_writable(path: str, what: str) -> None:
    """UserError (naming the file as `what`) when `path` cannot be written as a file: it is a
    directory, its directory is missing, or a file cannot be created there (read-only, /proc);
    probed by creating and removing a temporary file beside it."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{what} {path}: directory '{folder}' does not exist")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".onnxfold-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write into '{folder}' ({e.strerror})") from None


def check_data_files(*paths: str | None, inputs: InputOptions | None = None) -> None:
    """UserError for the first path given that is missing or unusable as inputs (a folder without
    images, a text file without --tokenizer)."""
    for path in paths:
        if path is not None:
            check_source(path, inputs)
