"""Training frames held in memory as tensors (what the loops consume).

Images and backgrounds stay uint8 until a frame is drawn, so 455 frames at 256 px take
~180 MB. Built by the stages from the workspace (``gstalk.dataset``); the loops see only
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def image(self, i: int) -> torch.Tensor:
        """Frame ``i`` as [1, H, W, 3] float32 in [0, 1]."""
        return self.images[i:i + 1].float() / 255.0

    def background(self, i: int) -> torch.Tensor:
        """Background of frame ``i`` as [1, H, W, 3] float32 in [0, 1]."""
        return self.backgrounds[i:i + 1].float() / 255.0

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
        return (self.mouth_masks[i:i + 1, :, :, None] > 127).float()

    def head_mask(self, i: int) -> torch.Tensor:
        """[1, H, W, 1] float32 in {0, 1}."""
        return (self.head_masks[i:i + 1, :, :, None] > 127).float()

    def subset(self, idx: list[int]) -> FrameSet:
        """The frames at positions ``idx`` of this set (audio windows are shared)."""
        sel = torch.tensor(idx, dtype=torch.long)
        return FrameSet(images=self.images[sel], backgrounds=self.backgrounds[sel], viewmats=self.viewmats[sel],
                        K=self.K, head_masks=self.head_masks[sel], mouth_masks=self.mouth_masks[sel],
                        mouth_boxes=self.mouth_boxes[sel], blink=self.blink[sel], audio=self.audio,
                        frame_ids=self.frame_ids[sel], articulation=self.articulation,
                        torso_masks=None if self.torso_masks is None else self.torso_masks[sel], plate=self.plate)
