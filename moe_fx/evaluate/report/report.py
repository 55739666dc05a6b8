"""``report.md`` + ``report.json`` + ``plots/*.png`` beside a checkpoint, built from its ``moe_fx.json`` record.

The report reads only the record (what was done, plan, scores, sizes, evaluations), so it can be
regenerated at any time (``moe-fx report DIR``) and never needs the model. A plot that fails is named in
the report instead of failing the run that wrote the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from moe_fx.errors import NotAModelError, first_line
from moe_fx.evaluate.nll import disk_size
from moe_fx.evaluate.report import plots
from moe_fx.evaluate.table import human_bytes
from moe_fx.formats.atomic import replace_atomically

REPORT_MD, REPORT_JSON, PLOTS_DIR = "report.md", "report.json", "plots"


def write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def _disk(path: str | None) -> int | None:
    """Weight bytes of a checkpoint directory, None when it is gone (a source moved since the run)."""
    return disk_size(path) if path and Path(path).is_dir() else None


def _layers(record: dict) -> list[dict]:
    """Per MoE block: experts and widths before/after, the kept expert ids, per-expert kept widths."""
    plan = (record.get("plan") or {}).get("kept_experts", {})
    widths = (record.get("channel_plan") or {}).get("kept_widths", {})
    rows = []
    for block, before in record.get("experts_before", {}).items():
        rows.append({
            "block": block,
            "experts_before": before,
            "experts_after": record["experts_after"][block],
            "kept_experts": plan.get(block),
            "width_before": record["widths_before"][block],
            "width_after": record["widths_after"][block],
            "kept_widths": widths.get(block),
        })
    return rows


def _paired(before: dict | None, after: dict | None, metrics: tuple[str, ...]) -> dict:
    """``{name: {metric: {before, after, delta}}}`` for every name and metric both sides hold."""
    if not before or not after:
        return {}
    out = {}
    for name, b in before.items():
        a = after.get(name, {})
        entry = {m: {"before": b[m], "after": a[m], "delta": a[m] - b[m]} for m in metrics if m in b and m in a}
        if entry:
            out[name] = entry | ({"n": b["n"]} if "n" in b else {})
    return out


def summarize(record: dict, checkpoint: Path, location: Path | None = None) -> dict:
    """The report's content as plain data (what ``report.json`` holds). ``location``: where the checkpoint
    will live, when it is being written under a temporary name."""
    cli = record.get("cli") or {}
    size_b, size_a = record.get("size_before") or {}, record.get("size_after") or {}
    return {
        "checkpoint": str(location or checkpoint),
        "source": record.get("source"),
        "model_type": record.get("model_type"),
        "method": {k: cli.get(k) for k in ("granularity", "method", "ratio", "keep", "allocation", "merge", "compensate", "expert_ratio", "seed") if k in cli},
        "passes": [{"name": p["name"], "seconds": p.get("seconds"), "report": p.get("report") or {}} for p in record.get("passes", [])],
        "prune_seconds": record.get("prune_seconds"),
        "size": {
            "params_before": size_b.get("params"), "params_after": size_a.get("params"),
            "bytes_before": size_b.get("bytes"), "bytes_after": size_a.get("bytes"),
            "disk_before": _disk(record.get("source")), "disk_after": _disk(str(checkpoint)),
        },
        "layers": _layers(record),
        "calibration": record.get("calibration"),
        "search": record.get("search"),
        "eval_source": record.get("eval_source"),
        "nll": _paired(record.get("eval_before"), record.get("eval_after"), ("nll", "ppl")),
        "nll_as_saved": _paired(record.get("eval_after"), record.get("eval_saved"), ("nll", "ppl")),
        # what the checkpoint stores: a scheme written after the prune, or the MXFP4 experts a GPT-OSS source had
        "quantized": (record.get("quantization") or {}).get("scheme") or (record.get("expert_format") or {}).get("format"),
        "tasks": _paired(record.get("tasks_before"), record.get("tasks_after"), ("acc", "acc_norm", "ppl")),
        "generation": record.get("generation"),
        "versions": record.get("versions"),
    }


def _plot_jobs(record: dict, summary: dict) -> dict[str, Callable[[Path], Path]]:
    """Which figures this record supports, each as ``path -> written path``."""
    jobs: dict[str, Callable[[Path], Path]] = {}
    scores = record.get("scores") or {}
    per_unit = scores.get("per_block") or scores.get("per_expert")
    kept = (record.get("plan") or {}).get("kept_experts")
    if per_unit:
        what = f"{scores.get('method', '?')} score" + (" (channel scores summed per expert)" if "per_expert" in scores else "")
        jobs["importance"] = lambda p: plots.importance_heatmap(per_unit, kept, p, title=f"Expert importance: {what}; dropped experts marked", score_label=what)
        jobs["scores"] = lambda p: plots.score_distributions(per_unit, kept, p, title=f"Distribution of expert scores per layer ({what})", score_label=what)
    widths = (record.get("channel_plan") or {}).get("kept_widths")
    if widths:
        jobs["widths"] = lambda p: plots.kept_widths(widths, record["widths_before"], p, title="Kept channels per expert")
    if summary["nll"]:
        nll = {side: {d: v["nll"][side] for d, v in summary["nll"].items() if d != "all"} for side in ("before", "after")}
        jobs["domains"] = lambda p: plots.domain_bars(nll, p, title="Held-out NLL per domain (lower is better)", ylabel="NLL (nats / token)")
    accs = {t: v["acc"] for t, v in summary["tasks"].items() if "acc" in v}
    if accs:
        bars = {side: {t: 100 * v[side] for t, v in accs.items()} for side in ("before", "after")}
        jobs["tasks"] = lambda p: plots.domain_bars(bars, p, title="Zero-shot accuracy per task", ylabel="accuracy (%)", xlabel="task")
    return jobs


def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"


def _change(before, after) -> str:
    return f"{after / before - 1:+.1%}" if before and after is not None else ""


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def render_markdown(summary: dict, plot_files: dict[str, str], plot_errors: dict[str, str]) -> str:
    m, s = summary["method"], summary["size"]
    budget = f"ratio {m['ratio']}" if m.get("ratio") is not None else f"keep {m.get('keep')}"
    extras = [k for k in ("merge", "compensate") if m.get(k)] + ([f"expert ratio {m['expert_ratio']}"] if m.get("expert_ratio") else [])
    lines = [
        f"# moe-fx prune report: {Path(summary['checkpoint']).name}",
        "",
        f"**{m.get('method', '?')}** ({m.get('granularity', 'expert')} granularity, {budget}, {m.get('allocation', 'uniform')} allocation"
        + (", " + ", ".join(extras) if extras else "") + f") on `{summary['source']}` ({summary['model_type']}).",
        "",
        "## Size",
        "",
        *md_table(["", "before", "after", "change"], [
            ["parameters", _fmt_int(s["params_before"]), _fmt_int(s["params_after"]), _change(s["params_before"], s["params_after"])],
            ["bytes in memory", human_bytes(s["bytes_before"] or 0), human_bytes(s["bytes_after"] or 0), _change(s["bytes_before"], s["bytes_after"])],
            ["weights on disk", human_bytes(s["disk_before"]) if s["disk_before"] else "-", human_bytes(s["disk_after"] or 0), _change(s["disk_before"], s["disk_after"])],
        ]),
        "",
    ]
    if summary["nll"]:
        lines += ["## Held-out NLL", "", f"Evaluated on {summary['eval_source']}.", ""]
        lines += md_table(["domain", "NLL before", "NLL after", "delta", "PPL before", "PPL after"], [
            [d, f"{v['nll']['before']:.4f}", f"{v['nll']['after']:.4f}", f"{v['nll']['delta']:+.4f}", f"{v['ppl']['before']:.2f}", f"{v['ppl']['after']:.2f}"]
            for d, v in summary["nll"].items()
        ]) + [""]
    if summary.get("nll_as_saved"):  # "after" is the pruned model in memory; the checkpoint holds it quantized
        lines += [f"The checkpoint stores the pruned model quantized ({summary['quantized']}); read back from disk:", ""]
        lines += md_table(["domain", "NLL pruned", "NLL as saved", "delta"], [
            [d, f"{v['nll']['before']:.4f}", f"{v['nll']['after']:.4f}", f"{v['nll']['delta']:+.4f}"] for d, v in summary["nll_as_saved"].items()
        ]) + [""]
    if summary["tasks"]:
        rows = []
        for task, metrics in summary["tasks"].items():
            for metric, v in metrics.items():
                if metric == "ppl":
                    rows.append([task, metric, metrics.get("n", ""), f"{v['before']:.2f}", f"{v['after']:.2f}", _change(v["before"], v["after"])])
                elif metric != "n":
                    rows.append([task, metric, metrics.get("n", ""), f"{100 * v['before']:.1f}", f"{100 * v['after']:.1f}", f"{100 * v['delta']:+.1f}"])
        lines += ["## Zero-shot tasks", "", "Accuracy in % (lm-eval's prompts and metrics; LAMBADA also perplexity, change in %).", ""]
        lines += md_table(["task", "metric", "items", "before", "after", "delta"], rows) + [""]
    gen = summary.get("generation")
    if gen:
        lines += ["## Generation agreement", "",
                  f"Greedy continuations of {gen['prompts']} held-out prompts ({gen['prompt_tokens']} tokens each), {gen['new_tokens']} new tokens, "
                  "against the unpruned model's; KL along the unpruned model's continuation"
                  + ("" if gen["kl_bins"] == "full" else f" ({gen['kl_bins']} bins, a lower bound)") + ".", ""]
        lines += md_table(["all tokens identical", "mean agreeing prefix", "tokens identical", "mean KL (nats / token)"], [
            [f"{100 * gen['exact_match']:.1f}%", f"{gen['prefix_tokens']:.1f} of {gen['new_tokens']}", f"{100 * gen['token_match']:.1f}%", f"{gen['kl']:.4f}"],
        ]) + [""]
    lines += ["## Per layer", ""]
    layer_rows = []
    for r in summary["layers"]:
        kept = r["kept_experts"]
        kept_txt = ("all" if kept is None or len(kept) == r["experts_before"] else ", ".join(map(str, kept)))
        widths = r["kept_widths"]
        width_txt = f"{r['width_after']}" + (f" (kept {min(widths)}-{max(widths)}, mean {sum(widths) / len(widths):.0f})" if widths else "")
        layer_rows.append([r["block"], f"{r['experts_before']} → {r['experts_after']}", f"{r['width_before']} → {width_txt}", kept_txt])
    lines += md_table(["block", "experts", "expert width", "kept experts (original ids)"], layer_rows) + [""]
    lines += ["## Run", ""]
    cal = summary["calibration"]
    if cal:
        lines.append(f"- calibration: {cal['tokens']:,} tokens of {cal.get('source')} in {cal['seconds']:.1f} s, fingerprint `{cal['fingerprint']}`")
    for p in summary["passes"]:
        line = f"- pass `{p['name']}`: {p['seconds']:.1f} s" if p.get("seconds") is not None else f"- pass `{p['name']}`"
        choice = p["report"] if p["name"] == "choose_recipe" else {}
        if choice.get("fitness"):  # which candidate recipe was kept, and what each scored
            line += (f"; kept `{choice['chosen']}` by its NLL on {choice['fitness_tokens']:,} held-out calibration tokens ("
                     + ", ".join(f"`{label}` {v:.4f}" for label, v in choice["fitness"].items()) + ")")
        lines.append(line)
    if summary["prune_seconds"] is not None:
        lines.append(f"- total pruning time: {summary['prune_seconds']:.1f} s")
    if summary["versions"]:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()))
    lines.append("")
    if plot_files or plot_errors:
        lines += ["## Plots", ""]
        lines += [f"![{name}]({file})" for name, file in plot_files.items()]
        lines += [f"- {name}: not drawn ({err})" for name, err in plot_errors.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(checkpoint: str | Path, record: dict | None = None, *, location: str | Path | None = None, draw: bool = True) -> Path:
    """Write ``report.md``, ``report.json`` and ``plots/`` into ``checkpoint`` from its record (read from
    ``moe_fx.json`` unless given); return the path of ``report.md``."""
    checkpoint = Path(checkpoint)
    if record is None:
        file = checkpoint / "moe_fx.json"
        if not file.is_file():
            raise NotAModelError(f"{checkpoint}: no moe_fx.json (a report describes a checkpoint moe-fx wrote)")
        record = json.loads(file.read_text())
    summary = summarize(record, checkpoint, Path(location) if location else None)
    plot_files, plot_errors = {}, {}
    if draw:
        for name, job in _plot_jobs(record, summary).items():
            try:
                job(checkpoint / PLOTS_DIR / f"{name}.png")
                plot_files[name] = f"{PLOTS_DIR}/{name}.png"
            except (ImportError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                plot_errors[name] = first_line(exc)
    summary["plots"], summary["plot_errors"] = plot_files, plot_errors
    write_text(checkpoint / REPORT_JSON, json.dumps(summary, indent=2) + "\n")
    md = checkpoint / REPORT_MD
    write_text(md, render_markdown(summary, plot_files, plot_errors))
    return md
