"""The model as a staged program: its FX graph, its nonlinearities and their units.

geomstore never re-implements layers. The user's model is traced to an FX graph
(``torch.fx.symbolic_trace``, or the graph of a ``torch.export`` program) and run by
:class:`Program` node by node, with every piecewise-linear nonlinearity replaced by a
*masked* version that applies a fixed activation state per region. With the states
fixed the network is affine, so running it on three points of the slice gives every
intermediate tensor's affine map exactly (the "3-point representation").

Units and patterns
------------------
Nonlinearities are numbered in topological order (``layer`` 0, 1, ...). A unit is one
output element of a nonlinearity for one input sample, numbered in C order (``neuron``).
Each unit has a discrete state: ReLU-like units 0 (inactive, pre-activation <= 0) or 1;
hard-tanh units 0 (below ``min_val``), 1 (linear) or 2 (above ``max_val``); max-pool units
the index of the winning element of the window (first maximum).
"""

from __future__ import annotations

import contextlib
import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from geomstore.engine.pooling import pool_candidates, pool_params
from geomstore.errors import ModelShapeError, UnsupportedModelError

__all__ = ["Nonlinearity", "Program"]

_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Identity,
)
_TRAINING_SENSITIVE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)

_AFFINE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.neg,
    operator.getitem,
    torch.add,
    torch.sub,
    torch.flatten,
    torch.cat,
    torch.reshape,
    F.linear,
    F.conv1d,
    F.conv2d,
    F.avg_pool1d,
    F.avg_pool2d,
    getattr,
}
_SCALAR_FUNCTIONS: set[Any] = {operator.mul, operator.truediv, torch.mul}
_AFFINE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "size",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "add",
    "sub",
    "neg",
    "__getitem__",
}
_SCALAR_METHODS = {"mul", "div"}
_AFFINE_ATEN = {
    "aten.linear.default",
    "aten.addmm.default",
    "aten.mm.default",
    "aten.t.default",
    "aten.permute.default",
    "aten.view.default",
    "aten.reshape.default",
    "aten._unsafe_view.default",
    "aten.flatten.using_ints",
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.convolution.default",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.add.Tensor",
    "aten.sub.Tensor",
    "aten.cat.default",
    "aten.avg_pool2d.default",
    "aten.clone.default",
    "aten.alias.default",
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.expand.default",
    "aten.contiguous.default",
    "aten.dropout.default",
    "aten.neg.default",
}
_SCALAR_ATEN = {"aten.mul.Tensor", "aten.div.Tensor", "aten.mul.Scalar", "aten.div.Scalar"}

_RELU_FUNCS: set[Any] = {F.relu, torch.relu}
_NONLINEAR_ATEN = {
    "aten.relu.default": "relu",
    "aten.relu_.default": "relu",
    "aten.leaky_relu.default": "leaky",
    "aten.hardtanh.default": "hardtanh",
    "aten.abs.default": "abs",
    "aten.max_pool2d.default": "maxpool",
    "aten.max_pool2d_with_indices.default": "maxpool",
    "aten._prelu_kernel.default": "prelu",
    "aten.prelu.default": "prelu",
}


