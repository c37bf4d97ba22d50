"""`onnxfold INPUT.onnx [-o OUTPUT.onnx] [options]` folds a model; `onnxfold inspect`, `sweep` and
`export` do the rest (COMMANDS).

Exit codes: 0 success (also when nothing could be folded), 2 bad input or usage (one line, no
traceback), 3 the verdict reached --fail-on, 1 internal error.

Start-up: a command's module, and onnx, onnxruntime or torch with it, is imported only once its
arguments are parsed, so `--help` and `--version` load none of them (tests/test_startup.py)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from typing import NamedTuple

from onnxfold import __version__
from onnxfold.config import CHOICES, DEFAULTS
from onnxfold.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def fold_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxfold",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Fold an ONNX model: cluster similar channels and merge them, data-free. Writes "
            "INPUT.folded.onnx and prints a before/after report.",
            78,
        )
        + "\n\n"
        + command_list(),
    )
    p.add_argument("--version", action="version", version=f"onnxfold {__version__}")
    p.add_argument(
        "input",
        help="the .onnx model to fold, or an onnxruntime-genai folder (genai_config.json and "
        "its model; never modified)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="where to write the folded model (default: INPUT.folded.onnx); for a folder: the "
        "new folder (required), with the model, tokenizer files and a genai_config.json that "
        "matches the folded graph",
    )
    _budget_flags(p)
    _method_flags(p)
    _repair_flags(p)
    _output_flags(p)
    return p


def _budget_flags(p: argparse.ArgumentParser) -> None:
    """How much each group keeps (the configuration's budget fields)."""
    p.add_argument(
        "--ratio",
        type=float,
        help="fraction of channels removed per group, in [0, 1) (default: the largest ratio "
        "graded ok, searched as --target ok does; with --head-ratio or --mlp-ratio alone: "
        f"{DEFAULTS.ratio})",
    )
    p.add_argument(
        "--target",
        metavar="METRIC=VALUE",
        help="fold as far as the fidelity on --data still meets this: cos=0.99 (lowest output "
        "cosine), top1=0.98 (logit argmax agreement), acc=0.97 (accuracy ratio, needs labels), "
        "error=0.05 (highest relative L2 error), ppl=1.5 (folded / dense perplexity of a causal "
        "LM on the --data text), or ok (the verdict's grade stays ok; the default "
        "without --ratio, then also on random inputs); the ratio is searched, --ratio ignored",
    )
    p.add_argument(
        "--head-ratio",
        type=float,
        metavar="R",
        help="ratio for attention-head groups (whole KV groups with GQA); default: --ratio",
    )
    p.add_argument(
        "--mlp-ratio",
        type=float,
        metavar="R",
        help="ratio for all other groups (MLP, conv channels); default: --ratio",
    )
    p.add_argument(
        "--layers",
        metavar="SPEC",
        help="fold only these layers, e.g. 5-27 or 0,3,7: the i-th foldable "
        "group of each kind (heads, channels) in graph order",
    )
    p.add_argument(
        "--allocate",
        action="store_true",
        help="remove the same number of parameters, but spread "
        "per group where clustering loses least (Ward error of each group's weights; data-free)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="remove the same number of parameters, but spread per group where the measured "
        "output deviation is lowest (each group folded alone at a few ratios on --calib inputs, "
        "Fold-DIR's with --repair dir, else random inputs); slower, not with --allocate. A "
        "group only one MatMul/Gemm/1x1 Conv reads is emulated at that layer on the dense model "
        "(exact for pruning, approximate for folding), the others folded alone",
    )
    p.add_argument(
        "--measure-exact",
        action="store_true",
        help="with --measure: fold every group alone, none emulated (slower)",
    )
    p.add_argument(
        "--budget",
        dest="cost",
        choices=CHOICES["cost"],
        default=DEFAULTS.cost,
        help="what --allocate / --measure spend: params (default), macs (multiply-accumulates at "
        "the input size) or latency (onnxruntime CPU time per layer, counts rounded up to a "
        "multiple of 4)",
    )
    p.add_argument(
        "--multiple-of",
        type=int,
        default=DEFAULTS.multiple_of,
        metavar="N",
        help="round kept channel counts up to a multiple of N (default 1; 4 with --budget latency)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="protect groups touching a tensor (activation or weight) whose name matches PATTERN "
        "(glob or substring); repeatable",
    )


def _method_flags(p: argparse.ArgumentParser) -> None:
    """How channels are chosen: importance, method, k-means backend, seed, compensation, refit."""
    p.add_argument(
        "--importance",
        choices=CHOICES["importance"],
        default=DEFAULTS.importance,
        help="act: weigh channels by activation RMS x next-layer weight norm, measured on --calib "
        "inputs or, for token models, data-free on text a causal LM generates itself (random token "
        "ids for other token models); prune keeps the highest, fold clusters the weighted features "
        "(default: weight)",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="with --importance act: restore each folded group's next-layer output mean with a "
        "bias (prune: the dropped channels' mean contribution, FLAP-style; fold: measured again on "
        "the folded model); helps LLMs, see README",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after merging (and repair): re-solve by least squares the weights of each layer that "
        "reads folded channels (MatMul, Gemm, ungrouped 2-D Conv) so its output matches the "
        "dense model's on the calibration inputs (--calib, or --repair dir's synthetic ones)",
    )
    p.add_argument(
        "--method",
        choices=CHOICES["method"],
        default=DEFAULTS.method,
        help="fold: cluster and merge channels (default); prune: keep the largest-norm channels "
        "(baseline)",
    )
    p.add_argument(
        "--prune-norm",
        choices=CHOICES["prune_norm"],
        default=DEFAULTS.prune_norm,
        help="channel score for --method prune",
    )
    p.add_argument(
        "--backend",
        choices=CHOICES["backend"],
        default=DEFAULTS.backend,
        help="k-means backend; auto uses a GPU only when one really works",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS.seed,
        help="seed for k-means and random validation inputs",
    )


def _repair_flags(p: argparse.ArgumentParser) -> None:
    """The repair after merging and its calibration inputs."""
    p.add_argument(
        "--repair",
        choices=CHOICES["repair"],
        default=DEFAULTS.repair,
        help="repair after merging: ar (Fold-AR, data-free, needs BatchNorm statistics); data "
        "(REPAIR: reset statistics on --calib inputs); dir (data-free: inputs synthesised from BN "
        "statistics, then REPAIR; needs torch); none. auto picks ar when BN statistics exist",
    )
    p.add_argument(
        "--calib",
        metavar="FILE.npz|DIR|TEXT",
        help="calibration inputs for --repair data (a few dozen samples): an .npz, a folder of "
        "images or a text file (see --data)",
    )
    _dir_flags(p, "--repair dir")


def _output_flags(p: argparse.ArgumentParser) -> None:
    """What is validated, written and reported."""
    p.add_argument(
        "--data",
        metavar="FILE.npz|DIR|TEXT",
        help="validation inputs: an .npz (keys = input names, optional 'labels'), a folder of "
        "images, or a text file (with --tokenizer)",
    )
    _input_flags(p)
    p.add_argument(
        "--no-validate", action="store_true", help="skip the onnxruntime comparison and timing"
    )
    p.add_argument("--report", metavar="OUT.json", help="write the full report as JSON")
    p.add_argument(
        "--fail-on",
        choices=("degraded", "broken"),
        help="exit 3 when the verdict is this bad or worse (the folded model is still written)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary line")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")


def _input_flags(p: argparse.ArgumentParser) -> None:
    """How image folders and text files given to --data / --calib become arrays
    (runtime.inputs.InputOptions; unset: inferred from the model's input)."""
    g = p.add_argument_group("image folders and text files for --data / --calib")
    g.add_argument(
        "--image-size",
        type=_image_size,
        metavar="N|HxW",
        help="image height and width where the model's are symbolic (default 224)",
    )
    g.add_argument(
        "--layout", choices=("NCHW", "NHWC"), help="default: from the input's channel axis"
    )
    g.add_argument("--channel-order", choices=("RGB", "BGR"), default="RGB")
    g.add_argument(
        "--pixel-range",
        choices=("0-1", "0-255"),
        help="float inputs: pixels scaled to [0, 1] (default) or raw 0..255; uint8 inputs: raw",
    )
    g.add_argument("--mean", type=_floats, metavar="M[,M,M]", help="subtracted per channel")
    g.add_argument("--std", type=_floats, metavar="S[,S,S]", help="divided per channel")
    g.add_argument(
        "--resize",
        choices=("crop", "stretch"),
        default="crop",
        help="crop: centre crop to the input's aspect, then resize (default); stretch: resize",
    )
    g.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="labels: images in sub-folders, class index = sorted sub-folder name's index",
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR|tokenizer.json",
        help="tokenizes a text file for token models (the tokenizers package)",
    )
    g.add_argument(
        "--seq-len", type=int, metavar="N", help="tokens per text sequence (default 128)"
    )
    g.add_argument(
        "--max-samples",
        type=int,
        metavar="N",
        help="at most N images (the first by name) or text sequences (default: all)",
    )


