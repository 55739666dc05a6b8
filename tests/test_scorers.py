import torch

from moe_fx import compose, state_of
from moe_fx.passes import SCORERS, Calibrate, Score
from moe_fx.score import get_scorer


def test_builtin_scorers_registered():
    assert {"random", "frequency", "reap"} <= set(SCORERS)


def test_scores_follow_their_definitions(tiny_model, tokens):
    m = compose(Calibrate(tokens, show_progress=False))(tiny_model)
    state = state_of(m)
    for block in state.spec.blocks:
        count = state.stats.get(block.path, "count")
        freq = get_scorer("frequency")(state.stats, state.spec).per_block[block.path]
        reap = get_scorer("reap")(state.stats, state.spec).per_block[block.path]
        assert torch.equal(freq, count)
        expected = torch.where(count > 0, state.stats.get(block.path, "reap_sum") / count.clamp(min=1), torch.zeros_like(count))
        assert torch.equal(reap, expected)


def test_random_is_seeded(tiny_model):
    spec = state_of(tiny_model).spec
    a = get_scorer("random", seed=1)(None, spec).per_block
    b = get_scorer("random", seed=1)(None, spec).per_block
    c = get_scorer("random", seed=2)(None, spec).per_block
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    paths = list(a)
    assert not torch.equal(a[paths[0]], a[paths[1]])  # blocks get independent draws


def test_score_pass_stores_scores(tiny_model, tokens):
    m = compose(Calibrate(tokens, show_progress=False), Score("frequency"))(tiny_model)
    assert state_of(m).scores.method == "frequency"


def test_unknown_scorer_option_is_a_clear_error():
    import pytest

    from moe_fx.errors import BadOptionError
    from moe_fx.score import get_scorer

    with pytest.raises(BadOptionError, match="'naee'.*colour"):
        get_scorer("naee", colour="blue")
