"""Held-out NLL: non-overlapping and sliding windows score every token once, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from test_zero_shot import VOCAB, Bigram, hand_logp

from moe_fx.errors import BadOptionError
from moe_fx.evaluate.nll import build_eval_set, evaluate_nll


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [VOCAB.index(c) for c in text]}


TEXT = ["abcdefgh hgfedcba " * 4, "fade bag cab hedge " * 3]


def stream_nll(model: Bigram, windows_stream: list[int]) -> tuple[float, int]:
    t = model.table.detach()
    return -sum(hand_logp(t, a, b) for a, b in zip(windows_stream, windows_stream[1:])), len(windows_stream) - 1


@pytest.mark.parametrize("stride", [3, 5, 8])
def test_sliding_windows_score_each_token_once(stride):
    model, tok = Bigram(), CharTokenizer()
    ev = build_eval_set(TEXT, tok, seq_len=8, seqs_per_domain=6, stride=stride)
    windows = ev.windows["all"]
    assert windows.shape == (6, 8) and ev.overlap == 8 - stride
    assert torch.equal(windows[1, : 8 - stride], windows[0, stride:])
    stream = windows[0].tolist() + [tok for w in windows[1:] for tok in w[8 - stride :].tolist()]
    res = evaluate_nll(model, ev, batch_size=4, show_progress=False)["all"]
    total, count = stream_nll(model, stream)  # a bigram model sees the same context in any window that holds the previous token
    if stride == 8:  # no overlap: the first token of every window is not predicted
        total -= sum(-hand_logp(model.table.detach(), windows[i - 1, -1].item(), windows[i, 0].item()) for i in range(1, 6))
        count -= 5
    assert res["tokens"] == count == ev.scored_tokens and res["nll"] == pytest.approx(total / count, rel=1e-6)  # logits are cast to float32
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bad_stride():
    with pytest.raises(BadOptionError, match="stride 9 must be in"):
        build_eval_set(TEXT, CharTokenizer(), seq_len=8, stride=9)
