"""Training frames held in memory as tensors (what the loops consume).

Images and backgrounds stay uint8 until a frame is drawn, so 455 frames at 256 px take
~180 MB. Built by the stages from the workspace (``gstalk.dataset``, which decodes the PNGs
on worker threads); the loops see only tensors. :meth:`FrameSet.to` puts a set on a
device: the small tensors (cameras, blinks, audio windows, articulation codes) go there; the
frames and masks go there too when they fit in the GPU's memory, else they stay in pinned
host memory and each drawn frame is copied asynchronously (``non_blocking``), so the GPU
never waits for a decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# uint8 per-frame tensors of a FrameSet (the big ones)
FRAME_TENSORS = ("images", "backgrounds", "head_masks", "mouth_masks", "torso_masks")


@dataclass
class FrameSet:
    """Frames, cameras and conditions for training or evaluation.

    Attributes:
        images: [F, H, W, 3] uint8 ground-truth RGB.
        backgrounds: [F, H, W, 3] uint8, what lies behind the head (torso over the plate).
        viewmats: [F, 4, 4] float32 world(canonical)-to-camera, OpenCV.
        K: [3, 3] float32 intrinsics in pixels.
        head_masks: [F, H, W] uint8 {0, 255}.
        mouth_masks: [F, H, W] uint8 {0, 255}.
        mouth_boxes: [F, 4] float32 (x0, y0, x1, y1) px.
        blink: [F] float32 in [0, 1].
        audio: [N_all, W, C] float32 feature window of *every* frame of the clip, indexed by
            frame number (so neighbours of a training frame are available), A/V offset
            applied; or None.
        frame_ids: [F] int64 workspace frame numbers.
        articulation: [N_all, D] float32 tracked mouth articulation code of every frame
            (:func:`~gstalk.deform.articulation.articulation_features`), standardised over
            this set's frames, indexed by frame number; or None.
        torso_masks: [F, H, W] uint8 {0, 255} (person and not head), or None.
        plate: [H, W, 3] uint8 background plate (the scene without the person), or None.
        eye_boxes: [F, 2, 4] float32 (x0, y0, x1, y1) px around each eye and its lids
            (:func:`~gstalk.tracking.schemes.eye_boxes`), or None.
        device: where the accessors (:meth:`image`, :meth:`background`, ...) deliver their
            tensors (:meth:`to`); ``frame_ids`` stays on the CPU.
    """

    images: torch.Tensor
    backgrounds: torch.Tensor
    viewmats: torch.Tensor
    K: torch.Tensor
    head_masks: torch.Tensor
    mouth_masks: torch.Tensor
    mouth_boxes: torch.Tensor
    blink: torch.Tensor
    audio: torch.Tensor | None
    frame_ids: torch.Tensor
    articulation: torch.Tensor | None = None
    torso_masks: torch.Tensor | None = None
    plate: torch.Tensor | None = None
    eye_boxes: torch.Tensor | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def to(self, device: torch.device | str, *, resident_bytes: int | None = None) -> FrameSet:
        """This set for ``device``: the cameras, blinks, K, plate, audio windows and
        articulation codes moved there; the uint8 frames and masks moved too when they take at
        most ``resident_bytes`` (default: half of the GPU's free memory), else pinned in host
        memory and copied a frame at a time as they are drawn. On the CPU, ``self``."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device.type == "cpu":
            moved = {f.name: getattr(self, f.name).cpu() for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)}
            return dataclasses.replace(self, **moved, device=device)
        big = {k: getattr(self, k) for k in FRAME_TENSORS if getattr(self, k) is not None}
        nbytes = sum(t.numel() * t.element_size() for t in big.values())
        if resident_bytes is None:
            resident_bytes = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else nbytes
        resident = nbytes <= resident_bytes or device.type != "cuda"  # pinned memory is CUDA's
        moved = {k: (t.to(device) if resident else t.pin_memory()) for k, t in big.items()}
        for k in ("viewmats", "K", "mouth_boxes", "blink", "audio", "articulation", "plate", "eye_boxes"):
            t = getattr(self, k)
            moved[k] = None if t is None else t.to(device)
        return dataclasses.replace(self, **moved, device=device)

    @property
    def resident(self) -> bool:
        """Whether the frames are on :attr:`device` (else in host memory, copied per frame)."""
        return self.images.device == self.device

    def _frame(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t[i:i + 1].to(self.device, non_blocking=True)

    def image(self, i: int) -> torch.Tensor:
        """Frame ``i`` as [1, H, W, 3] float32 in [0, 1], on :attr:`device`."""
        return self._frame(self.images, i).float() / 255.0

    def background(self, i: int) -> torch.Tensor:
        """Background of frame ``i`` as [1, H, W, 3] float32 in [0, 1], on :attr:`device`."""
        return self._frame(self.backgrounds, i).float() / 255.0

    def audio_windows(self, i: int, k: int) -> torch.Tensor:
        """Feature windows of the ``k`` frames around frame ``i`` of this set: [1, K, W, C]."""
        from gstalk.deform.audio import neighbour_indices

        assert self.audio is not None
        ids = neighbour_indices(int(self.frame_ids[i]), k, self.audio.shape[0])
        return self.audio[ids]

    def plate_image(self) -> torch.Tensor:
        """The background plate as [1, H, W, 3] float32 in [0, 1]."""
        assert self.plate is not None
        return self.plate[None].float() / 255.0

    def mouth_mask(self, i: int) -> torch.Tensor:
        """[1, H, W, 1] float32 in {0, 1}."""
        return (self._frame(self.mouth_masks, i)[..., None] > 127).float()

    def eye_mask(self, i: int) -> torch.Tensor:
        """[1, H, W, 1] float32 in {0, 1}: the pixels of frame ``i``'s two eye boxes."""
        assert self.eye_boxes is not None
        ys = torch.arange(self.height, device=self.device, dtype=torch.float32)[:, None] + 0.5
        xs = torch.arange(self.width, device=self.device, dtype=torch.float32)[None, :] + 0.5
        m = torch.zeros(self.height, self.width, dtype=torch.bool, device=self.device)
        for x0, y0, x1, y1 in self.eye_boxes[i].to(self.device):
            m |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        return m[None, :, :, None].float()

    def head_mask(self, i: int) -> torch.Tensor:
        """[1, H, W, 1] float32 in {0, 1}."""
        return (self._frame(self.head_masks, i)[..., None] > 127).float()

    def subset(self, idx: list[int]) -> FrameSet:
        """The frames at positions ``idx`` of this set (audio windows are shared)."""
        sel = torch.tensor(idx, dtype=torch.long)  # a CPU index reaches tensors on any device
        return FrameSet(images=self.images[sel], backgrounds=self.backgrounds[sel], viewmats=self.viewmats[sel],
                        K=self.K, head_masks=self.head_masks[sel], mouth_masks=self.mouth_masks[sel],
                        mouth_boxes=self.mouth_boxes[sel], blink=self.blink[sel], audio=self.audio,
                        frame_ids=self.frame_ids[sel], articulation=self.articulation,
                        torso_masks=None if self.torso_masks is None else self.torso_masks[sel], plate=self.plate,
                        eye_boxes=None if self.eye_boxes is None else self.eye_boxes[sel], device=self.device)
