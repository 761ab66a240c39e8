"""How a model's input is made from a picture: the one definition used by validation, infer.py, the relabelling
teacher and a deployed ONNX file. Pillow and numpy only."""
import io
import math
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

from .errors import UserError

# Pillow's filter for each interpolation name of the options ("pilcubic" and "area" are MindSpore's names for
# Pillow's bicubic and its box average).
FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "area": Image.BOX,
           "pilcubic": Image.BICUBIC}


class Preprocessing(NamedTuple):
    """The evaluation preprocessing of a model: the fact checkpoints and exported ONNX files carry."""
    size: int
    crop_pct: Optional[float]  # None: the whole image, resized to size x size (the relabelling teacher's view)
    interpolation: str
    mean: tuple  # per channel, 0-255 pixel scale
    std: tuple

    def __call__(self, image):
        """A PIL image as the model's input, float32 (3, size, size), as the official (timm on PIL images) does
        it: resize the shorter side to floor(size / crop_pct) with Pillow's filter, the centre size x size
        (zero-padded when crop_pct > 1), mean/std on the 0-255 scale, CHW."""
        image = image.convert("RGB")
        if self.crop_pct is None:
            image = image.resize((self.size, self.size), FILTERS[self.interpolation])
        else:
            short = int(math.floor(self.size / self.crop_pct))
            width, height = image.size
            if width <= height:
                resized = (short, int(short * height / width))
            else:
                resized = (int(short * width / height), short)
            image = image.resize(resized, FILTERS[self.interpolation])
            left, top = (int(round((side - self.size) / 2.0)) for side in resized)
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, np.float32)
        normalised = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def from_bytes(self, data):
        """An encoded picture (the bytes of its file, as a numpy uint8 array or bytes) as the model's input;
        a ValueError when they are not a picture Pillow can read."""
        try:
            with Image.open(io.BytesIO(np.asarray(data, np.uint8).tobytes())) as image:
                return self(image)
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"not a picture Pillow can read: {err}") from None

    def transforms(self):
        """The steps for a data pipeline's map over a column of encoded pictures (MindSpore's ImageFolder)."""
        return [self.from_bytes]

    def load(self, path):
        """One picture file as the model's input; a UserError naming a file that cannot be read."""
        try:
            return self.from_bytes(np.fromfile(path, np.uint8))
        except (OSError, ValueError):
            raise UserError(f"cannot read image {path}: corrupt or not an image") from None
