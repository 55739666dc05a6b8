"""The model in eval mode for the length of a block, its own mode restored afterwards.

Calibration, evaluation, distillation and the searches that measure candidate rewrites all run the model in eval mode
(no dropout, the families' inference-only routing paths) and must hand it back as they found it: a user's
training loop may call them between steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; ``model.train(was_training)`` on the way out, also after an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
