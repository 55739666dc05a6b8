"""Zero-shot evaluation: exact log-likelihood sums on a hand-computable model, lm-eval's tokenisation rules,
every task file's parsing and prompt text, metrics, caching, errors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ASSETS, SHARED, tiny_qwen3
from torch import nn

from moe_fx.errors import BadOptionError, CalibrationDataError
from moe_fx.evaluate.zero_shot import TASKS, Item, LoglikCache, Request, checkpoint_fingerprint, evaluate_tasks, read_items, resolve_tasks, task_metrics
from moe_fx.evaluate.zero_shot.loglik import encode_pair, loglikelihoods

SAMPLES = ASSETS / "eval"
VOCAB = " abcdefgh"


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


class Bigram(nn.Module):
    """logits at position t depend only on token t: log p(next | prev) = log_softmax(table[prev]) by hand."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(VOCAB), len(VOCAB), generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls = 0

    def forward(self, input_ids, use_cache=False):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def hand_logp(table: torch.Tensor, prev: int, nxt: int) -> float:
    row = table[prev].tolist()
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def test_loglikelihood_sums_are_exact():
    model = Bigram()
    t = model.table.detach()
    requests = [Request("ab", "cd"), Request("abc ", "hg"), Request("", "fed"), Request("h", "a")]
    got = loglikelihoods(model, encode, requests, prefix_id=0, batch_tokens=9, show_progress=False)
    a, b, c, d, e, f, g, h, sp = (VOCAB.index(x) for x in "abcdefgh ")
    want = [
        hand_logp(t, b, c) + hand_logp(t, c, d),
        hand_logp(t, c, sp) + hand_logp(t, sp, h) + hand_logp(t, h, g),  # the context's trailing space moves to the continuation
        hand_logp(t, 0, f) + hand_logp(t, f, e) + hand_logp(t, e, d),  # empty context: the prefix token
        hand_logp(t, h, a),
    ]
    for (ll, _), w in zip(got, want):
        assert ll == pytest.approx(w, abs=1e-9)
    greedy_next = int(t[h].argmax())
    (_, greedy), = loglikelihoods(model, encode, [Request("h", VOCAB[greedy_next])], prefix_id=0, show_progress=False)
    assert greedy
    (_, greedy), = loglikelihoods(model, encode, [Request("h", VOCAB[(greedy_next + 1) % len(VOCAB)])], prefix_id=0, show_progress=False)
    assert not greedy


def test_window_cuts_from_the_left():
    model = Bigram()
    t = model.table.detach()
    (ll, _), = loglikelihoods(model, encode, [Request("abcdefgh", "ab")], prefix_id=0, max_length=3, show_progress=False)
    g, h, a, b = (VOCAB.index(x) for x in "ghab")
    assert ll == pytest.approx(hand_logp(t, h, a) + hand_logp(t, a, b), abs=1e-9)


def test_encode_pair_tokenises_the_pair_whole():
    def merging(text: str) -> list[int]:  # a tokenizer with one merge: "ab" -> 99
        ids, i = [], 0
        while i < len(text):
            merged = text.startswith("ab", i)
            ids.append(99 if merged else VOCAB.index(text[i]))
            i += 2 if merged else 1
        return ids

    assert encode_pair(merging, Request("c", "ab"), 0) == ([3], [99])
    assert encode_pair(merging, Request("ca ", "b"), 0) == ([3, 1], [0, 2])  # trailing space moved to the continuation
    assert encode_pair(merging, Request("", "ab"), 7) == ([7], [99])


def test_padding_and_batching_do_not_change_results():
    model = tiny_qwen3()
    encode_ids = lambda s: [2 + (ord(ch) % 120) for ch in s]
    requests = [Request("a longer context here", " x"), Request("ab", " yz"), Request("", " short"), Request("mid size", " tail end")]
    one = loglikelihoods(model, encode_ids, requests, prefix_id=0, batch_tokens=1, show_progress=False)
    many = loglikelihoods(model, encode_ids, requests, prefix_id=0, batch_tokens=10**6, show_progress=False)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_metrics_follow_lm_eval():
    # acc picks the highest sum; acc_norm divides by the choice's characters and can pick another
    items = [Item((Request("q", " a"), Request("q", " bbbb")), 1, ("a", "bbbb")), Item((Request("q", " c"), Request("q", " d")), 0, ("c", "d"))]
    results = [(-1.0, False), (-2.0, False), (-0.5, True), (-0.5, False)]  # the tie goes to the first (numpy argmax)
    m = task_metrics("piqa", items, results)
    assert m["acc"] == 0.5 and m["acc_norm"] == 1.0 and m["n"] == 2
    assert m["acc_stderr"] == pytest.approx(0.5)  # sample deviation sqrt(0.5) over sqrt(2 items)
    lam = [Item((Request("c", " w"),), 0, ("w",)), Item((Request("c", " v"),), 0, ("v",))]
    m = task_metrics("lambada_openai", lam, [(-1.0, True), (-3.0, False)])
    assert m["acc"] == 0.5 and m["ppl"] == pytest.approx(math.exp(2.0))
    assert "acc_norm" not in task_metrics("copa", items, results)


