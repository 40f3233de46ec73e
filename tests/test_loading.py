"""Loading checkpoints: every supported form gives the same partition; bad files say why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import geomstore
from geomstore.loading import ModelLoadError, load_model
from tests.nets import BOX, factory_mlp, mlp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _regions(model: object) -> list[bytes]:
    part = geomstore.partition(model, BOX, device="cpu")
    return part.regions.column("pattern").to_pylist()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    net = factory_mlp()
    for p in net.parameters():  # distinct from the seed, so a silently ignored load shows
        p.data.add_(0.05 * torch.randn_like(p))
    f = {
        "sd": tmp_path / "w.pt",
        "wrapped": tmp_path / "ckpt.pth",
        "st": tmp_path / "w.safetensors",
        "pt2": tmp_path / "m.pt2",
        "ts": tmp_path / "m.ts",
        "traced": tmp_path / "traced.pt",
        "pickle": tmp_path / "whole.pt",
    }
    torch.save(net.state_dict(), f["sd"])
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, f["wrapped"])
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(f["st"]))
    torch.export.save(torch.export.export(net, (torch.zeros(1, 2),)), f["pt2"])
    torch.jit.script(net).save(str(f["ts"]))
    torch.jit.trace(net, torch.zeros(1, 2)).save(str(f["traced"]))
    torch.save(net, f["pickle"])
    f["net"] = net  # type: ignore[assignment]
    return f


def test_every_form_gives_the_models_partition(files: dict[str, Path]) -> None:
    want = _regions(files["net"])
    fac = "tests.nets:factory_mlp"
    assert _regions(load_model(files["sd"], factory=fac)) == want
    assert _regions(load_model(files["wrapped"], factory=fac)) == want
    assert _regions(load_model(files["st"], factory=fac)) == want
    assert _regions(load_model(files["pt2"])) == want
    assert _regions(load_model(files["ts"], input_shape=(2,))) == want
    assert _regions(load_model(files["traced"], input_shape=(2,))) == want
    assert _regions(load_model(files["pickle"], trust_pickle=True)) == want


def test_pickled_module_needs_the_explicit_flag(files: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(files["pickle"])
    with pytest.raises(ModelLoadError, match="pickled object"):
        load_model(files["pickle"], factory="tests.nets:factory_mlp")


def test_bad_files_and_factories_name_the_problem(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a model file geomstore knows"):
        load_model(junk)
    with pytest.raises(ModelLoadError, match=r"package\.module:function"):
        load_model(files["sd"], factory="tests.nets")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model(files["sd"], factory="no_such_pkg.mod:make")
    with pytest.raises(ModelLoadError, match="has no function"):
        load_model(files["sd"], factory="tests.nets:nope")
    other = tmp_path / "other.pt"
    torch.save(mlp((8,), 3).state_dict(), other)
    with pytest.raises(ModelLoadError, match=r"do not fit the model built by .*size mismatch"):
        load_model(other, factory="tests.nets:factory_mlp")
    with pytest.raises(ModelLoadError, match="weights or a pickled object"):
        load_model(files["sd"])
    with pytest.raises(ModelLoadError, match="TorchScript file, which holds its own model"):
        load_model(files["ts"], factory="tests.nets:factory_mlp")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_model(bad, factory="tests.nets:factory_mlp")
