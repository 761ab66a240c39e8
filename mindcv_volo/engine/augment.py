"""Training augmentation as functions of an explicit numpy Generator: crop, flips, RandAugment, colour jitter,
random erasing per sample, and mixup/cutmix per batch.

Written by hand on purpose: MindCV's transforms (MindSpore's vision ops), timm's and torchvision's all draw
from a process-global random state (MindSpore's, Python's `random`, numpy's, torch's), so what an image gets
depends on which worker took it and on everything drawn before, and cannot be restored on resume. No
maintained library makes these decisions a function of the sample. Here every decision of a sample comes
from the Generator it is given (`randomness.sample_generator(seed, epoch, position)`), in a fixed order, so
the same recipe and seed give the same decisions on any device, with any number of data workers, and after
a resume.

The semantics are MindCV's options with timm's rules (what the official VOLO trained with):
  * random-resized crop (torchvision's box: 10 tries, then the centre), then horizontal and vertical flips;
  * `auto_augment: randaug-m9-mstd0.5-inc1`: timm's RandAugment (`RandAugment`);
  * `color_jitter` when there is no auto_augment: brightness, contrast, saturation (and hue) factors in a
    random order, as torchvision's ColorJitter;
  * normalisation with mean/std (0-255 scale), CHW;
  * random erasing (`re_*`) on the normalised image, as torchvision's RandomErasing (MindCV's);
  * mixup/cutmix per batch (`BatchMixer`), as MindCV's (timm's) Mixup in batch mode.
The geometric operations are recorded (`Geometry`), so token labeling moves an image's label map with it.
"""
import math
import re
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..errors import UserError
from .randomness import step_generator

# PIL filters for the options' interpolation names; PIL's affine transform knows only the first three kinds.
RESIZE_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "pilcubic": Image.BICUBIC,
                  "nearest": Image.NEAREST, "area": Image.BOX}
AFFINE_FILTERS = {**RESIZE_FILTERS, "area": Image.BILINEAR}


class Geometry(NamedTuple):
    """Where each point of a training image comes from in its source image.

    The image is the source's `box` (top, left, height, width, source pixels) resized to size x size, then
    flipped, then moved by the `affines` in the order applied. An affine is PIL's (a, b, c, d, e, f): the
    output point (x, y) shows the input point (a x + b y + c, d x + e y + f). Coordinates are continuous,
    pixel i spanning [i, i + 1), as PIL's.
    """
    source_size: tuple  # (height, width)
    box: tuple
    size: int
    hflip: bool = False
    vflip: bool = False
    affines: tuple = ()

    def to_source(self, x, y):
        """(x, y, shown): source-image coordinates of training-image coordinates (arrays), and whether the point
        shows the crop at all (False where a rotation, shear or shift brought in the fill colour)."""
        for a, b, c, d, e, f in reversed(self.affines):  # the last operation applied is undone first
            x, y = a * x + b * y + c, d * x + e * y + f
        shown = (x >= 0) & (x <= self.size) & (y >= 0) & (y <= self.size)
        if self.hflip:
            x = self.size - x
        if self.vflip:
            y = self.size - y
        top, left, height, width = self.box
        return left + x * width / self.size, top + y * height / self.size, shown


def resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's / MindSpore's RandomResizedCrop box (top, left, height, width): 10 tries, then centre."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --- RandAugment ---------------------------------------------------------------------------------

LEVEL_DENOMINATOR = 10.0  # magnitudes are on a 0-10 scale


def _negate_half(rng, value):
    """timm's _randomly_negate: -value with probability 1/2."""
    return -value if rng.random() > 0.5 else value


def _rotate_level(level, rng):
    return _negate_half(rng, level / LEVEL_DENOMINATOR * 30.0)  # degrees, [-30, 30]


def _shear_level(level, rng):
    return _negate_half(rng, level / LEVEL_DENOMINATOR * 0.3)


def _translate_level(level, rng):
    return _negate_half(rng, level / LEVEL_DENOMINATOR * 0.45)  # a fraction of the image side


