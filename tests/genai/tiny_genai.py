"""onnxruntime-genai folders for the tests.

- genai_folder: a folder laid out as the genai model builder writes one (model.onnx + external
  data, genai_config.json, tokenizer files) around a small GroupQueryAttention decoder built in code
  with onnx alone (no onnxruntime-genai needed);
- save_tiny_llama + build_genai: a tiny LLaMA (random weights, helpers.tiny_llama_config) saved as
  a Hugging Face folder with a tiny BPE tokenizer trained in code, and the onnxruntime-genai model
  builder run on it offline. `python tests/genai/tiny_genai.py OUT_DIR` writes OUT_DIR/hf,
  OUT_DIR/tiny_fp32 and OUT_DIR/tiny_int4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import make_model, rand  # noqa: E402 - tests/ is on the path under pytest, not as a script

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD, FFN = 32, 32, 4, 2, 8, 48


def gqa_decoder(layers: int = 2) -> onnx.ModelProto:
    """A decoder as the genai builder lays one out (no rotary, no norms): input_ids -> embedding ->
    per layer [packed qkv MatMul -> GroupQueryAttention (past/present KV cache, seqlens_k and
    total_sequence_length from attention_mask) -> o_proj + residual -> Relu MLP + residual] ->
    lm_head -> logits (the last output)."""
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x0"]),
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["total"], keepdims=0),
        helper.make_node("Sub", ["total", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one_scalar"], ["t"]),
        helper.make_node("Cast", ["t"], ["total_len"], to=TensorProto.INT32),
    ]
    inits = {
        "embed": rand(VOCAB, HIDDEN, scale=1.0),
        "one": np.array([1], np.int64),
        "one_scalar": np.array(1, np.int64),
        "lm_head": rand(HIDDEN, VOCAB, seed=99),
    }
    kv = (TensorProto.FLOAT, ["batch_size", KV_HEADS, "past_sequence_length", HEAD])
    inputs = {
        "input_ids": (TensorProto.INT64, ["batch_size", "sequence_length"]),
        "attention_mask": (TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    }
    outputs = {}  # the caches first, logits last (the builder writes logits first)
    for i in range(layers):
        nodes += _layer(i, inits)
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = kv
            outputs[f"present.{i}.{kind}"] = ["batch_size", KV_HEADS, "total_sequence_length", HEAD]
    nodes.append(helper.make_node("MatMul", [f"x{layers}", "lm_head"], ["logits"]))
    outputs["logits"] = ["batch_size", "sequence_length", VOCAB]
    for n, node in enumerate(nodes):  # named as the builder names them
        node.name = f"/{node.op_type}_{n}"
    model = make_model(nodes, inits, inputs, outputs, opset=21, domains={"com.microsoft": 1})
    model.graph.value_info.extend(_hidden_shapes(layers))  # the builder declares them too
    return model


def _hidden_shapes(layers: int) -> list[onnx.ValueInfoProto]:
    """[batch_size, sequence_length, width] of every float activation (onnx's shape inference
    stops at GroupQueryAttention, a com.microsoft op)."""
    widths = {"x0": HIDDEN}
    for i in range(layers):
        p = f"layers.{i}."
        widths |= {p + "qkv_out": (HEADS + 2 * KV_HEADS) * HEAD, p + "attn": HEADS * HEAD}
        widths |= {p + n: HIDDEN for n in ("o_out", "r", "d")} | {f"x{i + 1}": HIDDEN}
        widths |= {p + "h": FFN, p + "a": FFN}
    shape = ["batch_size", "sequence_length"]
    return [
        helper.make_tensor_value_info(k, TensorProto.FLOAT, shape + [w]) for k, w in widths.items()
    ]


def _layer(i: int, inits: dict) -> list:
    """Layer i's nodes (x{i} -> x{i + 1}); its weights are added to `inits`."""
    p = f"layers.{i}."
    inits[p + "qkv"] = rand(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD, seed=10 * i + 1)
    inits[p + "o"] = rand(HEADS * HEAD, HIDDEN, seed=10 * i + 2)
    inits[p + "up"] = rand(HIDDEN, FFN, seed=10 * i + 3)
    inits[p + "down"] = rand(FFN, HIDDEN, seed=10 * i + 4)
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present = [f"present.{i}.key", f"present.{i}.value"]
    return [
        helper.make_node("MatMul", [f"x{i}", p + "qkv"], [p + "qkv_out"]),
        helper.make_node(
            "GroupQueryAttention",
            [p + "qkv_out", "", "", *past, "seqlens_k", "total_len"],
            [p + "attn", *present],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV_HEADS,
        ),
        helper.make_node("MatMul", [p + "attn", p + "o"], [p + "o_out"]),
        helper.make_node("Add", [f"x{i}", p + "o_out"], [p + "r"]),
        helper.make_node("MatMul", [p + "r", p + "up"], [p + "h"]),
        helper.make_node("Relu", [p + "h"], [p + "a"]),
        helper.make_node("MatMul", [p + "a", p + "down"], [p + "d"]),
        helper.make_node("Add", [p + "r", p + "d"], [f"x{i + 1}"]),
    ]


