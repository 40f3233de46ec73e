"""The cache of lowered graphs: slices of one model trace once; any change traces again."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from geomstore import Slice, partition
from geomstore.engine.cache import fingerprint
from geomstore.engine.lower import CACHE
from tests.nets import BOX, mlp

OTHER = Slice.box((-0.5, -2.0), (1.5, 0.5), name="other")
SHIFT = 0.25  # read by Shifted.forward: a global no fingerprint sees


class Shifted(nn.Module):
    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(2, 12)
        self.fc2 = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) - SHIFT))


def _fresh(model: nn.Module, sl: Slice = BOX) -> object:
    """The partition from a fresh trace (the cache emptied first)."""
    CACHE.clear()
    return partition(model, sl, device="cpu")


def _same(a: object, b: object) -> None:
    for name in ("regions", "edges", "boundary"):
        assert getattr(a, name).equals(getattr(b, name)), name


def test_slices_of_one_model_trace_once_with_the_same_result() -> None:
    model = mlp((16, 16), 3, seed=4)
    first = partition(model, BOX, device="cpu")
    second = partition(model, OTHER, device="cpu")
    again = partition(model, BOX, device="cpu")
    assert (CACHE.hits, CACHE.misses) == (2, 1)
    _same(first, again)
    assert second.verify(model, grid=48).ok
    _same(second, _fresh(model, OTHER))


def _add_in_place(m: nn.Sequential) -> None:
    with torch.no_grad():
        m[0].weight.mul_(1.1)


def _load_other_weights(m: nn.Sequential) -> None:
    m.load_state_dict(mlp((16, 16), 3, seed=9).state_dict())


def _replace_data_twice(m: nn.Sequential) -> None:
    # the second tensor may land where the first one was: values, not addresses, count
    m[2].bias.data = m[2].bias.data + 0.1
    m[2].bias.data = m[2].bias.data - 0.2


def _train_step(m: nn.Sequential) -> None:
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.randn(8, 2)).square().sum().backward()
    opt.step()


@pytest.mark.parametrize(
    "change", [_add_in_place, _load_other_weights, _replace_data_twice, _train_step]
)
def test_changed_weights_are_traced_again(change: Callable[[nn.Sequential], None]) -> None:
    model = mlp((16, 16), 3, seed=4)
    before = partition(model, BOX, device="cpu")
    change(model)
    after = partition(model, BOX, device="cpu")
    assert (CACHE.hits, CACHE.misses) == (0, 2)
    assert not after.regions.equals(before.regions)
    assert after.verify(model, grid=48).ok
    _same(after, _fresh(model))


def _slope(m: nn.Sequential) -> None:
    m[1].negative_slope = 0.3


def _swap_module(m: nn.Sequential) -> None:
    m[3] = nn.ReLU()


def _hook(m: nn.Sequential) -> None:
    m[2].register_forward_hook(lambda mod, inp, out: torch.relu(out - 0.1))


@pytest.mark.parametrize("change", [_slope, _swap_module, _hook])
def test_changed_modules_and_hooks_are_traced_again(
    change: Callable[[nn.Sequential], None],
) -> None:
    model = mlp((16, 16), 3, act=nn.LeakyReLU, seed=4, negative_slope=0.1)
    before = partition(model, BOX, device="cpu")
    change(model)
    after = partition(model, BOX, device="cpu")
    assert CACHE.hits == 0
    assert not after.regions.equals(before.regions)
    assert after.verify(model, grid=48).ok
    _same(after, _fresh(model))


def test_a_global_read_by_forward_is_caught_by_the_forward_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fingerprint cannot see ``SHIFT``; the cached graph's probe can."""
    model = Shifted().eval()
    before = partition(model, BOX, device="cpu")
    monkeypatch.setattr(sys.modules[__name__], "SHIFT", -0.4)
    after = partition(model, BOX, device="cpu")
    assert (CACHE.hits, CACHE.misses) == (0, 2)
    assert not after.regions.equals(before.regions)
    assert after.verify(model, grid=48).ok


def test_the_cache_keeps_a_few_models() -> None:
    models = [mlp((8,), 2, seed=s) for s in range(CACHE.size + 1)]
    for m in models:
        partition(m, BOX, device="cpu")
    partition(models[-1], BOX, device="cpu")  # the newest is kept
    partition(models[0], BOX, device="cpu")  # the oldest was dropped
    assert (CACHE.hits, CACHE.misses) == (1, CACHE.size + 2)


@pytest.mark.parametrize(
    "change",
    [_add_in_place, _load_other_weights, _replace_data_twice, _train_step, _swap_module, _hook],
)
def test_the_fingerprint_sees_values_modules_and_hooks(
    change: Callable[[nn.Sequential], None],
) -> None:
    """Without the forward check: the fingerprint alone changes with each change, and a
    copy of the model (a checkpoint loaded into a new object) has the same one."""
    model = mlp((16, 16), 3, seed=4)
    before = fingerprint(model)
    assert fingerprint(copy.deepcopy(model)) == before
    change(model)
    assert fingerprint(model) != before


