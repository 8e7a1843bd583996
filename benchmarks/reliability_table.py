"""Regenerate the tables of docs/reliability.md from the corpus tests themselves.

Runs ``tests/test_bad_inputs.py`` and ``tests/test_interrupt.py`` with
``$GSTALK_RELIABILITY_LOG`` set: each test records the case, the command, the exit code, the
line gstalk printed and whether the workspace stayed intact (``gstalk.testing.corpus.record``),
after asserting them. Prints the markdown tables (to paste into docs/reliability.md).

    python benchmarks/reliability_table.py            # ~5 minutes on 2 cores
    python benchmarks/reliability_table.py --log rows.jsonl --no-run   # render a saved log

Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GROUPS = ("extract", "track", "render --audio", "workspace", "resources", "training", "kill -9")
TESTS = ["tests/test_bad_inputs.py", "tests/test_interrupt.py"]


def run_tests(log: Path) -> int:
    """Run the corpus tests, recording rows into ``log``; returns pytest's exit code."""
    env = dict(os.environ, GSTALK_RELIABILITY_LOG=str(log))
    return subprocess.call([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"], env=env)


def cell(text: str) -> str:
    """Markdown-table-safe text: pipes escaped, kept on one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def code_span(text: str) -> str:
    """``text`` as an inline code span (double backticks when it holds backticks), or ''."""
    t = cell(text)
    if not t:
        return ""
    return f"`` {t} ``" if "`" in t else f"`{t}`"


def render(rows: list[dict]) -> str:
    """Markdown: one table per group, in ``GROUPS`` order, rows in recording order (deduplicated)."""
    out = []
    seen = set()
    for group in GROUPS:
        mine = []
        for r in rows:
            key = (r["group"], r["case"])
            if r["group"] == group and key not in seen:
                seen.add(key)
                mine.append(r)
        if not mine:
            continue
        out.append(f"### {group}\n")
        out.append("| bad input | command | message (the actual line) | exit | workspace intact |")
        out.append("|---|---|---|---|---|")
        for r in mine:
            out.append(f"| {cell(r['case'])} | {code_span(r['command'])} | {code_span(r['message'])} | {r['code']} | "
                       f"{cell(r['intact'])} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", type=Path, help="JSON-lines log to write (and read); default: a temp file")
    ap.add_argument("--no-run", action="store_true", help="only render an existing --log")
    a = ap.parse_args(argv)
    log = a.log or Path(tempfile.mkstemp(suffix=".jsonl")[1])
    code = 0
    if not a.no_run:
        log.write_text("")
        code = run_tests(log)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print(render(rows))
    if code:
        print(f"(pytest exited with {code}: some rows may be missing)", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
