"""Int8 / fp16 cut states and the fedloom-cut file: exact by hand, exact round trips, the sizes a sparse model earns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.cutting.quantize import build_model_from_cut, cut_state, load_cut, save_cut
from fedloom.cutting.structured import cut
from fedloom.models.mnist import McMahanCNN
from fedloom.models.tabular import MLP


def test_int8_by_hand() -> None:
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.27, -0.635, 0.0], [0.01, 0.5, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.25]))
    st = cut_state(nn.Sequential(lin), "int8")
    # scale = max|w| / 127 = 0.01; q = round(w / 0.01)
    assert float(st["0.weight::scale"]) == pytest.approx(0.01)
    assert st["0.weight"].tolist() == [[127, -64, 0], [1, 50, -100]]  # -63.5 rounds half to even: -64
    assert st["0.bias"].dtype == torch.float32
    model = build_model_from_cut(nn.Sequential(nn.Linear(3, 2)), st, "int8")
    assert type(model[0]).__name__ == "Linear" and "quantized" in type(model[0]).__module__
    assert torch.equal(model[0].weight().int_repr(), st["0.weight"])


@pytest.mark.parametrize("quantize", ["none", "fp16", "int8"])
@pytest.mark.parametrize("sparse", [False, True])
def test_file_round_trip_is_exact(tmp_path: Path, quantize: str, sparse: bool) -> None:
    torch.manual_seed(0)
    model = McMahanCNN().eval()
    with torch.no_grad():  # 90% of each weight zero
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_((torch.rand_like(p) > 0.9).float())
    state = cut_state(model, quantize)  # type: ignore[arg-type]
    built = build_model_from_cut(McMahanCNN(), state, quantize)  # type: ignore[arg-type]
    size = save_cut(tmp_path / "m.st", state, quantize=quantize, sparse=sparse, metadata={"run": "r", "version": 3})  # type: ignore[arg-type]
    loaded, info = load_cut(tmp_path / "m.st", McMahanCNN)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(x), built(x))
    assert info == {"run": "r", "version": 3}
    dense = 1_663_370 * 4
    if quantize == "int8" and sparse:
        assert dense / size > 10  # the target: 90% sparse + int8 at least 10x smaller
    if quantize == "none":
        assert torch.equal(built(x), model(x))


def test_sparse_bytes_by_hand(tmp_path: Path) -> None:
    w = torch.zeros(4, 4)
    w[0, 0], w[3, 2] = 1.5, -2.0
    save_cut(tmp_path / "s", {"w": w}, quantize="none", sparse=True, metadata={})
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "s"))
    # 16 entries -> 2 bitmap bytes: bit 0 (w[0,0]) and bit 14 (w[3,2]) -> [1, 64]
    assert raw["w::bitmap"].tolist() == [1, 64] and raw["w::values"].tolist() == [1.5, -2.0]
    assert sum(t.numel() * t.element_size() for t in raw.values()) == 2 + 2 * 4  # vs 16 * 4 dense


class _W(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4))


def test_a_sparse_tensor_comes_back_dense(tmp_path: Path) -> None:
    w = torch.zeros(4, 4)
    w[1, 3] = 7.0
    save_cut(tmp_path / "s", {"w": w}, quantize="none", sparse=True, metadata={})
    m, _ = load_cut(tmp_path / "s", _W)
    assert torch.equal(m.w.detach(), w)


def test_structured_then_int8_loads_into_the_smaller_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(21, hidden=(64, 32)).eval()
    _, small, _ = cut(model, 0.5)
    state = cut_state(small, "int8")
    save_cut(tmp_path / "m", state, quantize="int8", sparse=True, metadata={})
    loaded, _ = load_cut(tmp_path / "m", lambda: MLP(21, hidden=(64, 32)))
    x = torch.randn(7, 21)
    assert torch.equal(loaded(x), build_model_from_cut(MLP(21, hidden=(64, 32)), state, "int8")(x))
    with torch.no_grad():
        err = float((loaded(x) - small(x)).abs().max())
    assert err < 0.05 * float(small(x).detach().abs().max()) + 0.05


def test_bad_files_and_options_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain"))
    with pytest.raises(ConfigError, match="not a fedloom-cut"):
        load_cut(tmp_path / "plain", nn.Module)
    with pytest.raises(ConfigError, match="quantize"):
        cut_state(nn.Linear(2, 2), "int4")  # type: ignore[arg-type]
