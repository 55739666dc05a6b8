import gzip
import json

import pytest
import torch

from moe_fx.calibrate.data import Document, calibration_tokens, pack, read_documents, split_holdout
from moe_fx.errors import CalibrationDataError


class CharTokenizer:
    """A stand-in tokenizer: one token per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [2 + (ord(c) % 100) for c in text]}


def test_reads_jsonl_gz_txt_and_domains(tmp_path):
    rows = [{"text": "alpha beta", "domain": "a"}, {"text": "  "}, {"text": "gamma", "domain": "b"}]
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    docs = read_documents(p)
    assert [(d.text, d.domain) for d in docs] == [("alpha beta", "a"), ("gamma", "b")]
    t = tmp_path / "d.txt"
    t.write_text("one\n\ntwo\n\n\n")
    assert [d.text for d in read_documents(t)] == ["one", "two"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "holds no text"), (b'{"text": 1}\n', '"text" string'), (b"{oops\n", "not valid JSON"), (b"\x1f\x8bnot gzip", "unreadable")],
)
def test_bad_files_fail_clearly(tmp_path, content, message):
    p = tmp_path / ("bad.jsonl.gz" if content.startswith(b"\x1f") else "bad.jsonl")
    p.write_bytes(content)
    with pytest.raises(CalibrationDataError, match=message):
        read_documents(p)


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationDataError, match="no such file"):
        read_documents(tmp_path / "nope.jsonl")


def test_pack_is_seeded_and_exact():
    docs = [Document("x" * n) for n in (5, 7, 11, 13)]
    a = pack(CharTokenizer(), docs, seq_len=4, max_tokens=24, seed=3)
    b = pack(CharTokenizer(), docs, seq_len=4, max_tokens=24, seed=3)
    assert a.shape == (6, 4) and torch.equal(a, b)
    with pytest.raises(CalibrationDataError, match="fewer than one window"):
        pack(CharTokenizer(), [Document("ab")], seq_len=16, max_tokens=None, seed=None)


def test_holdout_is_disjoint_and_deterministic():
    docs = [Document(str(i)) for i in range(40)]
    cal, hold = split_holdout(docs, 0.1, seed=0)
    assert len(hold) == 4 and len(cal) == 36 and not {d.text for d in cal} & {d.text for d in hold}
    assert split_holdout(docs, 0.1, seed=0) == (cal, hold)


def test_token_tensor_source_and_errors():
    t = torch.arange(12).view(3, 4)
    assert torch.equal(calibration_tokens(t).input_ids, t)
    with pytest.raises(CalibrationDataError):
        calibration_tokens(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(CalibrationDataError, match="empty"):
        calibration_tokens([" ", ""], CharTokenizer())
