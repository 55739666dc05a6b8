#!/usr/bin/env python3
"""Convert the offline eval files in /work/shared/data/eval into the Hugging Face dataset
schemas that lm-evaluation-harness' OFFICIAL task yamls expect.

Output: one jsonl per task in benchmarks/lm_eval_reference/data/ (git-ignored), line i of the
output == line/item i of the source file (so lm-eval doc_id i == source item i).

    python benchmarks/lm_eval_reference/convert.py [--src /work/shared/data/eval] [--out DIR]

Pure stdlib (runs in any python3). Reconstruction (official lm-eval template -> rendered text):

  piqa        foundry query "Question: {goal}\n"          -> goal       ; lm-eval "Question: {goal}\nAnswer:" + " " + sol
  arc_*       foundry query "Question: {q}"               -> question   ; lm-eval "Question: {q}\nAnswer:" + " " + choice
  openbookqa  foundry query == question_stem                            ; lm-eval "{question_stem}" + " " + choice
  boolq       foundry "Passage: {p}\nQuestion: {q}?"      -> passage, question (no "?", as in super_glue)
              lm-eval "{passage}\nQuestion: {question}?\nAnswer:" + " " + no|yes
  copa        foundry "{premise w/o final char}, therefore|because" -> premise (+ "."), question effect|cause
              lm-eval "{premise[:-1]} therefore|because" + " " + lowercase-first(choice)   (NB: no comma)
  winogrande  foundry context_options = [P+opt1, P+opt2], continuation C -> sentence "P_ C", option1/2, answer "1"|"2"
              lm-eval contexts P+opt_k, continuation " " + C (partial scoring)
  lambada     text = context + " " + continuation ; lm-eval context = all but last " "-token, target " " + last
  hellaswag   klosax "activity_label: ctx" -> activity_label, ctx_a = ctx, ctx_b = "" ; label as string
              lm-eval query = preprocess(activity_label + ": " + ctx_a + " ") == klosax line (for clean items)
  blimp       already HF schema (sentence_good / sentence_bad / ...); copied line by line.
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
LETTERS = "ABCDEFGHIJ"


def read_jsonl(p: Path) -> list[dict]:
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(p: Path, rows: list[dict]) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def strip_prefix(s: str, prefix: str) -> str:
    assert s.startswith(prefix), (prefix, s[:80])
    return s[len(prefix):]


def conv_piqa(rows):
    out = []
    for i, r in enumerate(rows):
        q = strip_prefix(r["query"], "Question: ")
        assert q.endswith("\n"), i
        assert len(r["choices"]) == 2
        out.append({"goal": q[:-1], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": int(r["gold"])})
    return out


def _mc_choices(choices):
    return {"text": list(choices), "label": [LETTERS[k] for k in range(len(choices))]}


def conv_arc(rows):
    out = []
    for i, r in enumerate(rows):
        out.append({
            "id": str(i),
            "question": strip_prefix(r["query"], "Question: "),
            "choices": _mc_choices(r["choices"]),
            "answerKey": LETTERS[int(r["gold"])],
        })
    return out


def conv_openbookqa(rows):
    return [{
        "id": str(i),
        "question_stem": r["query"],
        "choices": _mc_choices(r["choices"]),
        "answerKey": LETTERS[int(r["gold"])],
    } for i, r in enumerate(rows)]


def conv_boolq(rows):
    out = []
    for i, r in enumerate(rows):
        q = strip_prefix(r["query"], "Passage: ")
        # the passage may itself contain "\nQuestion: " (1 case) -> split on the LAST one
        passage, question = q.rsplit("\nQuestion: ", 1)
        assert question.endswith("?"), i
        assert r["choices"] == ["no", "yes"], i
        out.append({"passage": passage, "question": question[:-1], "label": int(r["gold"]), "idx": i})
    return out


def conv_copa(rows):
    out = []
    for i, r in enumerate(rows):
        q = r["query"]
        if q.endswith(", therefore"):
            prem, question = q[: -len(", therefore")], "effect"
        elif q.endswith(", because"):
            prem, question = q[: -len(", because")], "cause"
        else:
            raise ValueError(f"copa line {i}: {q!r}")
        assert len(r["choices"]) == 2
        out.append({
            "premise": prem + ".",  # official utils drop the final char of the premise
            "choice1": r["choices"][0],
            "choice2": r["choices"][1],
            "question": question,
            "label": int(r["gold"]),
            "idx": i,
        })
    return out


def conv_winogrande(rows):
    out = []
    for i, r in enumerate(rows):
        a, b = r["context_options"]
        p = os.path.commonprefix([a, b])
        # back up to a word boundary so option1/option2 are whole words (rendering is identical either way)
        cut = p.rfind(" ") + 1 if " " in p else 0
        prefix, o1, o2 = a[:cut], a[cut:], b[cut:]
        assert prefix + o1 == a and prefix + o2 == b and o1 != o2, i
        cont = r["continuation"]
        assert cont == cont.strip(), i
        out.append({
            "sentence": prefix + "_ " + cont,
            "option1": o1,
            "option2": o2,
            "answer": str(int(r["gold"]) + 1),
        })
    return out


def conv_lambada(rows):
    out = []
    for i, r in enumerate(rows):
        text = r["context"] + " " + r["continuation"]
        # check that the official split reproduces the foundry context / continuation
        assert " ".join(text.split(" ")[:-1]) == r["context"], i
        assert text.split(" ")[-1] == r["continuation"], i
        out.append({"text": text})
    return out


def conv_hellaswag(path: Path):
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    assert len(lines) % 6 == 0, len(lines)
    out = []
    for k in range(0, len(lines), 6):
        head, label, *endings = lines[k:k + 6]
        act, ctx = head.split(": ", 1)
        assert label in {"0", "1", "2", "3"}
        out.append({
            "ind": k // 6,
            "activity_label": act,
            "ctx_a": ctx,
            "ctx_b": "",
            "ctx": ctx,
            "endings": endings,
            "label": label,
        })
    return out


FOUNDRY = {
    # task name: (source file, converter)
    "piqa": ("piqa.jsonl", conv_piqa),
    "arc_easy": ("arc_easy.jsonl", conv_arc),
    "arc_challenge": ("arc_challenge.jsonl", conv_arc),
    "openbookqa": ("openbook_qa.jsonl", conv_openbookqa),
    "boolq": ("boolq.jsonl", conv_boolq),
    "copa": ("copa.jsonl", conv_copa),
    "winogrande": ("winogrande.jsonl", conv_winogrande),
    "lambada_openai": ("lambada_openai.jsonl", conv_lambada),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="/work/shared/data/eval")
    ap.add_argument("--out", default=str(HERE / "data"))
    ap.add_argument("--no-blimp", action="store_true")
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)

    for task, (fname, fn) in FOUNDRY.items():
        rows = fn(read_jsonl(src / "llm_foundry" / fname))
        write_jsonl(out / f"{task}.jsonl", rows)
        print(f"{task:16s} {len(rows):6d} -> {out / (task + '.jsonl')}")

    rows = conv_hellaswag(src / "hellaswag" / "hellaswag_val_full.txt.bz2")
    write_jsonl(out / "hellaswag.jsonl", rows)
    print(f"{'hellaswag':16s} {len(rows):6d} -> {out / 'hellaswag.jsonl'}")

    if not args.no_blimp:
        n = 0
        for p in sorted((src / "blimp").glob("*.jsonl")):
            rows = read_jsonl(p)
            assert all("sentence_good" in r and "sentence_bad" in r for r in rows), p
            write_jsonl(out / "blimp" / p.name, rows)
            n += 1
        print(f"blimp: {n} paradigms -> {out / 'blimp'}")


if __name__ == "__main__":
    main()
