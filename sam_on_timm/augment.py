"""timm's AutoAugment / RandAugment / AugMix ops on the Pillow that pip installs.

timm's posterize ops map a magnitude to the number of bits each channel keeps. ``PosterizeIncreasing``
keeps ``4 - int(0.4 * m)`` bits, so 0 at magnitude 10 (reached by ``rand-m10-...-inc1``, or by
``rand-m9-mstd0.5-inc1`` whenever the noisy magnitude lands at 10 or more) and fewer than 0 with
``mmax`` above 10. ``Posterize`` keeps ``int(0.4 * m)`` bits, so 0 below magnitude 2.5 (``--aa v0``,
``rand-m2``). Keeping no bit maps every value to 0: a black image, which is what timm means and what
Pillow up to 12 computed. Pillow 13 refuses it (``ValueError: bits must be between or equal to 1
and 8``), which stops the epoch on the first such image.

:func:`install_posterize_fix` puts :func:`posterize` in the place of timm's op in
``timm.data.auto_augment.NAME_TO_OP`` (the table an ``AugmentOp`` takes its function from when it is
built). It does so only where timm's op refuses 0 bits on the installed Pillow, so a Pillow or a
timm that handles 0 bits keeps its own op. Every other op, and every other number of bits, runs
timm's code unchanged (docs/robustness.md, "Augmentations").
"""
from typing import Any

from PIL import Image
from timm.data import auto_augment

__all__ = ['POSTERIZE_OPS', 'posterize', 'install_posterize_fix']

#: the entries of timm's op table that run its posterize function
POSTERIZE_OPS = ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal')

_timm_posterize = auto_augment.posterize   # timm's own function (the module attribute is never replaced)


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, except that keeping 0 bits or fewer gives a black image of the same size and
    mode (every channel value ANDed with an all-zero mask, as Pillow computed it before version 13)
    instead of Pillow 13's ValueError. Modes other than L and RGB go to timm's op as they are."""
    if bits_to_keep <= 0 and img.mode in ('L', 'RGB'):
        return img.point([0] * (256 * len(img.getbands())))
    return _timm_posterize(img, bits_to_keep, **kwargs)


def _timm_refuses_zero_bits() -> bool:
    try:
        _timm_posterize(Image.new('L', (1, 1)), 0)
    except ValueError:
        return True
    return False


def install_posterize_fix() -> bool:
    """Put :func:`posterize` into timm's augmentation op table where timm's posterize refuses 0 bits on
    this Pillow; True where it did (or had). Call it before the transforms are built (train.py does, in
    its data setup): an ``AugmentOp`` keeps the function it found when it was created, and so do its
    copies in DataLoader workers. Idempotent; entries timm does not map to its own posterize are left
    alone."""
    table = auto_augment.NAME_TO_OP
    if not _timm_refuses_zero_bits():
        return False
    for name in POSTERIZE_OPS:
        if table.get(name) is _timm_posterize:
            table[name] = posterize
    return True
