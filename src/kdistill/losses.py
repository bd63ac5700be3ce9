r"""Distillation losses over explicit logit tensors.

Knowledge distillation after Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
Network" (2015). The student matches the teacher's softmax at temperature T. The soft term is
multiplied by T^2, because the gradients of the softened softmax shrink as 1/T^2, and the
factor keeps them on the scale of the hard-label term when T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    r"""Compute the temperature-scaled KL divergence from the teacher's soft targets.

    .. math::
        L_{soft} = T^2 \cdot \frac{1}{B} \sum_b \sum_c p^t_{bc}
                   (\log p^t_{bc} - \log p^s_{bc}),
        \quad p^t = \mathrm{softmax}(z^t / T),\ p^s = \mathrm{softmax}(z^s / T)

    Args:
        student_logits: (B, C) raw student outputs; gradients flow through these.
        teacher_logits: (B, C) raw teacher outputs; treated as constants.
        temperature: T > 0.

    Returns:
        A scalar: KL(p^t || p^s) summed over classes, averaged over the batch, times T^2.
        Both distributions are taken from ``log_softmax``, so the value stays finite for large
        logits and small T (no ``log(0)``).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (batch, classes)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    return kl * (temperature * temperature)


def kd_loss_parts(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (total, cross-entropy, soft-target loss); ``kd_loss`` documents the formula."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ce = F.cross_entropy(student_logits, labels)
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    # NOTE: the soft term is always computed and weighted, also at alpha = 0 or 1, so the T^2
    # scale never switches on or off; at alpha = 0 it adds an exact 0 to the gradient.
    total = (1.0 - alpha) * ce + alpha * soft
    return total, ce, soft


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    r"""Compute the distillation loss: a blend of hard-label and soft-target terms.

    .. math::
        L = (1 - \alpha) \cdot \mathrm{CE}(z^s, y) + \alpha \cdot L_{soft}(z^s, z^t, T)

    The cross-entropy uses the student's logits at T = 1; ``L_soft`` is
    :func:`soft_target_loss`, which carries the T^2 factor. At alpha = 0 the value and its
    gradient equal the plain cross-entropy of the baseline student exactly.

    Args:
        student_logits: (B, C) raw student outputs.
        teacher_logits: (B, C) raw teacher outputs.
        labels: (B,) int64 class ids in [0, C).
        temperature: T > 0 for the soft term.
        alpha: weight of the soft term, in [0, 1].
    """
    return kd_loss_parts(student_logits, teacher_logits, labels, temperature, alpha)[0]
