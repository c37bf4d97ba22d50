"""onnxruntime-genai folders in, onnxruntime-genai folders out: fold_folder folds the decoder model
that a folder's genai_config.json names (with files.fold_file, the one place that folds) and writes
a complete folder beside it: the folded model and its external data (real files), every other file
of the input copied (tokenizer files, ...), and genai_config.json with the head counts and sizes
read back from the folded graph. The output folder is built in a temporary folder beside it and
renamed into place once everything was written and checked; the input folder is never modified."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from .config import FoldConfig
from .errors import UserError
from .files import FoldReport, Reporter, check_fold_request, fold_file
from .plan.sensitivity import Sensitivity
from .runtime.caches import layer_widths, projection_layer
from .runtime.inputs import InputOptions

CONFIG = "genai_config.json"
ATTENTION = "GroupQueryAttention"
# ops between a projection and the tensor a shape is read from (bias, cast to the I/O type)


@dataclass(frozen=True)
class DecoderShapes:
    """What genai_config.json's `model.decoder` (and `model.vocab_size`) restates about the decoder
    graph: GroupQueryAttention's num_heads / kv_num_heads and node count, the head size from the
    query projection's width, the hidden size and vocabulary from the logits projection."""

    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int

    def changes(self, after: DecoderShapes) -> dict[str, tuple[int, int]]:
        """{field: (before, after)} for every field that differs in `after`."""
        pairs = {f.name: (getattr(self, f.name), getattr(after, f.name)) for f in _FIELDS}
        return {name: pair for name, pair in pairs.items() if pair[0] != pair[1]}


_FIELDS = dataclasses.fields(DecoderShapes)


@dataclass
class FolderReport:
    """What fold_folder did: the fold of the decoder model (`fold`, its paths those of the written
    folder), the decoder's shapes before and after, the files copied unchanged, and how the written
    folder was checked by onnxruntime-genai (`genai_check`)."""

    input: str
    output: str
    fold: FoldReport
    before: DecoderShapes
    after: DecoderShapes
    copied: list[str] = field(default_factory=list)
    genai_check: str = ""


class GenaiRefused(RuntimeError):
    """onnxruntime-genai refuses a folder onnxfold wrote: a bug of onnxfold, nothing is written."""


def is_genai_folder(path: str) -> bool:
    """True when `path` is a folder (an onnxruntime-genai folder or meant as one)."""
    return os.path.isdir(path)


def check_folder_request(
    folder: str,
    output: str | None,
    config: FoldConfig,
    data: str | None = None,
    calib: str | None = None,
    inputs: InputOptions | None = None,
) -> str:
    """UserError (one line) for what a fold of the genai folder `folder` into the folder `output`
    would fail on, before any work: no genai_config.json or decoder model in it, no -o, an -o that
    is the input or an existing non-empty folder, a genai_config.json that disagrees with its
    graph, and what files.check_fold_request refuses.
    Returns the decoder model's path."""
    model = decoder_path(folder)
    _check_config_matches(folder, decoder_shapes(model, logits=logits_name(folder)))
    _check_output(folder, output)
    parent = os.path.dirname(os.path.abspath(output))
    probe = os.path.join(parent, f".onnxfold-{os.path.basename(output)}.onnx")
    check_fold_request(model, probe, config, data, calib, inputs)
    return model


def decoder_path(folder: str) -> str:
    """The decoder model file that `folder`/genai_config.json names (model.decoder.filename);
    UserError when the file or the entry is missing."""
    config = read_config(folder)
    name = config.get("model", {}).get("decoder", {}).get("filename")
    if not isinstance(name, str) or not name:
        raise UserError(f"{folder}/{CONFIG} names no model file (model.decoder.filename)")
    if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
        raise UserError(f"{folder}/{CONFIG}: the model file '{name}' is not inside the folder")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: the model file '{name}' that {CONFIG} names is missing")
    return path


