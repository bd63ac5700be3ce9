"""Classification metrics and the paired-seed statistics behind the verdict."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from scipy import stats


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction in [0, 1] of rows whose argmax equals the label."""
    return float((logits.argmax(dim=1) == labels).float().mean())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats."""
    return float(F.cross_entropy(logits.double(), labels))


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE over equal-width confidence bins: sum_b |B_b|/N * |accuracy_b - confidence_b|.

    Bin b contains the rows whose top-class probability falls in (b/bins, (b+1)/bins]; the first
    bin also takes a confidence of exactly 0, which cannot occur for a softmax.
    """
    probabilities = logits.double().softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).double()
    # ceil(c * bins) - 1 maps (b/bins, (b+1)/bins] to bin b.
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(correct))
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    used = total > 0
    gaps = (hits[used] - mass[used]).abs()
    return float(gaps.sum() / len(labels))


def agreement(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    """Fraction of rows where two models predict the same class."""
    return accuracy(logits, reference_logits.argmax(dim=1))


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bins: int = 15,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, float]:
    metrics = {
        "accuracy": accuracy(logits, labels),
        "nll": nll(logits, labels),
        "ece": expected_calibration_error(logits, labels, bins),
    }
    if teacher_logits is not None:
        metrics["teacher_agreement"] = agreement(logits, teacher_logits)
    return metrics


@dataclass
class PairedInterval:
    """Mean of paired differences (treatment - control) with a Student-t interval."""

    differences: list[float]
    mean: float
    std: float
    low: float
    high: float
    confidence: float
    method: str

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        """Return JSON-ready fields; with one seed the ends are None, as JSON has no inf."""
        result = asdict(self)
        for key in ("low", "high"):
            if not math.isfinite(result[key]):
                result[key] = None
        if len(self.differences) < 2:
            result["std"] = None
        result["excludes_zero"] = self.excludes_zero
        return result


def paired_interval(
    treatment: list[float], control: list[float], confidence: float = 0.95
) -> PairedInterval:
    """Compute the t-interval of the mean paired difference over seeds.

    With n pairs, the interval is mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n). With one
    pair there is no spread to estimate, so the interval is unbounded.
    """
    if len(treatment) != len(control) or not treatment:
        raise ValueError("paired_interval needs two equally long, non-empty lists")
    differences = [t - c for t, c in zip(treatment, control, strict=True)]
    n = len(differences)
    mean = sum(differences) / n
    method = f"paired Student-t interval over {n} seeds (df = {n - 1})"
    if n < 2:
        return PairedInterval(differences, mean, 0.0, -math.inf, math.inf, confidence, method)
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return PairedInterval(differences, mean, std, mean - half, mean + half, confidence, method)


def verdict(interval: PairedInterval, metric: str = "accuracy") -> str:
    """Describe the measured gain in one line and whether its interval excludes zero."""
    points = 100 * interval.mean
    low, high = 100 * interval.low, 100 * interval.high
    span = f"{100 * interval.confidence:.0f}% CI [{low:+.2f}, {high:+.2f}]"
    seeds = len(interval.differences)
    head = f"distilled - baseline {metric}: {points:+.2f} points, {span} over {seeds} paired seeds"
    if len(interval.differences) < 2:
        return f"{head}: one seed gives no interval, so no claim either way"
    if interval.low > 0:
        return f"{head}: distillation helped (the interval excludes zero)"
    if interval.high < 0:
        return f"{head}: distillation hurt (the interval excludes zero)"
    return f"{head}: no significant gain (the interval includes zero)"


def nll_line(interval: PairedInterval) -> str:
    """Describe the paired NLL difference in one line; lower is better, so negative is a gain."""
    low, high = interval.low, interval.high
    span = f"{100 * interval.confidence:.0f}% CI [{low:+.4f}, {high:+.4f}]"
    if len(interval.differences) < 2:
        outcome = "one seed gives no interval"
    elif high < 0:
        outcome = "distillation lowered NLL (the interval excludes zero)"
    elif low > 0:
        outcome = "distillation raised NLL (the interval excludes zero)"
    else:
        outcome = "no significant change (the interval includes zero)"
    return f"distilled - baseline NLL: {interval.mean:+.4f} nats, {span}: {outcome}"


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std
