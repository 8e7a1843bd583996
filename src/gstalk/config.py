"""Typed stage configurations and the named presets that pick them.

Each stage has one frozen dataclass with commented defaults; a preset (``--preset
cpu-quick|paper``) is a named set of instances. The resolved config of a stage is stored in
the manifest, so a run can be repeated from the workspace alone.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from gstalk.errors import UsageError


@dataclass(frozen=True)
class AudioFeatureConfig:
    """Audio features windowed per video frame (``gstalk.audio``)."""

    # the front end: mfcc (normalised with the training clip's statistics, gstalk <= 0.x), fbank
    # (log mel filter-bank, per-utterance CMVN), phones (PocketSphinx viseme posteriors), or a
    # combination joined with '+' (e.g. fbank+phones); see docs/methods.md for the comparison
    features: str = "fbank+phones"
    sample_rate: int = 16000  # Hz, audio is resampled to this, mono
    winlen: float = 0.025  # s, analysis window
    winstep: float = 0.02  # s, hop: 50 feature steps per second (2 per video frame at 25 fps)
    numcep: int = 13  # cepstral coefficients kept
    nfilt: int = 26  # mel filters
    nfft: int = 512
    window: int = 16  # feature steps per video frame, centred on the frame (0.32 s)
    phone_units: str = "visemes"  # phones front end: visemes (12 lip-shape classes) or phones (42)
    phone_lw: float = 2.0  # PocketSphinx phone language-model weight
    phone_blur: int = 1  # steps of triangular blur of the phone posteriors (boundary uncertainty)


@dataclass(frozen=True)
class ExtractConfig:
    size: int = 256  # px, side of the square working frames
    fps: float = 25.0  # frames per second after resampling
    crop_scale: float = 2.0  # crop side = crop_scale x face size (clamped to the frame)
    crop_shift: float = 0.12  # crop centre moved down by this fraction of the side (shoulders)
    test_fraction: float = 1.0 / 11.0  # last frames held out for eval, as the peers do
    audio: AudioFeatureConfig = field(default_factory=AudioFeatureConfig)


#: the background plate's per-pixel statistic (:func:`gstalk.tracking.masks.background_plate`)
PlateStatistic = Literal["mean", "median"]


@dataclass(frozen=True)
class TrackConfig:
    focal_min: float = 0.8  # focal search range, as a multiple of the frame size in px
    focal_max: float = 4.0
    smooth_sigma: float = 1.5  # frames, zero-phase Gaussian smoothing of the head pose
    max_gap: int = 5  # frames without a face that are interpolated; longer gaps fail
    min_face_px: float = 48.0  # smaller faces fail (at the working resolution)
    av_max_lag: int = 10  # frames searched each way for the audio/video offset
    grabcut_size: int = 128  # px, resolution the person/background segmentation runs at
    grabcut_iterations: int = 3  # GrabCut iterations per frame (1 gives masks within ~0.3% IoU, 2x faster)
    landmark_sigma: float = 1.0  # frames, zero-phase smoothing of the stored landmarks_smooth
    max_view_angle: float = 45.0  # degrees a head may turn from the camera before its frames are flagged
    detector: str = "mediapipe"  # landmark detector: mediapipe (478 points + blendshapes) or fan (68 points)
    fan_weights: str | None = None  # FAN's TorchScript archive (--fan-weights; else $GSTALK_FAN_WEIGHTS)
    # the background plate's per-pixel statistic over the training frames that show the pixel:
    # mean (least squares: what PSNR scores; a moving curtain becomes its average) or median
    # (robust to a person mask that misses an arm); docs/methods.md, "The background plate"
    plate: PlateStatistic = "mean"


@dataclass(frozen=True)
class DensifyConfig:
    """Adaptive density control (3DGS, Kerbl et al. 2023, Sec. 5.2)."""

    start: int = 300  # iteration to start refining
    stop: int = 2000  # iteration to stop refining
    every: int = 100  # refine every N iterations
    reset_opacity_every: int = 1500  # 0 = never
    grad_threshold: float = 0.0002  # mean view-space gradient norm (NDC units) to clone/split
    percent_dense: float = 0.01  # fraction of the scene extent: small Gaussians clone, larger split
    prune_opacity: float = 0.005
    max_screen_fraction: float = 0.15  # prune Gaussians larger than this fraction of the image
    max_gaussians: int = 40000


@dataclass(frozen=True)
class CoarseConfig:
    iterations: int = 2500
    n_random: int = 2000  # random points in the head box besides the mesh vertices
    # points inside the mouth behind the lips (teeth, the inside of the mouth), which the
    # fine stage's field reveals as the lips part (gstalk.gaussians.mouth_init_points); 0 = none.
    # 0 by default: with 600 the lip gap of a fixed mouth code moved 0.37 px per degree of the
    # head's pitch on obama (0.25 without), so renders of new speech on the training clip's
    # nodding poses opened and closed with the nods (docs/methods.md, "The mouth seen from
    # another angle"); it bought no pixels on the clip's own frames
    n_mouth: int = 0
    # a per-Gaussian linear articulation basis during the coarse fit: each training frame
    # renders means + B_mean·c and sh0 + B_sh0·c with c its tracked, standardised mouth code,
    # so mouth shapes that come with a head pose (a speaker who opens while nodding down) are
    # explained by the code and not baked into the static head's view dependence; the static
    # head written is the one at c = 0 (the clip's average mouth)
    # (docs/methods.md, "The coarse head fitted with an articulation basis"); which Gaussians
    # the basis may move: the lower face (gstalk.train.coarse.lower_face), every one, or none
    articulation_basis: Literal["none", "lower_face", "all"] = "lower_face"
    lr_articulation: float = 1.6e-4  # the basis's learning rate for means (x scene extent), decayed with lr_means
    sh_degree: int = 1
    ssim_lambda: float = 0.2  # L = (1-λ) L1 + λ (1-SSIM)
    # weight of the phase-free detail loss (gstalk.train.losses.detail_loss: the local
    # Laplacian energy of the render against the frame's, in boxes detail_window px wide at
    # 256 px, scaled with the working size); 0 = off. 0.5 with 15 px: on four clips the held-out
    # sharpness ratio rose 0.44-0.60 -> 0.65-0.82 for +0.01 to -0.32 dB of PSNR (docs/methods.md,
    # "Detail the frames disagree on")
    detail_lambda: float = 0.5
    detail_window: int = 15
    lr_means: float = 1.6e-4  # x scene extent (m), decayed x0.01 over training
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lr_shN: float = 1.25e-4
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    raster: str = "auto"
    device: str = "auto"  # auto (CUDA when torch sees a GPU and the rasterizer draws there), cpu, cuda, cuda:N
    log_every: int = 50
    checkpoint_every: int = 1000  # iterations between coarse/checkpoint.safetensors writes (0 = never)
    # Per-frame head pose refinement (gstalk.train.pose_refine): registration passes over the
    # training frames at pose_passes steps spread from 40% of the iterations to the last one,
    # then over the test frames with the Gaussians frozen; 0 = off (the tracked poses). The
    # refined cameras (coarse/cameras.safetensors) replace the tracked ones for fine, render
    # and eval. See docs/methods.md, "Pose refinement".
    pose_passes: int = 3
    pose_sigma_rot_deg: float = 1.0  # prior std of each rotation component of a correction, degrees
    pose_sigma_trans_mm: float = 2.0  # prior std of its translation across the image, mm
    pose_sigma_depth_mm: float = 10.0  # prior std of its translation along the optical axis, mm
    pose_noise_px: float = 0.05  # registration error of the mean face point, px at 256 px (scaled with the
    # working size, gstalk.train.coarse.pose_prior): weighs the image against the prior


ModelName = Literal["gstalker", "audioplane", "egstalker"]
Conditioning = Literal["articulation", "audio"]
CodeEncoder = Literal["mlp", "audionet"]


@dataclass(frozen=True)
class GSTalkerConfig:
    """GSTalker (``--model gstalker``) has no settings of its own: it reads the shared ones
    of :class:`FineConfig` (the hash tri-plane ``grid_*``, the fusion MLP ``hidden``/``layers``,
    the temporal smoothing ``audio_smooth_window``)."""


@dataclass(frozen=True)
class AudioPlaneConfig:
    """Audio-Plane (``--model audioplane``): the audio factorization plane, dynamic
    splatting and its mask loss (Audio-Plane Eq. 4-9)."""

    plane_dim: int = 16  # D, features per plane/line/prototype (paper 16)
    plane_res: int = 32  # H, base resolution of planes, lines and the prototype grid (paper 64)
    plane_scales: int = 2  # s = 1..plane_scales (paper 4)
    dynamic: bool = True  # dynamic splatting: per-Gaussian dynamism weight d held to the mouth mask
    # frames Audio-Plane's audio attention smooths over (its own, as audio_smooth_window is
    # GSTalker's): on obama.mp4 at cpu-quick sizes 1 frame missed the static head's mouth box
    # twice (-0.15 dB) and 8 frames beat it (+0.47 dB). See docs/methods.md.
    plane_smooth_window: int = 8
    mask_lambda: float = 0.1  # λ_mask of L_mask (paper 0.1)
    mask_margin: float = 0.2  # margin of L_mask (paper 0.2)
    mask_dilate: float = 0.03  # the reference mask: mouth mask dilated by this x image size


@dataclass(frozen=True)
class EGSTalkerConfig:
    """EGSTalker (``--model egstalker``): KAN encoder and head, spatial-audio attention
    (ESAA) with periodic encoding; ``head=mlp`` and ``fusion=concat`` are the ablations."""

    feature_dim: int = 32  # spatial feature h = KAN(tri-plane)
    attention_dim: int = 32  # ESAA width
    attention_window: int = 8  # audio frames ESAA attends to (its tokens)
    pe_levels: int = 4  # periodic encoding levels of the audio tokens' time offsets (0 = off)
    kan_grid: int = 5  # B-spline intervals of the KAN layers
    kan_hidden: int = 32
    head: Literal["kan", "mlp"] = "kan"  # kan (paper) or mlp (ablation)
    fusion: Literal["attention", "concat"] = "attention"  # attention (ESAA, paper) or concat (ablation)


@dataclass(frozen=True)
class FineConfig:
    """The fine stage: settings every model shares, and one small dataclass per model
    (:attr:`gstalker`, :attr:`audioplane`, :attr:`egstalker`; :meth:`model_config` is the
    one ``model`` reads)."""

    model: ModelName = "gstalker"
    iterations: int = 1500
    # hash-grid tri-plane (Instant-NGP style, per plane)
    grid_levels: int = 6
    grid_features: int = 2
    grid_log2_table: int = 14
    grid_base_res: int = 16
    grid_max_res: int = 64
    grid_init: float = 1e-4  # tables start uniform in ±grid_init
    position_scale: float = 0.01  # metres per unit of the network's position output
    appearance: bool = True  # also deform opacity and colour (teeth, the inside of the mouth)
    rigid_free: bool = True  # remove the rigid part of the position offsets (the camera's job)
    audio_dim: int = 8  # condition code per frame
    # frames smoothed by GSTalker's temporal attention module (1 = off). Off for cpu-quick: on
    # obama.mp4 at two seeds, smoothing on top of the articulation regressor's own 4-frame
    # window flattened the lips (mouth motion 0.39 -> 0.85 / 0.65, LMD 0.87 -> 0.72 /
    # 0.90 -> 0.81, cross-driven lip sync 0.12 -> 0.20 / -0.01 -> 0.34); the paper preset
    # keeps the paper's 8 frames. See docs/methods.md. (Audio-Plane: plane_smooth_window.)
    audio_smooth_window: int = 1
    hidden: int = 64
    layers: int = 2
    lr_net: float = 1e-3
    lr_grid: float = 1e-2
    lr_gaussians_scale: float = 0.1  # canonical Gaussian lrs x this during fine
    ssim_lambda: float = 0.2
    # as CoarseConfig.detail_lambda, on the head's render; not on the torso layer's (there it
    # cost woman-grey-coat 0.5 dB and drew a herringbone into her coat)
    detail_lambda: float = 0.5
    detail_window: int = 15
    mouth_weight: float = 2.0  # extra L1 weight on the mouth mask
    # Eyes: blinks are a few percent of the frames and the eyes a fraction of a percent of the
    # pixels, so the field learnt to ignore the blink input (obama.mp4: renders at blink 0 and
    # 1 differed by 0.001 on average). Frames are drawn with probability ∝ 1 + blink_oversample
    # x blink, and the eye boxes get an extra L1 weight; 0 = off. See docs/methods.md, "Eyes".
    eye_weight: float = 2.0
    blink_oversample: float = 4.0
    deform_reg: float = 0.01  # weight of the mean |offset| penalty (position in cm)
    conditioning: Conditioning = "articulation"  # "articulation" (audio -> mouth code -> field) or "audio"
    # the coarse stage's per-Gaussian articulation basis carried, frozen, into the fine model
    # as the linear term of the mouth's motion (the field learns the rest): "coarse" (when the
    # coarse stage fitted one and conditioning is articulation) or "none"; docs/methods.md,
    # "The articulation basis in the fine model"
    articulation_basis: Literal["coarse", "none"] = "coarse"
    # std of the noise on the tracked code during training (std units): 0.3 since CodeNet (on
    # obama.mp4 0.6 -> 0.3 gave mouth box 30.70 -> 30.85 dB and motion 0.88 -> 0.98; aoc_hdtf
    # LMD 1.58 -> 1.42; docs/methods.md)
    articulation_noise: float = 0.3
    # how the field reads the articulation code of a frame: mlp (a two-layer MLP on the code,
    # gstalk.deform.audio.CodeNet) or audionet (AudioNet's convolutions over W copies of it,
    # as models trained before CodeNet do); see docs/methods.md for the comparison
    code_encoder: CodeEncoder = "mlp"
    articulation_steps: int = 1000  # max steps fitting each audio -> articulation regressor
    articulation_smooth: int = 4  # frames the articulation regressor's attention looks at
    articulation_members: int = 5  # regressors averaged (one alone varies a lot with its seed)
    # the multi-speaker audio -> articulation prior the regressor starts from: "auto" (the one
    # shipped with gstalk when it matches the workspace's audio features), "none", or a file
    # written by `python -m gstalk.prior fit`; with a prior, its members and attention span
    # replace articulation_members / articulation_smooth, and each member is adapted to the
    # speaker for articulation_adapt_steps at articulation_adapt_lr, with early stopping that
    # keeps the prior as it is when adapting does not pay on held-out frames
    # Adapting is off by default (0 steps): leave-one-speaker-out over 26 clips, the prior alone
    # predicts a speaker's lip opening better (r 0.57) than adapted to 2/3 of their clip (0.49),
    # and on obama.mp4 the prior alone drove other voices in sync (proxy 0.43/0.44 at lag 0
    # against 0.35/0.19 adapted); docs/methods.md
    articulation_prior: str = "auto"
    articulation_adapt_steps: int = 0
    articulation_adapt_lr: float = 3e-4
    av_offset: int | None = None  # frames; None = use the track stage's estimate
    # the settings of one model each (``--set KEY=VALUE`` reaches them by their own names)
    gstalker: GSTalkerConfig = field(default_factory=GSTalkerConfig)
    audioplane: AudioPlaneConfig = field(default_factory=AudioPlaneConfig)
    egstalker: EGSTalkerConfig = field(default_factory=EGSTalkerConfig)
    # Densification continued in the fine stage (3DGS clone/split/prune of the canonical
    # Gaussians, driven by the deformed renders' screen-space gradients); 0 = off (cpu-quick:
    # not shown to pay on a 20 s clip; the paper preset densifies up to 15k iterations)
    densify_until: int = 0
    densify_from: int = 200
    densify_every: int = 100
    densify_max: int = 40000  # Gaussians at most
    # Optional perceptual loss: LPIPS from a local safetensors file (see docs/methods.md)
    lpips_weights: str | None = None
    lpips_lambda: float = 0.05
    # Torso (GSTalker's pose-conditioned torso field; false = paste the pose frame's torso)
    torso: bool = True
    torso_stride: int = 3  # px between torso Gaussian seeds at the trained size
    torso_hidden: int = 64
    lr_torso: float = 1e-3  # the torso field's MLP (its Gaussians use the coarse stage's rates)
    # registration passes of the torso (gstalk.train.pose_refine.torso_shifts): each frame's
    # torso shift across the image, which the head pose does not tell, measured against the
    # torso field's render from 30% of the iterations on, then for the test frames with the
    # field frozen; 0 = off (the torso follows the head pose only). See docs/methods.md, "Torso".
    torso_passes: int = 2
    # ... and the torso's turn about the optical axis and scale per frame with the shift (a
    # similarity fitted to the flow; false = the shift only). See docs/methods.md, "Torso".
    torso_turns: bool = True
    # ... and after training a residual flow per frame (gstalk.train.torso_flow): a
    # torso_flow_grid x torso_flow_grid grid of image displacements of the rendered torso
    # layer, fitted to each frame (test frames too, the field frozen) for what the head pose
    # and the rigid warp cannot tell (the shoulders rising and falling); 0 = off (needs
    # torso_passes > 0). See docs/methods.md, "Torso: residual flow".
    torso_flow_grid: int = 4
    torso_flow_steps: int = 30  # Adam steps per frame
    raster: str = "auto"
    device: str = "auto"  # auto (CUDA when torch sees a GPU and the rasterizer draws there), cpu, cuda, cuda:N
    log_every: int = 50
    checkpoint_every: int = 500
    max_bad_steps: int = 20  # NaN/Inf steps in a row (each skipped) before the run stops

    def model_config(self) -> GSTalkerConfig | AudioPlaneConfig | EGSTalkerConfig:
        """The settings of the model this run trains (``model``)."""
        return getattr(self, self.model)


# The working size (px) at which the settings counted in pixels were chosen (cpu-quick's);
# a run at another size scales them by :func:`pixel_scale`, so a shift, a clamp or a flow's
# prior means the same part of the face and body at 512 px as at 256.
REFERENCE_SIZE_PX = 256


def pixel_scale(width: int) -> float:
    """How many pixels of an image ``width`` px wide one pixel of :data:`REFERENCE_SIZE_PX` is."""
    return float(width) / REFERENCE_SIZE_PX


# The default ``render --articulation-gain`` of a fine model that does not carry the coarse
# articulation basis (trained before it, or with articulation_basis=none; see
# default_articulation_gain): the predicted articulation code is already
# calibrated to the tracked code's spread on the training frames (ArticulationEnsemble.gain);
# this scales it at render time. 1.5: measured over five voices on obama and aoc_hdtf with the
# coarse stage's articulation basis (docs/methods.md, "The coarse head fitted with an
# articulation basis"): the mouth then moves 0.82-1.11x as much as in the real videos on other
# voices (1.3: 0.78-1.07x) with the same sync, for 0.02-0.16 dB of mouth PSNR on own speech.
# (1.3 before the basis: part of the mouth's motion then came from the view, not the code.)
DEFAULT_ARTICULATION_GAIN = 1.5
# The default for a model that carries the coarse articulation basis (FineConfig.articulation_basis):
# the basis answers the code fully (the field alone rendered 0.59-0.84 of the tracked code's
# opening, the basis 0.96-1.02), so the calibrated code needs no amplification. 0.85, measured
# over five voices on four clips (docs/methods.md, "The articulation basis in the fine model"):
# the mouth moves 0.87-1.11x the real one on obama, aoc_hdtf and man-black-sweater (1.0:
# 0.96-1.23x); on the speakers' own held-out frames 0.85 gives 0.2-0.5 dB more mouth PSNR than
# 1.0 where the predicted code over-moves the mouth at 1.0, 0.2 dB less on the other two clips.
BASIS_ARTICULATION_GAIN = 0.85


def default_articulation_gain(carries_basis: bool) -> float:
    """The default ``--articulation-gain`` of a fine model: :data:`BASIS_ARTICULATION_GAIN`
    when it carries the coarse articulation basis (``Avatar.has_articulation_basis``), else
    :data:`DEFAULT_ARTICULATION_GAIN`."""
    return BASIS_ARTICULATION_GAIN if carries_basis else DEFAULT_ARTICULATION_GAIN


def check_articulation_gain(gain: float | None, default: float = DEFAULT_ARTICULATION_GAIN) -> float:
    """``--articulation-gain``, defaulted (None: ``default``, :func:`default_articulation_gain`
    of the model when it is known) and checked: a float in (0, 5].

    Raises:
        UsageError: zero, negative, above 5 or not finite."""
    g = default if gain is None else float(gain)
    if not (math.isfinite(g) and 0.0 < g <= 5.0):
        raise UsageError(f"--articulation-gain {gain} is out of range.",
                         hint="give a number above 0 and at most 5 (1 = as calibrated; 1.2 = 20% more mouth motion)")
    return g


@dataclass(frozen=True)
class RenderConfig:
    """``gstalk render``: how a video is made from a trained avatar and speech."""

    # head poses: loop (the training poses, back and forth), still (the most frontal one, held),
    # or a pose file / workspace (gstalk.render.poses.read_pose_file)
    pose: str = "loop"
    background: str = "plate"  # plate, a colour (black, white, green, blue, grey, #rrggbb) or an image file
    alpha: bool = False  # RGBA PNG frames (head and torso over nothing) into a folder instead of an mp4
    size: int | None = None  # px, output width/height (even, 32-4096); None = the trained size
    blink: Literal["video", "auto"] = "video"  # the pose frames' own blinks, or natural ones at random
    articulation_gain: float | None = None  # scale of the predicted mouth code; None = DEFAULT_ARTICULATION_GAIN
    raster: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """``gstalk eval``: the self-driven evaluation on the test split."""

    lpips: str | None = None  # LPIPS weights (safetensors) for lpips / face_lpips
    syncnet: str | None = None  # SyncNet weights (safetensors) for LSE-C / LSE-D
    lmd_landmarks: Literal["mediapipe", "fan"] = "mediapipe"  # fan: also the papers' LMD (FAN, points 48-67)
    fan_weights: str | None = None  # FAN's TorchScript archive (default $GSTALK_FAN_WEIGHTS)
    raster: str = "auto"
    device: str = "auto"
    # scale of the predicted mouth code for the test frames, as ``render --articulation-gain``
    # (None: DEFAULT_ARTICULATION_GAIN), so eval measures what render makes
    articulation_gain: float | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    extract: ExtractConfig
    track: TrackConfig
    coarse: CoarseConfig
    fine: FineConfig
    description: str = ""


PRESETS: dict[str, Preset] = {
    "cpu-quick": Preset(
        name="cpu-quick",
        extract=ExtractConfig(size=256),
        track=TrackConfig(),
        coarse=CoarseConfig(),
        fine=FineConfig(),
        description="256 px, a few thousand iterations: minutes on a 2-core CPU",
    ),
    # The papers' fine architecture (hash grid, widths, Audio-Plane's planes) at cpu-quick's
    # 256 px, with 2.4x the coarse and 2x the fine iterations: about an hour per model on
    # 2 cores. Fine densification stays off and the audio smoothing at 1 frame, as in
    # cpu-quick, where they were measured not to pay (docs/methods.md).
    "cpu-long": Preset(
        name="cpu-long",
        extract=ExtractConfig(size=256),
        track=TrackConfig(),
        coarse=CoarseConfig(iterations=6000, densify=DensifyConfig(stop=3000)),
        fine=FineConfig(iterations=3000, grid_levels=12, grid_max_res=1024, audio_dim=32, hidden=128,
                        checkpoint_every=1000,
                        audioplane=AudioPlaneConfig(plane_res=64, plane_scales=4, plane_smooth_window=1)),
        description="256 px, the papers' fine architecture, 2x cpu-quick's iterations: about an hour "
                    "per model on a 2-core CPU",
    ),
    "paper": Preset(
        name="paper",
        extract=ExtractConfig(size=512),
        track=TrackConfig(grabcut_size=128, grabcut_iterations=1, min_face_px=96.0),
        coarse=CoarseConfig(iterations=15000, n_random=5000,
                            densify=DensifyConfig(start=500, stop=10000, every=100,
                                                  reset_opacity_every=3000, max_gaussians=150000)),
        fine=FineConfig(iterations=30000, grid_levels=12, grid_max_res=1024, audio_dim=32, hidden=128,
                        audio_smooth_window=8, checkpoint_every=2000,
                        densify_from=1000, densify_until=15000, densify_max=100000,
                        audioplane=AudioPlaneConfig(plane_res=64, plane_scales=4)),
        description="512 px and the papers' iteration counts: for a GPU (hours on a CPU)",
    ),
    "test": Preset(
        name="test",
        extract=ExtractConfig(size=128),
        track=TrackConfig(grabcut_size=64, min_face_px=24.0),
        coarse=CoarseConfig(iterations=60, n_random=300, n_mouth=100,
                            densify=DensifyConfig(start=20, stop=50, every=10, reset_opacity_every=0,
                                                  max_gaussians=4000),
                            log_every=10, checkpoint_every=20),
        fine=FineConfig(iterations=40, grid_levels=4, grid_log2_table=10, grid_max_res=64,
                        hidden=32, checkpoint_every=20, log_every=10, articulation_steps=100,
                        articulation_adapt_steps=50,
                        articulation_members=2, torso_stride=2, torso_flow_steps=5,
                        densify_from=20, densify_until=31, densify_every=10,
                        audioplane=AudioPlaneConfig(plane_res=8, plane_dim=8),
                        egstalker=EGSTalkerConfig(feature_dim=16, attention_dim=16, kan_hidden=16)),
        description="tiny: for the test suite and CI smoke runs (seconds)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"Unknown preset '{name}'.", hint=f"use one of: {', '.join(PRESETS)}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON-able dict (for the manifest)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from :func:`to_dict` output, ignoring unknown keys.

    Raises:
        UsageError: a field has the wrong type.
    """
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(v, dict):
                raise UsageError(f"config field '{f.name}' must be a mapping, got {type(v).__name__}")
            v = from_dict(type(sub), v)
        kwargs[f.name] = v
    return cls(**kwargs)