def read_config(folder: str) -> dict:
    """`folder`/genai_config.json parsed; UserError when it is missing or not JSON."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise UserError(
            f"{folder} is a folder without {CONFIG}: give a .onnx file or an onnxruntime-genai "
            f"model folder"
        )
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None


def _check_output(folder: str, output: str | None) -> None:
    """UserError when `output` cannot become the new folder."""
    if not output:
        raise UserError(f"{folder} is a folder: name the output folder with -o OUT_FOLDER")
    if os.path.exists(output) and os.path.samefile(folder, output):
        raise UserError(f"-o {output} is the input folder; onnxfold never overwrites its input")
    inside = os.path.relpath(os.path.realpath(output), os.path.realpath(folder))
    if not inside.startswith(".."):
        raise UserError(f"-o {output} is inside the input folder, which onnxfold never modifies")
    if os.path.exists(output) and not (os.path.isdir(output) and not os.listdir(output)):
        raise UserError(f"-o {output} exists and is not an empty folder; name a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise UserError(f"-o {output}: directory '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"-o {output}: cannot write into '{parent}'")


def fold_folder(
    folder: str,
    output: str | None,
    config: FoldConfig | None = None,
    *,
    calib: str | None = None,
    data: str | None = None,
    validate: bool = True,
    reporter: Reporter | None = None,
    inputs: InputOptions | None = None,
    sensitivity: Sensitivity | None = None,
) -> FolderReport:
    """Fold the onnxruntime-genai folder `folder` into the new folder `output` (fold_file's options
    for the decoder model), written atomically once the folded model passed fold_file's checks and
    genai_config.json was rewritten from the folded graph (and onnxruntime-genai, when installed,
    loads it and generates a token). UserError (one line) for bad input, before any work."""
    config = config or FoldConfig()
    model = check_folder_request(folder, output, config, data, calib, inputs)
    logits = logits_name(folder)
    before = decoder_shapes(model, logits=logits)
    name = os.path.relpath(model, folder)  # where genai_config.json says it is
    options = dict(calib=calib, data=data, validate=validate, reporter=reporter, inputs=inputs)
    tmp = tempfile.mkdtemp(prefix=".onnxfold-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
        report = fold_file(
            model, os.path.join(tmp, name), config, **options, sensitivity=sensitivity
        )
        after = decoder_shapes(os.path.join(tmp, name), os.path.join(output, name), logits)
        write_config(folder, tmp, after)
        copied = copy_other_files(folder, tmp, model)
        check = genai_check(tmp)
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fold = dataclasses.replace(report, input=model, output=os.path.join(output, name))
    return FolderReport(folder, output, fold, before, after, copied, check)


def _move_into_place(tmp: str, output: str) -> None:
    """Rename the finished folder `tmp` to `output` (an empty folder there is replaced), with the
    permissions of a new folder (mkdtemp made it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if os.path.isdir(output):
        os.rmdir(output)  # empty (checked before any work)
    os.rename(tmp, output)


def decoder_shapes(
    model_path: str, name: str | None = None, logits: str | None = None
) -> DecoderShapes:
    """The DecoderShapes of the decoder graph at `model_path` (read without its external data;
    `logits`: the logits output's name, default the first output); UserError (naming the model
    `name`, default its path) when the graph has no GroupQueryAttention or its layers disagree
    (genai_config.json has one head count for all layers)."""
    model, name = onnx.load(model_path, load_external_data=False), name or model_path
    graph = model.graph
    attention = [n for n in graph.node if n.op_type == ATTENTION]
    if not attention:
        raise UserError(
            f"{name}: no {ATTENTION} node; onnxfold reads the head counts of an "
            f"onnxruntime-genai decoder from it"
        )
    heads = {(_attr(n, "num_heads"), _attr(n, "kv_num_heads")) for n in attention}
    tensors = gs.import_onnx(model).tensors()
    widths = {_projection(tensors, n.input[0])[1] for n in attention}
    if len(heads) != 1 or len(widths) != 1:
        raise UserError(
            f"{name}: the {ATTENTION} layers differ (num_heads, kv_num_heads: "
            f"{sorted(heads)}; query widths {sorted(widths)}); genai_config.json holds one head "
            f"count and size for all layers: fold the heads alike (no --layers / --allocate)"
        )
    (num_heads, kv_heads), (width,) = heads.pop(), widths
    packed = len(attention[0].input) < 2 or not attention[0].input[1]
    head_size = _head_size(width, num_heads + 2 * kv_heads if packed else num_heads, name)
    _check_caches(graph, attention, (kv_heads, head_size), name)
    hidden, vocab = _projection(tensors, logits or graph.output[0].name)
    return DecoderShapes(num_heads, kv_heads, head_size, hidden, len(attention), vocab)


def _head_size(width: int, heads: int, name: str) -> int:
    """The head size of a query projection `width` wide holding `heads` heads."""
    if width % heads:
        raise UserError(f"{name}: a query projection {width} wide does not hold {heads} heads")
    return width // heads


def _check_caches(graph: onnx.GraphProto, attention: list, kv: tuple[int, int], name: str) -> None:
    """UserError when a past_key / past_value graph input of the attention nodes declares other
    (kv heads, head size) than `kv` on axes 1 and 3 (symbolic dims pass)."""
    inputs = {i.name: i for i in graph.input}
    for node in attention:
        for past in [inputs[t] for t in node.input[3:5] if t in inputs]:
            sizes = [
                d.dim_value if d.HasField("dim_value") else None
                for d in past.type.tensor_type.shape.dim
            ]
            declared = (sizes[1], sizes[3]) if len(sizes) == 4 else tuple(sizes)
            if sizes and (len(sizes) != 4 or any(d not in (None, k) for d, k in zip(declared, kv))):
                raise UserError(
                    f"{name}: cache input '{past.name}' declares (kv heads, head size) "
                    f"{declared}, its {ATTENTION} {kv}"
                )


def logits_name(folder: str) -> str:
    """The decoder's logits output as `folder`/genai_config.json names it (default "logits")."""
    decoder = read_config(folder).get("model", {}).get("decoder", {})
    return decoder.get("outputs", {}).get("logits", "logits")


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(int(a.i) for a in node.attribute if a.name == name)


def _projection(tensors: dict[str, gs.Tensor], name: str) -> tuple[int, int]:
    """(in, out) widths of the MatMul / MatMulNBits / Gemm that computes tensor `name` (through a
    bias Add or a Cast); UserError when another op computes it."""
    layer = projection_layer(tensors[name]) if name in tensors else None
    widths = layer_widths(layer)
    if widths is None:
        found = layer.op if layer is not None else "a graph input"
        raise UserError(f"cannot read the width of '{name}': it is computed by {found}")
    return widths


def _check_config_matches(folder: str, shapes: DecoderShapes) -> None:
    """UserError when the input's genai_config.json disagrees with its own graph as read by
    decoder_shapes: then the rewrite could not be trusted either."""
    stated = _stated(read_config(folder))
    wrong = {k: (v, getattr(shapes, k)) for k, v in stated.items() if v != getattr(shapes, k)}
    if wrong:
        said = ", ".join(f"{k} {v} (graph: {g})" for k, (v, g) in wrong.items())
        raise UserError(f"{folder}/{CONFIG} disagrees with its model: {said}")


def _stated(config: dict) -> dict[str, int]:
    """The DecoderShapes fields genai_config.json states (decoder entries, model.vocab_size)."""
    model = config.get("model", {})
    places = {f.name: model.get("decoder", {}) for f in _FIELDS} | {"vocab_size": model}
    return {name: place[name] for name, place in places.items() if name in place}


def write_config(folder: str, out: str, shapes: DecoderShapes) -> None:
    """`folder`'s genai_config.json written into `out` with every DecoderShapes field it states
    (and the head counts and sizes, always) set to `shapes`."""
    config = read_config(folder)
    model = config.setdefault("model", {})
    decoder = model.setdefault("decoder", {})
    for f in _FIELDS:
        place = model if f.name == "vocab_size" else decoder
        if f.name in place or f.name not in ("vocab_size", "num_hidden_layers"):
            place[f.name] = getattr(shapes, f.name)
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=4)
        f.write("\n")


