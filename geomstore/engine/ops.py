"""The operator table: what every core ATen operator means for the partition.

Models are lowered to core ATen operators (see :mod:`geomstore.engine.lower`), and each
operator that touches a value depending on the input is classified here, once:

- ``affine``: an affine function of its input-dependent arguments (views, slicing,
  padding, pooling by averages, sums, convolutions and matrix products with constant
  weights, batch norm in eval mode, upsampling, ...). Run as it is.
- ``one-input``: multilinear operators (``mul``, ``div``, ``mm``, ``convolution``, ...)
  that are affine only when at most one argument depends on the input (``div``: only the
  numerator). A product of two input-dependent tensors is refused.
- ``static-index``: indexing and gathering, affine when the indices are constants.
- ``piecewise``: piecewise linear; rewritten into the engine's units (see ``how``).
- ``refused``: not piecewise linear (GELU, SiLU, sigmoid, tanh, normalisation over
  features, softmax inside the network, attention, ...): the partition is refused before
  any computation, naming the operator and where it sits in the model.

Operators whose arguments are all constant (parameters, ``arange``, ``full``, ...) are
evaluated once and never classified: they are constants.

Examples
--------
>>> rule("aten.relu.default").kind
'piecewise'
>>> rule("aten.gelu.default").kind
'refused'
>>> rule("aten.no_such_op.default").kind
'refused'
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MAX_LIKE", "TABLE", "OpRule", "Treatment", "markdown_table", "op_name", "rule"]

Treatment = Literal["affine", "one-input", "static-index", "piecewise", "refused"]


@dataclass(frozen=True)
class OpRule:
    """How one operator is treated; ``how`` is the one-line explanation shown in the docs."""

    kind: Treatment
    how: str


def _rules(kind: Treatment, how: str, *names: str) -> dict[str, OpRule]:
    return {n: OpRule(kind, how) for n in names}


# every max over a fixed set of elements: rewritten into one max unit per output element
MAX_REDUCTIONS = ("aten.amax", "aten.amin", "aten.max", "aten.min")
MAX_POOLS = tuple(
    f"aten.{kind}max_pool{d}d{suffix}"
    for kind, suffix in (("", ""), ("", "_with_indices"), ("adaptive_", ""))
    for d in (1, 2, 3)
)
MAX_LIKE = frozenset(MAX_REDUCTIONS + MAX_POOLS)

TABLE: dict[str, OpRule] = {
    # shape and layout: affine (each output element is one input element or a constant)
    **_rules(
        "affine",
        "view, reshape or layout change",
        "aten.view",
        "aten._unsafe_view",
        "aten.reshape",
        "aten.permute",
        "aten.t",
        "aten.transpose",
        "aten.expand",
        "aten.squeeze",
        "aten.unsqueeze",
        "aten.flatten",
        "aten.unflatten",
        "aten.clone",
        "aten.alias",
        "aten.contiguous",
        "aten.detach",
        "aten.lift_fresh_copy",
        "aten.view_copy",
        "aten.expand_copy",
        "aten.permute_copy",
        "aten.unsqueeze_copy",
        "aten.squeeze_copy",
        "aten.pixel_shuffle",
        "aten.pixel_unshuffle",
        "aten.channel_shuffle",
    ),
    **_rules(
        "affine",
        "slicing, selection, concatenation, flips and rolls",
        "aten.slice",
        "aten.select",
        "aten.narrow",
        "aten.split",
        "aten.split_with_sizes",
        "aten.chunk",
        "aten.unbind",
        "aten.cat",
        "aten.stack",
        "aten.flip",
        "aten.roll",
        "aten.repeat",
        "aten.tile",
        "aten.diagonal",
        "aten.tril",
        "aten.triu",
    ),
    **_rules(
        "affine",
        "padding with a constant, reflection or replication",
        "aten.constant_pad_nd",
        "aten.pad",
        "aten.reflection_pad1d",
        "aten.reflection_pad2d",
        "aten.reflection_pad3d",
        "aten.replication_pad1d",
        "aten.replication_pad2d",
        "aten.replication_pad3d",
    ),
    **_rules(
        "affine",
        "sums and means over dimensions (global average pooling)",
        "aten.sum",
        "aten.mean",
        "aten.cumsum",
    ),
    **_rules(
        "affine",
        "average pooling, adaptive included",
        "aten.avg_pool1d",
        "aten.avg_pool2d",
        "aten.avg_pool3d",
        "aten._adaptive_avg_pool2d",
        "aten._adaptive_avg_pool3d",
        "aten.adaptive_avg_pool1d",
    ),
    **_rules(
        "affine",
        "upsampling (nearest, linear, bilinear, bicubic, trilinear: fixed weights)",
        "aten.upsample_nearest1d",
        "aten.upsample_nearest2d",
        "aten.upsample_nearest3d",
        "aten._upsample_nearest_exact1d",
        "aten._upsample_nearest_exact2d",
        "aten._upsample_nearest_exact3d",
        "aten.upsample_linear1d",
        "aten.upsample_bilinear2d",
        "aten._upsample_bilinear2d_aa",
        "aten.upsample_bicubic2d",
        "aten.upsample_trilinear3d",
    ),
    **_rules(
        "affine",
        "addition, subtraction and negation of tensors",
        "aten.add",
        "aten.sub",
        "aten.rsub",
        "aten.neg",
        "aten.positive",
    ),
    **_rules(
        "affine",
        "batch norm with running statistics (eval mode; training mode is refused)",
        "aten._native_batch_norm_legit_no_training",
        "aten.native_batch_norm",
        "aten._native_batch_norm_legit",
        "aten.batch_norm",
    ),
    **_rules(
        "affine",
        "dropout in eval mode (identity; training mode is refused)",
        "aten.dropout",
        "aten.native_dropout",
    ),
    **_rules(
        "affine",
        "a copy in float64 (a cast to another dtype is refused: it would round)",
        "aten._to_copy",
        "aten.to",
        "aten._assert_tensor_metadata",
    ),
    **_rules(
        "affine",
        "a constant shaped like its argument",
        "aten.zeros_like",
        "aten.ones_like",
        "aten.full_like",
        "aten.empty_like",
        "aten.new_zeros",
        "aten.new_ones",
        "aten.new_full",
        "aten.new_empty",
        "aten.sym_size",
        "aten.sym_numel",
        "aten.sym_stride",
    ),
    "getitem": OpRule("affine", "an element of a tuple result (not the indices of a max)"),
    # multilinear: affine when one argument is constant
    **_rules(
        "one-input",
        "product with constant weights (matrix products, convolutions of any dimension, "
        "stride, dilation, groups, transposed)",
        "aten.mm",
        "aten.addmm",
        "aten.bmm",
        "aten.baddbmm",
        "aten.matmul",
        "aten.linear",
        "aten.convolution",
        "aten.conv1d",
        "aten.conv2d",
        "aten.conv3d",
        "aten.conv_transpose1d",
        "aten.conv_transpose2d",
        "aten.conv_transpose3d",
        "aten._convolution",
        "aten.einsum",
        "aten.addcmul",
    ),
    **_rules(
        "one-input",
        "multiplication or division by a constant (a quotient's denominator must be constant)",
        "aten.mul",
        "aten.div",
    ),
    **_rules(
        "static-index",
        "indexing or gathering with constant indices",
        "aten.index",
        "aten._unsafe_index",
        "aten.index_select",
        "aten.gather",
        "aten.take",
        "aten.where",
        "aten.masked_fill",
        "aten.embedding",
    ),
    # piecewise linear
    **_rules("piecewise", "ReLU: one line per unit", "aten.relu", "aten.relu_"),
    **_rules("piecewise", "leaky ReLU: one line per unit", "aten.leaky_relu"),
    **_rules(
        "piecewise",
        "PReLU (constant slopes, per channel or shared): one line per unit",
        "aten.prelu",
        "aten._prelu_kernel",
    ),
    **_rules("piecewise", "absolute value: one line per unit", "aten.abs"),
    **_rules(
        "piecewise",
        "hard-tanh / ReLU6: two lines per unit (three states)",
        "aten.hardtanh",
        "aten.relu6",
    ),
    **_rules(
        "piecewise",
        "clamp / clip with both bounds: as hard-tanh; with one bound: a shifted ReLU",
        "aten.clamp",
        "aten.clip",
        "aten.clamp_min",
        "aten.clamp_max",
    ),
    **_rules(
        "piecewise",
        "elementwise maximum / minimum of two tensors: b + relu(a - b), a - relu(a - b)",
        "aten.maximum",
        "aten.minimum",
        "aten.fmax",
        "aten.fmin",
    ),
    **_rules(
        "piecewise",
        "threshold(x, t, t) = max(x, t): a shifted ReLU (other values are discontinuous)",
        "aten.threshold",
    ),
    **_rules(
        "piecewise",
        "max / min over dimensions (maxout): one unit per output, splitting by the pairwise "
        "comparisons of its candidates",
        *MAX_REDUCTIONS,
    ),
    **_rules(
        "piecewise",
        "max pooling 1-3-D, adaptive included, ceil mode included: one unit per window",
        *MAX_POOLS,
    ),
    # refused with a reason
    **_rules(
        "refused",
        "a smooth activation (use ReLU-family activations)",
        "aten.gelu",
        "aten.silu",
        "aten.sigmoid",
        "aten.tanh",
        "aten.softplus",
        "aten.elu",
        "aten.selu",
        "aten.celu",
        "aten.mish",
        "aten.hardswish",
        "aten.hardsigmoid",
        "aten.log_sigmoid_forward",
        "aten.exp",
        "aten.log",
        "aten.erf",
        "aten.pow",
        "aten.sqrt",
        "aten.rsqrt",
        "aten.reciprocal",
        "aten.sin",
        "aten.cos",
    ),
    **_rules(
        "refused",
        "normalisation over features (depends on the input's statistics)",
        "aten.native_layer_norm",
        "aten.layer_norm",
        "aten.native_group_norm",
        "aten.group_norm",
        "aten.var",
        "aten.std",
        "aten.var_mean",
        "aten.rms_norm",
        "aten._fused_rms_norm",
    ),
    **_rules(
        "refused",
        "softmax (accepted only as the model's last operation, with logits=True)",
        "aten._softmax",
        "aten._log_softmax",
        "aten.softmax",
        "aten.log_softmax",
    ),
    **_rules(
        "refused",
        "attention (products of two input-dependent tensors)",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_flash_attention",
        "aten.scaled_dot_product_attention",
    ),
    **_rules(
        "refused",
        "a comparison or rounding of input-dependent values (data-dependent control flow)",
        "aten.gt",
        "aten.ge",
        "aten.lt",
        "aten.le",
        "aten.eq",
        "aten.ne",
        "aten.sign",
        "aten.round",
        "aten.floor",
        "aten.ceil",
        "aten.argmax",
        "aten.argmin",
        "aten.sort",
        "aten.topk",
        "aten.logical_and",
        "aten.logical_or",
        "aten.logical_not",
    ),
}

_UNKNOWN = OpRule("refused", "not in geomstore's operator table")


def op_name(target: Any) -> str:
    """The table key of an FX node target: ``aten.relu.default``, ``getitem``, ...

    Examples
    --------
    >>> import torch
    >>> op_name(torch.ops.aten.relu.default)
    'aten.relu.default'
    """
    if target is operator.getitem:
        return "getitem"
    name = str(target)
    return name if name.startswith(("aten.", "prims.")) else getattr(target, "__name__", name)


def rule(name: str) -> OpRule:
    """The rule of an operator (``aten.max.dim``) or its packet (``aten.max``)."""
    if name in TABLE:
        return TABLE[name]
    packet = ".".join(name.split(".")[:2])
    return TABLE.get(packet, _UNKNOWN)


def markdown_table() -> str:
    """The operator table as Markdown, grouped by treatment (docs/operators.md)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, r in TABLE.items():
        groups.setdefault((r.kind, r.how), []).append(name)
    order = ["piecewise", "affine", "one-input", "static-index", "refused"]
    lines = ["| treatment | operators | how |", "| --- | --- | --- |"]
    for (kind, how), names in sorted(groups.items(), key=lambda g: order.index(g[0][0])):
        ops = ", ".join(f"`{n}`" for n in names)
        lines.append(f"| {kind} | {ops} | {how} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m geomstore.engine.ops > table for docs/operators.md
    print(markdown_table(), end="")
