"""``sweep.json`` + ``sweep.md`` + quality-vs-ratio plots of a :class:`moe_fx.run.sweep.SweepResult`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from moe_fx.errors import first_line
from moe_fx.evaluate.report import plots
from moe_fx.evaluate.report.report import md_table, write_text

SWEEP_MD, SWEEP_JSON = "sweep.md", "sweep.json"


def _curves(result, out: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Mean and worst-domain NLL change, and each task's accuracy change, against the fraction pruned."""
    jobs = []  # (file name, title, y label, value of a point)
    if any("nll_delta" in p for p in result.points):
        jobs += [("nll_delta", "Mean held-out NLL change vs fraction pruned", "Δ NLL (nats / token, mean over domains)", lambda p: p["nll_delta"]),
                 ("worst_delta", "Worst-domain NLL change vs fraction pruned", "Δ NLL of the worst domain", lambda p: p["worst_delta"])]
    for task in (result.base.get("tasks") or {}):
        jobs.append((f"task_{task}", f"{task}: accuracy change vs fraction pruned", "Δ accuracy (points)",
                     lambda p, t=task: 100 * p["task_deltas"][t]))
    files, errors = {}, {}
    done = [p for p in result.points if "error" not in p]
    for name, title, ylabel, value in jobs:
        points = [{"method": p["method"], "ratio": p["ratio"], "delta": value(p)} for p in done]
        points += [{"method": m, "ratio": 0.0, "delta": 0.0} for m in dict.fromkeys(p["method"] for p in done)]  # the unpruned model
        try:
            plots.quality_curves(points, out / "plots" / f"{name}.png", metric="delta", title=title, ylabel=ylabel)
            files[name] = f"plots/{name}.png"
        except (ImportError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            errors[name] = first_line(exc)
    return files, errors


def sweep_table(result) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: the unpruned model, then every point by ratio, best mean NLL change first; task
    columns hold the accuracy change in points (the unpruned row: accuracy in %)."""
    tasks = list(result.base.get("tasks") or {})
    headers = ["method", "pruned", "params", "NLL mean", "Δ mean", "worst Δ (domain)"] + [f"Δ {t}" for t in tasks] + ["prune s"]
    base = result.base
    rows = [["unpruned", "0%", f"{base['size']['params']:,}", f"{base['nll']['mean']['nll']:.4f}" if base["nll"] else "-", "", ""]
            + [f"{100 * base['tasks'][t]['acc']:.1f}" for t in tasks] + [""]]
    for p in sorted(result.points, key=lambda p: (p["ratio"], p.get("nll_delta", float("inf")))):
        if "error" in p:
            rows.append([p["method"], f"{p['ratio']:.0%}", "failed", p["error"], "", ""] + [""] * len(tasks) + [""])
            continue
        rows.append([p["method"], f"{p['ratio']:.0%}", f"{p['size']['params']:,}",
                     f"{p['nll_mean']:.4f}" if "nll_mean" in p else "-", f"{p['nll_delta']:+.4f}" if "nll_delta" in p else "-",
                     f"{p['worst_delta']:+.4f} ({p['worst_domain']})" if "worst_delta" in p else "-"]
                    + [f"{100 * p['task_deltas'][t]:+.1f}" for t in tasks] + [f"{p['seconds']:.1f}"])
    return headers, rows


def render_sweep_markdown(result, model: str, files: dict[str, str], errors: dict[str, str], notes: list[str]) -> str:
    lines = [f"# moe-fx sweep: {model}", "", *notes, "",
             "Rows by ratio, best mean NLL change first. Task columns: accuracy change in points (unpruned row: accuracy in %).", ""]
    lines += md_table(*sweep_table(result)) + [""]
    lines += [f"![{name}]({f})" for name, f in files.items()] + [f"- {name}: not drawn ({e})" for name, e in errors.items()]
    return "\n".join(lines) + "\n"


def write_sweep(out: str | Path, result, *, model: str, notes: list[str]) -> Path:
    """Write the sweep's JSON, markdown table and plots into ``out``; return the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, errors = _curves(result, out)
    write_text(out / SWEEP_JSON, json.dumps({"model": model, "notes": notes, **dataclasses.asdict(result), "plots": files}, indent=2) + "\n")
    md = out / SWEEP_MD
    write_text(md, render_sweep_markdown(result, model, files, errors, notes))
    return md
