"""Llama 4's rotary embedding in real numbers for ONNX export (:mod:`moe_fx.deliver.onnx.real_rotary`): the same
logits as transformers' complex path, and the stock code back afterwards, after an error too. The export itself
is tested in ``test_onnx.py`` (Llama 4 pruned, exported and checked against onnxruntime)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama4 import modeling_llama4

from moe_fx.deliver.onnx.real_rotary import real_rotary
from tests.tiny_models import tiny_model


def test_real_rotary_equals_complex_and_restores() -> None:
    model = tiny_model("llama4").eval()
    ids = torch.randint(3, 100, (2, 7))
    stock = modeling_llama4.apply_rotary_emb
    with torch.no_grad():
        want = model(ids).logits
        with real_rotary(model) as patched:
            assert patched == 1 and modeling_llama4.apply_rotary_emb is not stock
            got = model(ids).logits
            assert not model.model.rotary_emb(want, torch.arange(7)[None]).is_complex()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert modeling_llama4.apply_rotary_emb is stock and "forward" not in vars(model.model.rotary_emb)
    with pytest.raises(RuntimeError), real_rotary(model):
        raise RuntimeError("export failed")
    assert modeling_llama4.apply_rotary_emb is stock and "forward" not in vars(model.model.rotary_emb)


def test_other_models_untouched() -> None:
    with real_rotary(tiny_model("qwen3_moe")) as patched:
        assert patched == 0