EXPECTED_FIRST = {
    "piqa": ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", " Provide the guinea pig", 2),
    "arc_easy": ("Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:", " Sunlight is", 4),
    "copa": ("The man turned on the faucet therefore", "  the toilet filled with water.", 2),
    "winogrande": ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases.", 2),
    "lambada_openai": ("I don't care about", " signs", 1),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. he", " is using wrap to wrap a pair of skis.", 4),
    "openbookqa": ("the best way to save money is to", " make more phone calls", 4),
    "boolq": ("Question: does ethanol take more energy make that produces?\nAnswer:", " no", 2),
    "arc_challenge": ("Which is the most likely effect of this increase in rotation?\nAnswer:", " Planetary density will decrease.", 4),
    "blimp/passive_1": ("", " Lucille's sisters are confused by Amy.", 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST))
def test_each_task_file_parses_into_lm_eval_prompts(name):
    files = resolve_tasks("all", SAMPLES)
    items = read_items(name, files[name])
    assert len(items) == 20
    context_end, continuation_start, n_choices = EXPECTED_FIRST[name]
    first = items[0].requests[0]
    assert first.context.endswith(context_end) and first.continuation.startswith(continuation_start)
    for item in items:
        assert len(item.requests) == len(item.choices) == n_choices and 0 <= item.gold < n_choices
        assert all(r.continuation.startswith(" ") for r in item.requests)
    if name == "boolq":
        assert not first.context.startswith("Passage:")
    assert len(read_items(name, files[name], limit=5)) == 5


def test_task_names_and_groups():
    files = resolve_tasks("default", SAMPLES)
    assert {"lambada_openai", "hellaswag", "piqa", "arc_easy", "copa"} <= set(files)
    assert sorted(k for k in files if k.startswith("blimp/")) == ["blimp/anaphor_number_agreement", "blimp/passive_1", "blimp/wh_island"]
    assert list(resolve_tasks("blimp_wh_island", SAMPLES)) == ["blimp_wh_island"]
    assert set(resolve_tasks("all", SAMPLES)) >= {t for t in TASKS if t != "blimp"}


def test_bad_task_input_is_named(tmp_path):
    with pytest.raises(BadOptionError, match="unknown task 'mmlu'.*known: lambada_openai"):
        resolve_tasks("piqa,mmlu", SAMPLES)
    with pytest.raises(CalibrationDataError, match="no such directory"):
        resolve_tasks("piqa", tmp_path / "nope")
    with pytest.raises(CalibrationDataError, match="task piqa: .*not found"):
        resolve_tasks("piqa", tmp_path)
    with pytest.raises(CalibrationDataError, match="not found"):
        resolve_tasks("blimp_no_such_paradigm", SAMPLES)
    (tmp_path / "llm_foundry").mkdir()
    (tmp_path / "llm_foundry" / "piqa.jsonl").write_text('{"query": "Question: x\\n", "choices": ["a", "b"], "gold": 0}\n{"text": "wrong file"}\n')
    with pytest.raises(CalibrationDataError, match=r"piqa.jsonl: a line lacks the field\(s\) query, choices, gold"):
        read_items("piqa", [tmp_path / "llm_foundry" / "piqa.jsonl"])
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "h.txt").write_text("ctx\n1\na\nb\n")
    with pytest.raises(CalibrationDataError, match="not a multiple of 6"):
        read_items("hellaswag", [tmp_path / "hellaswag" / "h.txt"])


@pytest.mark.skipif(not (SHARED / "data" / "eval").is_dir(), reason="shared/data/eval not present")
def test_full_task_files_item_counts():
    files = resolve_tasks("all", SHARED / "data" / "eval")
    counts = {name: len(read_items(name, f)) for name, f in files.items() if not name.startswith("blimp/")}
    assert counts == {"lambada_openai": 5153, "hellaswag": 10042, "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172,
                      "copa": 100, "winogrande": 1267, "boolq": 3270, "openbookqa": 500}
    assert sum(1 for k in files if k.startswith("blimp/")) == 67


def test_evaluate_tasks_on_the_micro_model_and_cache(micro_path, tmp_path):
    from moe_fx.formats.loading import load_model, load_tokenizer

    model, tok = load_model(micro_path), load_tokenizer(micro_path)
    cache = LoglikCache.for_checkpoint(micro_path, dtype="auto", device="cpu", max_length=2048, directory=tmp_path)
    res = evaluate_tasks(model, tok, "default,winogrande", data_dir=SAMPLES, limit=8, cache=cache, show_progress=False)
    assert set(res) == {"blimp", "lambada_openai", "hellaswag", "piqa", "arc_easy", "copa", "winogrande"}
    assert res["blimp"]["n"] == 24 and set(res["blimp"]["paradigms"]) == {"anaphor_number_agreement", "passive_1", "wh_island"}
    assert res["blimp"]["acc"] == pytest.approx(sum(res["blimp"]["paradigms"].values()) / 3)
    for r in res.values():
        assert 0.0 <= r["acc"] <= 1.0
    assert res["lambada_openai"]["ppl"] > 1.0 and res["hellaswag"]["n"] == 8

    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    again = evaluate_tasks(model, tok, "default,winogrande", data_dir=SAMPLES, limit=8,
                           cache=LoglikCache(tmp_path, cache.file.stem), show_progress=False)
    assert again == res and not calls  # every request came from the cache file
    evaluate_tasks(model, tok, "copa", data_dir=SAMPLES, limit=12, cache=LoglikCache(tmp_path, cache.file.stem), show_progress=False)
    assert len(calls) == 1  # only the 4 new items (8 requests) ran, in one batch
    handle.remove()


def test_fingerprint_follows_the_weights(micro_path, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "m"
    shutil.copytree(micro_path, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(micro_path)
    (copy / "moe_fx.json").write_text("{}")  # a run's record is not the model
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(micro_path)
    weights = next(Path(copy).glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(micro_path)
