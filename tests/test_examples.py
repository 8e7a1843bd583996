"""README's commands need nothing outside the repository: the media they name ship in
``examples/``, with the checksums ``examples/README.md`` gives."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands(text: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [shlex.split(line.split("#")[0]) for b in blocks for line in b.splitlines() if line.startswith("gstalk ")]


def test_readme_run_and_render_use_media_in_the_repository():
    cmds = _commands((REPO / "README.md").read_text())
    run = next(c for c in cmds if c[1] == "run")
    assert (REPO / run[2]).is_file(), run
    render = next(c for c in cmds if c[1] == "render" and "--audio" in c)
    assert (REPO / render[render.index("--audio") + 1]).is_file(), render
    assert not any("shared/" in a for c in (run, render) for a in c)


def test_the_sample_media_are_the_files_examples_readme_describes():
    text = (REPO / "examples" / "README.md").read_text()
    for name in ("obama.mp4", "grid_bbaf2n.wav"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}`"))
        digest = re.search(r"`([0-9a-f]{64})`", row).group(1)
        size = int(re.search(r"\| ([\d,]+) B \|", row).group(1).replace(",", ""))
        data = (REPO / "examples" / name).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, name
