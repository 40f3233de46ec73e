"""The model as a staged program: its lowered graph, its nonlinearities and their units.

geomstore never re-implements layers. The user's model is lowered to core ATen
operators (:mod:`geomstore.engine.lower`, judged by :mod:`geomstore.engine.ops`) and run
by :class:`Program` node by node, with every piecewise-linear nonlinearity replaced by a
*masked* version that applies a fixed activation state per region
(:class:`geomstore.engine.nonlinear.Nonlinearity`). With the states fixed the network is
affine, so running it on three points of the slice gives every intermediate tensor's
affine map exactly (the "3-point representation").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx
from torch import Tensor

from geomstore.engine.cache import state_sha256
from geomstore.engine.lower import CACHE, lower
from geomstore.engine.nonlinear import Kind, Nonlinearity
from geomstore.engine.windows import windows_max
from geomstore.errors import ModelShapeError, UnsupportedModelError

__all__ = ["Nonlinearity", "Program"]

A = torch.ops.aten
_KINDS: dict[Any, Kind] = {
    A.relu.default: "relu",
    A.leaky_relu.default: "leaky",
    A._prelu_kernel.default: "prelu",
    A.prelu.default: "prelu",
    A.abs.default: "abs",
    A.hardtanh.default: "hardtanh",
    windows_max: "maxpool",
}


class Program:
    """A float64 copy of a model as a core-ATen graph, run in stages between nonlinearities.

    Parameters
    ----------
    model : torch.nn.Module or torch.export.ExportedProgram
        The network; must be in eval mode if it holds batch norm or dropout.
    input_shape : tuple of int
        Shape of one input sample (without batch dimension).
    device : torch.device
        Where the program runs.
    logits : bool
        Remove a trailing softmax / log-softmax (the regions are those of the logits).
    """

    def __init__(
        self,
        model: Any,
        input_shape: tuple[int, ...],
        device: torch.device,
        *,
        logits: bool = False,
    ) -> None:
        self.device = device
        self.input_shape = tuple(input_shape)
        low = lower(model, self.input_shape, logits=logits)
        self.gm = low.gm
        self._weights = low.weights
        self._weights_sha256 = low.weights_sha256
        self.stripped_softmax = low.stripped_softmax
        self._memo = low.memo
        self.nodes: list[torch.fx.Node] = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(
                f"the model takes {len(placeholders)} inputs; geomstore needs exactly one tensor."
            )
        self.static = self.memo(("static",), self._static_env)
        piecewise = [
            n
            for n in self.nodes
            if n.op == "call_function" and n.target in _KINDS and n not in self.static
        ]
        #: in topological order; ``layer`` is the index here (the edges' ``layer``)
        self.nonlinearities: list[Nonlinearity] = [
            self._spec(n, _KINDS[n.target], layer) for layer, n in enumerate(piecewise)
        ]
        self.last_use = self._liveness()
        self._probe_shapes()

    # building --------------------------------------------------------------------------------
    def _spec(self, node: torch.fx.Node, kind: Kind, layer: int) -> Nonlinearity:
        spec = Nonlinearity(layer=layer, node=node, name=node.name, kind=kind)
        args: list[Any] = [
            self.static.get(a, a) if isinstance(a, torch.fx.Node) else a for a in node.args
        ]
        if kind == "leaky":
            spec.slope = float(args[1]) if len(args) > 1 else 0.01
        elif kind == "prelu":
            spec.slope = torch.as_tensor(args[1], dtype=torch.float64).detach().clone()
        elif kind == "hardtanh":
            spec.lo = float(args[1]) if len(args) > 1 else -1.0
            spec.hi = float(args[2]) if len(args) > 2 else 1.0
            if not spec.lo < spec.hi:
                raise UnsupportedModelError(f"hardtanh {node.name!r} needs min_val < max_val.")
        elif kind == "maxpool":
            spec.candidates = torch.as_tensor(args[1]).to(self.device)
            spec.out_shape = tuple(int(s) for s in args[2])
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
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj.to(self.device) if isinstance(obj, Tensor) else obj
        args = self._fetch(node.args, env)
        kwargs = self._fetch(node.kwargs, env)
        if node.op == "call_function":
            if kwargs.get("device") is not None:  # constants made by the graph (arange, full)
                kwargs = {**kwargs, "device": self.device}
            if node.target in _CONVOLUTIONS and not kwargs:
                return _convolution(node.target, args)
            return node.target(*args, **kwargs)  # type: ignore[operator]
        raise AssertionError(node.op)

    def run_nonlinear_plain(self, spec: Nonlinearity, x: Tensor) -> Any:
        """Evaluate a nonlinearity node as the model itself does (for probes and checks)."""
        env: dict[torch.fx.Node, Any] = dict(self.static)
        env[spec.node.all_input_nodes[0]] = x
        return self.run_node(spec.node, env)

    def forward_with_pre(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The model's own forward on x (B, *input_shape); also each nonlinearity's input."""
        env: dict[torch.fx.Node, Any] = dict(self.static)
        pres: list[Tensor] = []
        out: Any = None
        specs = {s.node for s in self.nonlinearities}
        for node in self.nodes:
            if node in env:
                continue
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "output":
                out = self._fetch(node.args[0], env)
            else:
                if node in specs:
                    pres.append(env[node.args[0]])  # type: ignore[index]
                env[node] = self.run_node(node, env)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out, pres

    def _probe_shapes(self) -> None:
        x = torch.zeros((1, *self.input_shape), dtype=torch.float64, device=self.device)
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
            ) from exc
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
            raise ModelShapeError(
                "the model must return a (batch, outputs) tensor; got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}."
            )
        self.n_outputs = int(out.shape[1])
        offset = 0
        for spec, pre in zip(self.nonlinearities, pres, strict=True):
            spec.in_shape = tuple(pre.shape[1:])
            if spec.kind != "maxpool":
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

    def memo(self, key: tuple[Any, ...], make: Any) -> Any:
        """``make()``, kept with the cached graph for later programs on this device.

        A GPU program's copy of the weights (VGG-11: 74 MB sent again by every partition)
        and the stage matrices (:meth:`Descent._stage_matrix`, VGG-11: 0.9 s on the
        project's CPU) depend on the graph and the device only. They stay while the graph
        is cached, counted in its bytes; ``geomstore.engine.lower.CACHE.clear()`` frees
        them. The CPU program's weights are the graph's own tensors: not kept twice.
        """
        full = (str(self.device), *key)
        if full in self._memo:
            return self._memo[full]
        value = make()
        if key != ("static",) or self.device.type != "cpu":
            CACHE.remember(self._memo, full, value)
        return value

    def _static_env(self) -> dict[torch.fx.Node, Any]:
        """Values that do not depend on the input (parameters and functions of them)."""
        env: dict[torch.fx.Node, Any] = {}
        for node in self.nodes:
            if node.op == "get_attr" or (
                node.op == "call_function" and all(a in env for a in node.all_input_nodes)
            ):
                with torch.no_grad():
                    env[node] = self.run_node(node, env)
        return env

    def weights_sha256(self) -> str:
        """SHA-256 of the model's parameters and buffers (float64, sorted by name)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = state_sha256(self._weights)
        return self._weights_sha256

    def output_node(self) -> torch.fx.Node:
        return self.nodes[-1]


_CONVOLUTIONS = {torch.ops.aten.convolution.default, torch.ops.aten._convolution.default}
CONV_PIECE_BYTES = 4 << 20  # im2col bytes of one piece of a CPU convolution's batch


def _convolution(op: Any, args: tuple[Any, ...]) -> Tensor:
    """A convolution, on the CPU in pieces of its batch whose unfolded input fits in cache.

    PyTorch's CPU convolution (float64 has no oneDNN path) unfolds the whole batch
    (im2col) and multiplies one sample at a time. Past a few MB the buffer leaves the
    cache: ResNet-20's 16-channel layers ran at 11 GFLOP/s at the descent's batches, 45
    in pieces. Where a sample has few output positions (VGG's and ResNet-18's 512-channel
    layers at 2x2 and 4x4), each sample's product re-reads the whole weight, so those run
    as one matrix product over the piece's samples instead (17 -> 84 GFLOP/s).
    """
    x, w = args[0], args[1]
    if not isinstance(x, Tensor) or x.device.type != "cpu" or x.dim() < 3:
        return op(*args)
    transposed = len(args) > 6 and bool(args[6])
    dims = x.dim() - 2
    exact = not transposed and all(
        isinstance(a, (list, tuple)) and len(a) == dims for a in args[3:6]
    )
    spatial = _out_size(x.shape[2:], w.shape[2:], *args[3:6]) if exact else x.shape[2:]
    positions = int(np.prod(spatial))  # output positions per sample (transposed: input's)
    n = max(1, CONV_PIECE_BYTES // max(1, 8 * w[0].numel() * positions))
    if exact and dims == 2 and len(args) > 8 and args[8] == 1 and positions <= GEMM_POSITIONS:
        return torch.cat([_conv_gemm(piece, *args[1:6]) for piece in x.split(n)])
    if x.shape[0] <= n:
        return op(*args)
    return torch.cat([op(piece, *args[1:]) for piece in x.split(n)])


GEMM_POSITIONS = 16  # output positions per sample at or below which a conv is one product


def _conv_gemm(
    x: Tensor, w: Tensor, bias: Tensor | None, stride: Any, padding: Any, dilation: Any
) -> Tensor:
    """A 2-D convolution as one matrix product over all samples' unfolded windows."""
    b, o = x.shape[0], w.shape[0]
    cols = torch.nn.functional.unfold(x, w.shape[2:], dilation, padding, stride)  # (b, CKK, L)
    positions = cols.shape[2]
    flat = cols.transpose(1, 2).reshape(b * positions, -1)
    wt = w.reshape(o, -1).t()
    out = flat @ wt if bias is None else torch.addmm(bias, flat, wt)
    h, w_out = _out_size(x.shape[2:], w.shape[2:], stride, padding, dilation)
    return out.view(b, positions, o).transpose(1, 2).reshape(b, o, h, w_out).contiguous()


def _out_size(size: Any, kernel: Any, stride: Any, padding: Any, dilation: Any) -> list[int]:
    """Output size of a convolution along each spatial dimension."""
    return [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    ]
