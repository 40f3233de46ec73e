"""The canonical form of a traced graph: every input-dependent operator judged, the
piecewise-linear ones rewritten into the engine's unit kinds.

:func:`geomstore.engine.lower.lower` traces a model with ``make_fx`` and hands the graph
to :class:`Canon`, one pass that propagates a sample's values through it (shapes,
constants), strips a trailing softmax when asked, judges each node that depends on the
input by the operator table (:mod:`geomstore.engine.ops`) and rewrites ``clamp``,
``maximum``/``minimum``, max pooling and reductions as described in
:mod:`geomstore.engine.lower`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx
from torch import Tensor

from geomstore.engine.ops import MAX_LIKE as _MAX_LIKE
from geomstore.engine.ops import op_name, rule
from geomstore.engine.refusal import Refusal, quiet
from geomstore.engine.windows import (
    adaptive_candidates,
    pool_candidates,
    reduce_candidates,
    windows_max,
)

__all__ = ["SOFTMAX", "Canon"]

A = torch.ops.aten
_BATCH_SHAPED = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.expand", "aten.view_copy"}
SOFTMAX = {"aten._softmax", "aten._log_softmax", "aten.softmax", "aten.log_softmax"}


class Canon:
    """One pass over the traced graph: judge each input-dependent node, rewrite PL ones."""

    def __init__(self, gm: torch.fx.GraphModule, refuse: Refusal, *, logits: bool) -> None:
        self.gm = gm
        self.g = gm.graph
        self.refuse = refuse
        self.logits = logits
        self.dep: set[torch.fx.Node] = set()
        self.vals: dict[torch.fx.Node, Any] = {}
        self.n_buffers = 0
        self.trailing: torch.fx.Node | None = None

    def run(self, x1: Tensor) -> None:
        self.g.eliminate_dead_code()  # e.g. the unused indices of a max pooling
        self._propagate(x1)
        self._strip_softmax()
        for node in list(self.g.nodes):
            if node.op != "call_function" or node not in self.dep:
                continue
            self._judge(node)

    # values of every node on one sample (shapes, constants) --------------------------------
    def _propagate(self, x1: Tensor) -> None:
        env: dict[torch.fx.Node, Any] = {}
        for node in self.g.nodes:
            if node.op == "placeholder":
                env[node] = x1
                self.dep.add(node)
            elif node.op == "get_attr":
                env[node] = self._attr(str(node.target))
            elif node.op == "call_function":
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
                with torch.no_grad(), quiet():
                    env[node] = node.target(*args, **kwargs)
                if any(a in self.dep for a in node.all_input_nodes):
                    self.dep.add(node)
        self.vals = env

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _shape(self, node: Any) -> tuple[int, ...]:
        v = self.vals[node]
        return tuple(v.shape)

    # the output's softmax --------------------------------------------------------------------
    def _strip_softmax(self) -> None:
        out = next(n for n in self.g.nodes if n.op == "output")
        res = out.args[0]
        first = res[0] if isinstance(res, (tuple, list)) else res
        while isinstance(first, torch.fx.Node) and op_name(first.target).startswith(
            ("aten.detach", "aten.alias", "aten.clone")
        ):
            first = first.args[0]
        if not isinstance(first, torch.fx.Node):
            return
        packet = ".".join(op_name(first.target).split(".")[:2])
        if packet in SOFTMAX:
            self.trailing = first
            if self.logits:
                new = first.args[0]
                out.args = ((new, *res[1:]),) if isinstance(res, (tuple, list)) else (new,)
                self.g.eliminate_dead_code()
                self.gm._gs_stripped = True  # type: ignore[assignment]
                # what was stripped, for checks against the model's own output
                self.gm._gs_stripped_op = (packet, first.args[1])  # type: ignore[assignment]

    # judging ---------------------------------------------------------------------------------
    def _dep_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), found.append)
        return [a for a in found if a in self.dep]

    def _judge(self, node: torch.fx.Node) -> None:
        name = op_name(node.target)
        packet = ".".join(name.split(".")[:2]) if name.startswith("aten.") else name
        r = rule(name)
        if r.kind == "refused":
            fix = ""
            if node is self.trailing:
                fix = (
                    "pass logits=True (--logits) to partition the logits: the regions and "
                    "decision boundary are those of the logits, which softmax does not change"
                )
            elif packet == "aten.copy_":  # what a functionalized trace leaves of x.mul_(2)
                raise self.refuse(
                    node,
                    "the forward writes in place into its input",
                    "write the out-of-place form (x = x * 2, not x.mul_(2)): geomstore "
                    "evaluates many inputs through one graph",
                )
            elif r.how.startswith("not in"):
                fix = "geomstore partitions networks of affine and piecewise-linear operators"
            raise self.refuse(node, r.how, fix)
        deps = self._dep_args(node)
        if r.kind == "one-input":
            if len(deps) > 1 or (packet == "aten.div" and node.args[0] not in self.dep):
                raise self.refuse(
                    node,
                    "a product of two input-dependent tensors",
                    "only products with constant weights are affine",
                )
        elif r.kind == "static-index":
            self._static_index(node, packet)
        elif r.kind == "affine":
            self._affine(node, packet)
        else:
            self._piecewise(node, packet, name)

    def _static_index(self, node: torch.fx.Node, packet: str) -> None:
        if packet == "aten.where":
            bad = node.args[0] in self.dep
        elif packet == "aten.embedding":
            bad = True
        else:
            bad = any(a in self.dep for a in self._dep_args(node) if a is not node.args[0])
        if bad:
            raise self.refuse(
                node,
                "indexing or selecting with input-dependent indices or conditions",
            )

    def _affine(self, node: torch.fx.Node, packet: str) -> None:
        args: Any = node.args
        if packet in ("aten.native_batch_norm", "aten._native_batch_norm_legit") and (
            len(args) > 5 and args[5]
        ):
            raise self.refuse(node, "batch norm in training mode", "call model.eval() first")
        if packet == "aten.native_dropout" and len(args) > 2 and args[2]:
            raise self.refuse(node, "dropout in training mode", "call model.eval() first")
        if packet in ("aten._to_copy", "aten.to"):
            dtype = node.kwargs.get("dtype")
            if dtype is not None and dtype != torch.float64:
                raise self.refuse(
                    node,
                    f"a cast to {dtype} would round the values",
                    "remove the cast; geomstore computes in float64",
                )
        if packet == "getitem":
            src = args[0]
            if (
                isinstance(src, torch.fx.Node)
                and op_name(src.target).rsplit(".", 1)[0] in _MAX_LIKE
                and args[1] == 1
            ):
                raise self.refuse(src, "the indices of a max are used")
        if packet in _BATCH_SHAPED and len(args) > 1 and isinstance(args[1], (list, tuple)):
            shape = list(args[1])
            if shape and shape[0] == 1 and self._shape(node)[0] == 1:
                # the traced batch of one becomes any batch; an inferred -1 elsewhere takes
                # its traced size, since only one dimension can be inferred
                shape = [-1, *self._shape(node)[1:]]
                node.args = (args[0], shape, *args[2:])

    # piecewise-linear rewrites ---------------------------------------------------------------
    def _call(self, target: Any, *args: Any) -> torch.fx.Node:
        new = self.g.call_function(target, tuple(args))
        if any(a in self.dep for a in new.all_input_nodes):
            self.dep.add(new)
        return new

    def _replace(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        self.vals[new] = self.vals.get(node)
        node.replace_all_uses_with(new)
        self.g.erase_node(node)

    def _piecewise(self, node: torch.fx.Node, packet: str, name: str) -> None:
        args: list[Any] = list(node.args)
        kw: dict[str, Any] = dict(node.kwargs)
        x = args[0]
        with self.g.inserting_before(node):
            if packet in ("aten.relu", "aten.relu_"):
                if packet == "aten.relu_":
                    self._replace(node, self._call(A.relu.default, x))
            elif packet in ("aten.leaky_relu", "aten.abs", "aten.hardtanh"):
                return
            elif packet in ("aten.prelu", "aten._prelu_kernel"):
                if args[1] in self.dep:
                    raise self.refuse(node, "PReLU slopes must not depend on the input")
            elif packet == "aten.relu6":
                self._replace(node, self._call(A.hardtanh.default, x, 0.0, 6.0))
            elif packet in ("aten.clamp", "aten.clip", "aten.clamp_min", "aten.clamp_max"):
                lo = args[1] if len(args) > 1 else kw.get("min")
                hi = args[2] if len(args) > 2 else kw.get("max")
                if packet == "aten.clamp_max":
                    lo, hi = None, args[1]
                self._replace(node, self._clamp(node, x, lo, hi))
            elif packet == "aten.threshold":
                th, value = args[1], args[2]
                if th != value:
                    raise self.refuse(
                        node,
                        f"threshold({th}, {value}) is discontinuous",
                        "only threshold(x, t, t) = max(x, t) is piecewise linear",
                    )
                self._replace(node, self._clamp(node, x, th, None))
            elif packet in ("aten.maximum", "aten.fmax", "aten.minimum", "aten.fmin"):
                a, b = args[0], args[1]
                big = packet in ("aten.maximum", "aten.fmax")
                self._replace(node, self._max2(a, b) if big else self._min2(a, b))
            elif packet in _MAX_LIKE:
                self._max_like(node, packet, name)
            else:  # pragma: no cover - every piecewise row of the table is handled above
                raise self.refuse(node, "no rewrite for this piecewise-linear operator")

    def _max2(self, a: Any, b: Any) -> torch.fx.Node:
        d = self._call(A.sub.Tensor, a, b)
        return self._call(A.add.Tensor, b, self._call(A.relu.default, d))

    def _min2(self, a: Any, b: Any) -> torch.fx.Node:
        d = self._call(A.sub.Tensor, a, b)
        return self._call(A.sub.Tensor, a, self._call(A.relu.default, d))

    def _clamp(self, node: torch.fx.Node, x: Any, lo: Any, hi: Any) -> torch.fx.Node:
        if any(isinstance(v, torch.fx.Node) and v in self.dep for v in (lo, hi)):
            raise self.refuse(node, "clamp bounds must not depend on the input")
        scalar = all(v is None or isinstance(v, (int, float)) for v in (lo, hi))
        if scalar and lo is not None and hi is not None:
            if not float(lo) < float(hi):
                raise self.refuse(node, f"clamp needs min < max (got {lo}, {hi})")
            return self._call(A.hardtanh.default, x, float(lo), float(hi))
        out = x
        if lo is not None:  # max(x, lo) = relu(x - lo) + lo
            if isinstance(lo, (int, float)):
                if float(lo) == 0.0:
                    out = self._call(A.relu.default, out)
                else:
                    r = self._call(A.relu.default, self._call(A.sub.Scalar, out, float(lo)))
                    out = self._call(A.add.Scalar, r, float(lo))
            else:
                out = self._max2(out, lo)
        if hi is not None:  # min(x, hi) = hi - relu(hi - x)
            if isinstance(hi, (int, float)):
                r = self._call(A.relu.default, self._call(A.rsub.Scalar, out, float(hi)))
                out = self._call(A.rsub.Scalar, r, float(hi))
            else:
                out = self._min2(out, hi)
        return out

    def _buffer(self, t: Tensor) -> torch.fx.Node:
        name = f"_gs_const_{self.n_buffers}"
        self.n_buffers += 1
        self.gm.register_buffer(name, t)
        return self.g.get_attr(name)

    def _max_like(self, node: torch.fx.Node, packet: str, name: str) -> None:
        args: list[Any] = list(node.args)
        kw: dict[str, Any] = dict(node.kwargs)
        x = args[0]
        shape = self._shape(x)[1:]  # one sample
        negate = packet in ("aten.amin", "aten.min")
        if packet in ("aten.amax", "aten.amin", "aten.max", "aten.min"):
            if name.endswith(".default") and packet in ("aten.max", "aten.min"):
                raise self.refuse(
                    node,
                    "a max / min over the whole tensor mixes the samples of a batch",
                    "reduce over the feature dimensions only (x.amax(dim=-1))",
                )
            if packet in ("aten.amax", "aten.amin"):
                dims = args[1] if len(args) > 1 else kw.get("dim", [])
            else:  # keepdim only changes the output's shape, read from its value below
                dims = [args[1] if len(args) > 1 else kw["dim"]]
            dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
            nd = len(shape) + 1
            dims = [d % nd for d in dims] if dims else list(range(nd))
            if 0 in dims:
                raise self.refuse(
                    node,
                    "a max / min over the batch dimension mixes the samples",
                    "reduce over the feature dimensions only",
                )
            cand = reduce_candidates(shape, [d - 1 for d in dims])
        elif "adaptive" in packet:
            cand = adaptive_candidates(shape, list(args[1]))
        else:
            nd = {"1": 1, "2": 2, "3": 3}[packet.split("max_pool")[1][0]]
            k = self._tuple(args[1], nd)
            stride = self._tuple(args[2] if len(args) > 2 and args[2] else k, nd)
            pad = self._tuple(args[3] if len(args) > 3 else 0, nd)
            dil = self._tuple(args[4] if len(args) > 4 else 1, nd)
            ceil = bool(args[5] if len(args) > 5 else False)
            cand = pool_candidates(
                shape, kernel=k, stride=stride, padding=pad, dilation=dil, ceil_mode=ceil
            )
        res = self.vals[node]
        values = res[0] if isinstance(res, (tuple, list)) else res
        out_shape = tuple(values.shape[1:])
        if math.prod(out_shape) != cand.shape[0]:
            raise self.refuse(node, "unexpected window layout (please report this model)")
        src = self._call(A.neg.default, x) if negate else x
        new = self._call(windows_max, src, self._buffer(cand), list(out_shape))
        if negate:
            new = self._call(A.neg.default, new)
        check = windows_max(-self.vals[x] if negate else self.vals[x], cand, out_shape)
        if not torch.equal(-check if negate else check, values):
            raise self.refuse(node, "window candidates do not reproduce the operator")
        if isinstance(res, (tuple, list)):
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == 0:
                    self._replace(user, new)
                elif user.target is operator.getitem and user.users:
                    raise self.refuse(node, "the indices of a max are used")
                elif user.target is operator.getitem:
                    self.g.erase_node(user)
            self.g.erase_node(node)
        else:
            self._replace(node, new)

    @staticmethod
    def _tuple(v: Any, nd: int) -> tuple[int, ...]:
        if isinstance(v, (list, tuple)):
            return tuple(int(a) for a in v) if len(v) == nd else tuple(int(v[0]) for _ in range(nd))
        return tuple(int(v) for _ in range(nd))
