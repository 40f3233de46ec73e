"""Where a refused operator sits in the user's model, for the error that refuses it.

A refusal names the operator, why it is refused, the module path at which a plain
forward calls it, and the line of the user's source (the innermost stack frame outside
torch). Tracing records no stack traces (they make it a quarter slower: a ResNet-20
traces in 107 ms instead of 135 ms, on every partition), so
the source line is found by tracing again, only when there is an error to build.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import logging
import os
import re
import site
import sysconfig
import traceback
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from geomstore.engine.ops import op_name
from geomstore.errors import UnsupportedModelError

__all__ = ["Refusal", "quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    names = ("torch._export", "torch.export", "torch._dynamo", "torch.fx", "torch._subclasses")
    levels = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lv in zip(names, levels, strict=True):
            logging.getLogger(n).setLevel(lv)


def _user_frame(stack: str | None) -> str:
    """The innermost frame of a stack trace outside torch itself, as 'file:line: code'."""
    if not stack:
        return ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', stack)
    torch_dir = str(torch.__file__).rsplit("/", 1)[0]
    user = [f for f in frames if not f[0].startswith(torch_dir)]
    if not user:
        return ""
    path, line, code = user[-1]
    return f"{path}:{line}: {code.strip()}"


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Folders whose code is not the user's: torch, geomstore, the standard library and
    installed packages (the CLI's typer and click), as given and resolved."""
    import geomstore

    kinds = ("stdlib", "platstdlib", "purelib", "platlib", "scripts")
    dirs = {Path(torch.__file__).parent, Path(geomstore.__file__).parent}
    dirs |= {Path(sysconfig.get_paths()[k]) for k in kinds}
    dirs |= {Path(d) for d in (*site.getsitepackages(), site.getusersitepackages()) if d}
    return tuple({str(p) + os.sep for d in dirs for p in (d, d.resolve())})


def user_frame(frame: types.FrameType) -> bool:
    """Whether a frame runs the user's code: not a library's (:func:`_library_dirs`), but
    any ``nn.Module`` method outside torch and geomstore (a model in an installed package)."""
    name = frame.f_code.co_filename
    if name.startswith("<"):
        return False
    own = (str(Path(torch.__file__).parent) + os.sep, str(Path(__file__).parents[1]) + os.sep)
    if name.startswith(own):
        return False
    return isinstance(frame.f_locals.get("self"), nn.Module) or not name.startswith(_library_dirs())


def frame_line(frame: types.FrameType, lineno: int) -> str:
    """'file:line: code' of a frame."""
    name = frame.f_code.co_filename
    return f"{name}:{lineno}: {linecache.getline(name, lineno).strip()}"


def _innermost_user_frame() -> str:
    """The innermost frame of the current Python stack in the user's code (:func:`user_frame`),
    as 'file:line: code'."""
    for frame, lineno in traceback.walk_stack(None):  # innermost first
        if user_frame(frame):
            return frame_line(frame, lineno)
    return ""


def _module_paths(module: nn.Module | None, x: Tensor, target: Any) -> list[tuple[str, str]]:
    """Module path and source line at each call of ``target`` in a plain forward (for
    error messages): the line is the operator's own, inside helpers the forward calls."""
    if module is None:
        return []
    names = {id(m): (n or "<model>", type(m).__name__) for n, m in module.named_modules()}
    stack: list[tuple[str, str]] = []
    found: list[tuple[str, str]] = []
    packet = getattr(target, "overloadpacket", target)

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            if getattr(func, "overloadpacket", func) is packet and stack:
                found.append((f"module {stack[-1][0]!r} ({stack[-1][1]})", _innermost_user_frame()))
            return func(*args, **(kwargs or {}))

    def pre(m: nn.Module, _i: Any) -> None:
        stack.append(names.get(id(m), ("?", type(m).__name__)))

    def post(m: nn.Module, _i: Any, _o: Any) -> None:
        if stack:
            stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in module.modules()]
    hooks += [m.register_forward_hook(post) for m in module.modules()]
    try:
        with torch.no_grad(), quiet(), Spy():
            module(x)
    except Exception:
        pass
    finally:
        for h in hooks:
            h.remove()
    return found


class Refusal:
    """Builds the error for a refused node: operator, why, module path and source line."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        module: nn.Module | None,
        x: Tensor,
        retrace: Callable[[], torch.fx.GraphModule] | None = None,
    ) -> None:
        self.gm, self.module, self.x, self.retrace = gm, module, x, retrace

    def _stack_trace(self, node: torch.fx.Node) -> str | None:
        """The node's source stack: traced without stack traces (about a quarter
        faster), so it is found by tracing again, only for an error."""
        trace = node.meta.get("stack_trace")
        if trace or self.retrace is None:
            return trace
        try:
            gm = self.retrace()
        except Exception:
            return None
        for n in gm.graph.nodes:  # tracing is deterministic: the same node has the same name
            if n.name == node.name and n.target == node.target:
                return n.meta.get("stack_trace")
        return None

    def __call__(self, node: torch.fx.Node, why: str, fix: str = "") -> UnsupportedModelError:
        name = op_name(node.target)
        same = [n for n in self.gm.graph.nodes if n.op == node.op and n.target == node.target]
        where: list[str] = []
        paths = _module_paths(self.module, self.x, node.target)
        k = same.index(node) if node in same else 0
        line = ""
        if k < len(paths):
            where.append(paths[k][0])
            line = paths[k][1]
        frame = line or _user_frame(self._stack_trace(node))
        if frame:
            where.append(frame)
        at = f" at {', '.join(where)}" if where else ""
        msg = f"operator {name}{at} is not affine or piecewise linear: {why}"
        return UnsupportedModelError(msg + (f"; {fix}" if fix else "."))
