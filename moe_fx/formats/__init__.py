"""Saving and loading: checkpoints stock transformers loads (atomic directories, config aliases, the record and
report beside the weights), resumable partial writes, lazy memory-mapped reading for streaming, and loading
with clear errors."""

from moe_fx.formats.checkpoint import save_checkpoint

__all__ = ["save_checkpoint"]
