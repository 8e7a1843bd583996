#!/usr/bin/env bash
# The sample clip, one stage at a time (what `gstalk run` does), then two new sentences.
# Usage: examples/obama_stages.sh [VIDEO] [WORKSPACE]
# Each stage prints its workspace on stdout, so stages chain in a pipeline; --json gives
# machine-readable results. Re-running a finished stage redoes it; `gstalk fine --resume`
# continues an interrupted fine stage.
set -euo pipefail
here=$(dirname "$0")
video=${1:-$here/obama.mp4}
ws=${2:-obama_ws}

gstalk extract "$video" --workspace "$ws" --preset cpu-quick | xargs gstalk track | xargs gstalk coarse \
    | xargs gstalk fine
gstalk render "$ws"                 # the held-out test frames with their own audio: $ws/renders/test.mp4
gstalk eval "$ws" --json > "$ws/eval.json"
python -c "import json,sys; m=json.load(open(sys.argv[1])); \
print(f\"mouth-box PSNR: fine {m['mouth_psnr']:.2f} dB, coarse {m['baselines']['coarse']['mouth_psnr']:.2f} dB\")" \
    "$ws/eval.json"

for speech in "$here"/grid_bbaf2n.wav ../shared/data/audio/*.wav; do
    [ -e "$speech" ] || continue
    gstalk render "$ws" --audio "$speech" --json
done
