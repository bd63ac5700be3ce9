"""Training loop: the precomputed soft-target path, the epoch means and the opt-in fast paths."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kdistill import config
from kdistill.config import ConfigError, ModelConfig
from kdistill.losses import kd_loss_parts
from kdistill.models import build_model, model_spec
from kdistill.pipeline import hyper_for
from kdistill.trainer import (
    Hyper,
    SoftTargets,
    TrainData,
    predict_logits,
    train,
)


def blobs(rows: int = 120, features: int = 6, classes: int = 3, seed: int = 0):
    """Gaussian blobs that a small MLP separates within a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=generator) * 3
    labels = torch.arange(rows) % classes
    x = centers[labels] + torch.randn(rows, features, generator=generator)
    return x, labels


def tiny_model(features: int = 6, classes: int = 3, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return build_model(model_spec(ModelConfig(hidden=[8], dropout=dropout), features, classes))


def tiny_data(rows: int = 120) -> TrainData:
    x, y = blobs(rows)
    return TrainData(x, y, x[:30], y[:30])


def frozen_epoch(model, data, hyper_args: dict, soft=None) -> dict:
    """One epoch at lr 0, so the logged means are losses of the initial weights."""
    hyper = Hyper(epochs=1, lr=0.0, keep_best=False, **hyper_args)
    return train(model, data, hyper, seed=3, name="m", soft=soft).history[0]


def test_kd_epoch_means_match_kd_loss_parts():
    data = tiny_data(20)  # batch 8 leaves a short last batch of 4
    model = tiny_model()
    teacher_logits = torch.randn(20, 3) * 2
    with torch.no_grad():
        total, ce, kd = kd_loss_parts(model(data.x_train), teacher_logits, data.y_train, 4.0, 0.9)
    soft = SoftTargets(teacher_logits, temperature=4.0, alpha=0.9)
    record = frozen_epoch(model, data, {"batch_size": 8, "optimizer": "sgd"}, soft)
    assert record["loss"] == pytest.approx(total.item(), rel=1e-5)
    assert record["ce_loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert record["kd_loss"] == pytest.approx(kd.item(), rel=1e-4, abs=1e-6)


def test_baseline_epoch_mean_is_cross_entropy():
    data = tiny_data(20)
    model = tiny_model()
    with torch.no_grad():
        expected = F.cross_entropy(model(data.x_train), data.y_train).item()
    record = frozen_epoch(model, data, {"batch_size": 8, "optimizer": "sgd"})
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert record["ce_loss"] == pytest.approx(expected, rel=1e-5)
    assert record["kd_loss"] is None


def test_kd_step_gradient_matches_kd_loss_parts():
    data = tiny_data(16)
    teacher_logits = torch.randn(16, 3) * 2
    model = tiny_model()
    manual = copy.deepcopy(model)

    # One full-batch SGD step through the trainer.
    hyper = Hyper(epochs=1, lr=0.5, batch_size=16, optimizer="sgd", momentum=0.0, keep_best=False)
    train(model, data, hyper, seed=1, name="m", soft=SoftTargets(teacher_logits, 2.0, 0.7))

    # The same step by hand with the reference loss.
    total, _, _ = kd_loss_parts(manual(data.x_train), teacher_logits, data.y_train, 2.0, 0.7)
    total.backward()
    with torch.no_grad():
        for param in manual.parameters():
            param -= 0.5 * param.grad
    for trained, expected in zip(model.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("temperature", "alpha"), [(0.0, 0.5), (2.0, 1.5)])
def test_invalid_soft_targets_raise(temperature, alpha):
    soft = SoftTargets(torch.zeros(20, 3), temperature, alpha)
    with pytest.raises(ValueError):
        frozen_epoch(tiny_model(), tiny_data(20), {"batch_size": 8}, soft)


def test_fused_and_unfused_adam_agree():
    data = tiny_data()
    histories = []
    for fused in (False, True):
        hyper = Hyper(epochs=3, lr=1e-2, batch_size=16, fused=fused, keep_best=False)
        histories.append(train(tiny_model(), data, hyper, seed=5, name="m").history)
    for unfused, fused in zip(*histories, strict=True):
        assert fused["loss"] == pytest.approx(unfused["loss"], rel=1e-4)
        assert fused["val_accuracy"] == unfused["val_accuracy"]


def test_bf16_trains_close_to_fp32():
    x, y = blobs(600)
    data = TrainData(x[:480], y[:480], x[480:], y[480:])
    results = {}
    for bf16 in (False, True):
        hyper = Hyper(epochs=4, lr=1e-2, batch_size=32, bf16=bf16, keep_best=False)
        results[bf16] = train(tiny_model(dropout=0.1), data, hyper, seed=2, name="m").history[-1]
    # bfloat16 rounds the matrix products, so the loss differs but the accuracy does not.
    assert results[True]["loss"] != results[False]["loss"]
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=0.1, abs=0.02)
    assert results[False]["val_accuracy"] >= 0.95
    assert results[True]["val_accuracy"] >= results[False]["val_accuracy"] - 0.02


def test_bf16_leaves_evaluation_in_float32():
    model = tiny_model()
    hyper = Hyper(epochs=1, lr=1e-2, batch_size=16, bf16=True, keep_best=False)
    train(model, tiny_data(), hyper, seed=0, name="m")
    assert next(model.parameters()).dtype == torch.float32
    assert predict_logits(model, blobs(10)[0]).dtype == torch.float32


def test_predict_logits_chunks_agree_and_restore_mode():
    model = tiny_model(dropout=0.5)
    model.train()
    x = blobs(50)[0]
    whole = predict_logits(model, x)
    chunked = predict_logits(model, x, chunk=7)
    torch.testing.assert_close(whole, chunked)
    assert model.training


def test_config_bf16_reaches_hyper():
    cfg = config.from_dict({"train": {"bf16": True, "fused": False}})
    assert hyper_for(cfg, teacher=True).bf16 is True
    assert hyper_for(cfg, teacher=False).fused is False
    assert hyper_for(config.Config(), teacher=False).bf16 is False


def test_config_bf16_rejects_non_boolean():
    with pytest.raises(ConfigError) as caught:
        config.from_dict({"train": {"bf16": "yes"}})
    assert any("train.bf16" in problem for problem in caught.value.problems)


def test_config_teacher_bf16_follows_bf16_unless_set():
    both = config.from_dict({"train": {"bf16": True}})
    assert (hyper_for(both, True).bf16, hyper_for(both, False).bf16) == (True, True)
    teacher_only = config.from_dict({"train": {"teacher_bf16": True}})
    assert (hyper_for(teacher_only, True).bf16, hyper_for(teacher_only, False).bf16) == (
        True,
        False,
    )
    students_only = config.from_dict({"train": {"bf16": True, "teacher_bf16": False}})
    assert hyper_for(students_only, True).bf16 is False


def test_predict_logits_bf16_is_float32_and_close():
    model = tiny_model()
    x = blobs(64)[0]
    exact = predict_logits(model, x)
    rounded = predict_logits(model, x, bf16=True)
    assert rounded.dtype == torch.float32
    assert not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, rtol=0.02, atol=0.05)