def _enhance_level(level, rng):
    return level / LEVEL_DENOMINATOR * 1.8 + 0.1  # [0.1, 1.9]


def _enhance_increasing_level(level, rng):
    # 1.0 changes nothing; stronger magnitudes move further from it, either way
    return max(0.1, 1.0 + _negate_half(rng, level / LEVEL_DENOMINATOR * 0.9))


def _posterize_level(level, rng):
    return int(level / LEVEL_DENOMINATOR * 4)  # bits kept, [0, 4]


def _posterize_increasing_level(level, rng):
    return 4 - _posterize_level(level, rng)


def _solarize_level(level, rng):
    return int(level / LEVEL_DENOMINATOR * 256)  # threshold


def _solarize_increasing_level(level, rng):
    return 256 - _solarize_level(level, rng)


def _solarize_add_level(level, rng):
    return int(level / LEVEL_DENOMINATOR * 110)


def _affine(image, coefficients, fill, resample):
    return image.transform(image.size, Image.AFFINE, coefficients, resample=resample, fillcolor=fill), coefficients


def rotation_affine(degrees, width, height):
    """PIL's rotate(degrees) (counter-clockwise about the image centre) as affine coefficients."""
    angle = -math.radians(degrees)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def _rotate(image, degrees, fill, resample):
    return _affine(image, rotation_affine(degrees, *image.size), fill, resample)


def _shear_x(image, factor, fill, resample):
    return _affine(image, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill, resample)


def _shear_y(image, factor, fill, resample):
    return _affine(image, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill, resample)


def _translate_x(image, fraction, fill, resample):
    return _affine(image, (1.0, 0.0, fraction * image.size[0], 0.0, 1.0, 0.0), fill, resample)


def _translate_y(image, fraction, fill, resample):
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, fraction * image.size[1]), fill, resample)


def _colour(operation):
    """An operation that changes the pixels' values, not where they are."""
    def apply(image, argument, fill, resample):
        return operation(image, argument), None
    return apply


def _posterize(image, bits):
    """Keep the `bits` high bits of every value; 0 bits gives black (Pillow 13's posterize refuses 0)."""
    if bits >= 8:
        return image
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([value & mask for value in range(256)] * len(image.getbands()))


def _solarize_add(image, add, threshold=128):
    table = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(table * len(image.getbands()))


# name: (magnitude -> argument, or None for an operation without one; the operation)
RAND_AUGMENT_OPS = {
    "AutoContrast": (None, _colour(lambda image, _: ImageOps.autocontrast(image))),
    "Equalize": (None, _colour(lambda image, _: ImageOps.equalize(image))),
    "Invert": (None, _colour(lambda image, _: ImageOps.invert(image))),
    "Rotate": (_rotate_level, _rotate),
    "Posterize": (_posterize_level, _colour(_posterize)),
    "PosterizeIncreasing": (_posterize_increasing_level, _colour(_posterize)),
    "Solarize": (_solarize_level, _colour(ImageOps.solarize)),
    "SolarizeIncreasing": (_solarize_increasing_level, _colour(ImageOps.solarize)),
    "SolarizeAdd": (_solarize_add_level, _colour(_solarize_add)),
    "Color": (_enhance_level, _colour(lambda image, f: ImageEnhance.Color(image).enhance(f))),
    "ColorIncreasing": (_enhance_increasing_level, _colour(lambda image, f: ImageEnhance.Color(image).enhance(f))),
    "Contrast": (_enhance_level, _colour(lambda image, f: ImageEnhance.Contrast(image).enhance(f))),
    "ContrastIncreasing": (_enhance_increasing_level,
                           _colour(lambda image, f: ImageEnhance.Contrast(image).enhance(f))),
    "Brightness": (_enhance_level, _colour(lambda image, f: ImageEnhance.Brightness(image).enhance(f))),
    "BrightnessIncreasing": (_enhance_increasing_level,
                             _colour(lambda image, f: ImageEnhance.Brightness(image).enhance(f))),
    "Sharpness": (_enhance_level, _colour(lambda image, f: ImageEnhance.Sharpness(image).enhance(f))),
    "SharpnessIncreasing": (_enhance_increasing_level,
                            _colour(lambda image, f: ImageEnhance.Sharpness(image).enhance(f))),
    "ShearX": (_shear_level, _shear_x),
    "ShearY": (_shear_level, _shear_y),
    "TranslateXRel": (_translate_level, _translate_x),
    "TranslateYRel": (_translate_level, _translate_y),
}
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")

