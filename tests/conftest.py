"""Shared helpers: small, fast configs on the real digits data."""

import pytest

from kdistill import config


def small_config(*overrides: str):
    """A digits config that trains in about a second per model."""
    base = [
        "teacher.hidden=[64]", "student.hidden=[16]", "train.epochs=3",
        "train.teacher_epochs=4", "eval.seeds=2", "export.formats=[safetensors]",
        "run.threads=1",
    ]  # fmt: skip
    return config.load(None, base + list(overrides))


@pytest.fixture
def tiny():
    return small_config