class WholeModel(torch.nn.Module):
    """Hides ``training_parts``, so the trainer runs the whole model on every batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("block_rows", [8, 24, 4096])
def test_block_gather_matches_per_batch_bytes(monkeypatch, block_rows):
    from kdistill import trainer

    x, y = blobs(100)
    # A real standardization, so that applying it per block rather than per batch matters.
    data = TrainData(x * 5 + 3, y, x[:20] * 5 + 3, y[:20])
    mean, std = data.x_train.mean(0), data.x_train.std(0)
    soft = SoftTargets(torch.randn(100, 3), temperature=2.0, alpha=0.5)
    hyper = Hyper(epochs=2, lr=1e-2, batch_size=8, keep_best=False)

    def trained(wrap: bool, rows: int) -> list[torch.Tensor]:
        monkeypatch.setattr(trainer, "BLOCK_ROWS", rows)
        torch.manual_seed(0)
        spec = model_spec(ModelConfig(hidden=[8], dropout=0.2, input_dropout=0.1), 6, 3)
        model = build_model(spec, mean, std)
        train(WholeModel(model) if wrap else model, data, hyper, seed=4, name="m", soft=soft)
        return [p.detach().clone() for p in model.parameters()]

    per_batch = trained(wrap=True, rows=8)
    blocked = trained(wrap=False, rows=block_rows)
    for whole, split in zip(per_batch, blocked, strict=True):
        assert torch.equal(whole, split)