_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# inc1: the operations whose strength grows with the magnitude
_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# w0: timm's op-choice weights (an increasing op weighs as its plain form)
_CHOICE_WEIGHTS = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
                   "Color": 0.025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005,
                   "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005, "Posterize": 0.0, "Invert": 0.0}
_POLICY_KEYS = {"m": "magnitude", "n": "layers", "mstd": "magnitude std", "mmax": "largest magnitude",
                "inc": "increasing ops (0 or 1)", "w": "op-choice weights (0)"}


class RandAugment:
    """RandAugment by a policy such as `randaug-m9-mstd0.5-inc1`, with timm's rules.

    Sections after `randaug`: m (magnitude, default 10), n (operations per image, default 2), mstd (the
    magnitude is drawn from N(m, mstd), clipped to [0, mmax]; above 100: uniform in [0, m]; default 0.5, as
    MindCV), mmax (default 10), inc (1: the increasing op set), w (0: timm's op-choice weights, then drawn
    without replacement). Per image: n operations drawn (uniformly, with replacement), each applied with
    probability 1/2 at a magnitude drawn for it; signed arguments (angle, shear, shift, and the increasing
    enhancements) are negated with probability 1/2. Geometric operations fill with `fill`, resampling with
    `resample`.
    """

    def __init__(self, policy, fill=(128, 128, 128), resample=Image.BICUBIC):
        sections = policy.split("-")
        if sections[0] != "randaug":
            raise UserError(f"auto_augment {policy!r}: only RandAugment (randaug-...) is implemented with "
                            "reproducible per-sample decisions; e.g. randaug-m9-mstd0.5-inc1")
        values = {}
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", section)
            if match is None or match.group(1) not in _POLICY_KEYS:
                raise UserError(f"auto_augment {policy!r}: unknown section {section!r}; valid: "
                                + ", ".join(f"{key}<{meaning}>" for key, meaning in _POLICY_KEYS.items()))
            values[match.group(1)] = float(match.group(2))
        if values.get("w", 0) != 0 or values.get("inc", 0) not in (0, 1):
            raise UserError(f"auto_augment {policy!r}: w takes 0 and inc takes 0 or 1")
        self.magnitude = values.get("m", LEVEL_DENOMINATOR)
        self.layers = int(values.get("n", 2))
        std = values.get("mstd", 0.5)
        self.magnitude_std = math.inf if std > 100 else std
        self.magnitude_max = values.get("mmax", LEVEL_DENOMINATOR)
        self.ops = _INCREASING_OPS if values.get("inc") == 1 else _OPS
        if "w" in values:
            weights = np.array([_CHOICE_WEIGHTS[name.replace("Increasing", "")] for name in self.ops])
            self.weights = weights / weights.sum()
        else:
            self.weights = None
        self.fill, self.resample = tuple(fill), resample

    def draw_magnitude(self, rng):
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return max(0.0, min(magnitude, self.magnitude_max))

    def apply(self, name, image, magnitude, rng):
        """One operation at `magnitude`: (image, its affine coefficients or None for a colour operation)."""
        level, operation = RAND_AUGMENT_OPS[name]
        argument = level(magnitude, rng) if level is not None else None
        return operation(image, argument, self.fill, self.resample)

    def __call__(self, image, rng):
        """(image, affine coefficients of the geometric operations applied, in order)."""
        chosen = rng.choice(len(self.ops), self.layers, replace=self.weights is None, p=self.weights)
        affines = []
        for index in chosen:
            if rng.random() > 0.5:
                continue
            image, coefficients = self.apply(self.ops[index], image, self.draw_magnitude(rng), rng)
            if coefficients is not None:
                affines.append(coefficients)
        return image, tuple(affines)


