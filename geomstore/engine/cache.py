"""A small cache of lowered graphs, so that the slices of one model are traced once.

Tracing a model (``make_fx``, the operator checks and rewrites) is a large share of a
small network's partition: 17-20 of about 52 ms for 2-100-100-1 on the project's CPU,
0.64 of 1.15 s for a ResNet-20 on an H100, where the rest is fast. Researchers partition
many slices of one checkpoint, so :func:`geomstore.engine.lower.lower` keeps the last few
graphs.

A graph is reused only for a model that is the same in everything tracing reads:

- the values of every parameter and buffer (the SHA-256 of the state dict that partitions
  carry as ``weights_sha256``, so in-place updates, ``load_state_dict`` and replaced
  ``.data`` all count, whatever the allocator reuses; buffers kept out of the state dict
  by value too);
- every module's class, mode, hooks and plain attributes (``negative_slope``, a kernel
  size, a replaced ``forward``), tensors among them by value;
- the input shape and whether a trailing softmax is stripped.

And even then only when the model's own forward gives, bit for bit, what it gave on a
batch of 4 random inputs when the graph was made: what no fingerprint sees (a global
that ``forward`` reads, a class attribute) makes it retrace when it changes the output
there (not always: a change beyond the probe's inputs goes unseen, and ``verify(net)``,
which runs the model itself, fails such a partition). That check runs the model as
it is, in its own dtype and on its own device, so a hit copies nothing: the float64 copy
that tracing needs is made on a miss only (VGG-11's hit took 0.76 s on the project's CPU
with the copy's forward on 16 inputs, most of it float64 convolutions).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LoweringCache", "fingerprint", "state_sha256"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_SKIP = frozenset({"_parameters", "_buffers", "_modules"})  # by value, or their own entry


def _tensor_token(t: Tensor) -> tuple[Any, ...]:
    data = t.detach().to("cpu").reshape(-1)
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return ("tensor", tuple(t.shape), t.dtype, t.device.type, hashlib.sha256(raw).hexdigest())


def _token(value: Any, depth: int = 0) -> Any:
    """A hashable stand-in for an attribute: by value where it is data, else by identity."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, Tensor):
        return _tensor_token(value)
    if depth < 4 and isinstance(value, (tuple, list)):
        return (type(value), tuple(_token(v, depth + 1) for v in value))
    if depth < 4 and isinstance(value, dict):
        return (
            type(value),
            tuple((_token(k, depth + 1), _token(v, depth + 1)) for k, v in value.items()),
        )
    if depth < 4 and isinstance(value, (set, frozenset)):
        return (type(value), tuple(sorted(repr(_token(v, depth + 1)) for v in value)))
    return ("object", type(value), id(value))


HASH_CHUNK = 1 << 15
"""Float64 elements of a state dict converted and hashed at a time by :func:`state_sha256`
(256 KiB: the chunk is hashed while it is still in the cache)."""


