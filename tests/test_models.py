"""kdistill's dropout: drop rate, scaling, eval behavior and determinism."""

import pytest
import torch

from kdistill.models import Dropout


def drawn(p: float, shape=(1000, 1000), seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return Dropout(p)(torch.ones(shape, dtype=dtype))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drop_rate_and_scale(p):
    out = drawn(p)
    dropped = (out == 0).float().mean().item()
    # 10^6 draws: the binomial standard deviation is at most 0.0005.
    assert dropped == pytest.approx(p, abs=0.002)
    kept_values = out[out != 0]
    # Kept values are scaled by the inverse of the rounded keep probability.
    kept_count = 65536 - round(p * 65536)
    assert torch.all(kept_values == 65536 / kept_count)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)


def test_four_elements_per_draw_are_independent():
    out = drawn(0.5, shape=(250_000, 4))
    dropped = out == 0
    # Both of two neighbours (from one 64-bit draw) dropped: 0.25 if independent.
    both = (dropped[:, 0] & dropped[:, 1]).float().mean().item()
    assert both == pytest.approx(0.25, abs=0.004)
    last_pair = (dropped[:, 2] & dropped[:, 3]).float().mean().item()
    assert last_pair == pytest.approx(0.25, abs=0.004)


def test_eval_mode_returns_input():
    module = Dropout(0.3).eval()
    x = torch.randn(5, 7)
    assert module(x) is x


def test_zero_probability_is_identity_in_training():
    x = torch.randn(5, 7)
    assert torch.equal(Dropout(0.0)(x), x)


def test_probability_near_one_keeps_a_finite_scale():
    module = Dropout(0.9999999)
    assert module.scale == 65536.0
    out = drawn(0.9999999, shape=(100, 100))
    assert torch.isfinite(out).all()


def test_same_seed_same_mask_other_seed_other_mask():
    assert torch.equal(drawn(0.2, (64, 64), seed=3), drawn(0.2, (64, 64), seed=3))
    assert not torch.equal(drawn(0.2, (64, 64), seed=3), drawn(0.2, (64, 64), seed=4))


def test_gradient_is_the_scaled_mask():
    torch.manual_seed(1)
    x = torch.randn(33, 17, requires_grad=True)
    out = Dropout(0.25)(x)
    out.sum().backward()
    mask = (out != 0).float() * (65536 / (65536 - 16384))
    torch.testing.assert_close(x.grad, mask, rtol=0, atol=0)


def test_odd_sizes_and_bfloat16():
    out = drawn(0.2, shape=(3, 5), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.shape == (3, 5)
