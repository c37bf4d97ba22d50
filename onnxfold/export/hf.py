"""Export a Hugging Face model folder to ONNX for folding (needs torch and transformers).

`export_hf(model_dir, output)`: causal LMs give `logits` (batch, seq, vocab), other models
`last_hidden_state`; torch.onnx's legacy exporter, opset 18, no KV cache, eager attention, dynamic
batch and sequence axes. `with_past=True` calls optimum-onnx instead (task
text-generation-with-past) and writes its decoder with KV cache: inputs input_ids, attention_mask
[batch, past + seq], position_ids and past_key_values.N.key/value [batch, kv_heads, past, head_dim];
outputs logits and present.N.key/value. Loads from the folder only (no hub access)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings

from ..errors import ConfigError, UserError

OPSET = 18


def export_hf(model_dir: str, output: str, opset: int = OPSET, with_past: bool = False) -> str:
    """Export the model in `model_dir` to `output` (written atomically); returns the output's output
    name."""
    if with_past:
        return export_with_past(model_dir, output, opset)
    torch, transformers = _imports()
    _check_folder(model_dir)
    model, causal = _load(transformers, model_dir)
    wrapper = _Wrapper(model, causal)
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    example = torch.randint(0, min(vocab, 100), (1, 8))
    out_name = "logits" if causal else "last_hidden_state"
    target_dir = os.path.dirname(os.path.abspath(output))
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        tmp_path = os.path.join(tmp, os.path.basename(output))
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                torch.no_grad(),
            ):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    (example,),
                    tmp_path,
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input_ids"],
                    output_names=[out_name],
                    dynamic_axes={
                        "input_ids": {0: "batch", 1: "sequence"},
                        out_name: {0: "batch", 1: "sequence"},
                    },
                )
        # e.g. transformers 4.x masks built with vmap, which the legacy exporter rejects
        except RuntimeError as e:
            raise UserError(
                f"{model_dir}: torch.onnx cannot export it with transformers "
                f"{transformers.__version__} ({str(e).splitlines()[0][:120]}); this export is "
                "tested with transformers 5.x, the export with past with optimum-onnx"
            ) from None
        if causal and _tied(model):
            tmp_path = _retie_embeddings(tmp_path, os.path.join(tmp, "retied"))
        folder = os.path.dirname(tmp_path)
        for name in os.listdir(folder):
            if os.path.isfile(os.path.join(folder, name)):
                os.replace(os.path.join(folder, name), os.path.join(target_dir, name))
    return out_name


def _tied(model) -> bool:
    """True if the LM head reuses the input embedding matrix (tie_word_embeddings)."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and table is not None and head.weight is table.weight