# --- colour jitter, erasing ----------------------------------------------------------------------

def jitter_strengths(color_jitter):
    """MindCV's color_jitter (one strength, or [brightness, contrast, saturation(, hue)]) as four strengths."""
    if isinstance(color_jitter, (list, tuple)):
        return tuple(color_jitter) + (0.0,) * (4 - len(color_jitter))
    return (float(color_jitter),) * 3 + (0.0,)


def color_jitter(image, rng, strengths):
    """torchvision's ColorJitter: the four adjustments in a random order, each factor uniform in
    [max(0, 1 - s), 1 + s] (hue: a shift in [-s, s] of the hue circle)."""
    brightness, contrast, saturation, hue = strengths
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) if s > 0 else None for s in (brightness, contrast, saturation)]
    factors.append(rng.uniform(-hue, hue) if hue > 0 else None)
    for index in order:
        factor = factors[index]
        if factor is None:
            continue
        if index == 3:
            h, s, v = image.convert("HSV").split()
            shifted = (np.asarray(h, np.int64) + int(round(factor * 255))) % 256
            image = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), s, v)).convert("RGB")
        else:
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[index]
            image = enhancer(image).enhance(factor)
    return image


def erase_box(rng, height, width, prob, scale, ratio, attempts):
    """torchvision's RandomErasing box (top, left, height, width), or None: with probability `prob`, a box of area
    scale x image and aspect ratio `ratio` (log-uniform), placed uniformly; None after `attempts` boxes that do
    not fit."""
    if rng.random() >= prob:
        return None
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        area = height * width * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erase(array, rng, prob, scale, ratio, value, attempts):
    """torchvision's RandomErasing on a CHW float array, in place: the `erase_box` is set to `value` (a number,
    or 'random': standard normal values, drawn after the box)."""
    channels, height, width = array.shape
    box = erase_box(rng, height, width, prob, scale, ratio, attempts)
    if box is not None:
        top, left, h, w = box
        fill = rng.standard_normal((channels, h, w)).astype(array.dtype) if value == "random" else value
        array[:, top:top + h, left:left + w] = fill
    return array


# --- one sample ----------------------------------------------------------------------------------

