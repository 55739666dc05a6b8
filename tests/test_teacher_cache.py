"""Distillation from a cached teacher: the top-k loss, the cache files, and Distill(teacher="cached") against the
in-memory teacher (equal when the cache keeps the whole vocabulary), in a pipeline and through the CLI."""

from __future__ import annotations

import copy
import json
import tempfile

import pytest
import torch
from conftest import tiny_qwen3

from moe_fx import cli, compose, state_of
from moe_fx.errors import BadOptionError, PassOrderError
from moe_fx.passes import CacheTeacher, Calibrate, Distill, DropExperts, Score
from moe_fx.rewrite.distill import kl_to_teacher
from moe_fx.rewrite.teacher_cache import TeacherCache, topk_kl, topk_targets

WINDOWS = torch.randint(2, 128, (8, 24), generator=torch.Generator().manual_seed(5))


def test_topk_kl_is_the_full_kl_with_the_whole_vocabulary_and_a_lower_bound_below_it() -> None:
    s, t = torch.randn(3, 5, 40) * 2, torch.randn(3, 5, 40) * 2
    full = kl_to_teacher(s, t)
    assert topk_kl(s, *topk_targets(t, 40)).item() == pytest.approx(full.item(), abs=1e-5)
    bounds = [topk_kl(s, *topk_targets(t, k)).item() for k in (1, 4, 16, 39)]
    assert all(0 <= b <= full.item() + 1e-6 for b in bounds)
    assert topk_kl(t, *topk_targets(t, 4)).item() == pytest.approx(0, abs=1e-6)  # the teacher against itself


def test_cache_files_round_trip(tmp_path) -> None:
    logits = torch.randn(3, 7, 50)
    cache = TeacherCache.create(tmp_path / "c", WINDOWS[:3, :7], top_k=5)
    cache.write(slice(0, 2), logits[:2])
    cache.write(slice(2, 3), logits[2:])
    with pytest.raises(BadOptionError, match="not a complete teacher cache"):
        TeacherCache.open(tmp_path / "c")  # not finished: no cache.json yet
    cache.finish(source="test")
    opened = TeacherCache.open(tmp_path / "c")
    idx, logp = opened.targets([2, 0], torch.device("cpu"))
    ref_idx, ref_logp = topk_targets(logits[[2, 0]], 5)
    assert torch.equal(idx, ref_idx) and torch.equal(logp, ref_logp) and torch.equal(opened.windows, WINDOWS[:3, :7])
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["top_k"] == 5 and opened.summary()["mean_top_k_mass"] < 1


def _passes(teacher, cache_k: int | None, steps: int = 4):
    passes = [Calibrate(WINDOWS, batch_size=4, show_progress=False)]
    if cache_k is not None:
        passes.append(CacheTeacher(WINDOWS, top_k=cache_k, batch_size=4, show_progress=False))
    return passes + [Score("reap"), DropExperts(ratio=0.5),
                     Distill(teacher=teacher, data=WINDOWS, batch_size=4, steps=steps, lr=1e-3, show_progress=False)]


def test_a_head_narrower_than_top_k_is_cached_whole(tmp_path) -> None:
    """A head with fewer outputs than ``top_k`` (a token classifier's labels) caches all of them: the KL is then the
    full one (it used to fail writing 33 values into 64 slots)."""
    logits = torch.randn(2, 7, 33)
    cache = TeacherCache.create(tmp_path / "c", WINDOWS[:2, :7], top_k=64)
    cache.write(slice(0, 2), logits)
    cache.finish(source="test")
    opened = TeacherCache.open(tmp_path / "c")
    assert opened.top_k == 33 and opened.summary()["mean_top_k_mass"] == pytest.approx(1.0, abs=1e-5)
    student = torch.randn(2, 7, 33)
    assert topk_kl(student, *opened.targets([0, 1], torch.device("cpu"))).item() == pytest.approx(kl_to_teacher(student, logits).item(), abs=1e-5)


