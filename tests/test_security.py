"""Security rules over the source tree (issue 9), checked on the syntax tree of every module:

- nothing unpickles: no ``pickle``/``marshal``/``dill``/``joblib``/``shelve`` import, no
  ``torch.load`` (checkpoints are safetensors), no ``np.load(..., allow_pickle=True)``, no
  ``yaml.load`` (only ``safe_load``);
- no shell: no ``shell=True``, ``os.system``, ``os.popen``, ``subprocess.getoutput``;
- no ``eval``/``exec`` of strings.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gstalk"
UNPICKLERS = {"pickle", "cPickle", "_pickle", "marshal", "dill", "joblib", "shelve", "cloudpickle"}
SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "commands.getoutput"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target (``np.load``, ``torch.load``), or ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Each broken rule in ``source`` as ``file:line: what``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            out.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if _true(kw.get("shell")):
                out.append(f"{where}: shell=True")
            if name in SHELL_CALLS:
                out.append(f"{where}: {name}")
            if name in ("eval", "exec"):
                out.append(f"{where}: {name}()")
            if name == "torch.load" or name.endswith(".torch.load"):
                out.append(f"{where}: {name}() can unpickle")
            if name in ("np.load", "numpy.load") and _true(kw.get("allow_pickle")):
                out.append(f"{where}: {name}(allow_pickle=True)")
            if name == "yaml.load" or name == "yaml.unsafe_load":
                out.append(f"{where}: {name}")
    return out


def test_the_rules_catch_what_they_should():
    bad = ("import pickle\nfrom joblib import load\nimport torch, subprocess, os, numpy as np, yaml\n"
           "torch.load('m.pt')\nsubprocess.run('ls', shell=True)\nos.system('ls')\n"
           "np.load('a.npy', allow_pickle=True)\nyaml.load(s)\neval('1')\n")
    found = violations(bad)
    assert len(found) == 8, found
    ok = ("import subprocess, numpy as np, yaml\nsubprocess.run(['ffmpeg', '-i', 'file:/x'], shell=False)\n"
          "np.load('a.npy', allow_pickle=False)\nyaml.safe_load(s)\nmodel.eval()\n")
    assert violations(ok) == []


def test_source_never_unpickles_or_uses_a_shell():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50  # the tree was found
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(SRC.parent)))]
    assert found == []


JIT_LOADERS = {"gstalk/tracking/fan.py"}  # FAN's TorchScript archive, a file the user names (issue 22)


def test_torchscript_is_loaded_only_by_the_fan_detector():
    """``torch.jit.load`` rebuilds TorchScript modules from a file: only the FAN detector may
    call it, on the path the user gave (``--fan-weights``/``$GSTALK_FAN_WEIGHTS``)."""
    found = []
    for f in sorted(SRC.rglob("*.py")):
        rel = str(f.relative_to(SRC.parent))
        for node in ast.walk(ast.parse(f.read_text(), rel)):
            if isinstance(node, ast.Call) and _name(node.func) in ("torch.jit.load", "jit.load"):
                found.append(rel)
    assert sorted(set(found)) == sorted(JIT_LOADERS), found