class TrainAugmentation:
    """The training transforms of one image, from a Generator: (PIL image, Generator) -> (float32 CHW, Geometry),
    or, by `pixels`, the same sample as uint8 for the compiled step to normalise (`engine.step.PixelNormalize`).

    `aug`: the augmentation section; `mean`, `std`: per channel on the 0-255 scale.
    The decisions are drawn in a fixed order: crop box, flips, RandAugment or colour jitter, erasing.
    """

    def __init__(self, aug, mean, std):
        self.size = aug.image_resize
        self.scale, self.ratio = tuple(aug.scale), tuple(aug.ratio)
        self.resize_filter = RESIZE_FILTERS[aug.interpolation]
        self.hflip, self.vflip = aug.hflip, aug.vflip
        fill = tuple(min(255, round(m)) for m in mean)
        self.rand_augment = (RandAugment(aug.auto_augment, fill, AFFINE_FILTERS[aug.interpolation])
                             if aug.auto_augment else None)
        self.jitter = (jitter_strengths(aug.color_jitter)
                       if aug.color_jitter is not None and not aug.auto_augment else None)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.erasing = (aug.re_prob, tuple(aug.re_scale), tuple(aug.re_ratio), aug.re_value, aug.re_max_attempts)

    def crop_and_flip(self, image, box, hflip, vflip):
        """The source's `box` (top, left, height, width) resized to size x size, then flipped."""
        top, left, height, width = box
        out = image.crop((left, top, left + width, top + height)).resize((self.size, self.size), self.resize_filter)
        if hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        if vflip:
            out = out.transpose(Image.FLIP_TOP_BOTTOM)
        return out

    def picture(self, image, rng):
        """Every decision but erasing: (RGB PIL image, Geometry)."""
        box = resized_crop_box(image.width, image.height, rng, self.scale, self.ratio)
        hflip, vflip = bool(rng.random() < self.hflip), bool(rng.random() < self.vflip)
        out = self.crop_and_flip(image, box, hflip, vflip)
        affines = ()
        if self.rand_augment is not None:
            out, affines = self.rand_augment(out, rng)
        elif self.jitter is not None:
            out = color_jitter(out, rng, self.jitter)
        return out, Geometry((image.height, image.width), box, self.size, hflip, vflip, affines)

    def __call__(self, image, rng):
        out, geometry = self.picture(image, rng)
        array = ((np.asarray(out, np.float32) - self.mean) / self.std).transpose(2, 0, 1).copy()
        if self.erasing[0] > 0:
            random_erase(array, rng, *self.erasing)
        return array, geometry

    def pixels(self, image, rng):
        """The sample of `__call__` before normalisation: (uint8 HWC, Geometry); with erasing on, a 4th channel
        is 255 inside the erased box. The same draws in the same order, for an erase value that is a number
        (`random` values are drawn on the host, by `__call__`)."""
        out, geometry = self.picture(image, rng)
        prob, scale, ratio, _, attempts = self.erasing
        if prob <= 0:
            return np.asarray(out), geometry
        erased = Image.new("L", out.size, 0)
        box = erase_box(rng, self.size, self.size, prob, scale, ratio, attempts)
        if box is not None:
            top, left, h, w = box
            erased.paste(255, (left, top, left + w, top + h))
        out.putalpha(erased)  # PIL's RGBA: one copy, where numpy's concatenate costs 8x as much
        return np.asarray(out), geometry


# --- one batch -----------------------------------------------------------------------------------

class BatchMixer:
    """MindCV's (timm's) Mixup in batch mode, drawn per step from (seed, epoch, step, rank).

    With probability `prob` the batch is mixed with itself flipped along its first axis: cutmix (with
    probability `switch_prob` when both are on) pastes a box of the flipped batch (side sqrt(1 - lam) of the
    image's, lam ~ Beta(cutmix, cutmix), clipped, lam then corrected to the pasted area), mixup blends
    (lam ~ Beta(mixup, mixup)). Labels become float32 one-hot targets mixed with the same lam (at every
    step, so the step's input shapes do not change).
    """

    def __init__(self, aug, num_classes, seed, rank):
        self.mixup, self.cutmix = aug.mixup, aug.cutmix
        self.prob, self.switch_prob = aug.cutmix_prob, aug.mixup_switch_prob
        self.num_classes, self.seed, self.rank = num_classes, seed, rank

    def draw(self, rng, height, width):
        """(lam, box (top, bottom, left, right) or None for a blend); lam 1: no mixing."""
        if not rng.random() < self.prob:
            return 1.0, None
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return lam, None
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        return float(lam), (int(top), int(bottom), int(left), int(right))

    def __call__(self, images, labels, epoch, step):
        rng = step_generator("mixup", self.seed, epoch, step, self.rank)
        targets = np.eye(self.num_classes, dtype=np.float32)[labels.astype(np.int64)]
        lam, box = self.draw(rng, *images.shape[-2:])
        if lam == 1.0:
            return images, targets
        if box is None:
            images = (images * np.float32(lam) + images[::-1] * np.float32(1.0 - lam)).astype(np.float32)
        else:
            top, bottom, left, right = box
            pasted = images.copy()
            pasted[:, :, top:bottom, left:right] = images[::-1, :, top:bottom, left:right]
            images = pasted
        return images, (targets * np.float32(lam) + targets[::-1] * np.float32(1.0 - lam)).astype(np.float32)
