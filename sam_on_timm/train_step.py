"""The two-pass SAM training step (docs/design.md, section 4), shared by ``train.py`` and users' own loops.

For each chunk of m samples of the local batch:
  1. ascent:  forward + grad of the loss w.r.t. P only (lean ascent: the other parameters have
              ``requires_grad`` off for this pass, so neither eager autograd nor a torch.compile'd
              graph computes their weight gradients; ``.grad`` untouched); under DDP in ``no_sync()``
  2. perturb: w_P += eps(chunk's own gradient)        (m-sharpness: every rank, every chunk its own)
  3. descent: forward + backward at w + eps, loss / k accumulated into ``.grad``;
              DDP all-reduces on the last chunk only (one all-reduce per update, as for SGD)
  4. restore: w_P = saved originals (copy)
then clip (descent gradient), base step. Plain optimizers take the same path without 1, 2 and 4,
so SGD baselines and ``--grad-accum-steps`` share the mechanism.
"""
import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .checks import check_arg, check_sam_m
from .norm_params import is_norm_module
from .sam import SAM, torch_grad_scaler, unscale_grads

__all__ = ['StepStats', 'find_sam', 'split_chunks', 'ascent_samples', 'frozen_bn_stats', 'requires_grad_off',
           'train_step', 'BN_UPDATE_CHOICES']

BN_UPDATE_CHOICES = ('both', 'ascent')

# the SAM optimizers whose first update has passed the ascent-reach check (_check_ascent_reach)
_ascent_reach_checked: 'weakref.WeakSet[SAM]' = weakref.WeakSet()


@dataclass
class StepStats:
    """Per-update figures, as device tensors (read them with ``.item()`` only when logging)."""
    loss: Tensor                          # mean descent loss, L(w + eps) for SAM
    ascent_loss: Optional[Tensor] = None  # mean L(w) of the ascent passes
    eps_norm: Optional[Tensor] = None     # mean ||eps|| over chunks
    skipped: Optional[Tensor] = None      # perturbations skipped in this update (zero / non-finite ||T g||)


def find_sam(optimizer: torch.optim.Optimizer) -> Optional[SAM]:
    """The SAM instance inside ``optimizer`` (itself, or under timm's Lookahead), else None."""
    while optimizer is not None:
        if isinstance(optimizer, SAM):
            return optimizer
        optimizer = getattr(optimizer, '_base_optimizer', None)
    return None


