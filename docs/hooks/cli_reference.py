"""MkDocs hook: the CLI reference page is generated from ``moe-fx``'s own argument parser at build time, so it
cannot drift from the code. ``docs/cli.md`` holds the marker ``<!-- cli-reference -->`` where it goes."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def _section(name: str, parser: argparse.ArgumentParser) -> str:
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=110, max_help_position=40)
    return f"## `moe-fx {name}`\n\n{parser.description or ''}\n\n```text\n{parser.format_help().rstrip()}\n```\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from moe_fx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = [_section(name, p) for name, p in sub.choices.items()]
    top = f"```text\n{parser.format_help().rstrip()}\n```\n"
    return markdown.replace(MARKER, top + "\n" + "\n".join(sections))
