#!/usr/bin/env bash
# Packaging check: build the wheel, check it carries the landmark model and the C++ sources,
# install it into a fresh virtual environment (no editable install, no source tree on the
# path) and run the whole pipeline there on a generated clip.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m build --wheel --outdir "$work/dist" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/gstalk-*.whl)
python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["gstalk/assets/face_landmarker.task", "gstalk/assets/NOTICE", "gstalk/assets/lipsync_ridge.json", "gstalk/raster/csrc/raster_cpu.cpp",
        "gstalk/deform/csrc/hashgrid_cpu.cpp", "gstalk/serve/static/index.html", "gstalk/py.typed"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"wheel {sys.argv[1]} lacks {missing}")
print(f"wheel ok: {sys.argv[1].rsplit('/', 1)[-1]} ({len(names)} files)")
PY

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel"
cd "$work"  # away from the source tree, so only the installed wheel can be imported
"$work/venv/bin/gstalk" doctor --json > doctor.json || { cat doctor.json; exit 1; }
"$work/venv/bin/python" - <<'PY'
import json
checks = {c["name"]: c for c in json.load(open("doctor.json"))["checks"]}
assert checks["hash-grid kernel"]["status"] == "ok", checks["hash-grid kernel"]
assert "cpu" in checks["rasterizer"]["detail"].split(";")[0], checks["rasterizer"]
from gstalk.testing.mannequin import make_clip
make_clip("clip.mp4", duration_s=3.0, size=192)
PY
"$work/venv/bin/gstalk" run clip.mp4 --preset test --quiet > out.txt
video=$(tail -n 1 out.txt)
test -s "$video" && echo "gstalk run from the wheel: $video"
