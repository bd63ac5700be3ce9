"""Safe and strict model loading: safetensors plus model.json, never pickle."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kdistill
from kdistill.checkpoint import CheckpointError, clean_state_dict, save_model
from kdistill.config import ModelConfig
from kdistill.models import Classifier, build_model, model_spec
from kdistill.predict import PredictError, open_model

PICKLE_NAMES = ["model.pt", "student.pt", "model.pth", "pytorch_model.bin", "checkpoint.ckpt"]


def make_model(hidden: list[int] | None = None, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    spec = model_spec(ModelConfig(hidden=hidden or [8]), in_features=6, num_classes=3)
    return build_model(spec, torch.arange(6.0), torch.full((6,), 2.0)).eval()


class CodeRunner:
    """Unpickling this object runs code that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('unpickled')",))


@pytest.fixture
def saved(tmp_path) -> tuple[Classifier, Path]:
    model = make_model()
    save_model(tmp_path / "model", model, ["a", "b", "c"])
    return model, tmp_path / "model"


# step: round trip


def test_load_rebuilds_model(saved):
    model, folder = saved
    loaded = kdistill.load(folder)
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert loaded.class_names == ["a", "b", "c"]
    assert torch.equal(loaded.standardize.mean, torch.arange(6.0))


def test_load_accepts_safetensors_file(saved):
    model, folder = saved
    loaded = kdistill.load(folder / "model.safetensors")
    assert loaded.spec == model.spec


# step: pickles are never executed


def test_planted_pickle_never_executed(saved, tmp_path):
    _, folder = saved
    # The payload really runs code when unpickled, so the checks below can fail.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CodeRunner(probe)))
    assert probe.read_text() == "unpickled"

    marker = tmp_path / "marker"
    payload = pickle.dumps(CodeRunner(marker))
    trap = tmp_path / "trap"
    trap.mkdir()
    shutil.copy(folder / "model.json", trap / "model.json")
    for name in PICKLE_NAMES:
        (trap / name).write_bytes(payload)
    # A pickle under a weights name that kdistill does read.
    (trap / "student.safetensors").write_bytes(payload)

    for target in [trap, trap / "student.safetensors", *(trap / n for n in PICKLE_NAMES)]:
        with pytest.raises(CheckpointError):
            kdistill.load(target)
        with pytest.raises((CheckpointError, PredictError)):
            open_model(target)
    assert not marker.exists()


def test_pickle_suffix_error_explains(saved):
    _, folder = saved
    (folder / "model.pt").write_bytes(b"ignored")
    with pytest.raises(CheckpointError, match=r"only \.safetensors weights are loaded"):
        kdistill.load(folder / "model.pt")


# step: strict keys and shapes


def test_missing_key_named(saved):
    _, folder = saved
    weights = load_file(str(folder / "model.safetensors"))
    del weights["net.0.bias"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['net.0.bias'\]"):
        kdistill.load(folder)


def test_unexpected_key_named(saved):
    _, folder = saved
    weights = load_file(str(folder / "model.safetensors"))
    weights["teacher.net.0.weight"] = torch.zeros(2, 2)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['teacher.net.0.weight'\]"):
        kdistill.load(folder)


def test_wrapper_prefix_key_rejected(saved):
    _, folder = saved
    weights = load_file(str(folder / "model.safetensors"))
    prefixed = {f"module.{key}": tensor for key, tensor in weights.items()}
    save_file(prefixed, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as caught:
        kdistill.load(folder)
    assert "module.net.0.weight" in str(caught.value)
    assert "'net.0.weight'" in str(caught.value)


def test_wrong_shape_named(saved):
    _, folder = saved
    wider = make_model(hidden=[9])
    save_file(clean_state_dict(wider), str(folder / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"net.0.bias has shape \(9,\), the architecture expects \(8,\)"
    ):
        kdistill.load(folder)


def test_corrupt_safetensors_rejected(saved):
    _, folder = saved
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        kdistill.load(folder)


def test_missing_model_json_rejected(saved):
    _, folder = saved
    (folder / "model.json").unlink()
    with pytest.raises(CheckpointError, match="model.json: missing"):
        kdistill.load(folder)


# step: clean names


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel, which keeps the model under ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_clean_state_dict_strips_wrappers():
    model = make_model()
    wrapped = Wrapper(Wrapper(model))
    assert all(key.startswith("module.module.") for key in wrapped.state_dict())
    cleaned = clean_state_dict(wrapped)
    assert list(cleaned) == list(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(cleaned[key], tensor), key


def test_saved_weights_use_plain_names(tmp_path):
    model = make_model()
    save_model(tmp_path, model, ["a", "b", "c"])
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert all(tensor.is_contiguous() for tensor in weights.values())


def test_invalid_model_json_named(tmp_path):
    from kdistill.checkpoint import CheckpointError, read_description

    path = tmp_path / "model.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_description(path)


def test_future_format_version_rejected(tmp_path):
    from kdistill.checkpoint import CheckpointError, read_description

    path = tmp_path / "model.json"
    path.write_text('{"format": "kdistill-model", "format_version": 99}')
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        read_description(path)
