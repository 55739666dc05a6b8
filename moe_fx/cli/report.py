"""``moe-fx report``: (re)write report.md, report.json and plots/ of a pruned checkpoint from its moe_fx.json."""

from __future__ import annotations

from moe_fx.cli.common import add_output


def add_parser(sub) -> None:
    """Declare the command and its options on the ``moe-fx`` subparsers ``sub``."""
    p = sub.add_parser("report", help="(re)write report.md, report.json and plots/ of a checkpoint moe-fx pruned, from its moe_fx.json")
    p.add_argument("model", help="checkpoint directory written by moe-fx prune")
    add_output(p)


def run(args) -> int:
    """Run the command with the parsed ``args``; return the exit status."""
    from moe_fx.evaluate.report import write_report
    from moe_fx.formats.loading import check_model_dir

    md = write_report(check_model_dir(args.model))
    print(md.read_text())
    return 0