def _retie_embeddings(path: str, folder: str) -> str:
    """The legacy exporter writes a tied LM head as a second, transposed copy of the embedding table
    (V x h more parameters in the file). Give the MatMul `Transpose(table)` instead and drop the
    copy; the model is written to `folder` (external data if large); returns its path (`path` itself
    if no copy is found)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    skeleton = onnx.load(path, load_external_data=False)
    shapes = {t.name: list(t.dims) for t in skeleton.graph.initializer}
    tables = {
        n.input[0] for n in skeleton.graph.node if n.op_type == "Gather" and n.input[0] in shapes
    }
    pairs = [
        (n.input[1], t)
        for n in skeleton.graph.node
        if n.op_type == "MatMul" and n.input[1] in shapes
        for t in tables
        if len(shapes[t]) == 2 and shapes[n.input[1]] == shapes[t][::-1]
    ]
    if not pairs:
        return path
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    users = [name for n in model.graph.node for name in n.input]
    for copy, table in pairs:
        if users.count(copy) != 1 or not np.array_equal(
            numpy_helper.to_array(inits[copy]), numpy_helper.to_array(inits[table]).T
        ):
            continue
        nodes = list(model.graph.node)
        matmul = next(
            i for i, n in enumerate(nodes) if n.op_type == "MatMul" and n.input[1] == copy
        )
        transposed = copy + "_tied"
        nodes[matmul].input[1] = transposed
        nodes.insert(
            matmul,
            helper.make_node("Transpose", [table], [transposed], perm=[1, 0], name=transposed),
        )
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.remove(inits[copy])
        os.makedirs(folder)
        out = os.path.join(folder, os.path.basename(path))
        _save(model, out, os.path.basename(path) + ".data")
        return out
    return path


def export_with_past(model_dir: str, output: str, opset: int = OPSET) -> str:
    """A causal LM with KV cache through optimum-onnx (text-generation-with-past) -> `output`;
    returns 'logits'. Models over 2 GB are written with external data (OUTPUT.data)."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise ConfigError(
            "with_past",
            None,
            "needs optimum-onnx, which pins transformers<4.58: install it in "
            'its own environment (pip install "onnxfold[optimum]")',
        ) from None
    _check_folder(model_dir)
    import onnx

    target_dir = os.path.dirname(os.path.abspath(output))
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        model_dir = with_legacy_rope(model_dir, os.path.join(tmp, "source"))
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                main_export(
                    model_dir,
                    tmp,
                    task="text-generation-with-past",
                    opset=opset,
                    local_files_only=True,
                    do_validation=False,
                )
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"{model_dir}: optimum cannot export it with past ({str(e).splitlines()[0][:200]})"
            ) from None
        # optimum's name; weights read in if external
        model = onnx.load(os.path.join(tmp, "model.onnx"))
        data = os.path.basename(output) + ".data"
        if _save(model, os.path.join(tmp, "out.onnx"), data):
            os.replace(os.path.join(tmp, data), os.path.join(target_dir, data))
        os.replace(os.path.join(tmp, "out.onnx"), output)
    return "logits"


def with_legacy_rope(model_dir: str, scratch: str) -> str:
    """The folder to read `model_dir` from with transformers < 4.58 (optimum-onnx's): transformers
    5.x saves the rotary settings as `rope_parameters` ({"rope_theta": ..., "rope_type": ...}),
    which 4.57 does not read: it silently takes rope_theta 10000 (SmolLM2 needs 100000: a wrong
    model, 69.5% top-1 agreement). When config.json has rope_parameters and no rope_theta, returns
    `scratch`, a folder of links to the model's files with config.json rewritten to carry
    rope_theta (and rope_scaling for other rope types); otherwise `model_dir` itself."""
    import json

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return model_dir
    os.makedirs(scratch)
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(scratch, name))
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    with open(os.path.join(scratch, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return scratch


def _save(model, path: str, data: str) -> bool:
    """Write `model` to `path`, its weights to `data` (beside it) when protobuf's 2 GB would not
    hold them; returns whether they went to `data`."""
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) >= 2**31 - 2**24
    onnx.save(model, path, save_as_external_data=large, location=data)
    return large


def _check_folder(model_dir: str) -> None:
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir}: not a Hugging Face model folder (no config.json)")


def _imports():
    try:
        import torch
        import transformers
    except ImportError:
        raise UserError(
            "onnxfold export hf needs torch and transformers: pip install torch transformers"
        ) from None
    return torch, transformers


def _load(transformers, model_dir: str):
    """(model in eval mode, is_causal_lm) from a local folder, float32, eager attention."""
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    causal = any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or [])
    )
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise UserError(
            f"{model_dir}: cannot load the model ({str(e).splitlines()[0][:200]})"
        ) from None
    return model.float().eval(), causal


def _wrapper_class():
    import torch

    class Wrapper(torch.nn.Module):
        """input_ids -> logits (causal LM) or last_hidden_state, attention mask of ones, no KV
        cache."""

        def __init__(self, model, causal: bool):
            super().__init__()
            self.model, self.causal = model, causal

        def forward(self, input_ids):
            kwargs = {"use_cache": False} if self.causal else {}
            out = self.model(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
            )
            return out.logits if self.causal else out.last_hidden_state

    return Wrapper


def _Wrapper(model, causal: bool):  # noqa: N802 - builds the torch module lazily (torch is optional)
    return _wrapper_class()(model, causal)
