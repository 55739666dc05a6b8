"""Zero-shot task files -> log-likelihood requests, in lm-evaluation-harness's prompt formats.

Each task reads its offline file (the layouts of ``shared/data/eval``: llm-foundry's jsonl, BLiMP's jsonl,
klosax's HellaSwag text) and renders every item as lm-eval's task yaml does (prompt text, target
delimiter, choices), so accuracies are comparable with lm-eval's on the same model. Where a file lost
information lm-eval's template uses, the difference is named on the task (``note``).

A task is data: a reader (file -> items) and the metrics reported on it. Adding one is one entry.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_fx.errors import BadOptionError, CalibrationDataError


@dataclass(frozen=True)
class Request:
    """Score ``log p(continuation | context)`` (lm-eval's ``loglikelihood`` request)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    """One test item: a request per choice (one request for LAMBADA), the gold index, and the choice texts
    whose character lengths normalise ``acc_norm`` (lm-eval divides by ``len(choice)``)."""

    requests: tuple[Request, ...]
    gold: int
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    file: str
    """Path relative to the evaluation-data directory (a glob for task groups such as BLiMP)."""
    read: Callable[[Path], Iterator[Item]]
    metrics: tuple[str, ...]
    """What lm-eval reports for it: ``acc``, ``acc_norm`` (multiple choice), ``ppl`` (LAMBADA)."""
    note: str = ""


def _jsonl(path: Path) -> Iterator[dict]:
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise CalibrationDataError(f"{path}: unreadable ({exc})") from None


def _fields(row: dict, path: Path, *names: str) -> list:
    missing = [n for n in names if n not in row]
    if missing:
        raise CalibrationDataError(f"{path}: a line lacks the field(s) {', '.join(missing)}; is this the right file for the task?")
    return [row[n] for n in names]


def _choice_item(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Item:
    """lm-eval's multiple choice: one request ``(context, delimiter + choice)`` per choice."""
    return Item(tuple(Request(context, delimiter + c) for c in choices), int(gold), tuple(choices))


def _question_answer(path: Path) -> Iterator[Item]:
    """PIQA and ARC: llm-foundry's query is ``"Question: <q>"`` (PIQA adds ``"\\n"``); lm-eval's prompt is
    ``"Question: <q>\\nAnswer:"`` with each choice after a space."""
    for row in _jsonl(path):
        query, choices, gold = _fields(row, path, "query", "choices", "gold")
        yield _choice_item(query.removesuffix("\n") + "\nAnswer:", choices, gold)


def _plain_query(path: Path) -> Iterator[Item]:
    """OpenBookQA: the question stem is the prompt, each choice after a space."""
    for row in _jsonl(path):
        query, choices, gold = _fields(row, path, "query", "choices", "gold")
        yield _choice_item(query, choices, gold)


def _boolq(path: Path) -> Iterator[Item]:
    """BoolQ (SuperGLUE): ``"<passage>\\nQuestion: <question>?\\nAnswer:"``, choices ``no`` / ``yes``.
    llm-foundry's query is ``"Passage: <passage>\\nQuestion: <question>?"``."""
    for row in _jsonl(path):
        query, choices, gold = _fields(row, path, "query", "choices", "gold")
        yield _choice_item(query.removeprefix("Passage: ") + "\nAnswer:", choices, gold)


def _copa(path: Path) -> Iterator[Item]:
    """COPA (SuperGLUE): lm-eval's prompt is the premise without its final period, then ``" because"`` /
    ``" therefore"``; its choices already start with a space (lower-cased first letter) and the target
    delimiter adds another, as lm-eval does. llm-foundry's query is ``"<premise without period>, therefore"``."""
    for row in _jsonl(path):
        query, choices, gold = _fields(row, path, "query", "choices", "gold")
        head, _, connector = query.rpartition(" ")
        rendered = [" " + c[:1].lower() + c[1:] for c in choices]
        yield _choice_item(f"{head.removesuffix(',')} {connector}", rendered, gold)


def _winogrande(path: Path) -> Iterator[Item]:
    """WinoGrande, partial scoring: each option completes the context, and the shared continuation is scored."""
    for row in _jsonl(path):
        contexts, continuation, gold = _fields(row, path, "context_options", "continuation", "gold")
        yield Item(tuple(Request(c, " " + continuation) for c in contexts), int(gold), (continuation,) * len(contexts))


def _lambada(path: Path) -> Iterator[Item]:
    """LAMBADA (OpenAI): the last word after a space; accuracy = greedy decoding reproduces it."""
    for row in _jsonl(path):
        context, continuation = _fields(row, path, "context", "continuation")
        yield Item((Request(context, " " + continuation),), 0, (continuation,))


_HELLASWAG_BRACKETS = re.compile(r"\[.*?\]")


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: WikiHow ``[title]`` markers become sentence breaks, other
    bracketed markers go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    return _HELLASWAG_BRACKETS.sub("", text).replace("  ", " ")


def _hellaswag(path: Path) -> Iterator[Item]:
    """klosax's extraction: 6 lines per item (``activity_label: context``, gold, 4 endings)."""
    try:
        with bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else path.open(encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError) as exc:
        raise CalibrationDataError(f"{path}: unreadable ({exc})") from None
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise CalibrationDataError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per item)")
    for i in range(0, len(lines), 6):
        context, label, *endings = lines[i : i + 6]
        if not label.strip().isdigit():
            raise CalibrationDataError(f"{path}:{i + 2}: expected the gold label (0-3), got {label[:40]!r}")
        yield _choice_item(_hellaswag_text(context), [_hellaswag_text(e) for e in endings], int(label))