def genai_config(layers: int = 2, **decoder) -> dict:
    """genai_config.json as the builder writes it for gqa_decoder(layers); `decoder` entries
    replace or add fields of model.decoder."""
    return {
        "model": {
            "bos_token_id": 1,
            "context_length": 64,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": HEAD,
                "hidden_size": HIDDEN,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": HEADS,
                "num_hidden_layers": layers,
                "num_key_value_heads": KV_HEADS,
                **decoder,
            },
            "eos_token_id": 2,
            "pad_token_id": 2,
            "type": "llama",
            "vocab_size": VOCAB,
        },
        "search": {"max_length": 64, "do_sample": False},
    }


def genai_folder(folder, layers: int = 2, filename: str = "model.onnx", **decoder) -> str:
    """A genai folder at `folder` (created): gqa_decoder(layers) as `filename` + its .data file,
    genai_config.json (genai_config's `decoder` fields), two tokenizer files; returns it."""
    model = os.path.join(folder, filename)
    os.makedirs(os.path.dirname(model), exist_ok=True)
    onnx.save_model(
        gqa_decoder(layers),
        model,
        save_as_external_data=True,
        location=os.path.basename(filename) + ".data",
        size_threshold=1024,
    )
    with open(os.path.join(folder, "genai_config.json"), "w") as f:
        json.dump(genai_config(layers, filename=filename, **decoder), f, indent=4)
    for name, text in (("tokenizer.json", '{"model": {}}'), ("tokenizer_config.json", "{}")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return str(folder)


def token_inputs(path: str, layers: int = 2, kv_heads: int = KV_HEADS, head: int = HEAD) -> str:
    """An .npz of real-looking decoder inputs at `path`: 4 sequences of 12 token ids, attention
    mask of ones, empty past caches (the prompt's first step); returns the path."""
    rng = np.random.default_rng(0)
    arrays = {
        "input_ids": rng.integers(3, VOCAB, (4, 12)).astype(np.int64),
        "attention_mask": np.ones((4, 12), np.int64),
    }
    for i in range(layers):
        for kind in ("key", "value"):
            arrays[f"past_key_values.{i}.{kind}"] = np.zeros((4, kv_heads, 0, head), np.float32)
    np.savez(path, **arrays)
    return path


TEXT = (
    "the quick brown fox jumps over the lazy dog. a tiny model folds its channels and "
    "generates a few tokens. onnx runtime genai loads the folder and runs the graph. "
) * 8
SPECIALS = ["<unk>", "<s>", "</s>"]


def tiny_tokenizer(vocab_size: int):
    """A BPE tokenizer of `vocab_size` tokens trained on TEXT (GPT-2-style byte level, only the
    bytes TEXT uses), as a transformers PreTrainedTokenizerFast with <s>, </s> and <unk>."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.train_from_iterator([TEXT], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_llama(folder: str, seed: int = 0) -> str:
    """A random-weight tiny LLaMA and its tokenizer saved in `folder` (created); returns it."""
    import torch
    import transformers
    from helpers import tiny_llama_config

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(128)
    config = tiny_llama_config(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_genai(hf_dir: str, out_dir: str, precision: str = "fp32", timeout: float = 300) -> str:
    """Run the onnxruntime-genai model builder (CPU, `precision`) on the HF folder `hf_dir`,
    offline; returns `out_dir`. CalledProcessError (with the builder's output) when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir]
    command += ["-o", out_dir, "-p", precision, "-e", "cpu", "-c", out_dir + ".cache"]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=timeout)
    return out_dir


if __name__ == "__main__":
    root = sys.argv[1]
    hf = save_tiny_llama(os.path.join(root, "hf"))
    for precision in ("fp32", "int4"):
        print(build_genai(hf, os.path.join(root, f"tiny_{precision}"), precision))
