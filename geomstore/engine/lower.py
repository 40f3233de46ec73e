"""Lowering: any model -> a float64 FX graph of core ATen operators in canonical form.

The model (an ``nn.Module`` or a ``torch.export`` program) is traced with
``make_fx`` and PyTorch's core ATen decompositions, so every layer, functional call or
tensor method a user writes arrives as one of about 180 core operators; each is judged by
the operator table (:mod:`geomstore.engine.ops`). Piecewise-linear operators are then
rewritten into the engine's unit kinds:

- ``relu``, ``leaky_relu``, ``_prelu_kernel``, ``abs``, ``hardtanh`` stay as they are;
- ``clamp`` / ``clip`` with two bounds and ``relu6`` become ``hardtanh``; with one bound,
  a shifted ReLU (``max(x, lo) = relu(x - lo) + lo``, ``min(x, hi) = hi - relu(hi - x)``);
- ``maximum(a, b) = b + relu(a - b)``, ``minimum(a, b) = a - relu(a - b)``;
- every max over a fixed set of elements (max pooling of any kind, ``amax``, ``max.dim``)
  becomes one :func:`geomstore.engine.windows.windows_max` node with its candidates;
  minima are negated maxima.

The trace runs on one sample; shape arguments that carry that batch of one are made
batch-agnostic, and the lowered graph is checked against the model's own forward on a
batch of random inputs before it is used.
"""

from __future__ import annotations

import contextlib
import copy
import linecache
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from geomstore.engine.cache import LoweringCache, fingerprint
from geomstore.engine.canon import Canon
from geomstore.engine.refusal import Refusal, quiet, user_frame
from geomstore.errors import ModelShapeError, UnsupportedModelError

__all__ = ["Lowered", "lower"]

_TRAINING_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.modules.dropout._DropoutNd)
# kept whole so that they are recognised (prelu) or refused by their own name
_KEEP = (
    "prelu",
    "_prelu_kernel",
    "hardtanh",
    "relu6",
    "silu",
    "hardswish",
    "hardsigmoid",
    "mish",
    "softplus",
    "gelu",
    "elu",
    "selu",
    "celu",
    "native_layer_norm",
    "native_group_norm",
    "layer_norm",
    "group_norm",
    "_softmax",
    "_log_softmax",
    "softmax",
    "log_softmax",
    "leaky_relu",
    "threshold",
    "rms_norm",
    "log_sigmoid_forward",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention",
)


@dataclass
class Lowered:
    """The lowered graph and what the engine needs to know about it."""

    gm: torch.fx.GraphModule
    weights: dict[str, Tensor]  # the source model's state (for the weights hash)
    stripped_softmax: bool
    weights_sha256: str | None = None  # state_sha256(weights), when already computed
    # what programs derive from the graph on a device, kept with the cached graph (see
    # LoweringCache.remember); a graph the cache does not keep has its own
    memo: dict[Any, Any] = field(default_factory=dict)


def _decompositions() -> dict[Any, Any]:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    for key in list(table):
        name = str(key).split(".")
        if len(name) > 1 and name[1] in _KEEP:
            del table[key]
    return table


_DECOMP: dict[Any, Any] | None = None


def _source(
    model: Any, state: dict[str, Tensor] | None = None
) -> tuple[Any, dict[str, Tensor], nn.Module | None]:
    """A float64 callable for tracing, the weights (``state``, the module's state dict, if
    given), and the module for locating nodes."""
    if hasattr(model, "module") and hasattr(model, "graph_signature"):  # ExportedProgram
        mod = model.module()
        weights = {k: v.detach() for k, v in mod.state_dict().items()}
        return mod.to(torch.float64), weights, None
    _check_module(model)
    weights = dict(model.state_dict()) if state is None else state  # detached
    # one copy: each floating parameter and buffer goes straight to float64 (shared ones
    # stay shared); deepcopy copies the rest
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            c = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
    copy_ = copy.deepcopy(model, memo).to(torch.float64).eval()
    return copy_, weights, copy_


