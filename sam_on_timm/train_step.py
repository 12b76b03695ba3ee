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

A batch is a tensor (images along dim 0) or a NaFlex dict (timm's ``create_naflex_loader``: ``patches``
``[B, N, ...]``, ``patch_coord`` ``[B, N, 2]``, ``patch_valid`` ``[B, N]``, and the collator's int
``seq_len``). A chunk of a dict takes the same images' rows of every per-image tensor, so each
image keeps its patches, coordinates and validity mask together; other values are kept as they are.

Chunk sizes and weights. A tensor batch must be a multiple of m (its size is the user's batch
size). A NaFlex batch's size comes from the loader's token budget and varies per update, so it is
cut into chunks of m images with a smaller last chunk (``split_chunks(..., ragged=True)``, the default
for dicts). The descent loss of chunk c is weighted by n_c / N (its share of the update's N images;
1 / k for k equal chunks), so the update is the mean over the images, as one pass over the whole batch
would give; ``chunk_weights`` replaces those weights (train.py: timm's NaFlex loss scale,
--variable-batch-loss-scale and gradient accumulation). Every chunk still gets its own eps from its own
mean loss (the ascent is never weighted: eps of the fisher variant depends on the gradient's scale).

That is the sequential path. The batched path (``chunk_path``; ``sam_on_timm.batched``) computes the
same update with all chunks of a pass in one ascent and one descent pass: possible when P holds only
affine parameters of per-channel norm layers (SAM-ON), as chunk c then differs from the others only
in its BatchNorm batch statistics and its affine parameters gamma + eps_c, beta + eps_c. It takes
NaFlex dict chunks too (interleaved key by key; NaFlexVit is per image apart from its LayerNorms),
but only equal chunks: an update with a smaller last chunk takes the sequential path ('auto').
"""
import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .batches import Batch, batch_rows, frozen_bn_stats, take_rows
from .batched import CHUNK_PATHS, apply_running_stats, chunk_rows, ghost_norms, interleave, unbatchable_reason
from .checks import check_arg, check_sam_m
from .family import esam_selection
from .perturbations import VARIANTS
from .sam import SAM, torch_grad_scaler, unscale_grads

__all__ = ['StepStats', 'find_sam', 'batch_rows', 'take_rows', 'split_chunks', 'ascent_samples', 'frozen_bn_stats',
           'requires_grad_off', 'train_step', 'choose_chunk_path', 'BN_UPDATE_CHOICES', 'CHUNK_PATHS']

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


def split_chunks(x: Batch, y: Tensor, m: Optional[int], splits: int = 1,
                 ragged: Optional[bool] = None) -> List[Tuple[Batch, Tensor]]:
    """Cut a local batch into chunks of ``m`` images (m-sharpness), in order.

    ``ragged``: whether the last chunk may be smaller when m does not divide the batch. Default: yes for a
    NaFlex dict (the loader sizes its batches from a token budget, not the user), no for a tensor batch
    (its size is the user's batch size: m must divide it). A dict is cut with ``take_rows``.

    ``splits`` > 1 (tensor batches): the batch is that many equal parts one after the other (timm's AugMix
    splits, split BatchNorm); chunk j takes rows j*m/s .. (j+1)*m/s - 1 of every part, in the same layout,
    so that each chunk keeps its splits together.
    """
    n = batch_rows(x)
    if m is None or m == n:
        return [(x, y)]
    is_dict = not isinstance(x, Tensor)
    if ragged is None:
        ragged = is_dict
    if is_dict or ragged:
        if splits != 1:
            raise ValueError(f'a NaFlex (dict) or ragged batch cannot be cut into {splits} equal splits per chunk')
        check_sam_m(m, None if ragged else n)
        return [(take_rows(x, slice(i, i + m)), y[i:i + m]) for i in range(0, n, m)]
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


def choose_chunk_path(model: nn.Module, optimizer: torch.optim.Optimizer, chunk_sizes: Sequence[int],
                      chunk_path: str = 'auto', per_pass: Optional[int] = None) -> Tuple[str, str]:
    """('batched' or 'sequential', why) for an update over chunks of ``chunk_sizes`` samples, with
    ``per_pass`` chunks (default: all) sharing a batched pass.

    Batched needs at least 2 chunks per pass, equal chunks, a model whose normalization layers
    ``sam_on_timm.batched`` handles (BatchNorm, timm's BatchNormAct2d, LayerNorm, LayerNorm2d,
    GroupNorm, RMSNorm) and, for SAM, a perturbed set made only of their affine parameters (SAM-ON).
    'auto' takes it where these hold; 'sequential' always the sequential path; 'batched' reports why
    not (the caller raises).
    """
    if chunk_path not in CHUNK_PATHS:
        raise ValueError(f"chunk_path must be one of {', '.join(CHUNK_PATHS)}, got '{chunk_path}'")
    if chunk_path == 'sequential':
        return 'sequential', 'forced'
    per_pass = len(chunk_sizes) if per_pass is None else per_pass
    sam = find_sam(optimizer)
    if per_pass < 2:
        reason = 'one chunk per pass'
    elif len(chunk_sizes) % per_pass or len(set(chunk_sizes)) > 1:
        reason = 'the chunks differ in size'
    elif sam is not None and (why := _sam_reason(sam)) is not None:
        reason = why
    else:
        reason = _model_reason(model, sam.perturbed if sam is not None else ())
    if reason is None:
        return 'batched', f'{per_pass} chunks of {chunk_sizes[0]} per pass (ghost normalization)'
    return 'sequential', reason


def _sam_reason(sam: SAM) -> Optional[str]:
    """Why the batched path cannot reproduce this SAM optimizer's sequential update (None: it can).

    The batched path never calls ``perturb``: it takes eps of each chunk from ``SAM.perturbation``, which
    holds everything a perturbation involves (formula, sparse mask, counters), and adds it in the ghost
    norms. That is the sequential update exactly when ``perturb`` / ``restore`` are SAM's own (a subclass
    that changes them perturbs otherwise) and the variant is one of Table 10's.
    """
    if sam.family == 'esam':
        return "esam selects each chunk's own samples for its descent"
    for method in ('perturb', 'perturbation', 'restore'):
        if getattr(type(sam), method) is not getattr(SAM, method):
            return f'{type(sam).__name__} has its own {method}(), which the batched path would not run'
    if sam.variant not in VARIANTS:
        return f"unknown variant '{sam.variant}'"
    return None


# model -> (perturbed list, its requires_grad flags, unbatchable_reason): train_step asks every update, and
# walking the model costs ~0.4 ms of host time on ResNet-50 (SAM.perturbed is a new list when P changes;
# a plain optimizer passes the one empty tuple)
_reason_cache: 'weakref.WeakKeyDictionary[nn.Module, tuple]' = weakref.WeakKeyDictionary()


def _model_reason(model: nn.Module, perturbed: Sequence[Tensor]) -> Optional[str]:
    """``unbatchable_reason(model, perturbed)``, computed again only when the perturbed set or its
    ``requires_grad`` flags change (the model's norm layers are taken as fixed once training runs)."""
    flags = tuple(p.requires_grad for p in perturbed)
    cached = _reason_cache.get(model)
    if cached is not None and cached[0] is perturbed and cached[1] == flags:
        return cached[2]
    reason = unbatchable_reason(model, perturbed)
    _reason_cache[model] = (perturbed, flags, reason)
    return reason


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
        chunks: Sequence[Tuple[Batch, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        amp_autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        loss_scaler=None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        clip_parameters: Optional[Iterable[Tensor]] = None,
        bn_update: str = 'both',
        ascent_frac: float = 1.0,
        sam_step: bool = True,
        chunk_path: str = 'auto',
        chunks_per_pass: Optional[int] = None,
        chunk_weights: Optional[Sequence[Union[float, Tensor]]] = None,
) -> StepStats:
    """One optimizer update over ``chunks`` (see module docstring); the weights end unperturbed.

    ``loss_scaler``: timm ``NativeScaler`` or ``torch.amp.GradScaler`` for float16 (None for fp32 / bf16).
    ``bn_update``: 'both' (ascent and descent passes update BN running stats) or 'ascent'.
    ``ascent_frac``: the ascent uses the first fraction of each chunk (1.0 = the paper's algorithm).
    ``sam_step``: False takes the plain path with a SAM optimizer: no ascent, the base optimizer's step
    on its own state (``--sam-epochs``: momentum carries across the switch).
    ``chunk_path``: 'sequential' (one ascent and one descent pass per chunk), 'batched' (all chunks of a
    pass in one ascent and one descent pass, ghost normalization: ``sam_on_timm.batched``; a ValueError
    where the model or the optimizer does not allow it) or 'auto' (batched where allowed, see
    ``choose_chunk_path``). ``chunks_per_pass``: how many consecutive chunks share a batched pass
    (default all; ``train.py`` gives the chunks of one micro-batch, so ``--grad-accum-steps`` keeps
    its memory saving).
    ``chunks``: (images, targets) pairs; images a tensor or a NaFlex dict (``split_chunks`` cuts either).
    ``chunk_weights``: the descent loss of chunk c is multiplied by ``chunk_weights[c]`` (a number or a 0-dim
    tensor). Default: n_c / N, chunk c's share of the update's images (exactly 1 / k for equal chunks),
    so the update is the mean over the images. The ascent losses are never weighted. ``StepStats.loss``
    and ``ascent_loss`` are means over the update's images whatever the weights.
    """
    if bn_update not in BN_UPDATE_CHOICES:
        raise ValueError(f"bn_update must be one of {', '.join(BN_UPDATE_CHOICES)}, got '{bn_update}'")
    check_arg('ascent_frac', ascent_frac)
    if clip_grad is not None:
        check_arg('clip_grad', clip_grad)
    sam = find_sam(optimizer) if sam_step else None
    if sam is not None and getattr(model, 'static_graph', False):
        raise ValueError('DistributedDataParallel(static_graph=True) cannot run the SAM step: its ascent is an extra '
                         'backward under no_sync(), which a static graph does not allow; wrap the model without '
                         'static_graph')
    if sam is not None and sam.is_perturbed:   # before anything: the user's w + eps is theirs to restore
        raise RuntimeError(f'{sam.name}: train_step() while the weights are perturbed (after first_step()); call '
                           f'second_step() or restore() first')
    family = sam   # the optimizer whose descent gradient the family may change (also on a plain update)
    if sam is not None:
        sam._ascent_grad = None   # GSAM, LookSAM: nothing kept from an update that raised
        sam._reuse_pending = False
        if not sam.is_sam_update():   # interval SAM: the base optimizer's plain step (LookSAM: its reuse step)
            sam._reuse_pending = sam.family == 'looksam'
            sam = None
    moment = sam is not None and not sam.needs_ascent   # Momentum-SAM: eps known before any pass
    scaler = torch_grad_scaler(loss_scaler)
    k = len(chunks)
    sizes = [batch_rows(x) for x, _ in chunks]
    # per-chunk weights of the logged means: None = equal chunks, the plain mean (sum / k, as always)
    mean_w = None if len(set(sizes)) == 1 else [n / sum(sizes) for n in sizes]
    if chunk_weights is not None and len(chunk_weights) != k:
        raise ValueError(f'chunk_weights has {len(chunk_weights)} entries for {k} chunks')
    weights = mean_w if chunk_weights is None else list(chunk_weights)   # None: loss / k
    optimizer.zero_grad(set_to_none=True)
    if sam is not None:
        sam.adopt_new_groups()   # groups added through a wrapper (Lookahead) since the last step
    others = sam.unperturbed() if sam is not None else []
    trainable = None   # P, or the part of it still requiring grad (some frozen after the optimizer was built)
    if sam is not None:
        trainable = sam.perturbed
        if not all(p.requires_grad for p in trainable):
            trainable = [p for p in trainable if p.requires_grad]
    per_pass = k if chunks_per_pass is None else chunks_per_pass
    path, reason = choose_chunk_path(model, optimizer if sam is not None and not moment else None, sizes,
                                     chunk_path, per_pass)   # a plain step chooses as a plain optimizer would
    if path == 'sequential' and chunk_path == 'batched':
        raise ValueError(f'the chunks cannot share one pass: {reason}')
    run = _batched_chunks if path == 'batched' else _sequential_chunks
    if sam is not None and sam.family == 'esam':
        if ascent_frac != 1.0 or any(not isinstance(x, Tensor) for x, _ in chunks):
            raise ValueError(f'{sam.name} selects samples by their loss at w and w + eps: it needs the whole chunk '
                             f'in the ascent (ascent_frac 1) and tensor batches (not NaFlex dicts)')
        run = _esam_chunks
    if moment:   # one eps for the whole update (the momentum does not change within it), then plain passes
        try:
            eps_norm = sam.perturb([None] * len(sam.perturbed))
            loss_sum, _, _, _ = run(model, None, chunks, loss_fn, amp_autocast, scaler, bn_update,
                                    ascent_frac, others, trainable, per_pass, weights, mean_w)
        finally:
            sam.restore()
        ascent_sum, eps_sum, skipped = None, eps_norm * k, sam.last_skipped
    else:
        loss_sum, ascent_sum, eps_sum, skipped = run(model, sam, chunks, loss_fn, amp_autocast, scaler, bn_update,
                                                     ascent_frac, others, trainable, per_pass, weights, mean_w)
    unscaled = False
    if family is not None and family.family in ('gsam', 'looksam'):   # before clipping (docs/design.md, 8)
        _all_reduce_mean(model, family._ascent_grad)
        if scaler is not None and family.family == 'gsam':   # LookSAM's formulas are free of the loss scale
            scaler.unscale_(optimizer)
            unscaled = True
        family.descent_gradient()

    if clip_parameters is None and clip_grad is not None:
        clip_parameters = [p for g in optimizer.param_groups for p in g['params']]
    if scaler is not None:
        if clip_grad is not None:
            if not unscaled:
                scaler.unscale_(optimizer)   # once per update, descent gradient only
            _clip(clip_parameters, clip_grad, clip_mode)
        scaler.step(optimizer)           # a skipped step still leaves w restored (done above)
        scaler.update()
    else:
        if clip_grad is not None:
            _clip(clip_parameters, clip_grad, clip_mode)
        optimizer.step()

    mean = (lambda v: v / k) if mean_w is None else (lambda v: v)   # weighted sums are means already
    stats = StepStats(loss=mean(loss_sum))
    if sam is not None:
        stats.ascent_loss = None if ascent_sum is None else mean(ascent_sum)
        stats.eps_norm, stats.skipped = eps_sum / k, skipped
    return stats


def _descent_loss(loss: Tensor, i: int, k: int, weights: Optional[Sequence]) -> Tensor:
    """Chunk i's contribution to the accumulated descent loss: loss / k, or loss * weights[i]."""
    return loss / k if weights is None else loss * weights[i]


def _logged(value: Tensor, i: int, mean_w: Optional[Sequence[float]]) -> Tensor:
    """Chunk i's term of a logged sum: the value (equal chunks, divided by k at the end) or its share."""
    return value if mean_w is None else value * mean_w[i]


def _sequential_chunks(model, sam, chunks, loss_fn, amp_autocast, scaler, bn_update, ascent_frac, others,
                       trainable, per_pass, weights, mean_w):
    """Each chunk its own ascent and descent pass, one after the other (module docstring, steps 1-4)."""
    k = len(chunks)
    loss_sum = ascent_sum = eps_sum = skipped = None
    for i, (x, y) in enumerate(chunks):
        last = i == k - 1
        try:   # whatever raises after the perturbation, the weights are w again (restore in finally)
            if sam is not None:
                n = ascent_samples(batch_rows(x), ascent_frac)
                with _no_sync(model, True), requires_grad_off(others):
                    with amp_autocast():
                        ascent_loss = loss_fn(model(take_rows(x, slice(0, n))), y[:n])
                    scaled = scaler.scale(ascent_loss) if scaler is not None else ascent_loss
                    check = i == 0 and sam not in _ascent_reach_checked   # first update of this optimizer only
                    if scaled.requires_grad and trainable is sam.perturbed:
                        grads = list(torch.autograd.grad(scaled, sam.perturbed, allow_unused=True,
                                                         materialize_grads=not check))
                    elif scaled.requires_grad and trainable:   # some of P frozen after the optimizer was built: eps 0
                        it = iter(torch.autograd.grad(scaled, trainable, allow_unused=True))
                        grads = [next(it) if p.requires_grad else None for p in sam.perturbed]
                    else:   # no trainable perturbed parameter reaches the loss: zero gradient, perturbation skipped
                        grads = [None] * len(sam.perturbed)
                    if check or not scaled.requires_grad or trainable is not sam.perturbed:
                        missing = [j for j, g in enumerate(grads) if g is None]
                        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(sam.perturbed, grads)]
                found_inf = unscale_grads(grads, scaler)   # fp16: true gradient for eps, overflow skips it
                eps_norm = sam.perturb(grads, found_inf, grads_writable=True,   # autograd.grad's own buffers
                                       weight=1.0 / k if weights is None else weights[i])
                ascent_sum = _acc(ascent_sum, _logged(ascent_loss.detach(), i, mean_w))
                eps_sum = eps_norm if eps_sum is None else eps_sum + eps_norm
                skipped = sam.last_skipped if skipped is None else skipped + sam.last_skipped

            with _no_sync(model, not last), frozen_bn_stats(model, sam is not None and bn_update == 'ascent'):
                with amp_autocast():
                    loss = loss_fn(model(x), y)
                descent = _descent_loss(loss, i, k, weights)
                (scaler.scale(descent) if scaler is not None else descent).backward()
        finally:
            if sam is not None:
                sam.restore()
        if sam is not None and check:
            _check_ascent_reach(sam, missing)
        loss_sum = _acc(loss_sum, _logged(loss.detach(), i, mean_w))
    return loss_sum, ascent_sum, eps_sum, skipped


def _esam_chunks(model, sam, chunks, loss_fn, amp_autocast, scaler, bn_update, ascent_frac, others,
                 trainable, per_pass, weights, mean_w):
    """ESAM (docs/design.md, section 8), each chunk in turn: the ascent over the update's SWP subset S of P
    (the other tensors' gradients not computed), per-sample losses L_i(w); eps on S; a forward at w + eps
    without gradients (running statistics untouched) for L_i(w + eps); the descent at w + eps on the gamma
    of the chunk with the largest L_i(w + eps) - L_i(w), its mean loss weighted as the chunk's."""
    k = len(chunks)
    sel = sam.draw_swp()
    subset = [p for p, s in zip(sam.perturbed, sel) if s and p.requires_grad]
    left_out = [p for p in sam.perturbed if not any(p is q for q in subset)]
    loss_sum = ascent_sum = eps_sum = skipped = None
    for i, (x, y) in enumerate(chunks):
        last = i == k - 1
        n = batch_rows(x)
        try:
            with _no_sync(model, True), requires_grad_off(list(others) + left_out):
                with amp_autocast():
                    out = model(x)
                    before = torch.stack([loss_fn(out[j:j + 1], y[j:j + 1]) for j in range(n)])
                ascent_loss = before.mean()
                scaled = scaler.scale(ascent_loss) if scaler is not None else ascent_loss
                got = {}
                if scaled.requires_grad and subset:
                    got = dict(zip(map(id, subset), torch.autograd.grad(scaled, subset, allow_unused=True)))
                grads = [got.get(id(p)) for p in sam.perturbed]
                grads = [torch.zeros_like(p) if g is None else g for p, g in zip(sam.perturbed, grads)]
            found_inf = unscale_grads(grads, scaler)
            eps_norm = sam.perturb(grads, found_inf, grads_writable=True)   # (ESAM keeps no g: no weight)
            with torch.no_grad(), frozen_bn_stats(model), amp_autocast():
                out = model(x)
                after = torch.stack([loss_fn(out[j:j + 1], y[j:j + 1]) for j in range(n)])
            idx = esam_selection(after.detach(), before.detach(), sam.esam_gamma)
            with _no_sync(model, not last), frozen_bn_stats(model, bn_update == 'ascent'):
                with amp_autocast():
                    loss = loss_fn(model(x[idx]), y[idx])
                descent = _descent_loss(loss, i, k, weights)
                (scaler.scale(descent) if scaler is not None else descent).backward()
        finally:
            sam.restore()
        ascent_sum = _acc(ascent_sum, _logged(ascent_loss.detach(), i, mean_w))
        eps_sum = _acc(eps_sum, eps_norm)
        skipped = _acc(skipped, sam.last_skipped)
        loss_sum = _acc(loss_sum, _logged(loss.detach(), i, mean_w))
    return loss_sum, ascent_sum, eps_sum, skipped


def _batched_chunks(model, sam, chunks, loss_fn, amp_autocast, scaler, bn_update, ascent_frac, others,
                    trainable, per_pass, weights, mean_w):
    """The same update, ``per_pass`` chunks at a time in one ascent and one descent pass.

    Chunk c's ascent gradient is the gradient w.r.t. row c of a zero addend ``E_p`` of shape
    ``(k, *p.shape)`` to every p in P (``sam_on_timm.batched``); its eps is ``SAM.perturbation`` of that
    row alone, the method the sequential path's ``perturb`` calls (mask and counters included); the
    descent runs with ``p + eps_c`` for chunk c and backpropagates ``sum_c L_c / K`` (K chunks in the
    update; ``sum_c w_c L_c`` with chunk weights). P itself is never written. NaFlex dict chunks are
    interleaved key by key (``interleave``).
    """
    k_all = len(chunks)
    loss_sum = ascent_sum = eps_sum = skipped = None
    for start in range(0, k_all, per_pass):
        group = chunks[start:start + per_pass]
        k, m = len(group), batch_rows(group[0][0])
        last = start + k == k_all
        x, ys = interleave([c[0] for c in group]), [c[1] for c in group]
        records, addends, check = [], {}, False
        if sam is not None:
            n = ascent_samples(m, ascent_frac)
            check = start == 0 and sam not in _ascent_reach_checked   # first update of this optimizer only
            leaves = {p: torch.zeros((k,) + p.shape, dtype=p.dtype, device=p.device, requires_grad=True)
                      for p in (trainable or ())}
            record = {}
            with _no_sync(model, True), requires_grad_off(others), \
                    ghost_norms(model, k, n * k, leaves, detach=True, record=record):
                with amp_autocast():
                    out = model(take_rows(x, slice(0, n * k)))   # interleaved: the first n samples of every chunk
                    ascent_losses = [loss_fn(chunk_rows(out, k, c), y[:n]) for c, y in enumerate(ys)]
                total = torch.stack(ascent_losses).sum()
                scaled = scaler.scale(total) if scaler is not None else total
                rows = {}
                if scaled.requires_grad and leaves:
                    rows = dict(zip(leaves, torch.autograd.grad(scaled, list(leaves.values()), allow_unused=True,
                                                                materialize_grads=not check)))
            records.append(record)
            missing = [j for j, p in enumerate(sam.perturbed) if rows.get(p) is None]
            eps_rows = [torch.empty((k,) + p.shape, dtype=p.dtype, device=p.device) for p in sam.perturbed]
            with torch.no_grad():
                for c in range(k):
                    grads = [torch.zeros_like(p) if rows.get(p) is None else rows[p][c] for p in sam.perturbed]
                    found_inf = unscale_grads(grads, scaler)   # fp16: true gradient for eps, overflow skips it
                    # the optimizer's one eps (mask, counters); on CUDA a view of its flat buffer: copied out
                    eps, eps_norm, skip = sam.perturbation(
                        grads, found_inf, grads_writable=True,
                        weight=1.0 / k_all if weights is None else weights[start + c])
                    torch._foreach_copy_([e[c] for e in eps_rows], list(eps))
                    ascent_sum = _acc(ascent_sum, _logged(ascent_losses[c].detach(), start + c, mean_w))
                    eps_sum, skipped = _acc(eps_sum, eps_norm), _acc(skipped, skip)
            addends = dict(zip(sam.perturbed, eps_rows))

        record = {}
        with _no_sync(model, not last), frozen_bn_stats(model, sam is not None and bn_update == 'ascent'), \
                ghost_norms(model, k, m * k, addends, record=record):
            with amp_autocast():
                out = model(x)
                losses = [loss_fn(chunk_rows(out, k, c), y) for c, y in enumerate(ys)]
            descent = torch.stack([_descent_loss(loss, start + c, k_all, weights)
                                   for c, loss in enumerate(losses)]).sum()
            (scaler.scale(descent) if scaler is not None else descent).backward()
        records.append(record)
        apply_running_stats(records, k)   # ascent then descent of chunk 0, then of chunk 1, ...
        if check:
            _check_ascent_reach(sam, missing)
        for c, loss in enumerate(losses):
            loss_sum = _acc(loss_sum, _logged(loss.detach(), start + c, mean_w))
    return loss_sum, ascent_sum, eps_sum, skipped


def _all_reduce_mean(model: nn.Module, tensors: Optional[List[Tensor]]) -> None:
    """GSAM under DDP: the kept gradient at w averaged over the ranks, as the descent gradient is, so that every
    rank computes the same descent gradient (one all-reduce of P's size besides the descent's)."""
    import torch.distributed as dist
    if not tensors or not hasattr(model, 'no_sync') or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        parts = flat.split([t.numel() for t in tensors])
        torch._foreach_copy_(tensors, [f.view_as(t) for f, t in zip(parts, tensors)])


def _acc(total: Optional[Tensor], value: Tensor) -> Tensor:
    return value if total is None else total + value


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
