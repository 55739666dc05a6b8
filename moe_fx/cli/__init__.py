"""The ``moe-fx`` command: ``inspect``, ``prune``, ``sweep``, ``eval``, ``report``, ``export``, one module each.

Errors caused by the input (paths, options, data) print one line naming the problem and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from moe_fx.cli import evaluate, export, inspect, prune, quantize, report, sweep
from moe_fx.errors import MoeFxError

COMMANDS = {"inspect": inspect, "prune": prune, "sweep": sweep, "export": export, "report": report, "eval": evaluate,
            "quantize": quantize}
"""Command name -> its module (``add_parser(sub)`` declares the options, ``run(args)`` runs it)."""


class _VersionAction(argparse.Action):
    """``--version``: the stack's versions, read from package metadata (nothing heavy is imported)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from moe_fx.environment import version_line

        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-fx", description="Make Mixture-of-Experts models smaller: trace, calibrate, prune, save.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of moe-fx, torch, transformers and onnxruntime, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """``--nproc N``: run this same command as N torchrun workers (PyTorch's launcher, not a process pool)."""
    import subprocess

    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc") and not a.startswith("--nproc=")]
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "moe_fx", *rest])


def _configure_output(args: argparse.Namespace) -> None:
    """Quiet by default: transformers' warnings about checkpoint details a user cannot act on are hidden unless
    ``--verbose`` (which also shows its info messages); ``--quiet`` also hides the progress bars."""
    from transformers.utils import logging as hf_logging

    if getattr(args, "verbose", False):
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_error()
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch_under_torchrun(argv, args.nproc)
    _configure_output(args)
    from moe_fx.calibrate import distributed
    from moe_fx.environment import untested_transformers

    warning = untested_transformers()
    if warning and distributed.is_main():
        print(f"moe-fx: warning: {warning}", file=sys.stderr)
    try:
        code = COMMANDS[args.command].run(args)
        distributed.finish()
        return code
    except MoeFxError as exc:
        print(f"moe-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-fx {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