_SCALARS = (int, float, str, bool, type(None))
MODEL_SETTINGS = ("gstalker", "audioplane", "egstalker")  # FineConfig's per-model dataclass fields


def _scalar_fields(cfg: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if isinstance(getattr(cfg, f.name), _SCALARS)]


def settable_keys(cfg: Any) -> dict[str, str | None]:
    """Every key ``--set`` takes for ``cfg``: name -> the per-model field it lives in (None
    for the shared ones). A :class:`FineConfig`'s model settings are reached by their own
    names (``plane_res``, ``head``) or written out (``audioplane.plane_res``)."""
    keys: dict[str, str | None] = {k: None for k in _scalar_fields(cfg)}
    for sub in MODEL_SETTINGS if isinstance(cfg, FineConfig) else ():
        keys.update({k: sub for k in _scalar_fields(getattr(cfg, sub))})
    return keys


def with_options(cls: type, cfg: Any, options: dict[str, Any], what: str) -> Any:
    """``cfg`` (default ``cls()``) with ``options`` applied: the keyword form of a stage
    function that takes a config (``run_render(..., pose="still")``). ``backend`` is accepted
    for ``raster`` (its older name), paths become strings, and the choices are checked.

    Raises:
        UsageError: an option that is not a field of ``cls`` (``what`` names the stage), or a
            value that is not one of its choices.
    """
    from pathlib import Path

    cfg = cfg or cls()
    options = dict(options)
    if "backend" in options:
        options["raster"] = options.pop("backend")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UsageError(f"Unknown {what} option(s): {', '.join(unknown)}.", hint=f"use: {', '.join(sorted(names))}")
    cfg = dataclasses.replace(cfg, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()})
    check_choices(cfg, "flag")
    return cfg


