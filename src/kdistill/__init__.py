"""kdistill: knowledge distillation for classifiers, compared honestly on paired seeds."""

__version__ = "0.1.0"

from kdistill.checkpoint import load  # noqa: E402

__all__ = ["__version__", "load"]
