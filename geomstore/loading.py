"""Loading models from files without running code from them (unless asked to).

A model reaches geomstore as one of:

- a ``torch.export`` program (``.pt2``, from ``torch.export.save``), read with every
  pickle in it refused but tensors (``torch.export.load`` itself would unpickle weights
  marked ``use_pickle``, opaque constants and legacy payloads, running code named in the
  file): such an archive loads only with ``trust_pickle=True``;
- a factory ``package.module:function`` that builds the module, plus a weights file: a
  state dict (``torch.load(weights_only=True)``: tensors only, no code) or safetensors;
- a TorchScript file (``torch.jit.save``), converted to an export program;
- a pickled whole module (``torch.save(model)``), only with ``trust_pickle=True``:
  unpickling runs code named in the file.

Every failure names the file and what was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import sys
import threading
import types
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geomstore.errors import GeomstoreError

__all__ = ["FactoryError", "ModelLoadError", "ModelSpec", "check_spec", "file_sha256", "load_model"]


class ModelLoadError(GeomstoreError):
    """A model file is missing, of an unknown kind, or does not fit its factory."""


class FactoryError(GeomstoreError):
    """A model factory (``package.module:function``) raised while building the module.

    Not a :class:`ModelLoadError`: what a factory does (download, read a config) may fail
    only this once, so a worker tries its job again.
    """


@dataclass(frozen=True)
class ModelSpec:
    """How to build one checkpoint's model: a file, and a factory when the file holds weights.

    Plain data (a JSON-able dict via ``to_dict``), so that it can be stored with a job.
    """

    path: str
    factory: str | None = None
    trust_pickle: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "factory": self.factory, "trust_pickle": self.trust_pickle}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(str(d["path"]), d.get("factory"), bool(d.get("trust_pickle", False)))

    def load(self, input_shape: Sequence[int]) -> Any:
        return load_model(
            self.path, factory=self.factory, input_shape=input_shape, trust_pickle=self.trust_pickle
        )


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (identifies a checkpoint file's content)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _kind(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix == ".pt2":
        return "export"
    if not zipfile.is_zipfile(path):
        return "unknown"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("serialized_exported_program.json") for n in names) or any(
        "/models/" in n and n.endswith(".json") for n in names
    ):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-save"
    return "unknown"


def _cwd_importable() -> None:
    """Modules in the current folder import, as under ``python -m`` (uvicorn's --app-dir):
    the ``geomstore`` script alone would not find a factory or a class next to the user."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _factory_parts(spec: str) -> tuple[str, str]:
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ModelLoadError(
            f"factory {spec!r} is not of the form package.module:function "
            "(e.g. mypkg.models:make_mlp, a function that takes no arguments)."
        )
    return mod_name, fn_name


def _factory(spec: str) -> Callable[[], Any]:
    mod_name, fn_name = _factory_parts(spec)
    _cwd_importable()
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import {mod_name!r} for factory {spec!r}: {exc}. Install the package or "
            "run from the folder that holds it (it must be importable)."
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelLoadError(f"{mod_name!r} has no function {fn_name!r} (factory {spec!r}).")
    return fn


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    names = ("torch._export", "torch.export", "torch._dynamo", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation notices are not the user's
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _PickledCode(ModelLoadError):
    """An archive asked to unpickle an object (raised where it would have run)."""


_EXPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def _tensors_only() -> Iterator[None]:
    """``torch.export.load`` with no unpickling but of tensors.

    Its loader calls ``torch.load(weights_only=False)`` for weights and constants marked
    ``use_pickle`` (and as the fallback for example inputs), ``pickle.loads`` for opaque
    constants and TorchScript's unpickler for custom objects. For the load, ``torch.load``
    takes tensors only and the other two refuse; loads take turns (the patch is global).
    """
    import pickle

    import torch.export.pt2_archive._package as package

    real_load, real_obj = torch.load, torch._C._pickle_load_obj

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _PickledCode("an object pickled in the archive")

    def tensors(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.get("pickle_module") is not None:
            refuse()
        kwargs["weights_only"] = True
        try:
            return real_load(f, map_location, **kwargs)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise _PickledCode(
                f"it names {named.group(1)}" if named else "not tensors only"
            ) from None

    shim = types.SimpleNamespace(**vars(pickle))
    shim.loads = shim.load = refuse
    with _EXPORT_LOCK:
        torch.load = tensors
        torch._C._pickle_load_obj = refuse
        package.pickle = shim  # type: ignore[assignment]
        try:
            yield
        finally:
            torch.load, torch._C._pickle_load_obj = real_load, real_obj
            package.pickle = pickle


def _load_export(p: Path, trust_pickle: bool) -> Any:
    guard = contextlib.nullcontext() if trust_pickle else _tensors_only()
    try:
        with _quiet_export(), guard:
            return torch.export.load(str(p))
    except _PickledCode as exc:
        raise ModelLoadError(
            f"{p} holds pickled objects besides tensors ({exc}); unpickling them would run "
            "code named in the file. Load it with --trust-pickle (trust_pickle=True) only if "
            "you trust where it came from, or save the model again with torch.export.save."
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"{p} is not a readable torch.export program: {exc}") from None


def _state_dict(path: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelLoadError(
                f"{path} is a safetensors file; install safetensors (pip install safetensors)."
            ) from None
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from None
    if kind == "torchscript":
        raise ModelLoadError(
            f"{path} is a TorchScript file, which holds its own model: drop --factory."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc).lower() or "unpickl" in type(exc).__name__.lower():
            raise ModelLoadError(
                f"{path} holds more than tensors (a pickled object); with a factory it must be "
                "a state dict: torch.save(model.state_dict(), path)."
            ) from None
        raise ModelLoadError(f"{path} is not a readable torch weights file: {exc}") from None
    for key in ("state_dict", "model_state_dict", "model"):  # common training-loop layouts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path} does not hold a state dict (a dict of tensors, or one under 'state_dict', "
            "'model_state_dict' or 'model')."
        )
    return obj


def load_model(
    path: str | Path,
    *,
    factory: str | None = None,
    input_shape: Sequence[int] | None = None,
    trust_pickle: bool = False,
) -> Any:
    """Load a model from a checkpoint file, ready for :func:`geomstore.partition`.

    Parameters
    ----------
    path : a ``.pt2`` export program, a TorchScript file, a weights file (state dict or
        ``.safetensors``) together with ``factory``, or a pickled module (``trust_pickle``).
    factory : ``"package.module:function"``, a function without arguments returning the
        module whose ``load_state_dict`` takes the weights.
    input_shape : the shape of one input (without batch); needed for TorchScript files.
    trust_pickle : load a pickled whole module, or a ``.pt2`` archive holding pickled
        objects besides tensors; either runs code named in the file.

    Returns an ``nn.Module`` in eval mode or a ``torch.export.ExportedProgram``.

    Examples
    --------
    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    >>> f = tempfile.mkdtemp() + "/net.pt2"
    >>> torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), f)
    >>> type(load_model(f)).__name__
    'ExportedProgram'
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"model file {p} does not exist (or is not a file).")
    kind = _kind(p)
    if factory is not None:
        state = _state_dict(p, kind)
        build = _factory(factory)
        try:
            model = build()
        except Exception as exc:
            raise FactoryError(
                f"factory {factory!r} raised {type(exc).__name__}: {exc} (while building the "
                f"model for {p})"
            ) from exc
        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(
                f"factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module."
            )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:600]
            raise ModelLoadError(
                f"the weights in {p} do not fit the model built by {factory!r}: {detail}"
            ) from None
        return model.eval()
    if kind == "export":
        return _load_export(p, trust_pickle)
    if kind == "torchscript":
        if input_shape is None:
            raise ModelLoadError(f"{p} is a TorchScript file; its input shape is needed.")
        try:
            from torch._export.converter import TS2EPConverter

            with _quiet_export():
                scripted = torch.jit.load(str(p), map_location="cpu")
                example = (torch.zeros(1, *input_shape),)
                return TS2EPConverter(scripted, example).convert()
        except Exception as exc:
            detail = " ".join(str(exc).split())[:400]
            raise ModelLoadError(
                f"cannot convert the TorchScript file {p} to an export program ({detail}); "
                "save the model with torch.export.save instead."
            ) from None
    if kind in ("torch-save", "safetensors"):
        if kind == "torch-save" and trust_pickle:
            _cwd_importable()
            try:
                obj = torch.load(p, map_location="cpu", weights_only=False)
            except (ImportError, AttributeError) as exc:  # the class's module or the class
                raise ModelLoadError(
                    f"cannot unpickle {p}: {exc}. A pickled module needs the code that defines "
                    "its class: run from the folder that holds that module, or install it."
                ) from None
            if not isinstance(obj, torch.nn.Module):
                raise ModelLoadError(
                    f"{p} unpickled to {type(obj).__name__}, not a torch.nn.Module; for a state "
                    "dict give factory= / --factory package.module:function."
                )
            return obj.eval()
        raise _needs_factory(p)
    raise _unknown_kind(p)


def _needs_factory(p: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{p} holds weights or a pickled object, not a self-contained model: give the "
        "factory that builds the module (factory= / --factory package.module:function), or "
        "save the model with torch.export.save(...) as .pt2. A pickled whole module is "
        "loaded only with trust_pickle=True / --trust-pickle (it runs code from the file)."
    )


def _unknown_kind(p: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{p} is not a model file geomstore knows: expected a torch.export program (.pt2), a "
        "TorchScript file, a state dict (.pt/.pth) or safetensors file with a factory "
        "(factory= / --factory)."
    )


def check_spec(spec: ModelSpec) -> None:
    """Refuse, without loading it, a file that :func:`load_model` cannot load as given.

    For jobs queued now and loaded later by a worker: weights with no factory (and a
    pickle not trusted), an unknown kind of file, a malformed factory. Loading can still
    fail later (the factory's module, the weights' shapes), as it can for any file.
    """
    p = Path(spec.path)
    if not p.is_file():
        raise ModelLoadError(f"model file {p} does not exist (or is not a file).")
    kind = _kind(p)
    if spec.factory is not None:
        _factory_parts(spec.factory)
        return
    if kind == "unknown":
        raise _unknown_kind(p)
    if kind == "safetensors" or (kind == "torch-save" and not spec.trust_pickle):
        raise _needs_factory(p)
