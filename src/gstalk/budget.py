"""How big to train: ``gstalk run --size auto`` picks the working resolution from the face in
the video and the preset's time budget.

A larger working size only pays when the video has the pixels: the crop (``crop_scale`` x
the face, :func:`gstalk.stages.extract.find_crop`) must be at least that many source pixels
wide, or extract would upscale it. And it costs time: four times the pixels make the coarse
and fine iterations slower by the factors measured below on 2 CPU cores (``docs/methods.md``,
"512 px"). ``run`` takes twice the preset's size only where both allow it *as measured*;
where the cost was not measured (a GPU) it keeps the preset's size and says so, and
``--size 512`` forces it.

Pure functions of numbers; the pipeline reads the face and the device and calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The wall-clock budget of one `gstalk run` of a 20 s clip per preset on 2 CPU cores, seconds
# (None: no budget, the preset's size stands).
RUN_BUDGET_S: dict[str, float | None] = {"cpu-quick": 600.0, "cpu-long": None, "paper": None, "test": None}

# Measured on 2 CPU cores shared with one other 1-thread job (docs/methods.md, "512 px"):
# a default cpu-quick `gstalk run` of man-black-sweater_latentsync.mp4 (20 s) at 256 px took
# 426 s (extract 6, track 7, coarse 178, fine 219, eval 13); at 512 px a fine iteration took
# 3.5x as long (997 against 283 ms, 60 iterations each, the same Gaussians) and the
# rasterizer's forward + backward 2.1x (159 against 72-77 ms, 30k Gaussians), extract + track
# took 21 s against 14 s, which puts the whole run at about 1,210 s, 2.85x (coarse at 2.1x,
# fine, render and eval at 3.5x).
CPU_RUN_S_256 = 426.0
CPU_COST_512 = 2.85


@dataclass(frozen=True)
class SizeChoice:
    """The working size ``run`` trains at, and why (one sentence)."""

    size: int
    reason: str


def estimated_run_s(size: int, base_size: int) -> float:
    """Seconds a cpu-quick run of a 20 s clip took (``base_size``) or is estimated to take
    (twice it) on 2 CPU cores, from the measurements above. More cores are not credited:
    only 2 were measured."""
    return CPU_RUN_S_256 * (1.0 if size <= base_size else CPU_COST_512)


def choose_size(crop_side_src: float, base_size: int, preset: str, device_type: str) -> SizeChoice:
    """The working size for ``gstalk run --size auto``: twice the preset's ``base_size`` when
    the video's crop has that many pixels and the measured cost fits the preset's budget,
    else ``base_size``.

    Args:
        crop_side_src: the head-and-shoulders crop's side in the video's pixels.
        base_size: the preset's working size (256 for cpu-quick).
        preset: the preset's name (its budget: :data:`RUN_BUDGET_S`; presets without one
            keep their size).
        device_type: ``cpu`` or ``cuda`` (on CUDA the cost of 512 px is not measured: the
            preset's size stands).
    """
    big = 2 * base_size
    budget = RUN_BUDGET_S.get(preset)
    if budget is None:
        return SizeChoice(base_size, f"the {preset} preset's own size")
    if crop_side_src < big:
        return SizeChoice(base_size, f"the face crop is {crop_side_src:.0f} px in the video: {big} px would "
                                     "only upscale it")
    if device_type != "cpu":
        return SizeChoice(base_size, f"the face crop is {crop_side_src:.0f} px in the video, but {big} px is not "
                                     f"measured on {device_type} yet (--size {big} forces it)")
    est = estimated_run_s(big, base_size)
    if est > budget:
        return SizeChoice(base_size, f"{big} px measured {CPU_COST_512:g}x the {base_size} px run on 2 CPU cores "
                                     f"(about {est / 60:.0f} min), over the {preset} budget of {budget / 60:.0f} min "
                                     f"(--size {big} forces it)")
    return SizeChoice(big, f"the face crop is {crop_side_src:.0f} px in the video and {big} px takes about "
                           f"{est / 60:.0f} min on 2 CPU cores, within the {budget / 60:.0f} min budget")
