"""Loading checkpoints: every supported form gives the same partition; bad files say why."""

from __future__ import annotations

import contextlib
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


class _Plants:
    """Unpickling this creates a directory: the sign that code from a file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.makedirs, (str(self.path),))


class _WithConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 3)
        self.shift = torch.ones(3)  # a plain attribute: exported as a constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) + self.shift


def _rewrite(src: Path, dst: Path, edit: dict[str, bytes | None], config: str = "") -> None:
    """Copy a .pt2 archive, replacing members ending in a key of ``edit`` by its bytes and
    marking every payload of the config ending in ``config`` as pickled."""
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            for end, new in edit.items():
                if name.endswith(end) and new is not None:
                    data = new
            if config and name.endswith(config):
                cfg = json.loads(data)
                for meta in cfg["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(cfg).encode()
            zout.writestr(name, data)


@pytest.mark.parametrize(
    "where",
    ["weight marked use_pickle", "constant marked use_pickle", "sample inputs"],
)
def test_a_pt2_with_pickled_code_is_refused_before_it_runs(tmp_path: Path, where: str) -> None:
    import io

    torch.manual_seed(0)
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(_WithConstant(), (torch.zeros(1, 2),)), good)
    mark = tmp_path / "code ran"
    buf = io.BytesIO()
    torch.save(_Plants(mark), buf)
    evil = tmp_path / "evil.pt2"
    if where == "weight marked use_pickle":
        _rewrite(good, evil, {"weights/weight_0": buf.getvalue()}, "model_weights_config.json")
    elif where == "constant marked use_pickle":
        _rewrite(good, evil, {"constants/tensor_0": buf.getvalue()}, "model_constants_config.json")
    else:  # torch's own loader falls back to unpickling anything here
        _rewrite(good, evil, {"sample_inputs/model.pt": buf.getvalue()})
    with pytest.raises(ModelLoadError, match=r"pickled objects.*--trust-pickle") as err:
        load_model(evil)
    assert "os.makedirs" in str(err.value) or "posix" in str(err.value)
    assert not mark.exists()
    if where == "sample inputs":  # the CLI says the same, without a traceback
        import subprocess
        import sys

        cmd = ["compute", str(tmp_path / "store"), str(evil), "-m", "evil", "--box=-1,-1,1,1"]
        res = subprocess.run(
            [sys.executable, "-m", "geomstore", *cmd], capture_output=True, text=True, timeout=120
        )
        assert res.returncode != 0 and "--trust-pickle" in res.stderr + res.stdout
        assert "Traceback" not in res.stderr and not mark.exists()
    # the user may trust it explicitly: then the file's code runs, as torch's loader does
    with contextlib.suppress(Exception):  # what the planted object breaks varies
        load_model(evil, trust_pickle=True)
    assert mark.exists()
    # a plain archive still loads, with its constant, after a refused one
    prog = load_model(good)
    x = torch.randn(1, 2)  # exported for batch 1
    with torch.no_grad():
        assert torch.equal(prog.module()(x), torch.export.load(str(good)).module()(x))
