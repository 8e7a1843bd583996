#!/usr/bin/env bash
# Render many speech files with one trained workspace, one mp4 each, and print a JSON line
# per video (output path, frames, rendering frames/s) for scripts.
# Usage: examples/batch_render.sh WORKSPACE AUDIO_DIR [OUT_DIR]
set -euo pipefail
ws=${1:?workspace}
audio_dir=${2:?folder of audio files}
out=${3:-$ws/renders}
mkdir -p "$out"
find "$audio_dir" -maxdepth 1 -type f \( -name '*.wav' -o -name '*.mp3' -o -name '*.flac' -o -name '*.m4a' \) \
    -print0 | sort -z | while IFS= read -r -d '' a; do
    name=$(basename "${a%.*}")
    gstalk render "$ws" --audio "$a" -o "$out/$name.mp4" --quiet --json \
        | python -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({k: d[k] for k in ('output', 'frames', 'fps')}))"
done
