"""Export the graph to ONNX, check it, and write it atomically (temporary name, then rename).

External data is used when the model is over 2 GB or the input came with it. The output replaces the target
only after onnx.checker (and, through `validate_file`, onnxruntime) accepted it.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import onnx
import onnx_graphsurgeon as gs

from .errors import UserError

TWO_GB = 2**31 - 2**20


def to_proto(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """gs.Graph -> ModelProto with shapes re-inferred (strictly: a shape error is a bug worth seeing)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    if model.ByteSize() < TWO_GB:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    return model


def write_atomic(model: onnx.ModelProto, path: str, external: bool, check=None) -> int:
    """Write `model` to `path` (plus `path`.data when external); `check(tmp_path)` runs before the rename.

    Returns the bytes written (model plus data file).
    """
    external = external or model.ByteSize() >= TWO_GB
    target_dir = os.path.dirname(os.path.abspath(path)) or "."
    if not os.access(target_dir, os.W_OK):
        raise UserError(f"{path}: cannot write into '{target_dir}'")
    name = os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=".onnxfold-", dir=target_dir)
    try:
        tmp_model = os.path.join(tmp, name)
        data_name = name + ".data"
        onnx.save_model(model, tmp_model, save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        onnx.checker.check_model(tmp_model, full_check=True)
        if check is not None:
            check(tmp_model)
        written = [f for f in os.listdir(tmp)]
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in written)
        for f in sorted(written, key=lambda f: f == name):  # data first, the model file last
            os.replace(os.path.join(tmp, f), os.path.join(target_dir, f))
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