def _blimp(path: Path) -> Iterator[Item]:
    """BLiMP: the whole sentence after the model's prefix token (empty context); the good one must score higher."""
    for row in _jsonl(path):
        good, bad = _fields(row, path, "sentence_good", "sentence_bad")
        yield _choice_item("", [good, bad], 0)


MC, MC_NORM = ("acc",), ("acc", "acc_norm")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("lambada_openai", "llm_foundry/lambada_openai.jsonl", _lambada, ("acc", "ppl")),
        Task("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", _hellaswag, MC_NORM,
             note="klosax's text keeps the second context part lower-case where lm-eval capitalises it"),
        Task("piqa", "llm_foundry/piqa.jsonl", _question_answer, MC_NORM),
        Task("arc_easy", "llm_foundry/arc_easy.jsonl", _question_answer, MC_NORM),
        Task("arc_challenge", "llm_foundry/arc_challenge.jsonl", _question_answer, MC_NORM),
        Task("copa", "llm_foundry/copa.jsonl", _copa, MC),
        Task("winogrande", "llm_foundry/winogrande.jsonl", _winogrande, MC),
        Task("boolq", "llm_foundry/boolq.jsonl", _boolq, MC),
        Task("openbookqa", "llm_foundry/openbook_qa.jsonl", _plain_query, MC_NORM),
        Task("blimp", "blimp/*.jsonl", _blimp, MC, note="mean over the paradigms (blimp_<paradigm> runs one)"),
    )
}

DEFAULT_TASKS = ("blimp", "lambada_openai", "hellaswag", "piqa", "arc_easy", "copa")
"""Those that separate models of a few tens of millions of parameters (the others sit near chance there)."""


def resolve_tasks(names: str | list[str] | tuple[str, ...], data_dir: str | Path) -> dict[str, list[Path]]:
    """Task names (comma list; ``default``, ``all``; ``blimp_<paradigm>``) -> their files under ``data_dir``,
    checked to exist. The BLiMP group expands to one entry per paradigm file (``blimp/<paradigm>``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CalibrationDataError(f"{data_dir}: no such directory of evaluation data (pass --task-data DIR or set MOE_FX_EVAL_DATA)")
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    expanded: list[str] = []
    for n in wanted:
        expanded += DEFAULT_TASKS if n == "default" else tuple(TASKS) if n == "all" else (n,)
    out: dict[str, list[Path]] = {}
    for name in dict.fromkeys(expanded):
        task = task_of(name)
        if task.name == "blimp" and name != "blimp":
            files = [data_dir / "blimp" / f"{name.removeprefix('blimp_')}.jsonl"]
        else:
            files = sorted(data_dir.glob(task.file))
        if not files or not all(f.is_file() for f in files):
            raise CalibrationDataError(f"task {name}: {data_dir / task.file} not found (is {data_dir} the evaluation-data directory?)")
        if name == "blimp":  # the group: one entry per paradigm, averaged by the caller
            out.update({f"blimp/{f.stem}": [f] for f in files})
        else:
            out[name] = files
    if not out:
        raise BadOptionError("no tasks given; name some of: " + ", ".join(TASKS) + " (or default, all)")
    return out


def task_of(name: str) -> Task:
    """The task a (possibly per-paradigm) name belongs to, or an error listing the known ones."""
    task = TASKS.get("blimp" if name.startswith(("blimp_", "blimp/")) else name)
    if task is None:
        raise BadOptionError(f"unknown task {name!r}; known: {', '.join(TASKS)} (blimp_<paradigm> for one BLiMP paradigm), default, all")
    return task


def read_items(name: str, files: list[Path], limit: int | None = None) -> list[Item]:
    """The first ``limit`` items of a task (file order, so runs with the same limit see the same items)."""
    items: list[Item] = []
    task = task_of(name)
    for f in files:
        for item in task.read(f):
            if limit is not None and len(items) >= limit:
                return items
            items.append(item)
    if not items:
        raise CalibrationDataError(f"task {name}: {', '.join(map(str, files))} holds no items")
    return items
