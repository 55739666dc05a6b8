"""eval_mode: the model evaluates inside the block and gets its own mode back, also when the block raises."""

import pytest
from torch import nn

from moe_fx.model.mode import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_after_the_block_and_after_an_error(training: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training is training and model[1].training is training
