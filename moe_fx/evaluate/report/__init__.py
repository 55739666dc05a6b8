"""Run reports: report.md / report.json and their plots."""

from moe_fx.evaluate.report.report import REPORT_JSON, REPORT_MD, summarize, write_report

__all__ = ["REPORT_JSON", "REPORT_MD", "summarize", "write_report"]
