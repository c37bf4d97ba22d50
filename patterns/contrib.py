"""onnxruntime's contrib ops (com.microsoft) that the transformers optimizer writes into MLPs
(DESIGN §3): BiasGelu(A, bias) = Gelu(A + bias) and FastGelu(X, [bias]) couple a per-channel bias
like Add; Gelu and QuickGelu(X, alpha) pass channels through. Keys are "domain:op"."""

from __future__ import annotations

from .elementwise import binary, unary

DOMAIN = "com.microsoft"

RULES = {
    f"{DOMAIN}:BiasGelu": binary,
    f"{DOMAIN}:FastGelu": binary,
    f"{DOMAIN}:Gelu": unary,
    f"{DOMAIN}:QuickGelu": unary,
}
