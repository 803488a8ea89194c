"""Advantage estimators: group-relative (GRPO, Dr. GRPO, RLOO, rank) and GAE."""

from .gae import gae
from .group import group_advantages
from . import cuda as _cuda  # noqa: F401  (registers the "cuda" backends)

__all__ = ["group_advantages", "gae"]
