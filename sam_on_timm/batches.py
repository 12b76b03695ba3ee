"""Batches and what a pass over one needs, below the SAM step and the sparse masks (ssam-f's Fisher) that both
use them: a batch is a tensor (images along dim 0) or a NaFlex dict of per-image tensors (``patches``,
``patch_coord``, ``patch_valid``); ``batch_rows`` counts its images, ``take_rows`` cuts some out, and
``frozen_bn_stats`` runs a pass that leaves the norm layers' running statistics as they are.
"""
import contextlib
from typing import Any, Mapping, Union

import torch
from torch import Tensor, nn

from .norms import is_norm_module

__all__ = ['Batch', 'batch_rows', 'take_rows', 'frozen_bn_stats']

# a batch of images: a tensor (images along dim 0), or a NaFlex dict of per-image tensors
Batch = Union[Tensor, Mapping[str, Any]]


def batch_rows(x: Batch) -> int:
    """How many images a batch holds: a tensor's first dimension, a NaFlex dict's ``patches`` rows."""
    if isinstance(x, Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        t = x.get('patches')
        if not isinstance(t, Tensor):
            t = next((v for v in x.values() if isinstance(v, Tensor) and v.dim() > 0), None)
        if t is not None and t.dim() > 0:
            return t.shape[0]
    raise TypeError(f'a batch is a tensor or a dict of per-image tensors (NaFlex), got {type(x).__name__}')


def take_rows(x: Batch, rows: slice) -> Batch:
    """Images ``rows`` of a batch. A dict: every tensor with one row per image is cut the same way (an
    image keeps its patches, ``patch_coord`` and ``patch_valid`` together); other values are kept."""
    if isinstance(x, Tensor):
        return x[rows]
    n = batch_rows(x)
    out = {}
    for key, v in x.items():
        if isinstance(v, Tensor) and v.dim() > 0:
            if v.shape[0] != n:
                raise ValueError(f"batch entry '{key}' has {v.shape[0]} rows, the batch {n} images: every tensor of "
                                 f"a NaFlex batch has one row per image")
            v = v[rows]
        out[key] = v
    return out


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, enabled: bool = True):
    """Running statistics of the norm layers left exactly as they are inside the block, also when a
    batch statistic is not finite (an fp16 overflow at w + eps).

    BatchNorm (torch's, SyncBatchNorm, timm's BatchNormAct2d): ``track_running_stats`` off, so the
    forward normalises with the batch statistics, as in training, and updates nothing (counter
    included). Other layers with running statistics (timm's EvoNorm-B): their buffers are put back.
    """
    switched, saved = [], []
    if enabled:
        for mod in model.modules():
            # running_var is None for a BatchNorm built with track_running_stats=False
            if not is_norm_module(mod) or getattr(mod, 'running_var', None) is None:
                continue
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.track_running_stats:
                    mod.track_running_stats = False
                    switched.append(mod)
            else:
                saved.extend((b, b.clone()) for b in mod.buffers(recurse=False))
    try:
        yield
    finally:
        for mod in switched:
            mod.track_running_stats = True
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