def _check_module(model: Any) -> None:
    """Refuse what cannot be traced or is not in eval mode, before anything runs it."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "TorchScript modules cannot be traced; pass the nn.Module or a torch.export "
            "program (torch.export.export(model, (example,)))."
        )
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module or torch.export program, got {type(model).__name__}."
        )
    for name, mod in model.named_modules():
        if isinstance(mod, _TRAINING_SENSITIVE) and mod.training:
            raise UnsupportedModelError(
                f"module {name!r} ({type(mod).__name__}) is in training mode; "
                "call model.eval() before computing a partition."
            )


def _example(input_shape: tuple[int, ...], batch: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *input_shape), generator=g, dtype=torch.float64) - 0.5


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


# the lowering --------------------------------------------------------------------------------
def lower(model: Any, input_shape: tuple[int, ...], *, logits: bool = False) -> Lowered:
    """Trace ``model`` to core ATen, judge every operator and rewrite the piecewise ones."""
    global _DECOMP
    from torch.fx.experimental.proxy_tensor import make_fx

    key = _cache_key(model, input_shape, logits)
    sha = None if key is None else key.sha
    if key is not None:
        _check_module(model)
        entry = CACHE.get(key.key)
        if entry is not None and _same_forward(model, input_shape, entry.probe):
            CACHE.count(hit=True)
            return Lowered(entry.gm, key.state, entry.stripped, sha, entry.memo)
        CACHE.count(hit=False)
    fn, weights, module = _source(model, None if key is None else key.state)
    x1 = _example(input_shape, 1)
    if _DECOMP is None:
        _DECOMP = _decompositions()
    decomp = _DECOMP

    def trace(stacks: bool) -> torch.fx.GraphModule:
        with torch.no_grad(), quiet():
            # functionalized: in-place operators (``out += identity``, ``clamp_``, inplace
            # activations) are traced as their out-of-place forms
            out: torch.fx.GraphModule = make_fx(
                torch.func.functionalize(fn), decomposition_table=decomp, record_stack_traces=stacks
            )(x1)
        return out

    try:
        gm = trace(False)
    except Exception as exc:
        try:
            with torch.no_grad():
                fn(x1)
        except Exception as exc2:
            raise ModelShapeError(
                f"the model cannot run on one input of shape {tuple(input_shape)} "
                f"({type(exc2).__name__}: {exc2}); check the slice's input shape."
            ) from exc2
        raise UnsupportedModelError(_trace_failure(exc)) from exc
    refuse = Refusal(gm, module, x1, retrace=lambda: trace(True))
    Canon(gm, refuse, logits=logits).run(x1)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    _check_batch(gm, fn, input_shape)
    stripped = bool(logits and getattr(gm, "_gs_stripped", False))
    low = Lowered(gm, weights, stripped, sha)
    if key is not None:
        with contextlib.suppress(Exception):  # a model the probe cannot run: traced each time
            CACHE.put(key.key, gm, stripped, _probe(model, input_shape), key.nbytes, low.memo)
    return low


_DATA_DEPENDENT = (
    "data-dependent",
    "data dependent",
    "_local_scalar_dense",
    "GuardOnDataDependent",
)


def _trace_failure(exc: BaseException) -> str:
    """One line on why tracing failed, at the user's line where the traceback has it."""
    found = [(f, n) for f, n in traceback.walk_tb(exc.__traceback__) if user_frame(f)]
    where = ""
    if found:  # the innermost frame in the user's code
        frame, lineno = found[-1]
        name = frame.f_code.co_filename
        code = linecache.getline(name, lineno).strip()
        where = f" at {name}:{lineno}" + (f" ({code})" if code else "")
    text = " ".join(str(exc).split())
    if any(k in text for k in _DATA_DEPENDENT):
        return (
            f"the model's forward reads the value of an input-dependent tensor in Python{where} "
            "(data-dependent control flow: `if h.sum() > 0`, `.item()`, `.any()`, `.tolist()`); "
            "geomstore needs the same operations for every input: write it with piecewise-"
            "linear tensor operations (torch.maximum, clamp, relu, abs) instead."
        )
    return (
        f"could not trace the model{where} ({type(exc).__name__}: {text[:300]}); geomstore "
        "needs a forward without data-dependent control flow that torch's make_fx can trace."
    )


