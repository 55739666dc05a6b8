"""moe_fx.static_cache: a StaticCache whose sliding-window layers the cache cannot outgrow count in a tensor, so
compiled decode compiles once; logits equal the stock cache's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from torch._dynamo.testing import CompileCounter
from transformers import StaticCache
from transformers.cache_utils import StaticSlidingWindowLayer

import moe_fx
from moe_fx.deliver.static_cache import RollingWindowLayer, UnfilledWindowLayer

PROMPT = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled frames of one test count towards the recompile limit of the next (the same transformers code)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@torch.no_grad()
def _decode(model, forward, cache, steps: int = STEPS) -> list[torch.Tensor]:
    """Prefill then ``steps`` greedy tokens through ``forward``, positions given (as generate gives them)."""
    length = PROMPT.shape[1]
    pos = torch.arange(length)
    logits = [model(input_ids=PROMPT, past_key_values=cache, cache_position=pos, position_ids=pos.expand(2, -1), use_cache=True).logits[:, -1]]
    for i in range(steps):
        token = logits[-1].argmax(-1, keepdim=True).contiguous()
        pos = torch.tensor([length + i])
        logits.append(forward(input_ids=token, past_key_values=cache, cache_position=pos, position_ids=pos.expand(2, 1), use_cache=True).logits[:, -1])
    return logits


def test_compiled_decode_compiles_once_and_matches_the_stock_cache() -> None:
    """Llama 4's chunked layers (transformers' one class for sliding and chunked windows, GPT-OSS's too)."""
    model = tiny_model("llama4").eval()
    length = PROMPT.shape[1] + STEPS + 2
    cache = moe_fx.static_cache(model.config, length)
    assert any(isinstance(layer, UnfilledWindowLayer) for layer in cache.layers)
    expected = _decode(model, model, StaticCache(config=model.config, max_cache_len=length))
    counter = CompileCounter()
    got = _decode(model, moe_fx.compile(model, backend=counter, dynamic=False), cache)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    stock = CompileCounter()  # what the fix is for: the stock cache recompiles at every token
    _decode(model, moe_fx.compile(model, backend=stock, dynamic=False), StaticCache(config=model.config, max_cache_len=length))
    assert stock.frame_count >= STEPS - 1


def test_each_window_layer_takes_its_class() -> None:
    model = tiny_model("gpt_oss")
    window = model.config.sliding_window
    kinds = [type(layer) for layer in moe_fx.static_cache(model.config, window + 1).layers]
    assert StaticSlidingWindowLayer in kinds and RollingWindowLayer not in kinds and UnfilledWindowLayer not in kinds
    kinds = [type(layer) for layer in moe_fx.static_cache(model.config, window + 1, rolling_windows=True).layers]
    assert RollingWindowLayer in kinds and StaticSlidingWindowLayer not in kinds
    kinds = [type(layer) for layer in moe_fx.static_cache(model.config, window, rolling_windows=True).layers]
    assert UnfilledWindowLayer in kinds and StaticSlidingWindowLayer not in kinds and RollingWindowLayer not in kinds


@pytest.mark.parametrize("window", [4, 8], ids=["prompt-past-window", "fills-while-decoding"])
def test_a_window_the_cache_outgrows_rolls_and_compiles_once(window: int) -> None:
    """GPT-OSS's sliding layers with a window shorter than the cache: the prompt (6 tokens) already past it, or
    the window filling during decode; eager and compiled logits equal the stock cache's, one compile."""
    steps = 8
    model = tiny_model("gpt_oss", sliding_window=window)
    length = PROMPT.shape[1] + steps + 2
    expected = _decode(model, model, StaticCache(config=model.config, max_cache_len=length), steps)
    cache = moe_fx.static_cache(model.config, length, rolling_windows=True)
    assert any(isinstance(layer, RollingWindowLayer) for layer in cache.layers)
    for a, b in zip(_decode(model, model, moe_fx.static_cache(model.config, length, rolling_windows=True), steps), expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    counter = CompileCounter()
    got = _decode(model, moe_fx.compile(model, backend=counter, dynamic=False), cache, steps)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert int(cache.layers[0].cumulative_length) == length - 2 and cache.get_seq_length() == length - 2
    if window == 4:  # what the fix is for (once: 8 compiles): the stock cache recompiles at every token past the window
        torch._dynamo.reset()  # the stock cache's recompiles would count on top of this compile's
        stock = CompileCounter()
        _decode(model, moe_fx.compile(model, backend=stock, dynamic=False), StaticCache(config=model.config, max_cache_len=length), steps)
        assert stock.frame_count >= steps - 1
