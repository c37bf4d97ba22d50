"""Channel rules per op family: one small function per op type, in one explicit registry.

A rule receives the node and the Discovery state, reads its inputs' channel layouts, and records
what the op does with channels: produce a new group, pass channels through, couple groups, add
member slices, or freeze groups with a reason. Ops without a rule are boundaries (their tensors'
groups are frozen). Ops of the default domain are keyed by their type, others by "domain:type"."""

from . import (
    attention,
    contrib,
    control_flow,
    elementwise,
    linear,
    norm,
    quant,
    recurrent,
    reshape,
    shape_ops,
    split,
)

RULES = {
    **linear.RULES,
    **elementwise.RULES,
    **norm.RULES,
    **shape_ops.RULES,
    **reshape.RULES,
    **split.RULES,
    **recurrent.RULES,
    **control_flow.RULES,
    **contrib.RULES,  # keyed "domain:op"
    **quant.RULES,
    **attention.RULES,
}

__all__ = ["RULES"]