def copy_other_files(folder: str, out: str, model: str) -> list[str]:
    """Copy every file under `folder` but genai_config.json, the decoder model and its external
    data into `out`, in the same sub-folders (contents: links are followed); returns the relative
    paths copied."""
    here = os.path.relpath(os.path.dirname(model), folder)
    data = {os.path.normpath(os.path.join(here, name)) for name in _data_files(model)}
    skip = {CONFIG, os.path.relpath(model, folder), *data}
    copied = []
    for rel in _files_under(folder):
        if rel not in skip:
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(folder, rel), os.path.join(out, rel))
            copied.append(rel)
    return copied


def _files_under(folder: str) -> list[str]:
    """Relative paths of every file under `folder`, sorted (links to folders followed)."""
    found = []
    for here, _, files in os.walk(folder, followlinks=True):
        found += [os.path.relpath(os.path.join(here, f), folder) for f in files]
    return sorted(found)


def _data_files(model: str) -> set[str]:
    """Locations (relative to the model file's folder) of the external-data files it refers to."""
    proto = onnx.load(model, load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }


def genai_check(folder: str) -> str:
    """onnxruntime-genai loads the written `folder` and generates one token after the BOS token
    (GenaiRefused says why not); without onnxruntime-genai installed, says it was not checked."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "not loaded by onnxruntime-genai (not installed)"
    import onnxruntime_genai as og

    bos = read_config(folder).get("model", {}).get("bos_token_id", 0)
    bos = bos[0] if isinstance(bos, list) else bos
    try:
        model = og.Model(folder)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=2, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([[int(bos)]])
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
    except Exception as e:  # noqa: BLE001 - any refusal of the folder is the fold's failure
        raise GenaiRefused(f"onnxruntime-genai cannot run the folded folder: {e}") from None
    return f"onnxruntime-genai loads it and generates (token {token} after {bos})"
