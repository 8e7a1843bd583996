#!/usr/bin/env bash
# A CI-style quality gate: train a tiny model on a 3 s GRID clip (CC BY 4.0) with the `test`
# preset (128 px) and 1000 + 300 iterations (a minute or two on 2 cores) and fail the job when the
# held-out PSNR drops below a threshold. Exit codes: 0 pass, 10 quality gate failed, others
# as in docs/troubleshooting.md.
# Usage: examples/ci_grid.sh [CLIP] [MIN_PSNR]
set -euo pipefail
clip=${1:-../shared/data/grid/bbaf2n.mpg}
min_psnr=${2:-30}
ws=$(mktemp -d)/grid_ws

gstalk extract "$clip" --workspace "$ws" --preset test --quiet | xargs gstalk track --quiet \
    | xargs gstalk coarse --quiet --iterations 1000 | xargs gstalk fine --quiet --iterations 300 > /dev/null
gstalk eval "$ws" --quiet --json --fail-under "psnr=$min_psnr" > "$ws/metrics.json"
python -c "import json,sys; m=json.load(open(sys.argv[1])); \
print(f\"PSNR {m['psnr']:.2f} dB (gate {sys.argv[2]}), mean frame {m['baselines']['mean_frame']['psnr']:.2f}\")" \
    "$ws/metrics.json" "$min_psnr"