def _image_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '480x640' -> (480, 640) (height x width)."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return (int(parts[0]), int(parts[-1]))
    raise argparse.ArgumentTypeError(f"{text!r} is not N or HxW (positive integers)")


def _floats(text: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers") from None


def inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxfold inspect",
        description="List every channel group of each model: members, channel count, and for "
        "frozen groups the reason they cannot be folded; first, the frozen groups counted by "
        "cause.",
    )
    p.add_argument("input", nargs="+", help="the .onnx models to inspect")
    p.add_argument(
        "--summary",
        action="store_true",
        help="only the counts: groups, foldable, frozen by cause",
    )
    p.add_argument(
        "--json",
        metavar="OUT.json",
        help="also write the groups as JSON (several models: a list, one entry per model)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def sweep_parser() -> argparse.ArgumentParser:
    from onnxfold.sweep import DEFAULT_METHODS, METHODS  # onnxruntime: only for this command

    p = _Parser(
        prog="onnxfold sweep",
        description="Accuracy against parameter, MACs and latency reduction for every method "
        "(fold+none, fold+ar, fold+dir, fold+data, prune) at every ratio; writes CSV, JSON and a "
        "PNG.",
    )
    p.add_argument("input", help="the .onnx model")
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE.npz|DIR|TEXT",
        help="evaluation inputs and optional 'labels' (an .npz, a folder of images, a text file)",
    )
    p.add_argument(
        "--calib",
        metavar="FILE.npz|DIR|TEXT",
        help="calibration inputs for fold+data (skipped without)",
    )
    _input_flags(p)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated channel ratios")
    p.add_argument(
        "--allocate",
        action="store_true",
        help="every fold method with --allocate (per-group ratios "
        "by Ward error, same parameter budget)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="every method with --measure (per-group ratios by deviation measured on --calib, "
        "or on random inputs without it; measured once per method, for the largest ratio)",
    )
    p.add_argument(
        "--x-axis",
        choices=("params", "macs", "latency"),
        default="params",
        help="the figure's x-axis: parameter sparsity, MACs reduction at the --data inputs' size, "
        "or latency reduction on onnxruntime CPU (the table shows all three)",
    )
    p.add_argument(
        "--importance",
        choices=CHOICES["importance"],
        default=DEFAULTS.importance,
        help="act: every method scores channels by activation x next-layer weight norm, measured "
        "on --calib (token models: data-free, see onnxfold --help)",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (+refit: --refit after the repair)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PREFIX",
        help="writes PREFIX.csv, PREFIX.json, PREFIX.png (default: INPUT.sweep)",
    )
    _dir_flags(p, "fold+dir")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


def _dir_flags(p: argparse.ArgumentParser, what: str) -> None:
    """Fold-DIR's settings (--dir-batch, --dir-iters, --dir-size), defaults from the
    configuration."""
    p.add_argument(
        "--dir-batch",
        type=int,
        default=DEFAULTS.dir_batch,
        metavar="N",
        help=f"synthetic samples for {what}",
    )
    p.add_argument(
        "--dir-iters",
        type=int,
        default=DEFAULTS.dir_iters,
        metavar="N",
        help=f"optimisation steps for {what}",
    )
    p.add_argument(
        "--dir-size",
        type=int,
        default=DEFAULTS.dir_size,
        metavar="PIXELS",
        help=f"input height/width for {what} when the model's are symbolic",
    )


def export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxfold export",
        description="Export a model to ONNX for folding. `onnxfold export hf "
        "MODEL_DIR -o model.onnx`: a local Hugging Face folder (causal LMs and encoders), "
        "torch.onnx legacy exporter, opset 18, no KV cache (--with-past: with KV cache, through "
        "optimum-onnx). Needs torch and transformers.",
    )
    p.add_argument("source", choices=("hf",), help="hf: a Hugging Face model folder")
    p.add_argument("model_dir", help="folder with config.json and the weights")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument(
        "--with-past",
        action="store_true",
        help="causal LMs with KV cache (past_key_values inputs, "
        "present outputs) through optimum-onnx, which pins transformers<4.58: use its own "
        "environment",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return p


class Command(NamedTuple):
    """A subcommand: how it is called, what it does, its parser, and its code as "module:function"
    of this package (imported only when the command runs)."""

    usage: str
    summary: str
    parser: Callable[[], argparse.ArgumentParser]
    run: str


COMMANDS = {
    "fold": Command(
        "[fold] INPUT.onnx|GENAI_DIR [options]",
        "fold a model or a genai folder (the options below)",
        fold_parser,
        "commands:fold",
    ),
    "inspect": Command(
        "inspect INPUT.onnx ...",
        "list channel groups and why frozen ones cannot fold",
        inspect_parser,
        "inspect:inspect",
    ),
    "sweep": Command(
        "sweep INPUT.onnx --data FILE",
        "accuracy against sparsity, every method and ratio",
        sweep_parser,
        "commands:sweep",
    ),
    "export": Command(
        "export hf MODEL_DIR -o OUT",
        "export a Hugging Face model to ONNX",
        export_parser,
        "commands:export",
    ),
}


def command_list() -> str:
    """The commands block of `onnxfold --help`, one line per entry of COMMANDS."""
    width = max(len(c.usage) for c in COMMANDS.values()) + len("onnxfold ")
    lines = [f"  {'onnxfold ' + c.usage:<{width}}  {c.summary}" for c in COMMANDS.values()]
    return "commands (each has its own --help):\n" + "\n".join(lines)


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """(command name, its arguments): a first word naming a command selects it (`fold` only when no
    file of that name exists); anything else is the fold command's arguments."""
    if argv and argv[0] in COMMANDS and (argv[0] != "fold" or not os.path.exists("fold")):
        return argv[0], argv[1:]
    return "fold", argv


def run_command(name: str, argv: list[str]) -> int:
    """Parse `argv` for command `name`, then import and run its code."""
    command = COMMANDS[name]
    args = command.parser().parse_args(argv)
    module, _, function = command.run.partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _show_log(debug)
    try:
        return run_command(*split_command(argv))
    except UserError as e:
        print(f"onnxfold: error: {_in_flags(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxfold: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line unless --debug
        if debug:
            raise
        print(
            f"onnxfold: internal error: {type(e).__name__}: {e} (rerun with --debug for details; "
            f"please report it)",
            file=sys.stderr,
        )
        return 1


def _in_flags(error: UserError) -> str:
    """commands.in_flags, imported only for library errors: a usage error stays cheap."""
    if type(error) is UserError:
        return str(error)
    from .commands import in_flags

    return in_flags(error)


def _show_log(debug: bool) -> None:
    """The library's log on stderr, one line per distinct record of this run: warnings (a rule
    that hit a bug, an option that selects nothing), and with --debug what best-effort steps
    skipped (shape observation, constant folding, MACs). A --target search folds up to 11 times;
    what each fold says again is not repeated."""
    logger = logging.getLogger("onnxfold")
    logger.setLevel(logging.INFO if debug else logging.WARNING)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("onnxfold: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    handler.shown.clear()


class _StderrHandler(logging.StreamHandler):
    """A log handler writing to whatever sys.stderr is when a record comes, each distinct
    message once until `shown` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.shown: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.shown:
            return False
        self.shown.add(key)
        return super().filter(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def entry() -> None:
    """Console-script entry: exits with main()'s code; a closed pipe (`| head`) ends quietly."""
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


if __name__ == "__main__":
    entry()
