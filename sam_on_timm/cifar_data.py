"""The CIFAR training augmentations of the paper (Appendix A.1), as a replacement for timm's training transform.

- ``basic``: random 32x32 crop of the image zero-padded by 4 pixels on each side, then a horizontal
  flip with probability 0.5;
- ``basic+aa``: the same, followed by AutoAugment with its CIFAR-10 policy (Cubuk et al. 2019;
  torchvision's ``AutoAugmentPolicy.CIFAR10``), as the paper's "+AA".

timm's ImageNet pipeline (RandomResizedCrop, color jitter, its ImageNet AutoAugment policies) has
neither. Evaluation needs no replacement: at 32 px with ``crop_pct`` 1.0 (the CIFAR models' default)
timm's eval transform only converts and normalises.
"""
from typing import Sequence

import torch
from torchvision import transforms

__all__ = ['CIFAR_AUGS', 'CIFAR_MEAN_STD', 'cifar_train_transform']

CIFAR_AUGS = ('basic', 'basic+aa')

# per-channel mean / std of the training images, as the paper's code normalises them
CIFAR_MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def cifar_train_transform(aug: str, mean: Sequence[float], std: Sequence[float], use_prefetcher: bool = False,
                          img_size: int = 32, padding: int = 4) -> transforms.Compose:
    """The training transform for ``aug`` in ``CIFAR_AUGS``.

    ``use_prefetcher``: end in a uint8 CHW tensor, which timm's prefetching loader normalises on the
    device (as timm's own transforms do); otherwise a float tensor normalised with ``mean`` / ``std``.
    """
    if aug not in CIFAR_AUGS:
        raise ValueError(f"unknown CIFAR augmentation '{aug}'; valid: {', '.join(CIFAR_AUGS)}")
    tfl = [transforms.RandomCrop(img_size, padding=padding, fill=0), transforms.RandomHorizontalFlip()]
    if aug == 'basic+aa':
        tfl.append(transforms.AutoAugment(transforms.AutoAugmentPolicy.CIFAR10))
    if use_prefetcher:
        tfl.append(transforms.PILToTensor())
    else:
        tfl += [transforms.ToTensor(), transforms.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return transforms.Compose(tfl)
