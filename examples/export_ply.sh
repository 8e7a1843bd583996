#!/usr/bin/env bash
# The trained canonical Gaussians are a standard 3D Gaussian Splatting PLY
# (x y z, f_dc_*, f_rest_*, opacity, scale_*, rot_*; canonical head space in metres):
# open ws/fine/point_cloud.ply (or ws/coarse/point_cloud.ply) in any 3DGS viewer, e.g.
# https://antimatter15.com/splat/ or SuperSplat (drag and drop), or the `gsplat` viewer.
# This script copies it out and prints what it holds.
# Usage: examples/export_ply.sh WORKSPACE [OUT.ply]
set -euo pipefail
ws=${1:?workspace}
out=${2:-$(basename "$ws").ply}
cp "$ws/fine/point_cloud.ply" "$out"
python -c "
import sys
from plyfile import PlyData
v = PlyData.read(sys.argv[1])['vertex']
print(f'{sys.argv[1]}: {v.count} Gaussians, properties: {\" \".join(p.name for p in v.properties)}')
" "$out"