def test_the_fingerprint_sees_plain_attributes() -> None:
    model = mlp((16, 16), 3, act=nn.LeakyReLU, seed=4, negative_slope=0.1)
    before = fingerprint(model)
    _slope(model)
    assert fingerprint(model) != before


def test_models_over_half_the_cache_are_traced_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = mlp((16, 16), 3, seed=4)  # 371 weights: 2,968 bytes in float64
    monkeypatch.setattr(CACHE, "max_bytes", 5_900)
    partition(model, BOX, device="cpu")
    partition(model, BOX, device="cpu")
    assert (CACHE.hits, CACHE.misses, CACHE.nbytes) == (0, 0, 0)
    monkeypatch.setattr(CACHE, "max_bytes", 6_000)
    partition(model, BOX, device="cpu")
    partition(model, BOX, device="cpu")
    # and the stage matrices kept with the graph: 8 x (16 x 16 + 16 + 16 x 3 + 3) bytes
    assert (CACHE.hits, CACHE.misses, CACHE.nbytes) == (1, 1, 2_968 + 2_584)


def _f64(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def test_what_programs_derive_is_kept_within_the_cache_bytes() -> None:
    from geomstore.engine.cache import LoweringCache

    cache = LoweringCache(size=2, max_bytes=1000)
    gm = torch.fx.symbolic_trace(nn.Identity())
    memos: list[dict[object, object]] = [{}, {}]
    cache.put("a", gm, False, None, 400, memos[0])
    cache.remember(memos[0], "big", _f64(80))  # 640 bytes: a past 1000 alone
    assert "big" not in memos[0] and cache.nbytes == 400
    cache.remember(memos[0], "small", _f64(50))
    assert cache.nbytes == 800
    cache.put("b", gm, False, None, 300, memos[1])  # 1100 bytes: the oldest goes
    assert cache.get("a") is None and cache.nbytes == 300
    cache.remember(memos[1], "m", {"w": _f64(25), "again": memos[0]["small"]})
    assert cache.nbytes == 300 + 200 + 400  # tensors in dicts, each counted once
    loose: dict[object, object] = {}
    cache.remember(loose, "x", _f64(10_000))  # not a cached graph's: kept, uncounted
    assert "x" in loose and cache.nbytes == 900


class Tied(nn.Module):
    """Two layers sharing one weight, and a buffer: the float64 copy must keep both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.inp = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("shift", torch.full((4,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(torch.relu(self.inp(x))) - self.shift)
        return self.head(torch.relu(self.b(h)))


def test_tracing_copies_the_model_in_float64_and_leaves_it_alone() -> None:
    model = Tied().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    part = partition(model, BOX, device="cpu")
    assert part.verify(model, grid=48).ok
    assert model.a.weight is model.b.weight  # still tied, still float32, same values
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the traced copy is one float64 model with the tie kept (one weight, not two)
    from geomstore.engine.lower import _source

    copy_, _, _ = _source(model)
    assert copy_.a.weight is copy_.b.weight
    assert {p.dtype for p in copy_.parameters()} | {b.dtype for b in copy_.buffers()} == {
        torch.float64
    }


def test_a_checkpoint_loaded_into_a_new_model_reuses_the_trace() -> None:
    """A worker builds a new model per job and loads the checkpoint into it: jobs on one
    checkpoint trace once, jobs on another trace again."""
    from tests.nets import SmallCNN, digits_slice

    def load(state: dict[str, torch.Tensor]) -> nn.Module:
        model = SmallCNN(seed=7).eval()
        model.load_state_dict(state)
        return model

    first, second = SmallCNN(seed=0).state_dict(), SmallCNN(seed=1).state_dict()
    a = partition(load(first), digits_slice(0), device="cpu")
    b = partition(load(first), digits_slice(1), device="cpu")
    assert (CACHE.hits, CACHE.misses) == (1, 1)
    partition(load(second), digits_slice(0), device="cpu")
    assert (CACHE.hits, CACHE.misses) == (1, 2)
    assert b.verify(load(first), grid=32).ok
    _same(a, _fresh(load(first), digits_slice(0)))


def test_the_weights_hash_is_sha256_of_names_and_float64_bytes() -> None:
    """The chunked hash gives the plain definition's value: stores compare it."""
    import hashlib

    from geomstore.engine.cache import HASH_CHUNK, state_sha256

    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(3 * HASH_CHUNK + 5, generator=g),  # several chunks, a short last one
        "t": torch.randn(7, 9, generator=g).t(),  # not contiguous
        "n": torch.tensor(4),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "a.bias": torch.randn(2, generator=g, dtype=torch.float64),
        "param": nn.Parameter(torch.randn(4, generator=g)),  # requires grad
    }
    want = hashlib.sha256()
    for name in sorted(state):
        want.update(name.encode())
        want.update(state[name].detach().to(torch.float64).contiguous().numpy().tobytes())
    assert state_sha256(state) == want.hexdigest()
    with torch.no_grad():
        state["w"][HASH_CHUNK + 1] += 1e-6  # one value in the second chunk
    assert state_sha256(state) != want.hexdigest()


