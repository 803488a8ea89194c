"""Advantage estimators: group-relative (GRPO, Dr. GRPO, RLOO, rank) and GAE."""

from .gae import gae
from .group import group_advantages, register_advantage_estimator

__all__ = ["group_advantages", "gae", "register_advantage_estimator"]