def with_settings(cfg: FineConfig, **values: Any) -> FineConfig:
    """``cfg`` with settings changed by their ``--set`` names, shared or of any model
    (``with_settings(FineConfig(), iterations=10, plane_res=8, head="mlp")``): the library
    form of ``--set``, without its string parsing and its check of the trained model.

    Raises:
        UsageError: an unknown name, or a value that is not one of its field's choices.
    """
    keys = settable_keys(cfg)
    shared: dict[str, Any] = {}
    per_model: dict[str, dict[str, Any]] = {}
    for k, v in values.items():
        if k not in keys:
            raise UsageError(f"unknown fine setting '{k}'.", hint=f"settable: {', '.join(sorted(keys))}")
        if keys[k] is None:
            shared[k] = v
        else:
            per_model.setdefault(str(keys[k]), {})[k] = v
    out = dataclasses.replace(cfg, **shared, **{m: dataclasses.replace(getattr(cfg, m), **kv)
                                                for m, kv in per_model.items()})
    check_choices(out)
    return out


def parse_assignments(cfg: Any, items: list[str] | None) -> Any:
    """``cfg`` (a config dataclass) with ``KEY=VALUE`` assignments applied (``--set``); values
    are converted to the field's type (int, float, bool: true/false/1/0/yes/no, str, one of
    a ``Literal``'s choices, or none for optional fields).

    For a :class:`FineConfig` a key may also name a setting of the model being trained
    (``cfg.model``): ``plane_res`` for audioplane, ``head`` for egstalker (or
    ``audioplane.plane_res``); a setting of another model is refused, since it would do
    nothing.

    Raises:
        UsageError: malformed item, unknown key (the message lists the keys), a setting of
            another model, or a value that does not convert or is not one of the choices.
    """
    if not items:
        return cfg
    keys = settable_keys(cfg)
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got '{item}'.", hint="e.g. --set mask_lambda=0.2")
        owner, _, name = key.rpartition(".")
        if owner and (owner not in MODEL_SETTINGS or keys.get(name) != owner or not isinstance(cfg, FineConfig)):
            raise UsageError(f"--set: unknown setting '{key}'.", hint=f"settable: {', '.join(sorted(keys))}")
        if name not in keys:
            raise UsageError(f"--set: unknown setting '{key}'.", hint=f"settable: {', '.join(sorted(keys))}")
        sub = keys[name]
        if sub is None:
            cfg = dataclasses.replace(cfg, **{name: _convert(key, raw.strip(), cfg, name)})
            continue
        if sub != cfg.model:
            raise UsageError(f"--set {key}: a setting of --model {sub}, and this run trains {cfg.model}.",
                             hint=f"add --model {sub}, or drop --set {key}")
        part = getattr(cfg, sub)
        cfg = dataclasses.replace(cfg, **{sub: dataclasses.replace(part, **{name: _convert(key, raw.strip(), part,
                                                                                            name)})})
    check_choices(cfg)
    return cfg


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def check_detail_loss(cfg: CoarseConfig | FineConfig) -> None:
    """Refuse detail-loss settings that cannot work (``--set detail_lambda`` /
    ``detail_window`` of the coarse or fine stage), before anything is written.

    Raises:
        UsageError: ``detail_lambda`` negative or not finite, or ``detail_window`` not an odd
            number of pixels ≥ 1 (an even box has no centre pixel).
    """
    if not (math.isfinite(cfg.detail_lambda) and cfg.detail_lambda >= 0):
        raise UsageError(f"--set detail_lambda: {cfg.detail_lambda} is not a weight.",
                         hint="use 0 (off) or a positive weight (default 0.5)")
    if cfg.detail_window < 1 or cfg.detail_window % 2 == 0:
        raise UsageError(f"--set detail_window: {cfg.detail_window} is not an odd number of pixels.",
                         hint="use an odd box side in pixels at 256 px, such as 7 or 15 (the default)")