def test_a_hit_makes_no_float64_copy_and_still_refuses_training_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forward check runs the model as it is; the copy for tracing is made on misses."""
    import geomstore.engine.lower as lower_mod
    from geomstore.errors import UnsupportedModelError

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    first = partition(model, BOX, device="cpu")

    def no_copy(*args: object) -> None:
        raise AssertionError("a cache hit copied the model")

    monkeypatch.setattr(lower_mod, "_source", no_copy)
    again = partition(model, BOX, device="cpu")
    assert (CACHE.hits, CACHE.misses) == (1, 1)
    _same(first, again)
    assert all(v.dtype != torch.float64 for v in model.state_dict().values())
    model.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        partition(model, BOX, device="cpu")


def test_a_hit_reuses_the_stage_matrices_kept_with_the_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stage matrices depend on the graph and the device only: probed once per graph."""
    from geomstore.engine.cache import memo_bytes
    from geomstore.engine.descent import Descent

    model = mlp((24, 24), 3, seed=5)
    first = partition(model, BOX, device="cpu")
    entry = next(iter(CACHE._entries.values()))
    kept = {k: v for k, v in entry.memo.items() if "stage matrix" in k}
    assert len(kept) == 2 and kept[("cpu", "stage matrix", 0, Descent.max_matrix_elements)]
    assert memo_bytes(entry.memo) >= 8 * (24 * 24 + 24 * 3)  # counted in the cache's bytes
    assert CACHE.nbytes == entry.nbytes + memo_bytes(entry.memo)

    def no_probe(self: Descent, layer: int) -> None:
        raise AssertionError("a cache hit probed a stage matrix again")

    monkeypatch.setattr(Descent, "_stage_matrix", no_probe)
    again = partition(model, OTHER, device="cpu")
    assert (CACHE.hits, CACHE.misses) == (1, 1)
    assert again.verify(model, grid=48).ok
    monkeypatch.undo()
    _same(again, _fresh(model, OTHER))
    _same(first, _fresh(model))
    # another setting is another key: probed again (no stage is a matrix now)
    monkeypatch.setattr(Descent, "max_matrix_elements", 10)
    general = partition(model, BOX, device="cpu")
    entry = next(iter(CACHE._entries.values()))
    assert entry.memo[("cpu", "stage matrix", 0, 10)] is None
    assert general.n_regions == first.n_regions and general.verify(model, grid=48).ok
    CACHE.clear()
    assert CACHE.nbytes == 0


CAP = 1e9  # read by Capped.forward: changing it changes the model beyond the probe's inputs


class Capped(Shifted):
    def __init__(self) -> None:
        super().__init__(seed=11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(torch.relu(h) - torch.relu(h - CAP))


def test_verify_runs_the_model_itself_and_fails_a_stale_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Capped().eval()
    wide = Slice.box((-20.0, -20.0), (20.0, 20.0))
    first = partition(model, wide, device="cpu")
    assert first.verify(model, grid=32).ok
    # the probe's inputs lie in [-0.5, 0.5): there no unit reaches the new cap
    monkeypatch.setattr(sys.modules[__name__], "CAP", 2.0)
    stale = partition(model, wide, device="cpu")
    assert CACHE.hits == 1  # the cache could not tell
    report = stale.verify(model, grid=32)
    own = next(c for c in report.checks if c.name == "model's own output")
    assert not own.passed and not report.ok
    assert all(c.passed for c in report.checks if c.name != "model's own output")
    fresh = _fresh(model, wide)
    assert fresh.n_regions > stale.n_regions and fresh.verify(model, grid=32).ok


def test_verify_of_another_model_fails_and_logits_partitions_pass() -> None:
    model = mlp((16, 16), 3, seed=4)
    part = partition(model, BOX, device="cpu")
    assert not part.verify(mlp((16, 16), 3, seed=5), grid=24).ok
    soft = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    logsoft = nn.Sequential(model, nn.LogSoftmax(dim=-1)).eval()
    for net in (soft, logsoft):
        p = partition(net, BOX, device="cpu", logits=True)
        report = p.verify(net, grid=24)
        assert report.ok, str(report)
        assert any(c.name == "model's own output" for c in report.checks)
