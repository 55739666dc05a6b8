#!/usr/bin/env python3
"""Reference zero-shot numbers from EleutherAI lm-evaluation-harness on local data.

Runs in the separate venv /work/venv-lmeval (torch 2.13.0 cpu, transformers 5.23.0, lm-eval 0.4.13):

    python3 benchmarks/lm_eval_reference/convert.py          # once: writes data/ (git-ignored)
    /work/venv-lmeval/bin/python benchmarks/lm_eval_reference/run.py \
        --model /work/shared/models/qwen3moe-bench \
        --tasks piqa,arc_easy,arc_challenge,copa,boolq,openbookqa,lambada_openai,winogrande,hellaswag,blimp_anaphor_number_agreement,blimp_passive_1,blimp_wh_island \
        --limit 200 --batch-size 16 --out benchmarks/lm_eval_reference/reference_bench_limit200.json

Task names may be given with or without the "local_" prefix; "blimp" = the local_blimp group (67 paradigms).
The yamls in tasks/ `include:` the OFFICIAL yaml of the installed lm_eval package; their @LM_EVAL_TASKS@ /
@DATA_DIR@ placeholders are filled in here (materialize_tasks) into a temp dir handed to lm-eval's TaskManager.
Samples are sorted by doc_id; doc_id i == line i of the source file (lm-eval --limit N takes the first N docs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def materialize_tasks(dst: Path, data_dir: Path) -> Path:
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).resolve().parent / "tasks"
    for src in (HERE / "tasks").rglob("*.yaml"):
        out = dst / src.relative_to(HERE / "tasks")
        out.parent.mkdir(parents=True, exist_ok=True)
        txt = src.read_text().replace("@LM_EVAL_TASKS@", str(lm_tasks)).replace("@DATA_DIR@", str(data_dir))
        out.write_text(txt)
    return dst


def _num(x):
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def gold_index(sample, pairs):
    """Gold choice index, as lm-eval's ConfigurableTask.process_results derives it."""
    t = sample["target"]
    if isinstance(t, int):
        return t
    if isinstance(t, str) and t.strip().isdigit():
        return int(t.strip())
    doc = sample.get("doc", {})
    if len({c for c, _ in pairs}) > 1 and "answer" in doc:  # winogrande: multiple contexts, gold = doc_to_text
        return {"1": 0, "2": 1}[str(doc["answer"])]
    if len(pairs) == 1:  # lambada: single continuation
        return 0
    conts = [k for _, k in pairs]
    for cand in (t, " " + t):  # copa: target string == choice (target_delimiter " " prepended in requests)
        if cand in conts:
            return conts.index(cand)
    raise ValueError(f"cannot map target {t!r} to a choice")


def encode_pair(lm, context, continuation):
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        if lm.prefix_token_id != cont[0]:
            return [[lm.prefix_token_id], cont]
        return [cont[:1], cont[1:]]
    c, k = lm._encode_pair(context, continuation)
    return [list(c), list(k)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", required=True, help="comma list, e.g. piqa,copa,blimp_passive_1")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", default="8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(HERE / "data"))
    ap.add_argument("--samples-max-docs", type=int, default=None,
                    help="keep per-sample loglikelihoods only for the first K docs of each task (size control)")
    args = ap.parse_args()

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data_dir = Path(args.data_dir).resolve()
    if not (data_dir / "piqa.jsonl").exists():
        sys.exit(f"{data_dir} has no converted data: run convert.py first")

    tasks = []
    for t in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        tasks.append(t if t.startswith("local_") else "local_" + t)

    bs = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    lm = HFLM(pretrained=args.model, device="cpu", dtype="float32", batch_size=bs, trust_remote_code=False)

    tmp = Path(tempfile.mkdtemp(prefix="lmeval_tasks_"))
    try:
        tm = TaskManager(include_path=str(materialize_tasks(tmp, data_dir)), include_defaults=False)
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=tm,
            limit=args.limit,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out = {
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model": str(Path(args.model).resolve()),
        "dtype": "float32",
        "limit": args.limit,
        "num_fewshot": 0,
        "tasks": {},
        "samples": {},
    }
    if args.samples_max_docs is not None:
        out["samples_max_docs"] = args.samples_max_docs

    for task, r in sorted(res["results"].items()):
        row = {}
        for key, name in (("acc,none", "acc"), ("acc_norm,none", "acc_norm"), ("perplexity,none", "perplexity")):
            if key in r:
                row[name] = _num(r[key])
        samples = res.get("samples", {}).get(task)
        if samples is not None:
            row["n"] = len(samples)
        elif "sample_len" in r:
            row["n"] = r["sample_len"]
        out["tasks"][task] = row

    for task, samples in sorted(res.get("samples", {}).items()):
        rows = []
        for s in sorted(samples, key=lambda s: s["doc_id"]):
            if args.samples_max_docs is not None and s["doc_id"] >= args.samples_max_docs:
                continue
            # resps: one entry per request (= per choice, in choice order), each [[ll, is_greedy]]
            lls = []
            for x in s["resps"]:
                ll, g = x[0] if isinstance(x[0], (list, tuple)) else x
                lls.append([float(ll), bool(g)])
            pairs = [list(a) for a in s["arguments"]]  # exact (context, continuation) strings per choice
            row = {"doc_id": s["doc_id"], "loglikelihoods": lls, "target": gold_index(s, pairs)}
            if s["doc_id"] == 0:
                row["context_continuation"] = pairs
                # the token ids lm-eval scores (context_enc, continuation_enc) for doc 0
                row["token_ids"] = [encode_pair(lm, c, k) for c, k in pairs]
            rows.append(row)
        out["samples"][task] = rows

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:  # compact: one line per sample row
        head = {k: v for k, v in out.items() if k != "samples"}
        txt = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
        txt += ',\n "samples": {'
        for i, (task, rows) in enumerate(out["samples"].items()):
            txt += ("," if i else "") + "\n  " + json.dumps(task) + ": ["
            txt += ",".join("\n   " + json.dumps(r, ensure_ascii=False) for r in rows) + "\n  ]"
        txt += "\n }\n}\n"
        json.loads(txt)
        f.write(txt)
    print(json.dumps(out["tasks"], indent=1))
    print("wrote", args.out, os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
    main()