def state_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 of a state dict: names sorted, values as float64 bytes (the weights hash
    partitions and stores carry).

    Values go through one reused cache-sized buffer, a chunk at a time: VGG-11 (9.2M
    parameters) took 41 ms on the project's CPU, against 0.14 s converting each tensor
    whole and copying it once more to bytes (SHA-256 of the 74 MB alone: 44 ms).
    """
    h = hashlib.sha256()
    buf: Tensor | None = None
    for name, t in sorted(state.items()):
        h.update(name.encode())
        t = t.detach() if t.requires_grad else t
        if t.numel() <= HASH_CHUNK:  # one conversion (none for float64 on the host)
            h.update(t.to("cpu", torch.float64).contiguous().numpy().data)
            continue
        flat = t.reshape(-1)
        if buf is None:
            buf = torch.empty(HASH_CHUNK, dtype=torch.float64)
        for lo in range(0, flat.numel(), HASH_CHUNK):
            piece = flat[lo : lo + HASH_CHUNK]
            chunk = buf[: piece.numel()]
            chunk.copy_(piece)  # to float64 (and to the host)
            h.update(chunk.numpy().data)
    return h.hexdigest()


def fingerprint(model: nn.Module, state: dict[str, Tensor] | None = None) -> tuple[Any, ...]:
    """Everything tracing ``model`` reads except the input: see the module docstring.

    ``state`` is the model's (detached) state dict when the caller has it; its hash is
    the fingerprint's first element, :func:`state_sha256`.
    """
    state = dict(model.state_dict()) if state is None else state
    modules = []
    for name, mod in model.named_modules(remove_duplicate=False):
        attrs = tuple((k, _token(v)) for k, v in vars(mod).items() if k not in _SKIP)
        # buffers left out of the state dict count by value too
        kept_out = getattr(mod, "_non_persistent_buffers_set", ())
        extra = tuple((k, _token(b)) for k, b in mod._buffers.items() if k in kept_out)
        modules.append((name, type(mod), attrs, extra))
    hooks = tuple(
        _token(getattr(nn.modules.module, g, {}))
        for g in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_forward_hooks_always_called",
        )
    )
    return (state_sha256(state), tuple(modules), hooks)


@dataclass
class _Entry:
    gm: torch.fx.GraphModule
    stripped: bool
    probe: Any  # the model's own forward on the probe batch when the graph was made
    nbytes: int  # what the graph holds (its float64 copy of the weights)
    memo: dict[Any, Any] = field(default_factory=dict)  # what programs derive, by device


def memo_bytes(memo: dict[Any, Any]) -> int:
    """Bytes of the tensors a memo holds (in dicts, lists, tuples and dataclasses)."""
    seen: set[int] = set()

    def size(obj: Any, depth: int) -> int:
        if isinstance(obj, Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if depth > 3:
            return 0
        if isinstance(obj, dict):
            return sum(size(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v, depth + 1) for v in obj)
        if hasattr(obj, "__dataclass_fields__"):
            return sum(size(getattr(obj, f), depth + 1) for f in obj.__dataclass_fields__)
        return 0

    return size(memo, 0)


class LoweringCache:
    """The last ``size`` lowered graphs by (fingerprint, input shape, logits), holding at
    most ``max_bytes`` of weights (a long-running worker keeps no more); thread-safe.
    The default, 512 MiB, keeps models up to 256 MiB in float64 (32M parameters): VGG-11
    (74 MB) was traced in every partition at 128 MiB, 0.19 of 0.43 s on an H100.

    ``hits`` and ``misses`` count lookups (a hit whose graph then fails the forward check
    is counted as a miss by :func:`geomstore.engine.lower.lower`).
    """

    def __init__(self, size: int = 4, max_bytes: int = 512 << 20) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(
        self,
        key: Any,
        gm: torch.fx.GraphModule,
        stripped: bool,
        probe: Any,
        nbytes: int,
        memo: dict[Any, Any] | None = None,
    ) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._entries[key] = _Entry(gm, stripped, probe, nbytes, {} if memo is None else memo)
            self._entries.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.size or self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def remember(self, memo: dict[Any, Any], key: Any, value: Any) -> None:
        """Keep ``value`` in a cached graph's memo (what programs derive from the graph on
        one device: its weights there, stage matrices), evicting the oldest graphs past
        ``max_bytes``; a value that would take its own graph past it is not kept."""
        with self._lock:
            memo[key] = value
            owner = next((e for e in self._entries.values() if e.memo is memo), None)
            if owner is None:  # a graph not cached: the memo lives with its program
                return
            if owner.nbytes + memo_bytes(memo) > self.max_bytes:
                del memo[key]
            self._evict()

    @property
    def nbytes(self) -> int:
        """Bytes the cached graphs hold: their weights, and what programs derived from
        them on each device (:meth:`remember`), GPU memory included."""
        return sum(e.nbytes + memo_bytes(e.memo) for e in self._entries.values())

    def count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0
