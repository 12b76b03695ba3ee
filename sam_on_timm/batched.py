"""All m-sharpness chunks of a batch in one forward and one backward (ghost normalization).

Under SAM-ON the perturbation lives only in the per-channel affine parameters of the normalization
layers, and the only layers that mix samples are the BatchNorms. ``k`` chunks of ``m`` samples can
therefore share one pass over the ``k * m`` samples in which every norm layer

* normalises chunk ``c`` with chunk ``c``'s own batch statistics (ghost BatchNorm; LayerNorm,
  GroupNorm and RMSNorm are per sample anyway), and
* scales and shifts chunk ``c`` with its own ``gamma_c = gamma + E[c]``, ``beta_c = beta + E'[c]``,
  where ``E`` is a ``(k, *gamma.shape)`` tensor.

With ``E`` a zero leaf, ``d(sum_c L_c) / dE[c] = dL_c / dgamma``: the k per-chunk ascent gradients
of P from one backward. With ``E[c] = eps_c`` and ``L = sum_c L_c / k``, ``dL / dgamma`` is the
descent gradient the sequential chunks accumulate. Everything else in the network is per sample,
so the maths is that of k separate passes; only the summation order of floating-point sums differs.

Sample order: the batch of a pass is interleaved, sample ``i`` of chunk ``c`` at row ``i * k + c``
(``interleave``). A norm input of shape ``(k * m, C, ...)`` is then, without a copy, the tensor
``(m, k * C, ...)`` in which channel ``c * C + j`` is channel ``j`` of chunk ``c``: ghost BatchNorm is
one ``F.batch_norm`` call with ``k * C`` channels.

BatchNorm running statistics: each chunk's batch mean and unbiased variance are recorded during the
pass (``F.batch_norm`` with zeroed buffers and momentum 1 writes exactly them), and applied after
the step as k sequential updates would have (``apply_running_stats``; ascent and descent updates of
chunk c in the order the sequential path makes them). In training mode a BatchNorm never reads its
running statistics, so deferring the updates changes nothing else.

The forwards of the norm modules are swapped for the duration of a pass (``ghost_norms``, a
context manager that puts the class forward back even when the pass raises). Only modules of the
exact types in ``_forward_table()`` are handled; a model with any other normalization layer (SyncBatchNorm,
EvoNorm, FilterResponseNorm, timm's fast-norm or fp32 variants, subclasses that override forward)
is not batchable and keeps the sequential path (``unbatchable_reason``).
"""
import contextlib
import types
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import is_norm_module

__all__ = ['CHUNK_PATHS', 'unbatchable_reason', 'interleave', 'chunk_rows', 'ghost_norms', 'apply_running_stats']

CHUNK_PATHS = ('auto', 'batched', 'sequential')


class _Ghost:
    """Per-pass state of one swapped norm module."""
    __slots__ = ('k', 'n', 'addends', 'detach', 'record')

    def __init__(self, k: int, n: int, addends: Dict[Tensor, Tensor], detach: bool, record: Optional[Dict]):
        self.k, self.n, self.addends, self.detach, self.record = k, n, addends, detach, record

    def param(self, p: Optional[Tensor]) -> Tuple[Optional[Tensor], bool]:
        """``p`` per chunk, shape ``(k, *p.shape)`` (batched) or ``(1, *p.shape)``; and whether batched."""
        if p is None:
            return None, False
        e = self.addends.get(p)
        base = p.detach() if self.detach else p
        if e is None:
            return base.unsqueeze(0), False
        return base.unsqueeze(0) + e, True


def _rows(mod: nn.Module, x: Tensor) -> int:
    """How many rows of ``x`` belong to each sample (1; more where a model folds windows into the batch)."""
    n = mod._sam_ghost.n
    if x.dim() == 0 or x.shape[0] % n:
        raise RuntimeError(f'batched SAM chunks: {type(mod).__name__} got an input of {x.shape[0]} rows for a batch '
                           f'of {n} samples (the batch is not the first dimension): use --sam-chunks sequential')
    return x.shape[0] // n


def _affine(y: Tensor, w: Optional[Tensor], b: Optional[Tensor], k: int, r: int, first: int) -> Tensor:
    """``y * w + b`` with per-chunk ``w, b`` of shape ``(k or 1, *pshape)``; ``pshape`` sits at dim
    ``first`` of ``y`` (1: channels; ``y.dim() - len(pshape)``: trailing dims)."""
    if w is None and b is None:
        return y
    pdims = (w if w is not None else b).dim() - 1
    lead, rest = first - 1, y.dim() - first - pdims
    v = y.reshape((-1, k, r) + tuple(y.shape[1:]))   # rows i * k * r + c * r + j: chunk c at dim 1

    def shaped(p):
        return p.reshape((1, p.shape[0], 1) + (1,) * lead + tuple(p.shape[1:]) + (1,) * rest)
    if w is not None:
        v = v * shaped(w)
    if b is not None:
        v = v + shaped(b)
    # autocast: the norm's own dtype (a float32 parameter would promote a bfloat16 output)
    return v.reshape(y.shape).to(y.dtype)


