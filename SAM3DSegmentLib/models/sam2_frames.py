"""The slices of one volume as SAM 2 input frames, made in memory when they are needed.

The volume is windowed to uint8 once (:mod:`intensity`); each slice is shown in ``view``
(:mod:`~SAM3DSegmentLib.data.orientation`: the radiological view by default) and then becomes exactly what
the official SAM 2 frame loader (``sam2.utils.misc._load_img_as_tensor`` plus
``load_video_frames``) makes of a greyscale frame: RGB, a PIL resize of the uint8 image to the
model's square input size (PIL's default filter, as the loader uses), division by 255 and
ImageNet mean/std normalisation. No image file is written or read.
"""

from __future__ import annotations

import numpy as np

from ..data.intensity import WindowSpec, window_volume
from ..data.orientation import SliceView
from ..data.volume import Volume, get_slice
from ..errors import InputError
from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


class Sam2Frames:
    """Slices along ``axis`` of ``volume`` as (1, 3, S, S) float32 tensors for SAM 2."""

    def __init__(self, volume: Volume, axis: int, spec: ModelSpec, window: WindowSpec = WindowSpec(),
                 view: SliceView | None = None):
        if spec.resize != "square" or spec.normalisation != "imagenet":
            raise InputError(
                f"Model '{spec.name}' expects {spec.resize} resizing and {spec.normalisation} "
                "normalisation; SAM 2 frames are square and ImageNet-normalised. Pick a SAM 2 model."
            )
        self.axis = axis
        self.size = int(spec.input_size)
        self.pixels = window_volume(volume.array, window, volume.modality)  # once per volume
        self.n_slices = volume.n_slices(axis)
        shape = get_slice(self.pixels, axis, 0).shape
        self.view = view or SliceView((int(shape[0]), int(shape[1])))
        self.height, self.width = self.view.view_shape

    def slice_uint8(self, index: int) -> np.ndarray:
        """The windowed 2D slice as uint8, in the model's view (height, width)."""
        if not 0 <= index < self.n_slices:
            raise InputError(f"Slice {index} is outside 0..{self.n_slices - 1}.")
        return self.view.to_view(get_slice(self.pixels, self.axis, index))

    def tensor(self, index: int):
        """Slice ``index`` as the normalised (1, 3, S, S) float32 tensor SAM 2 expects."""
        import torch
        from PIL import Image

        grey = Image.fromarray(self.slice_uint8(index))  # mode L
        # Resizing the grey image equals resizing its RGB copy: PIL filters each band alike.
        resized = np.asarray(grey.resize((self.size, self.size)), dtype=np.uint8)
        image = torch.from_numpy(resized / 255.0).to(torch.float32)  # float64 division, as official
        image = image.expand(3, -1, -1).clone()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
        image -= mean
        image /= std
        return image.unsqueeze(0)