def test_cached_teacher_with_the_whole_vocabulary_trains_as_the_model_teacher(monkeypatch, tmp_path) -> None:
    """Same windows, same order, same loss up to rounding: the trained weights agree; the temporary cache is gone."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tiny_qwen3(seed=3)
    teacher = copy.deepcopy(base).eval()
    by_model = compose(*_passes(teacher, None))(copy.deepcopy(base))
    by_cache = compose(*_passes("cached", base.config.vocab_size))(copy.deepcopy(base))
    for (name, a), b in zip(by_model.named_parameters(), by_cache.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    report = state_of(by_cache).report_of("distill")
    assert report["teacher"] == f"cached top-{base.config.vocab_size}" and report["kl_last"] < report["kl_first"]
    assert state_of(by_cache).teacher_cache is None and not list(tmp_path.glob("moe_fx-teacher-*"))


def test_small_top_k_still_recovers() -> None:
    base = tiny_qwen3(seed=3)
    teacher = copy.deepcopy(base).eval()
    pruned = compose(Calibrate(WINDOWS, batch_size=4, show_progress=False), Score("reap"), DropExperts(ratio=0.5))(copy.deepcopy(base))
    distilled = compose(*_passes("cached", 8, steps=12))(copy.deepcopy(base))
    with torch.no_grad():
        target = teacher(input_ids=WINDOWS).logits
        before = kl_to_teacher(pruned(input_ids=WINDOWS).logits, target).item()
        after = kl_to_teacher(distilled(input_ids=WINDOWS).logits, target).item()
    assert after < 0.9 * before  # measured on the full vocabulary, though trained on 8 tokens a position


def test_cached_without_cache_teacher_is_an_order_error() -> None:
    with pytest.raises(PassOrderError, match="CacheTeacher"):
        compose(Calibrate(WINDOWS, batch_size=4, show_progress=False), Score("reap"), DropExperts(ratio=0.5),
                Distill(teacher="cached", steps=2, show_progress=False))(tiny_qwen3())


def test_cli_cached_teacher(micro_path, calib_path, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "out"
    code = cli.main(["prune", str(micro_path), "--method", "reap", "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "1024",
                     "--seq-len", "64", "--batch-size", "4", "--distill-steps", "3", "--distill-teacher", "cached", "--distill-top-k", "16",
                     "--no-eval", "--device", "cpu", "--quiet", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "teacher: cached top-16" in stdout
    names = [p["name"] for p in json.loads((out / "moe_fx.json").read_text())["passes"]]
    assert names == ["calibrate", "cache_teacher", "score", "drop_experts", "distill"]
    assert not list(tmp_path.glob("moe_fx-teacher-*"))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_streamed_teacher_pass_equals_the_model_in_memory(model_type, tmp_path) -> None:
    """The cache a streamed prune writes from its final hidden states is the unpruned model's own top-k."""
    from tiny_models import tiny_model

    from moe_fx.formats.loading import load_model
    from moe_fx.run.streaming import stream_prune

    source = tmp_path / "src"
    tiny_model(model_type).save_pretrained(source)
    windows = WINDOWS[:6, :16]
    passes = [Calibrate(windows, batch_size=4, show_progress=False), Score("reap"), DropExperts(ratio=0.25)]
    stream_prune(source, tmp_path / "out", passes, show_progress=False, teacher_cache=tmp_path / "cache", teacher_top_k=8)
    streamed = TeacherCache.open(tmp_path / "cache")
    model = load_model(source)
    state = state_of(model)
    CacheTeacher(windows, top_k=8, batch_size=4, show_progress=False).run(model, state)
    idx, logp = streamed.targets(list(range(6)), torch.device("cpu"))
    ref_idx, ref_logp = state.teacher_cache.targets(list(range(6)), torch.device("cpu"))
    state.teacher_cache.discard()
    assert torch.equal(streamed.windows, windows) and torch.allclose(logp, ref_logp, atol=1e-5)
    assert (idx == ref_idx).float().mean() > 0.99  # only near-ties may swap order


def test_cli_streamed_prune_then_cached_distillation(micro_path, calib_path, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    base = ["prune", str(micro_path), "--method", "reap", "--ratio", "0.25", "--calib", str(calib_path), "--calib-tokens", "1024", "--seq-len", "64",
            "--batch-size", "4", "--distill-steps", "3", "--no-eval", "--device", "cpu", "--quiet", "--stream", "on", "--out", str(out)]
    assert cli.main(base) == 2 and "--distill-teacher cached" in capsys.readouterr().err  # the model teacher cannot stream
    code = cli.main([*base, "--distill-teacher", "cached", "--distill-top-k", "16"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "teacher: cached top-16" in stdout
    record = json.loads((out / "moe_fx.json").read_text())
    names = [p["name"] for p in record["passes"]]
    assert names[0] == "calibrate" and names[-1] == "distill" and record["streaming"]["layers"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory, no cache left beside it


def test_temporary_cache_is_removed_with_it(monkeypatch, tmp_path) -> None:
    """A pipeline that stops after CacheTeacher (a failure before Distill, here no Distill at all) leaves no cache
    directory once the cache is gone; an explicit path is kept."""
    import gc

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = compose(Calibrate(WINDOWS, batch_size=4, show_progress=False), CacheTeacher(WINDOWS, top_k=4, show_progress=False))(tiny_qwen3())
    assert len(list(tmp_path.glob("moe_fx-teacher-*"))) == 1 and state_of(model).teacher_cache.temporary
    del model
    gc.collect()
    assert not list(tmp_path.glob("moe_fx-teacher-*"))
    kept = TeacherCache.create(tmp_path / "chosen", WINDOWS[:2, :4], top_k=2)
    kept.discard()
    assert (tmp_path / "chosen").is_dir() and not kept.temporary
