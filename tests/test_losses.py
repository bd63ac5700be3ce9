"""Loss values against numbers worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import kd_loss, kd_loss_parts, soft_target_loss

# Teacher logits [2, 1, 0] and student logits [0, 1, 2] are mirror images, so
# softmax(t/T) = (a, b, c) and softmax(s/T) = (c, b, a). The KL divergence then reduces to
# (a - c) * log(a / c) = (a - c) * 2 / T, because the logits of the two ends differ by 2.
TEACHER = torch.tensor([[2.0, 1.0, 0.0]])
STUDENT = torch.tensor([[0.0, 1.0, 2.0]])


def mirror_kl(temperature: float) -> float:
    weights = [math.exp(v / temperature) for v in (2.0, 1.0, 0.0)]
    a, c = weights[0] / sum(weights), weights[2] / sum(weights)
    return (a - c) * 2.0 / temperature


def test_equal_logits_give_zero():
    logits = torch.randn(8, 5)
    assert soft_target_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_three_classes_at_t1():
    # a = 0.665241, c = 0.090031: (a - c) * 2 = 1.150421
    value = soft_target_loss(STUDENT, TEACHER, 1.0).item()
    assert value == pytest.approx(1.150421, abs=1e-6)
    assert value == pytest.approx(mirror_kl(1.0), rel=1e-6)


def test_three_classes_at_t4():
    # a = 0.419229, c = 0.254275: (a - c) * 0.5 = 0.0824769, times T^2 = 16 gives 1.319630
    value = soft_target_loss(STUDENT, TEACHER, 4.0).item()
    assert value == pytest.approx(1.319630, abs=1e-5)


def test_t_squared_scaling():
    for temperature in (0.5, 2.0, 4.0, 10.0):
        expected = temperature**2 * mirror_kl(temperature)
        assert soft_target_loss(STUDENT, TEACHER, temperature).item() == pytest.approx(
            expected, rel=1e-5
        )


def test_batch_mean_over_rows():
    student = torch.cat([STUDENT, TEACHER])
    teacher = torch.cat([TEACHER, TEACHER])
    # Row 2 has zero divergence, so the batch mean is half of row 1's value.
    assert soft_target_loss(student, teacher, 1.0).item() == pytest.approx(1.150421 / 2, abs=1e-6)


def test_alpha_zero_is_cross_entropy():
    labels = torch.tensor([0])
    total = kd_loss(STUDENT, TEACHER, labels, 4.0, 0.0)
    # -log softmax([0, 1, 2])[0] = log(1 + e + e^2) = 2.407606
    assert total.item() == pytest.approx(2.407606, abs=1e-6)
    assert torch.equal(total, F.cross_entropy(STUDENT, labels))


def test_alpha_one_is_soft_loss():
    labels = torch.tensor([0])
    total = kd_loss(STUDENT, TEACHER, labels, 4.0, 1.0)
    assert total.item() == pytest.approx(1.319630, abs=1e-5)


def test_blend_at_half():
    labels = torch.tensor([0])
    total = kd_loss(STUDENT, TEACHER, labels, 4.0, 0.5).item()
    assert total == pytest.approx(0.5 * 2.407606 + 0.5 * 1.319630, abs=1e-5)


def test_alpha_zero_gradient_equals_cross_entropy():
    student = torch.randn(16, 10, requires_grad=True)
    teacher = torch.randn(16, 10) * 5
    labels = torch.randint(0, 10, (16,))
    kd_loss(student, teacher, labels, 4.0, 0.0).backward()
    kd_grad = student.grad.clone()
    student.grad = None
    F.cross_entropy(student, labels).backward()
    assert torch.equal(kd_grad, student.grad)


def test_continuous_as_alpha_approaches_ends():
    torch.manual_seed(0)
    student, teacher = torch.randn(32, 10), torch.randn(32, 10) * 3
    labels = torch.randint(0, 10, (32,))
    for end in (0.0, 1.0):
        at_end = kd_loss(student, teacher, labels, 4.0, end).item()
        for step in (1e-3, 1e-5):
            near = end + step if end == 0.0 else end - step
            assert abs(kd_loss(student, teacher, labels, 4.0, near).item() - at_end) < 50 * step


def test_finite_at_small_temperature():
    student = torch.tensor([[10.0, -10.0, 10.0], [-10.0, 10.0, -10.0]], requires_grad=True)
    teacher = torch.tensor([[-10.0, 10.0, -10.0], [10.0, -10.0, -10.0]])
    loss = soft_target_loss(student, teacher, 0.05)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    # Row 1: the teacher puts all mass on class 1, where the student's log-probability at
    # T = 0.05 is (-10 - 10) / 0.05 - log 2 = -400.69; T^2 * KL = 0.0025 * 400.69.
    # Row 2: the same gap of 20 logits, without the tie: 0.0025 * 400 = 1.0.
    expected = (0.0025 * (400 + math.log(2)) + 0.0025 * 400) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_parts_report_both_terms():
    labels = torch.tensor([0])
    total, ce, soft = kd_loss_parts(STUDENT, TEACHER, labels, 4.0, 0.9)
    assert ce.item() == pytest.approx(2.407606, abs=1e-6)
    assert soft.item() == pytest.approx(1.319630, abs=1e-5)
    assert total.item() == pytest.approx(0.1 * 2.407606 + 0.9 * 1.319630, abs=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0, "alpha": 0.5},
        {"temperature": -1.0, "alpha": 0.5},
        {"temperature": 4.0, "alpha": 1.5},
        {"temperature": 4.0, "alpha": -0.1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        kd_loss(STUDENT, TEACHER, torch.tensor([0]), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
