"""moe_fx.evaluate.report.plots: every figure writes a readable PNG, empty input is rejected, global state is untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib import image as mpimg

from moe_fx.evaluate.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_scores(n_layers: int, n_experts: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    scores, kept = {}, {}
    for layer in range(n_layers):
        s = rng.lognormal(-1.0, 1.5, size=n_experts) * 10.0**layer
        name = f"model.layers.{layer}.mlp"
        scores[name] = s.tolist()
        kept[name] = sorted(np.argsort(-s)[: n_experts * 3 // 4].tolist())
    return scores, kept


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert not list(path.parent.glob(f".{path.name}.*")), "temp file left behind"


def test_short_layer_name():
    assert plots.short_layer_name("model.layers.3.mlp") == "L3"
    assert plots.short_layer_name("transformer.h.11.moe") == "L11"
    assert plots.short_layer_name("model.layers.5.block_sparse_moe.experts.3") == "L5"
    assert plots.short_layer_name("encoder") == "encoder"


def test_importance_heatmap(tmp_path):
    scores, kept = _fake_scores(4, 16)
    out = plots.importance_heatmap(scores, kept, tmp_path / "sub" / "heat.png", title="REAP", score_label="REAP score")
    assert out == tmp_path / "sub" / "heat.png"
    _assert_png(out)


def test_importance_heatmap_unequal_experts_and_no_kept(tmp_path):
    scores = {"model.layers.0.mlp": [0.1, 0.5, 0.2, 0.9, 0.3, 0.4], "model.layers.1.mlp": [1.0, 2.0, 3.0]}
    _assert_png(plots.importance_heatmap(scores, None, tmp_path / "a.png", title="t", score_label="s"))
    # signed scores switch to min-max scaling; a layer missing from kept is left unmarked
    signed = {"model.layers.0.mlp": [-1.0, 0.5, 2.0], "model.layers.1.mlp": [0.0, 0.0]}
    kept = {"model.layers.0.mlp": [2]}
    _assert_png(plots.importance_heatmap(signed, kept, tmp_path / "b.png", title="t", score_label="logit"))


def test_importance_heatmap_rejects_bad_kept(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        plots.importance_heatmap({"model.layers.0.mlp": [1.0, 2.0]}, {"model.layers.0.mlp": [5]},
                                 tmp_path / "x.png", title="t", score_label="s")


def test_score_distributions(tmp_path):
    scores, kept = _fake_scores(5, 12)  # spans many decades -> log axis
    _assert_png(plots.score_distributions(scores, kept, tmp_path / "d.png", title="t", score_label="REAP score"))
    lin = {"model.layers.0.mlp": [-1.0, 0.0, 1.0], "model.layers.1.mlp": [2.0, float("nan"), None]}
    _assert_png(plots.score_distributions(lin, None, tmp_path / "e.png", title="t", score_label="logit"))


def test_kept_widths(tmp_path):
    widths = {"model.layers.0.mlp": [64, 128, 0, 32], "model.layers.1.mlp": [128, 96]}
    full = {"model.layers.0.mlp": 128, "model.layers.1.mlp": 128}
    _assert_png(plots.kept_widths(widths, full, tmp_path / "w.png", title="channels"))
    with pytest.raises(ValueError, match="full_width"):
        plots.kept_widths(widths, {"model.layers.0.mlp": 128}, tmp_path / "w2.png", title="t")


def test_quality_curves_two_methods_three_ratios(tmp_path):
    points = [
        {"method": m, "ratio": r, "ppl_delta": (0.1 if m == "reap" else 0.3) * r, "other": 1.0}
        for m in ("reap", "frequency")
        for r in (0.25, 0.5, 0.75)
    ]
    points.append({"method": "reap", "ratio": 0.5, "other": 2.0})  # no ppl_delta: skipped
    _assert_png(plots.quality_curves(points, tmp_path / "q.png", metric="ppl_delta", title="t", ylabel="Δ ppl"))


def test_domain_bars(tmp_path):
    results = {
        "base": {"code": 5.0, "math": 6.0, "a_rather_long_domain_name": 7.0},
        "reap 25%": {"code": 5.5, "math": 6.6, "a_rather_long_domain_name": 7.7, "extra": 1.0},
    }
    _assert_png(plots.domain_bars(results, tmp_path / "b.png", title="t", ylabel="perplexity"))


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda p: plots.importance_heatmap({}, None, p, title="t", score_label="s"), "scores"),
        (lambda p: plots.importance_heatmap({"model.layers.0.mlp": []}, None, p, title="t", score_label="s"), "scores"),
        (lambda p: plots.score_distributions({}, None, p, title="t", score_label="s"), "scores"),
        (lambda p: plots.kept_widths({}, {}, p, title="t"), "widths"),
        (lambda p: plots.quality_curves([], p, metric="m", title="t", ylabel="y"), "points"),
        (lambda p: plots.quality_curves([{"method": "a", "ratio": 0.1}], p, metric="m", title="t", ylabel="y"),
         "points"),
        (lambda p: plots.domain_bars({}, p, title="t", ylabel="y"), "results"),
        (lambda p: plots.domain_bars({"base": {}}, p, title="t", ylabel="y"), "domains"),
    ],
)
def test_empty_input_raises(tmp_path, call, word):
    with pytest.raises(ValueError, match=word):
        call(tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_leaves_global_matplotlib_state_alone(tmp_path):
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    fig = plt.figure()  # the caller's own figure must survive and stay current
    before = plt.get_fignums()
    scores, kept = _fake_scores(3, 8)
    plots.importance_heatmap(scores, kept, tmp_path / "1.png", title="t", score_label="s")
    plots.score_distributions(scores, kept, tmp_path / "2.png", title="t", score_label="s")
    plots.kept_widths({"model.layers.0.mlp": [1, 2]}, {"model.layers.0.mlp": 2}, tmp_path / "3.png", title="t")
    plots.quality_curves([{"method": "a", "ratio": 0.5, "m": 1.0}], tmp_path / "4.png", metric="m", title="t",
                         ylabel="y")
    plots.domain_bars({"base": {"d": 1.0}}, tmp_path / "5.png", title="t", ylabel="y")
    try:
        assert plt.get_fignums() == before
        assert plt.gcf() is fig
        assert matplotlib.get_backend() == backend
        assert dict(matplotlib.rcParams) == rc
    finally:
        plt.close(fig)
