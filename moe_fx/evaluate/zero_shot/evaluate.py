"""Run zero-shot tasks on a model: accuracies (lm-eval's metrics), standard errors, BLiMP's paradigm mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from moe_fx.evaluate.zero_shot.cache import LoglikCache
from moe_fx.evaluate.zero_shot.loglik import loglikelihoods, prefix_token_id, tokenizer_encoder
from moe_fx.evaluate.zero_shot.tasks import Item, read_items, resolve_tasks, task_of


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, which lm-eval relies on)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error with the sample deviation (lm-eval's ``mean_stderr``)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def task_metrics(name: str, items: list[Item], results: list[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's per-item metrics, averaged: ``acc`` (highest log-likelihood is gold), ``acc_norm`` (per
    character of the choice), LAMBADA's ``acc`` (greedy decoding reproduces the word) and ``ppl``."""
    task = task_of(name)
    per_metric: dict[str, list[float]] = {m: [] for m in task.metrics if m != "ppl"}
    at = 0
    for item in items:
        scores = results[at : at + len(item.requests)]
        at += len(item.requests)
        lls = [s[0] for s in scores]
        if "ppl" in task.metrics:
            per_metric["acc"].append(float(scores[0][1]))
            continue
        per_metric["acc"].append(float(_argmax(lls) == item.gold))
        if "acc_norm" in per_metric:
            per_metric["acc_norm"].append(float(_argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.gold))
    out: dict[str, float] = {"n": len(items)}
    for metric, values in per_metric.items():
        out[metric], out[f"{metric}_stderr"] = _mean_stderr(values)
    if "ppl" in task.metrics:
        out["ppl"] = math.exp(-sum(r[0] for r in results) / len(results))
    return out


def evaluate_tasks(
    model: nn.Module,
    tokenizer,
    tasks: str | Sequence[str] = "default",
    *,
    data_dir: str | Path,
    limit: int | None = None,
    batch_tokens: int = 4096,
    cache: LoglikCache | None = None,
    show_progress: bool = True,
) -> dict[str, dict]:
    """Zero-shot results per task (the first ``limit`` items of each; of each paradigm for BLiMP, whose
    ``blimp`` entry is the mean over its paradigms as lm-eval's group reports it, ``paradigms`` inside)."""
    files = resolve_tasks(tasks, data_dir)
    encode, prefix = tokenizer_encoder(tokenizer), prefix_token_id(tokenizer)
    results: dict[str, dict] = {}
    for name, task_files in files.items():
        items = read_items(name, task_files, limit)
        requests = [r for item in items for r in item.requests]
        found = [cache.get(r) if cache else None for r in requests]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            scored = loglikelihoods(model, encode, [requests[i] for i in missing], prefix_id=prefix, batch_tokens=batch_tokens,
                                    show_progress=show_progress, desc=name)
            for i, result in zip(missing, scored):
                found[i] = result
                if cache:
                    cache.put(requests[i], result)
            if cache:
                cache.save()
        results[name] = task_metrics(name, items, found)  # type: ignore[arg-type]
    paradigms = {k.removeprefix("blimp/"): results.pop(k) for k in list(results) if k.startswith("blimp/")}
    if paradigms:
        accs = [v["acc"] for v in paradigms.values()]
        results["blimp"] = {"acc": sum(accs) / len(accs), "n": sum(v["n"] for v in paradigms.values()),
                            "paradigms": {k: v["acc"] for k, v in paradigms.items()}}
    return results
