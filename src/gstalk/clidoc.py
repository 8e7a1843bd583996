"""Generate ``docs/cli.md``, the CLI reference, from the typer app itself.

``python -m gstalk.clidoc > docs/cli.md`` rewrites it; ``tests/test_cli.py`` fails when the
file is stale, so the reference always matches ``gstalk --help``.
"""

from __future__ import annotations

from typing import Any

from gstalk.metrics.report import markdown_table

# typer 0.29 vendors click (``typer._click``): the objects are duck-typed here.


def _params_table(cmd: Any, ctx: Any) -> list[str]:
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name, kind = f"`{p.name.upper()}`", "argument"
        else:
            name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            kind = "flag" if getattr(p, "is_flag", False) else str(p.display_type(ctx)).strip("<>")
        default = p.default
        default_s = "" if default is None or callable(default) or isinstance(default, bool) else f"`{default}`"
        help_s = " ".join((p.help or "").split()).replace("|", "\\|")
        rows.append([name, kind, default_s, help_s])
    if not rows:
        return []
    return [*markdown_table(["option", "type", "default", "meaning"], rows), ""]


def _walk(cmd: Any, path: list[str], out: list[str]) -> None:
    if hasattr(cmd, "commands"):
        for name in sorted(cmd.commands):
            sub = cmd.commands[name]
            if not sub.hidden:
                _walk(sub, [*path, name], out)
        return
    title = " ".join(path)
    out += [f"## `{title}`", ""]
    doc = " ".join((cmd.help or "").split())
    if doc:
        out += [doc, ""]
    ctx = cmd.context_class(cmd, info_name=title)
    out += ["```", cmd.get_usage(ctx).strip(), "```", ""]
    out += _params_table(cmd, ctx)


def render_cli_markdown() -> str:
    """The whole CLI reference as Markdown (one section per command, options tables)."""
    import typer.main

    from gstalk.cli import app

    root = typer.main.get_command(app)
    out = ["# CLI reference", "",
           "Generated from the typer app by `python -m gstalk.clidoc > docs/cli.md`; a test fails when this",
           "file is out of date. Every command also takes `--help`. Exit codes: `docs/troubleshooting.md`.", ""]
    _walk(root, ["gstalk"], out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render_cli_markdown(), end="")