@dataclass
class Nonlinearity:
    """One piecewise-linear nonlinearity of the program and how its units split a region."""

    layer: int
    node: torch.fx.Node
    name: str
    kind: str  # relu | leaky | prelu | abs | hardtanh | maxpool
    slope: Tensor | float = 0.0  # leaky / prelu negative slope (prelu: per channel)
    lo: float = 0.0
    hi: float = 0.0
    pool: dict[str, Any] = field(default_factory=dict)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    candidates: Tensor | None = None  # maxpool: (n_units, k) flat input indices
    unit_offset: int = 0

    @property
    def n_units(self) -> int:
        """Units (output elements per sample)."""
        n = 1
        for s in self.out_shape:
            n *= s
        return n

    @property
    def n_steps(self) -> int:
        """Line tests needed to settle one unit's state inside a region."""
        if self.kind == "hardtanh":
            return 2
        if self.kind == "maxpool":
            assert self.candidates is not None
            return int(self.candidates.shape[1]) - 1
        return 1

    @property
    def n_states(self) -> int:
        """Distinct states a unit can take."""
        if self.kind == "hardtanh":
            return 3
        if self.kind == "maxpool":
            assert self.candidates is not None
            return int(self.candidates.shape[1])
        return 2

    @property
    def bits(self) -> int:
        """Bits per unit in the packed activation pattern."""
        return max(1, (self.n_states - 1).bit_length())

    def states_from_values(self, pre: Tensor) -> Tensor:
        """The model's own state of every unit, from pre-activation values (B, *in_shape)."""
        flat = pre.reshape(pre.shape[0], -1)
        if self.kind == "hardtanh":
            return (flat > self.lo).to(torch.uint8) + (flat > self.hi).to(torch.uint8)
        if self.kind == "maxpool":
            assert self.candidates is not None
            vals = flat[:, self.candidates]  # (B, units, k)
            return vals.argmax(dim=2).to(torch.uint8)
        return (flat > 0).to(torch.uint8)

    def margins(self, pre: Tensor) -> Tensor:
        """Distance in value of each unit from a state change (B, units); small = ambiguous."""
        flat = pre.reshape(pre.shape[0], -1)
        if self.kind == "hardtanh":
            return torch.minimum((flat - self.lo).abs(), (flat - self.hi).abs())
        if self.kind == "maxpool":
            assert self.candidates is not None
            vals = flat[:, self.candidates]
            top2 = vals.topk(2, dim=2).values if vals.shape[2] > 1 else None
            if top2 is None:
                return torch.full_like(vals[..., 0], float("inf"))
            gap = top2[..., 0] - top2[..., 1]
            # duplicated candidates (padding) tie by construction and are not ambiguous
            dup = (self.candidates[:, :1] == self.candidates).sum(1) > 1
            return torch.where(dup[None, :] & (gap == 0), float("inf"), gap)
        return flat.abs()

    def apply(self, pre: Tensor, states: Tensor, *, coef: bool = False) -> Tensor:
        """Masked nonlinearity: pre (P, 3, *in_shape), states (P, units) -> (P, 3, *out_shape).

        ``pre`` holds values at three points, or with ``coef`` the affine form (slope0,
        slope1, value): a saturated hard-tanh unit is then (0, 0, bound).
        """
        p = pre.shape[0]
        flat = pre.reshape(p, 3, -1)
        st = states[:, None, :]
        if self.kind == "relu":
            out = flat * st.to(flat.dtype)
        elif self.kind == "abs":
            out = flat * (2 * st.to(flat.dtype) - 1)
        elif self.kind == "leaky":
            out = torch.where(st == 1, flat, flat * float(self.slope))
        elif self.kind == "prelu":
            slope = torch.as_tensor(self.slope, dtype=flat.dtype, device=flat.device)
            if slope.numel() > 1:
                per = self.n_units // slope.numel()
                slope = slope.repeat_interleave(per)
            out = torch.where(st == 1, flat, flat * slope)
        elif self.kind == "hardtanh":
            lo, hi = torch.full_like(flat, self.lo), torch.full_like(flat, self.hi)
            if coef:
                lo[:, :2], hi[:, :2] = 0.0, 0.0
            out = torch.where(st == 0, lo, flat)
            out = torch.where(st == 2, hi, out)
        else:
            assert self.candidates is not None
            cand = self.candidates.to(flat.device)
            idx = cand[torch.arange(cand.shape[0], device=flat.device)[None, :], states.long()]
            out = flat.gather(2, idx[:, None, :].expand(p, 3, -1))
        return out.reshape(p, 3, *self.out_shape)

    def unit_values(self, vals: Tensor, units: Tensor, states: Tensor) -> Tensor:
        """Output (slope0, slope1, value) of each unit in the given state, (pairs, 3).

        ``vals`` (pairs, 3, k) is the affine form of the unit's input: its k max-pool
        candidates, or k = 1 (see :class:`geomstore.engine.split.Crossings`).
        """
        if self.kind == "maxpool":
            ar = torch.arange(vals.shape[0], device=vals.device)
            return vals[ar, :, states.long()]
        z = vals[:, :, 0]
        on = (states == 1)[:, None]
        if self.kind == "relu":
            return torch.where(on, z, torch.zeros_like(z))
        if self.kind == "abs":
            return torch.where(on, z, -z)
        if self.kind == "leaky":
            return torch.where(on, z, z * float(self.slope))
        if self.kind == "prelu":
            slope = torch.as_tensor(self.slope, dtype=z.dtype, device=z.device).reshape(-1)
            per = self.n_units // slope.numel()
            return torch.where(on, z, z * slope[units // per][:, None])
        const = torch.zeros_like(z)
        const[:, 2] = torch.where(states == 0, z.new_tensor(self.lo), z.new_tensor(self.hi))
        return torch.where(on, z, const)


def _one_variable(node: torch.fx.Node) -> bool:
    """A product or quotient is affine when at most one factor depends on the input."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), found.append)  # repeats count: h * h
    return sum(a.op != "get_attr" for a in found) <= 1


def _target_name(target: Any) -> str:
    return str(target) if not callable(target) else getattr(target, "__name__", str(target))


class Program:
    """A float64 copy of a model as an FX graph, run in stages between nonlinearities.

    Parameters
    ----------
    model : torch.nn.Module or torch.export.ExportedProgram
        The network; must be in eval mode if it holds batch norm or dropout.
    input_shape : tuple of int
        Shape of one input sample (without batch dimension).
    device : torch.device
        Where the program runs.
    """

    def __init__(self, model: Any, input_shape: tuple[int, ...], device: torch.device) -> None:
        self.device = device
        self.input_shape = tuple(input_shape)
        gm = self._graph_module(model)
        self.gm = gm
        self.nodes: list[torch.fx.Node] = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.nonlinearities: list[Nonlinearity] = []
        self._check_and_collect()
        self.last_use = self._liveness()
        self._probe_shapes()
        self.static = self._static_env()

    # building --------------------------------------------------------------------------------
    @staticmethod
    def _graph_module(model: Any) -> torch.fx.GraphModule:
        if hasattr(model, "module") and hasattr(model, "graph_signature"):  # ExportedProgram
            gm = model.module()
        elif isinstance(model, torch.jit.ScriptModule):
            raise UnsupportedModelError(
                "TorchScript modules cannot be traced; pass the nn.Module or a torch.export "
                "program (torch.export.export(model, (example,)))."
            )
        elif isinstance(model, nn.Module):
            for name, mod in model.named_modules():
                if isinstance(mod, _TRAINING_SENSITIVE) and mod.training:
                    raise UnsupportedModelError(
                        f"module {name!r} ({type(mod).__name__}) is in training mode; "
                        "call model.eval() before computing a partition."
                    )
            try:
                gm = torch.fx.symbolic_trace(copy.deepcopy(model))
            except Exception as exc:
                raise UnsupportedModelError(
                    f"could not trace the model with torch.fx ({type(exc).__name__}: {exc}); "
                    "remove data-dependent control flow or pass a torch.export program."
                ) from None
        else:
            raise UnsupportedModelError(
                f"expected a torch.nn.Module or torch.export program, got {type(model).__name__}."
            )
        gm = gm.to(torch.float64)
        with contextlib.suppress(NotImplementedError):  # export modules refuse eval()
            gm.eval()
        return gm

    def _check_and_collect(self) -> None:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(
                f"the model takes {len(placeholders)} inputs; geomstore needs exactly one tensor."
            )
        for node in self.nodes:
            kind = self._classify(node)
            if kind is None:
                continue
            spec = self._spec(node, kind)
            self.nonlinearities.append(spec)

    def _classify(self, node: torch.fx.Node) -> str | None:
        """Return the nonlinearity kind of a node, None for affine nodes; refuse the rest."""
        if node.op in ("placeholder", "output", "get_attr"):
            return None
        if node.op == "call_module":
            if str(node.target) == "_guards_fn":  # torch.export's shape guards (batch 1)
                return None
            mod = self.modules[str(node.target)]
            for cls, kind in (
                (nn.ReLU, "relu"),
                (nn.LeakyReLU, "leaky"),
                (nn.PReLU, "prelu"),
                (nn.Hardtanh, "hardtanh"),
                (nn.MaxPool1d, "maxpool"),
                (nn.MaxPool2d, "maxpool"),
            ):
                if isinstance(mod, cls):  # ReLU6 is a Hardtanh subclass
                    return kind
            if isinstance(mod, _AFFINE_MODULES):
                if isinstance(mod, _TRAINING_SENSITIVE) and mod.training:
                    raise UnsupportedModelError(
                        f"module {node.target!r} is in training mode; call model.eval() first."
                    )
                return None
            raise UnsupportedModelError(
                f"module {node.target!r} ({type(mod).__name__}) is not affine or piecewise "
                "linear; supported: Linear, Conv1d/2d, BatchNorm (eval), AvgPool, Flatten, "
                "Dropout/Identity (eval), ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, MaxPool1d/2d."
            )
        if node.op == "call_function":
            t = node.target
            name = str(t)
            if name in _NONLINEAR_ATEN:
                return _NONLINEAR_ATEN[name]
            if t in _RELU_FUNCS:
                return "relu"
            if t is F.leaky_relu:
                return "leaky"
            if t in (F.hardtanh, F.relu6):
                return "hardtanh"
            if t in (torch.abs, operator.abs):
                return "abs"
            if t in (F.max_pool1d, F.max_pool2d, torch.max_pool2d, torch.max_pool1d):
                return "maxpool"
            if t in _AFFINE_FUNCTIONS or name in _AFFINE_ATEN:
                return None
            if (t in _SCALAR_FUNCTIONS or name in _SCALAR_ATEN) and _one_variable(node):
                return None
            raise UnsupportedModelError(
                f"operation {_target_name(t)!r} (node {node.name!r}) is not affine or "
                "piecewise linear; geomstore supports ReLU-family activations, max-pooling "
                "and affine layers only."
            )
        if node.op == "call_method":
            m = str(node.target)
            if m in ("relu", "relu_"):
                return "relu"
            if m == "abs":
                return "abs"
            if m in _AFFINE_METHODS:
                return None
            if m in _SCALAR_METHODS and _one_variable(node):
                return None
            raise UnsupportedModelError(
                f"tensor method {m!r} (node {node.name!r}) is not affine or piecewise linear."
            )
        raise UnsupportedModelError(f"unsupported graph node {node.op} {node.target!r}.")

    def _spec(self, node: torch.fx.Node, kind: str) -> Nonlinearity:
        layer = len(self.nonlinearities)
        spec = Nonlinearity(layer=layer, node=node, name=node.name, kind=kind)
        args: list[Any] = list(node.args)
        kw: dict[str, Any] = dict(node.kwargs)
        mod = self.modules.get(str(node.target)) if node.op == "call_module" else None
        if kind == "leaky":
            spec.slope = (
                float(mod.negative_slope)
                if isinstance(mod, nn.LeakyReLU)
                else float(args[1] if len(args) > 1 else kw.get("negative_slope", 0.01))
            )
        elif kind == "prelu":
            if isinstance(mod, nn.PReLU):
                spec.slope = mod.weight.detach().to(torch.float64).clone()
            else:
                w = args[1]
                spec.slope = (
                    self.gm.get_parameter(str(w.target)).detach().clone()
                    if isinstance(w, torch.fx.Node) and w.op == "get_attr"
                    else torch.as_tensor(w, dtype=torch.float64)
                )
        elif kind == "hardtanh":
            if isinstance(mod, nn.Hardtanh):
                spec.lo, spec.hi = float(mod.min_val), float(mod.max_val)
            elif node.target is F.relu6:
                spec.lo, spec.hi = 0.0, 6.0
            else:
                spec.lo = float(args[1] if len(args) > 1 else kw.get("min_val", -1.0))
                spec.hi = float(args[2] if len(args) > 2 else kw.get("max_val", 1.0))
            if not spec.lo < spec.hi:
                raise UnsupportedModelError(f"hardtanh {node.name!r} needs min_val < max_val.")
        elif kind == "maxpool":
            spec.pool = pool_params(node, mod, args, kw)
        return spec

    def _liveness(self) -> list[int]:
        last = [i for i in range(len(self.nodes))]
        for i, n in enumerate(self.nodes):
            for u in n.users:
                last[i] = max(last[i], self.index[u])
        return last

    # running -------------------------------------------------------------------------------
    def _fetch(self, a: Any, env: dict[torch.fx.Node, Any]) -> Any:
        return torch.fx.node.map_arg(a, lambda n: env[n])

    def run_node(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        """Evaluate one affine node on its arguments from ``env``."""
        args = self._fetch(node.args, env)
        kwargs = self._fetch(node.kwargs, env)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_module":
            if str(node.target) == "_guards_fn":
                return None
            return self.modules[str(node.target)](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        raise AssertionError(node.op)

    def run_nonlinear_plain(self, spec: Nonlinearity, x: Tensor) -> Any:
        """Evaluate a nonlinearity node as the model itself does (for probes and checks)."""
        env: dict[torch.fx.Node, Any] = {spec.node.all_input_nodes[0]: x}
        env.update(self._const_env(spec.node))
        return self.run_node(spec.node, env)

    def _const_env(self, node: torch.fx.Node) -> dict[torch.fx.Node, Any]:
        env: dict[torch.fx.Node, Any] = {}
        for a in node.all_input_nodes[1:]:
            if a.op == "get_attr":
                env[a] = self.run_node(a, env)
        return env

    def forward_with_pre(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The model's own forward on x (B, *input_shape); also each nonlinearity's input."""
        env: dict[torch.fx.Node, Any] = {}
        pres: list[Tensor] = []
        out: Any = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                out = self._fetch(node.args[0], env)
            else:
                if any(node is s.node for s in self.nonlinearities):
                    pres.append(env[node.args[0]])  # type: ignore[index]
                env[node] = self.run_node(node, env)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out, pres

    def _probe_shapes(self) -> None:
        x = torch.zeros((1, *self.input_shape), dtype=torch.float64, device=self.device)
        self.gm.to(self.device)
        for spec in self.nonlinearities:
            if isinstance(spec.slope, Tensor):
                spec.slope = spec.slope.to(self.device)
        try:
            with torch.no_grad():
                out, pres = self.forward_with_pre(x)
        except Exception as exc:
            raise ModelShapeError(
                f"the model cannot run on one input of shape {self.input_shape} "
                f"({type(exc).__name__}: {exc}); check the slice's input shape."
            ) from None
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
            raise ModelShapeError(
                "the model must return a (batch, outputs) tensor; got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}."
            )
        self.n_outputs = int(out.shape[1])
        offset = 0
        for spec, pre in zip(self.nonlinearities, pres, strict=True):
            spec.in_shape = tuple(pre.shape[1:])
            if spec.kind == "maxpool":
                spec.candidates = pool_candidates(spec).to(self.device)
                res = self.run_nonlinear_plain(spec, pre)
                res = res[0] if isinstance(res, (tuple, list)) else res
                spec.out_shape = tuple(res.shape[1:])
                if int(spec.candidates.shape[0]) != spec.n_units:
                    raise UnsupportedModelError(f"max-pool {spec.name!r}: unexpected layout.")
            else:
                spec.out_shape = spec.in_shape
            per_channel = isinstance(spec.slope, Tensor) and spec.slope.numel() > 1
            if spec.kind == "prelu" and per_channel:
                assert isinstance(spec.slope, Tensor)
                if len(spec.in_shape) < 1 or spec.in_shape[0] != spec.slope.numel():
                    raise UnsupportedModelError(f"PReLU {spec.name!r}: channel count mismatch.")
            spec.unit_offset = offset
            offset += spec.n_units
        self.n_units = offset

    def stage_nodes(self, layer: int) -> list[torch.fx.Node]:
        """Affine nodes to run after nonlinearity ``layer - 1`` and before ``layer``."""
        start = 0 if layer == 0 else self.index[self.nonlinearities[layer - 1].node] + 1
        stop = (
            self.index[self.nonlinearities[layer].node]
            if layer < len(self.nonlinearities)
            else len(self.nodes)
        )
        return [n for n in self.nodes[start:stop] if n.op not in ("placeholder", "output")]

    def live_after(self, layer: int) -> list[torch.fx.Node]:
        """Nodes computed by the end of nonlinearity ``layer`` that later nodes still read."""
        pos = self.index[self.nonlinearities[layer].node]
        return [n for n in self.nodes[: pos + 1] if self.last_use[self.index[n]] > pos]

    def _static_env(self) -> dict[torch.fx.Node, Any]:
        """Values that do not depend on the input (parameters and functions of them)."""
        env: dict[torch.fx.Node, Any] = {}
        for node in self.nodes:
            if node.op == "get_attr" or (
                node.op.startswith("call")
                and node.all_input_nodes
                and all(a in env for a in node.all_input_nodes)
            ):
                with torch.no_grad():
                    env[node] = self.run_node(node, env)
        return env

    def weights_sha256(self) -> str:
        """SHA-256 of the parameters and buffers (float64, sorted by name)."""
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(self.gm.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def output_node(self) -> torch.fx.Node:
        return self.nodes[-1]