def split_chunks(x: Tensor, y: Tensor, m: Optional[int], splits: int = 1) -> List[Tuple[Tensor, Tensor]]:
    """Cut a local batch into chunks of ``m`` rows (m-sharpness); ``m`` must divide the batch.

    ``splits`` > 1: the batch is that many equal parts one after the other (timm's AugMix splits,
    split BatchNorm); chunk j takes rows j*m/s .. (j+1)*m/s - 1 of every part, in the same layout,
    so that each chunk keeps its splits together.
    """
    n = x.shape[0]
    if m is None or m == n:
        return [(x, y)]
    check_sam_m(m, n)
    if splits == 1:
        return list(zip(x.split(m), y.split(m)))
    if m % splits:
        raise ValueError(f'a chunk of {m} rows cannot hold {splits} equal splits')
    k = n // m

    def regroup(t: Tensor) -> Tuple[Tensor, ...]:   # (splits, k, m / splits, ...) -> k chunks of (m, ...)
        return t.reshape(splits, k, m // splits, *t.shape[1:]).transpose(0, 1).reshape(k, m, *t.shape[1:]).unbind(0)
    return list(zip(regroup(x), regroup(y)))


def ascent_samples(chunk: int, ascent_frac: float) -> int:
    """How many samples of a chunk of ``chunk`` the ascent pass uses (the first ones; at least 1)."""
    return chunk if ascent_frac == 1.0 else max(1, int(round(ascent_frac * chunk)))


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


@contextlib.contextmanager
def requires_grad_off(params: Iterable[Tensor]):
    """``requires_grad`` off inside the block for those of ``params`` that have it on; put back after.

    The lean ascent runs under it with the parameters outside P (``SAM.unperturbed()``):
    ``autograd.grad(loss, P)`` alone already skips their weight gradients in eager mode, but a
    torch.compile'd graph computes every gradient its inputs require. With the flags off, dynamo
    compiles (once) a second graph for the ascent whose backward leaves them out (without the flags,
    a compiled ascent computes the full backward). Frozen parameters stay frozen; the flags are put back
    even when the block raises.
    """
    off = [p for p in params if p.requires_grad]
    if off:
        _guard_requires_grad()
    for p in off:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in off:
            p.requires_grad_(True)


def _guard_requires_grad() -> None:
    """Make torch.compile'd graphs notice the flags that ``requires_grad_off`` switches.

    Dynamo skips the guards of a tensor held in a module dict whose version tag is unchanged
    (``skip_tensor_guards_with_matching_dict_tags``); ``requires_grad_()`` changes no tag, so torch
    versions without a requires_grad check on that fast path (2.11 among them) reuse the lean ascent
    graph for the descent and compute no weight gradient there. With the skip off, every parameter's
    guard, requires_grad included, is checked: the descent recompiles once, as it should. Set before
    the first compiled forward (the first ``train_step``), it costs a guard check per parameter per call.
    """
    config = getattr(getattr(torch, '_dynamo', None), 'config', None)
    if getattr(config, 'skip_tensor_guards_with_matching_dict_tags', False):
        config.skip_tensor_guards_with_matching_dict_tags = False


def _no_sync(model: nn.Module, skip_sync: bool) -> ContextManager:
    return model.no_sync() if skip_sync and hasattr(model, 'no_sync') else contextlib.nullcontext()


def train_step(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        chunks: Sequence[Tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        amp_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        loss_scaler=None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        clip_parameters: Optional[Iterable[Tensor]] = None,
        bn_update: str = 'both',
        ascent_frac: float = 1.0,
) -> StepStats:
    """One optimizer update over ``chunks`` (see module docstring); the weights end unperturbed.

    ``loss_scaler``: timm ``NativeScaler`` or ``torch.amp.GradScaler`` for float16 (None for fp32 / bf16).
    ``bn_update``: 'both' (ascent and descent passes update BN running stats) or 'ascent'.
    ``ascent_frac``: the ascent uses the first fraction of each chunk (1.0 = the paper's algorithm).
    """
    if bn_update not in BN_UPDATE_CHOICES:
        raise ValueError(f"bn_update must be one of {', '.join(BN_UPDATE_CHOICES)}, got '{bn_update}'")
    check_arg('ascent_frac', ascent_frac)
    if clip_grad is not None:
        check_arg('clip_grad', clip_grad)
    sam = find_sam(optimizer)
    if sam is not None and getattr(model, 'static_graph', False):
        raise ValueError('DistributedDataParallel(static_graph=True) cannot run the SAM step: its ascent is an extra '
                         'backward under no_sync(), which a static graph does not allow; wrap the model without '
                         'static_graph')
    scaler = torch_grad_scaler(loss_scaler)
    k = len(chunks)
    optimizer.zero_grad(set_to_none=True)
    if sam is not None:
        sam.adopt_new_groups()   # groups added through a wrapper (Lookahead) since the last step
    others = sam.unperturbed() if sam is not None else []
    trainable = None   # P, or the part of it still requiring grad (some frozen after the optimizer was built)
    if sam is not None:
        trainable = sam.perturbed
        if not all(p.requires_grad for p in trainable):
            trainable = [p for p in trainable if p.requires_grad]
    loss_sum = ascent_sum = eps_sum = skipped = None

    for i, (x, y) in enumerate(chunks):
        last = i == k - 1
        if sam is not None:
            n = ascent_samples(x.shape[0], ascent_frac)
            with _no_sync(model, True), requires_grad_off(others):
                with amp_autocast():
                    ascent_loss = loss_fn(model(x[:n]), y[:n])
                scaled = scaler.scale(ascent_loss) if scaler is not None else ascent_loss
                check = i == 0 and sam not in _ascent_reach_checked   # first update of this optimizer only
                if scaled.requires_grad and trainable is sam.perturbed:
                    grads = list(torch.autograd.grad(scaled, sam.perturbed, allow_unused=True,
                                                     materialize_grads=not check))
                elif scaled.requires_grad and trainable:   # some of P frozen after the optimizer was built: eps 0 there
                    it = iter(torch.autograd.grad(scaled, trainable, allow_unused=True))
                    grads = [next(it) if p.requires_grad else None for p in sam.perturbed]
                else:   # no trainable perturbed parameter reaches the loss: zero gradient, perturbation skipped
                    grads = [None] * len(sam.perturbed)
                if check or not scaled.requires_grad or trainable is not sam.perturbed:
                    missing = [j for j, g in enumerate(grads) if g is None]
                    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(sam.perturbed, grads)]
            found_inf = unscale_grads(grads, scaler)   # fp16: true gradient for eps, overflow skips it
            eps_norm = sam.perturb(grads, found_inf, grads_writable=True)   # autograd.grad's own buffers
            ascent_sum = ascent_loss.detach() if ascent_sum is None else ascent_sum + ascent_loss.detach()
            eps_sum = eps_norm if eps_sum is None else eps_sum + eps_norm
            skipped = sam.last_skipped if skipped is None else skipped + sam.last_skipped

        with _no_sync(model, not last), frozen_bn_stats(model, sam is not None and bn_update == 'ascent'):
            with amp_autocast():
                loss = loss_fn(model(x), y)
            descent = loss / k
            (scaler.scale(descent) if scaler is not None else descent).backward()
        if sam is not None:
            sam.restore()
            if check:
                _check_ascent_reach(sam, missing)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()

    if clip_parameters is None and clip_grad is not None:
        clip_parameters = [p for g in optimizer.param_groups for p in g['params']]
    if scaler is not None:
        if clip_grad is not None:
            scaler.unscale_(optimizer)   # once per update, descent gradient only
            _clip(clip_parameters, clip_grad, clip_mode)
        scaler.step(optimizer)           # a skipped step still leaves w restored (done above)
        scaler.update()
    else:
        if clip_grad is not None:
            _clip(clip_parameters, clip_grad, clip_mode)
        optimizer.step()

    stats = StepStats(loss=loss_sum / k)
    if sam is not None:
        stats.ascent_loss, stats.eps_norm, stats.skipped = ascent_sum / k, eps_sum / k, skipped
    return stats


def _check_ascent_reach(sam: SAM, missing: List[int]) -> None:
    """Every perturbed tensor the descent's ``backward()`` reached must have had an ascent gradient.

    ``torch.autograd.grad`` does not see through reentrant activation checkpointing (``use_reentrant=True``,
    e.g. ``TIMM_REENTRANT_CKPT=1``): the norm layers inside checkpointed blocks would silently get
    eps = 0. Checked on the first update (the weights are already restored and no step was taken).
    """
    unreached = [j for j in missing if sam.perturbed[j].grad is not None]
    if unreached:
        raise RuntimeError(
            f'{sam.name}: the ascent pass got no gradient for {len(unreached)} of the {len(sam.perturbed)} perturbed '
            f'tensors that the descent pass reaches; reentrant activation checkpointing (use_reentrant=True, '
            f'TIMM_REENTRANT_CKPT=1) hides them from torch.autograd.grad: use non-reentrant checkpointing '
            f"(timm's default, timm.layers.set_reentrant_ckpt(False)) or none")
    _ascent_reach_checked.add(sam)


def _clip(parameters, value: float, mode: str) -> None:
    from timm.utils import dispatch_clip_grad
    dispatch_clip_grad(parameters, value, mode=mode)
