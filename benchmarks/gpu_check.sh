#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: is gstalk's CUDA path right, and how fast is it?
#
#   benchmarks/gpu_check.sh             # on the GPU machine, from a clone of this repository
#   benchmarks/gpu_check.sh --dry-run   # anywhere (CI): every step it would run, with its command
#
# Steps: check the GPU and torch's CUDA build; install the `cuda` extra (gsplat); run the CUDA
# tests (`pytest -m cuda`: parity of the rasterizers with the reference, every stage at test
# size on the GPU, CPU <-> GPU workspaces and checkpoints); train the `paper` preset (512 px) on
# the sample clip with --device cuda --raster gsplat, render and evaluate it (`gstalk run`);
# time the renderer at 512 px (`gstalk bench render`); print ONE JSON line on stdout with the
# seconds per stage, the render FPS at 512 px and the eval metrics (everything else goes to
# stderr). The papers' numbers to hold it against: GSTalker ~40 min of training, 125 FPS.
#
# Options: --dry-run, --video PATH (default examples/obama.mp4), --out DIR (default
# gpu_check_out/), --preset NAME (default paper), --raster NAME (default gsplat),
# --no-install (use the environment as it is). Exit code: 0 when every step passed, else the
# failing step's (and its name on stderr).
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0 install=1 video=examples/obama.mp4 out=gpu_check_out preset=paper raster=gsplat
py=${PYTHON:-python}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --no-install) install=0 ;;
        --video) video=$2; shift ;;
        --out) out=$2; shift ;;
        --preset) preset=$2; shift ;;
        --raster) raster=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ws=$out/ws

q() { printf '%q' "$1"; }  # a value quoted for the shell
n=0
step() {  # step NAME COMMAND: print the command as it runs; run it unless --dry-run
    n=$((n + 1))
    printf '[%d] %s\n    $ %s\n' "$n" "$1" "$2" >&2
    [ "$dry" = 1 ] && return 0
    local rc=0
    bash -c "$2" || rc=$?
    if [ "$rc" != 0 ]; then
        echo "gpu_check.sh: step $n ($1) failed with exit code $rc" >&2
        exit "$rc"
    fi
}

[ "$dry" = 1 ] && echo "gpu_check.sh --dry-run: the steps, not run" >&2
P=$(q "$py") W=$(q "$ws") O=$(q "$out") R=$(q "$raster")
step "the GPU is there" "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"
if [ "$install" = 1 ]; then
    step "install gstalk with the cuda extra (gsplat 1.5.3; it compiles its kernels on first use)" \
        "$P -m pip install -q -e '.[dev,cuda]'"
fi
step "torch is a CUDA build and sees the GPU" "$P benchmarks/gpu_summary.py --check-torch"
step "gstalk doctor (a report; its warnings do not stop the check)" "$P -m gstalk doctor || true"
step "the CUDA tests (pytest -m cuda)" "$P -m pytest -q -m cuda tests"
step "train, render and evaluate --preset $preset on the GPU (gstalk run)" \
    "mkdir -p $O && $P -m gstalk run $(q "$video") -w $W --preset $(q "$preset") --device cuda --raster $R --json --quiet > $O/run.json"
step "render speed at 512 px (gstalk bench render)" \
    "$P -m gstalk bench render $W --size 512 --frames 200 --device cuda --raster $R --json > $O/bench.json"
step "one JSON line: seconds per stage, render FPS at 512 px, eval metrics" \
    "$P benchmarks/gpu_summary.py $O/run.json $O/bench.json"
