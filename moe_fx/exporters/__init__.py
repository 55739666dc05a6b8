"""Exporters: write a (pruned) model where people run it."""

from .checkpoint import save_checkpoint

__all__ = ["save_checkpoint"]
