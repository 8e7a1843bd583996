"""Canonical 3D Gaussians: parameters, activations, initialisation, PLY, densification."""

from gstalk.gaussians.densify import Densifier
from gstalk.gaussians.model import (
                                    PARAM_NAMES,
                                    activated,
                                    count,
                                    head_init_points,
                                    init_params,
                                    mouth_init_points,
                                    rgb_to_sh0,
                                    sh0_to_rgb,
                                    sh_degree_of,
)
from gstalk.gaussians.ply import load_ply, save_ply

__all__ = ["PARAM_NAMES", "Densifier", "activated", "count", "head_init_points", "init_params", "load_ply",
           "mouth_init_points", "rgb_to_sh0", "save_ply", "sh0_to_rgb", "sh_degree_of"]
