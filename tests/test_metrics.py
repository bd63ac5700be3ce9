"""Metrics and the paired-seed interval against hand-computed values."""

import math

import pytest
import torch

from kdistill.metrics import (
    accuracy,
    agreement,
    expected_calibration_error,
    nll,
    paired_interval,
    verdict,
)


def logits_with_confidence(confidences, predicted, classes=2):
    """Build 2-class logits whose softmax puts ``c`` on class ``predicted``."""
    rows = []
    for c, p in zip(confidences, predicted, strict=True):
        margin = math.log(c / (1 - c))
        row = [0.0] * classes
        row[p] = margin
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_accuracy_fraction():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == 0.5


def test_nll_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # p(label) = 0.5 and 0.75: NLL = (log 2 + log 4/3) / 2
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert nll(logits, torch.tensor([0, 0])) == pytest.approx(expected, abs=1e-7)


def test_ece_by_hand():
    # Four rows with confidences 0.9, 0.9, 0.6, 0.6; the first and third are right.
    # Bin (0.8667, 0.9333]: accuracy 0.5, confidence 0.9, weight 2/4 -> 0.2
    # Bin (0.5333, 0.6]:    accuracy 0.5, confidence 0.6, weight 2/4 -> 0.05
    logits = logits_with_confidence([0.9, 0.9, 0.6, 0.6], [0, 0, 0, 0])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(logits, labels, 15) == pytest.approx(0.25, abs=1e-9)


def test_ece_perfect_calibration_is_zero():
    logits = logits_with_confidence([0.75] * 4, [0] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(logits, labels, 15) == pytest.approx(0.0, abs=1e-9)


def test_ece_bin_edges_are_right_closed():
    # A confidence of exactly 0.6 = 9/15 belongs to bin (8/15, 9/15], with 0.55.
    logits = logits_with_confidence([0.6, 0.55], [0, 0])
    labels = torch.tensor([0, 1])
    # One bin: accuracy 0.5, mean confidence 0.575 -> 0.075
    assert expected_calibration_error(logits, labels, 15) == pytest.approx(0.075, abs=1e-9)


def test_agreement_counts_equal_argmax():
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    second = torch.tensor([[5.0, 0.0], [3.0, 1.0], [2.0, 0.0]])
    assert agreement(first, second) == pytest.approx(2 / 3)


def test_paired_interval_by_hand():
    # Differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t(0.975, 2) = 4.302653, so the
    # half-width is 0.0248 and the interval [-0.0048, 0.0448] still includes zero.
    interval = paired_interval([0.81, 0.82, 0.83], [0.80, 0.80, 0.80])
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert interval.mean == pytest.approx(0.02)
    assert interval.std == pytest.approx(0.01)
    assert interval.low == pytest.approx(0.02 - half, abs=1e-6)
    assert interval.high == pytest.approx(0.02 + half, abs=1e-6)
    assert not interval.excludes_zero
    assert "df = 2" in interval.method


def test_paired_interval_includes_zero():
    interval = paired_interval([0.80, 0.82, 0.79], [0.81, 0.80, 0.80])
    assert not interval.excludes_zero
    assert "no significant gain" in verdict(interval)


def test_verdict_states_gain_and_help():
    interval = paired_interval([0.90, 0.91, 0.92, 0.93], [0.88, 0.88, 0.89, 0.90])
    text = verdict(interval)
    assert "+2.75 points" in text
    assert "distillation helped" in text


def test_verdict_states_harm():
    interval = paired_interval([0.80, 0.81, 0.80], [0.85, 0.85, 0.86])
    assert "distillation hurt" in verdict(interval)


def test_one_seed_makes_no_claim():
    interval = paired_interval([0.9], [0.8])
    assert math.isinf(interval.high)
    assert "no claim" in verdict(interval)


def test_nll_line_lower_is_gain():
    from kdistill.metrics import nll_line

    interval = paired_interval([0.30, 0.31, 0.29], [0.50, 0.52, 0.51])
    assert "lowered NLL" in nll_line(interval)
    assert "-0.2100 nats" in nll_line(interval)