CACHE = LoweringCache(size=4)
"""The lowered graphs of the last models traced (see :mod:`geomstore.engine.cache`)."""


@dataclass
class _CacheKey:
    key: Any  # (fingerprint, input shape, logits)
    sha: str  # the weights hash (the fingerprint's first element)
    nbytes: int  # float64 bytes of the weights
    state: dict[str, Tensor]  # the model's state dict, detached


def _cache_key(model: Any, input_shape: tuple[int, ...], logits: bool) -> _CacheKey | None:
    """The cache key of an ``nn.Module`` the cache can keep, else None: torch.export
    programs and models over half the cache are traced every time."""
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return None
    nbytes = 8 * sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    if 2 * nbytes > CACHE.max_bytes:
        return None
    state = dict(model.state_dict())
    fp = fingerprint(model, state)
    return _CacheKey((fp, tuple(input_shape), bool(logits)), fp[0], nbytes, state)


PROBE_BATCH = 4
"""Inputs of the cache's forward check: VGG-11's float32 forward on 4 took 15 ms on the
project's CPU, where the float64 copy's on 16 (the check until 2026-11-26) took 0.59 s."""


def _probe(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    """The model's own forward, as it is (its dtype and device: no copy), on the probe
    batch; raises where it cannot run that way (such a model is traced every time)."""
    like = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    x = _example(input_shape, PROBE_BATCH, seed=2)
    if like is not None:
        x = x.to(like.device, like.dtype)
    with torch.no_grad(), quiet():
        out = _first(model(x))
    if not isinstance(out, Tensor):
        raise TypeError("the model's forward returned no tensor")
    return out.clone()  # under no_grad: nothing to detach


def _same_forward(model: nn.Module, input_shape: tuple[int, ...], want: Tensor) -> bool:
    """Whether the model's forward gives exactly ``want`` on the probe batch again."""
    try:
        got = _probe(model, input_shape)
    except Exception:  # the full lowering reports it
        return False
    return got.dtype == want.dtype and got.device == want.device and torch.equal(got, want)


def _check_batch(gm: torch.fx.GraphModule, fn: Any, input_shape: tuple[int, ...]) -> None:
    """The lowered graph must equal the model's own forward, sample by sample, on a batch."""
    x = _example(input_shape, 3, seed=1)
    try:
        with torch.no_grad(), quiet():
            got = _first(gm(x))
    except Exception as exc:
        raise UnsupportedModelError(
            "the model's graph does not run on a batch of inputs "
            f"({type(exc).__name__}: {exc}); geomstore evaluates many points at once, so the "
            "model must not fix its batch size (write x.flatten(1) or x.view(x.shape[0], -1), "
            "not x.view(1, -1))."
        ) from exc
    with torch.no_grad(), quiet():
        want = torch.cat([_first(fn(x[i : i + 1])) for i in range(3)])
    stripped = getattr(gm, "_gs_stripped", False)
    if not stripped and (
        not isinstance(got, Tensor) or got.shape != want.shape or not torch.allclose(got, want)
    ):
        held = [*fn.named_parameters(), *fn.named_buffers()] if isinstance(fn, nn.Module) else []
        bad = [k for k, t in held if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise UnsupportedModelError(
                f"the model's weights hold NaN or infinite values ({', '.join(bad[:5])}); "
                "load a checkpoint from before training diverged."
            )
        raise UnsupportedModelError(
            "the model's lowered graph does not reproduce its own forward on a batch of "
            "inputs (it may mix samples, or branch on values); geomstore needs a network that "
            "maps each sample independently."
        )