def check_choices(cfg: Any, style: str = "set") -> None:
    """Check every ``Literal``-typed field of the config dataclass ``cfg`` (and of its
    nested dataclasses) against its choices.

    Args:
        style: how the message names a setting: ``set`` (``--set head``) or ``flag``
            (``--blink``).

    Raises:
        UsageError: one line naming the setting, the value and the choices.
    """
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            check_choices(v, style)
            continue
        choices = _choices(_field_type(type(cfg), f.name))
        if choices is not None and v not in choices and v is not None:
            name = f"--set {f.name}:" if style == "set" else f"--{f.name.replace('_', '-')}"
            raise UsageError(f"{name} '{v}' is not one of {', '.join(map(str, choices))}.",
                             hint=f"e.g. {name.rstrip(':')} {choices[0]}")


def _convert(key: str, raw: str, cfg: Any, name: str) -> Any:
    current = getattr(cfg, name)
    tp = _field_type(type(cfg), name)
    type_name = str(tp)
    low = raw.lower()
    if low in ("none", "null") and "None" in type_name:
        return None
    choices = _choices(tp)
    if choices is not None:
        if raw not in choices:
            raise UsageError(f"--set {key}: '{raw}' is not one of {', '.join(map(str, choices))}.",
                             hint=f"current value: {current}")
        return raw
    try:
        if isinstance(current, bool) or tp is bool:
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(current, int) or type_name.startswith("int") or "int |" in type_name:
            return int(raw)
        if isinstance(current, float) or type_name.startswith("float") or "float |" in type_name:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
    except ValueError:
        kind = "true/false" if isinstance(current, bool) else \
            type(current).__name__ if current is not None else type_name
        raise UsageError(f"--set {key}: '{raw}' is not a valid {kind}.", hint=f"current value: {current}") from None
    return raw


def flat_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """A fine config as the manifest records it (:func:`to_dict`), flattened to the ``--set``
    names: the shared settings and those of the model it trained (older, flat records are
    returned as they are)."""
    out = {k: v for k, v in cfg.items() if k not in MODEL_SETTINGS}
    model = cfg.get("model")
    if isinstance(cfg.get(model), dict):
        out.update(cfg[model])
    return out


def override(cfg: Any, **changes: Any) -> Any:
    """``cfg`` with the non-None ``changes`` applied (flags that the user set), its
    ``Literal`` choices checked.

    Raises:
        UsageError: a change that is not one of its field's choices (e.g. ``--model banana``).
    """
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return cfg
    out = dataclasses.replace(cfg, **changes)
    for k, v in changes.items():
        choices = _choices(_field_type(type(cfg), k))
        if choices is not None and v not in choices:
            raise UsageError(f"--{k.replace('_', '-')} '{v}' is not one of {', '.join(map(str, choices))}.",
                             hint=f"e.g. --{k.replace('_', '-')} {choices[0]}")
    return out