def _batch_norm_forward(mod: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    g = mod._sam_ghost
    k = g.k
    if _rows(mod, x) != 1:
        raise RuntimeError(f'batched SAM chunks: {type(mod).__name__} got more rows than samples; '
                           f'use --sam-chunks sequential')
    w, _ = g.param(mod.weight)
    b, _ = g.param(mod.bias)
    batch_stats = mod.training or (mod.running_mean is None and mod.running_var is None)
    if batch_stats:
        c = x.shape[1]
        v = x.reshape((x.shape[0] // k, k * c) + tuple(x.shape[2:]))   # channel c * C + j: chunk c, channel j
        wk = None if w is None else w.expand(k, c).reshape(k * c)
        bk = None if b is None else b.expand(k, c).reshape(k * c)
        if mod.training and mod.track_running_stats and mod.running_mean is not None:
            # momentum 1 into zeroed buffers: they receive exactly the batch mean and unbiased variance
            mean = torch.zeros(k * c, dtype=mod.running_mean.dtype, device=x.device)
            var = torch.zeros(k * c, dtype=mod.running_var.dtype, device=x.device)
            y = F.batch_norm(v, mean, var, wk, bk, True, 1.0, mod.eps)
            if g.record is not None:
                g.record.setdefault(mod, []).append((mean.view(k, c), var.view(k, c)))
        else:
            y = F.batch_norm(v, None, None, wk, bk, True, 0.0, mod.eps)
        y = y.reshape(x.shape)
    else:   # eval mode: running statistics, per sample; only the affine is per chunk
        y = _affine(F.batch_norm(x, mod.running_mean, mod.running_var, None, None, False, 0.0, mod.eps), w, b, k, 1, 1)
    if hasattr(mod, 'act'):   # timm's BatchNormAct2d: norm, then drop, then activation
        y = mod.act(mod.drop(y))
    return y


def _ghost_affine(mod: nn.Module) -> Optional[Tuple[Optional[Tensor], Optional[Tensor]]]:
    """The per-chunk (weight, bias) of a per-sample norm (LayerNorm, GroupNorm), or None when neither is
    perturbed: the module's own forward then computes the same for every chunk."""
    g = mod._sam_ghost
    w, wb = g.param(mod.weight)
    b, bb = g.param(mod.bias)
    return (w, b) if wb or bb else None


def _layer_norm_forward(mod: nn.LayerNorm, x: Tensor) -> Tensor:
    wb = _ghost_affine(mod)
    if wb is None:
        return type(mod).forward(mod, x)
    y = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
    return _affine(y, *wb, mod._sam_ghost.k, _rows(mod, x), x.dim() - len(mod.normalized_shape))


def _layer_norm_2d_forward(mod: nn.LayerNorm, x: Tensor) -> Tensor:
    wb = _ghost_affine(mod)
    if wb is None:
        return type(mod).forward(mod, x)
    y = F.layer_norm(x.permute(0, 2, 3, 1), mod.normalized_shape, None, None, mod.eps)
    return _affine(y, *wb, mod._sam_ghost.k, _rows(mod, x), 3).permute(0, 3, 1, 2)


def _group_norm_forward(mod: nn.GroupNorm, x: Tensor) -> Tensor:
    wb = _ghost_affine(mod)
    if wb is None:
        return type(mod).forward(mod, x)
    return _affine(F.group_norm(x, mod.num_groups, None, None, mod.eps), *wb, mod._sam_ghost.k, _rows(mod, x), 1)


def _rms_norm_forward(mod: nn.Module, x: Tensor) -> Tensor:
    g = mod._sam_ghost
    w, wb = g.param(mod.weight)
    if not wb:
        return type(mod).forward(mod, x)
    y = F.rms_norm(x, mod.normalized_shape, None, mod.eps)
    return _affine(y, w, None, g.k, _rows(mod, x), x.dim() - len(mod.normalized_shape))


def _forwards() -> Dict[type, object]:
    """Exact module type -> batched forward. Subclasses are not included: they may compute otherwise."""
    table = {nn.BatchNorm1d: _batch_norm_forward, nn.BatchNorm2d: _batch_norm_forward,
             nn.BatchNorm3d: _batch_norm_forward, nn.LayerNorm: _layer_norm_forward,
             nn.GroupNorm: _group_norm_forward}
    if hasattr(nn, 'RMSNorm') and hasattr(F, 'rms_norm'):
        table[nn.RMSNorm] = _rms_norm_forward
    try:
        import timm.layers as tl
        import timm.layers.norm as tn
    except ImportError:  # pragma: no cover
        return table
    table[tl.BatchNormAct2d] = _batch_norm_forward
    table[tl.LayerNorm] = _layer_norm_forward
    table[tl.LayerNorm2d] = _layer_norm_2d_forward
    table[tl.GroupNorm] = _group_norm_forward
    table[tl.GroupNorm1] = _group_norm_forward
    if getattr(tn, 'rms_norm', None) is getattr(F, 'rms_norm', False):   # timm's RmsNorm is torch's rms_norm
        table[tl.RmsNorm] = _rms_norm_forward
    return table


_TABLE: Optional[Dict[type, object]] = None


def _forward_table() -> Dict[type, object]:
    """``_forwards()``, built on first use (not at import, so that what it holds is what the running code says)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _forwards()
    return _TABLE


def _batchable(mod: nn.Module) -> bool:
    # timm's fast-norm kernels (APEX, other autocast casts) are left to the module's own forward
    return type(mod) in _forward_table() and not getattr(mod, '_fast_norm', False) and 'forward' not in mod.__dict__


def unbatchable_reason(model: nn.Module, perturbed: Sequence[Tensor] = ()) -> Optional[str]:
    """Why the chunks of a step on ``model`` cannot share one pass (None: they can).

    Every normalization module must be of a type handled here, and every tensor of ``perturbed``
    (the SAM set P; empty for a plain optimizer) must be the weight or bias of one of them.
    """
    owned = set()
    for mod in model.modules():
        if is_norm_module(mod):
            if not _batchable(mod):
                return f'{type(mod).__name__} layers cannot be batched'
            owned.update(p for p in (getattr(mod, 'weight', None), getattr(mod, 'bias', None)) if p is not None)
    outside = [p for p in perturbed if p.requires_grad and p not in owned]
    if outside:
        return (f'{len(outside)} perturbed tensors are not affine parameters of a normalization layer '
                f'(SAM-ON perturbs only those)')
    return None


def interleave(xs: Sequence) -> object:
    """One batch from k equal chunks, sample i of chunk c at row ``i * k + c`` (memory format kept).

    NaFlex dict chunks: each per-image tensor (patches, patch_coord, patch_valid) interleaved the same way,
    so an image keeps its rows together; other values (the collator's int seq_len) taken from chunk 0.
    """
    if isinstance(xs[0], Mapping):
        return {key: interleave([x[key] for x in xs]) if isinstance(v, Tensor) and v.dim() > 0 else v
                for key, v in xs[0].items()}
    x = torch.stack(list(xs), dim=1).flatten(0, 1)
    if xs[0].dim() == 4 and xs[0].is_contiguous(memory_format=torch.channels_last) and not xs[0].is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def chunk_rows(out, k: int, c: int):
    """Chunk ``c``'s rows of a model output (a tensor, or a tuple / list of them) of an interleaved
    batch of ``k`` chunks."""
    if isinstance(out, (tuple, list)):
        return type(out)(chunk_rows(o, k, c) for o in out)
    return out[c::k]


@contextlib.contextmanager
def ghost_norms(model: nn.Module, k: int, n: int, addends: Dict[Tensor, Tensor], detach: bool = False,
                record: Optional[Dict] = None):
    """Inside the block, every norm module of ``model`` runs batched over k interleaved chunks of a
    batch of ``n`` samples: chunk statistics for BatchNorm, affine parameter ``p + addends[p][c]`` for
    chunk c (``addends[p]`` of shape ``(k, *p.shape)``; ``p`` itself where absent). ``detach``: the base
    parameters are used detached (the ascent, whose gradient is taken w.r.t. the addends).
    ``record``: dict receiving, per BatchNorm that tracks running statistics, a list with one
    ``(mean, unbiased var)`` pair of ``(k, C)`` tensors per pass. The class forwards are put back on exit.
    """
    state = _Ghost(k, n, addends, detach, record)
    swapped = []
    try:
        for mod in model.modules():
            fwd = _forward_table().get(type(mod))
            if fwd is not None and is_norm_module(mod):
                mod._sam_ghost = state
                mod.forward = types.MethodType(fwd, mod)
                swapped.append(mod)
        yield
    finally:
        for mod in swapped:
            del mod.forward
            del mod._sam_ghost


@torch.no_grad()
def apply_running_stats(records: Sequence[Dict], k: int) -> None:
    """Update BatchNorm running statistics as k sequential passes would have: for chunk c = 0..k-1,
    the recorded statistics of each pass in ``records`` in turn (ascent then descent of chunk c).

    Per update, as ``torch.nn.BatchNorm``: ``num_batches_tracked += 1``; factor ``f = momentum`` (or
    ``1 / num_batches_tracked`` when momentum is None); ``r = (1 - f) r + f s``.
    """
    mods: List[nn.Module] = []
    for rec in records:
        mods.extend(m for m in rec if m not in mods)
    for mod in mods:
        passes = [s for rec in records for s in rec.get(mod, ())]
        # each rec holds one entry per pass of this step; keep the pass order within a chunk
        for c in range(k):
            for mean, var in passes:
                f = mod.momentum
                if mod.num_batches_tracked is not None:
                    mod.num_batches_tracked.add_(1)
                    if f is None:
                        f = 1.0 / float(mod.num_batches_tracked)
                elif f is None:
                    f = 0.0
                mod.running_mean.mul_(1 - f).add_(mean[c], alpha=f)
                mod.running_var.mul_(1 - f).add_(var[c], alpha=f)
