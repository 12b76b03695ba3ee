"""timm-format checkpoints that also carry the RNG states, so a resumed run is the same run.

The file is what timm's ``CheckpointSaver`` writes (``state_dict``, ``optimizer``, ``epoch``,
``arch``, ``amp_scaler``, ``state_dict_ema``, ``metric``, ``version``, and a distillation task's
``task_state``: feature distillation's projection) plus ``rng_states`` (one per
rank; ``rng_state`` is rank 0's) and, for a plateau schedule, ``lr_scheduler`` (what it has learnt);
``args`` is stored as a plain dict so that ``torch.load(weights_only=True)`` reads the whole file.
"""
import argparse
import contextlib
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from .optim_state import load_optimizer_state  # noqa: F401  (exported here too, beside the other loaders)
from timm.utils import CheckpointSaver, get_state_dict

__all__ = ['RngCheckpointSaver', 'get_rng_state', 'set_rng_state', 'plain_args', 'plateau_state', 'resume_plateau',
           'Resumed', 'load_resume', 'resume_rng', 'resume_saver', 'read_checkpoint', 'load_optimizer_state',
           'state_dict_mismatch', 'check_rng_state', 'check_resume_contents', 'missing_for_resume']


def plain_args(args) -> Dict[str, Any]:
    """The run's arguments that are plain values (what a weights_only load and YAML can hold)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


def get_rng_state() -> Dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'python': _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    random.setstate(_to_tuples(state['python']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


PLATEAU_PROGRESS = ('best', 'num_bad_epochs', 'cooldown_counter', 'last_epoch')


def plateau_state(lr_scheduler) -> Optional[Dict[str, Any]]:
    """What a plateau schedule has learnt (best metric, epochs without improvement, cooldown, the lr
    under the noise), None for other schedules (a function of the epoch: re-stepping restores them).
    timm's own ``state_dict`` keeps the best metric only: a resume would restart the patience count."""
    from timm.scheduler import PlateauLRScheduler
    if not isinstance(lr_scheduler, PlateauLRScheduler):
        return None
    plateau = lr_scheduler.lr_scheduler
    return {'reduce_on_plateau': {'mode': plateau.mode, **{k: getattr(plateau, k) for k in PLATEAU_PROGRESS}},
            'restore_lr': lr_scheduler.restore_lr}


def resume_plateau(lr_scheduler, epoch: int, lrs: Optional[List[float]], state: Optional[Dict[str, Any]]) -> None:
    """Continue a plateau schedule at ``epoch`` from a checkpoint whose optimizer held ``lrs``.

    Building the schedule set the lr to the warmup start (timm's factory runs after the resume): past
    the warmup the lrs the plateau had reached are put back, and its progress where the file has it.
    Its settings (patience, factor, min lr, threshold) are this run's; a best metric of the other
    direction (the metric changed) is dropped. ``lrs`` None (the optimizer was not resumed): the
    schedule starts afresh at its base lr, as it would after the warmup.
    """
    from timm.scheduler import PlateauLRScheduler
    if not isinstance(lr_scheduler, PlateauLRScheduler):
        return
    if lrs is None:
        lrs, state = list(lr_scheduler.base_values), None
    if epoch > lr_scheduler.warmup_t:   # (in the warmup, re-stepping has set the lr already)
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group['lr'] = lr
        # the lr under the noise: the file's, never the warmup lr that re-stepping may have noted
        lr_scheduler.restore_lr = None if state is None else state['restore_lr']
    if state is not None:
        plateau, saved = lr_scheduler.lr_scheduler, state['reduce_on_plateau']
        same_direction = saved.get('mode') == plateau.mode
        for key in PLATEAU_PROGRESS:
            if key in saved and (same_direction or key in ('cooldown_counter', 'last_epoch')):
                setattr(plateau, key, saved[key])


def state_dict_mismatch(model: torch.nn.Module, state_dict: Mapping[str, Any], shown: int = 3) -> Optional[str]:
    """Why ``state_dict`` does not fit ``model`` (the first missing, unexpected and reshaped keys), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    reshaped = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in own
                if k in state_dict and hasattr(state_dict[k], 'shape') and state_dict[k].shape != own[k].shape]
    parts = []
    for what, keys in (('missing keys', missing), ('unexpected keys', unexpected), ('other shapes', reshaped)):
        if keys:
            more = f' (+{len(keys) - shown} more)' if len(keys) > shown else ''
            parts.append(f"{what} {', '.join(keys[:shown])}{more}")
        if len(parts) == 2:
            break
    return '; '.join(parts) or None


class RngCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver (history, best, last) writing the RNG states too.

    ``rng_states``: one ``get_rng_state()`` per rank (set by the training loop before each save,
    gathered from all ranks); ``rng_state`` in the file is rank 0's, ``rng_states`` all of them.
    ``scheduler_state``: ``plateau_state(lr_scheduler)``, set by the loop too.

    A write that fails (a full disk) leaves no partial file: ``last`` and the kept checkpoints stay
    as they were, the half-written file is removed, and the OSError names the epoch. A metric that
    is not finite is refused (ValueError): timm ranks with ``<`` / ``>``, which NaN would win.
    """
    rng_states = None
    scheduler_state = None
    task_state = None   # a callable: a distillation task's own state (feature projection), saved as timm does

    def _save(self, save_path, epoch, metric=None):
        rng_states = self.rng_states or [get_rng_state()]
        state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # epoch is the last completed epoch
            'rng_state': rng_states[0],
            'rng_states': rng_states,
        }
        if hasattr(self, 'state_dict'):  # history bookkeeping, in recent timm versions
            state['saver'] = self.state_dict(epoch, metric)
        if self.args is not None:
            state['args'] = plain_args(self.args)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if metric is not None:
            state['metric'] = metric
        if self.scheduler_state is not None:
            state['lr_scheduler'] = self.scheduler_state
        task_state = self.task_state() if self.task_state is not None else None
        if task_state:
            state['task_state'] = task_state
        try:
            torch.save(state, save_path)
        except BaseException:   # a full disk, Ctrl-C: no partial tmp file
            _remove(save_path)
            raise

    def save_checkpoint(self, epoch, metric=None):
        if metric is not None and not math.isfinite(metric):
            raise ValueError(f'epoch {epoch}: the metric is {metric}, not finite: not saved (it would rank as best)')
        try:
            return super().save_checkpoint(epoch, metric)
        except OSError as e:
            raise OSError(e.errno, f"cannot write the checkpoint of epoch {epoch} into '{self.checkpoint_dir}' "
                                   f"({e.strerror or e}); the checkpoints already there are intact") from None

    def _duplicate(self, src, dst):
        """``dst`` becomes a copy of ``src`` (a hard link where possible) under a temporary name, then
        replaces ``dst`` in one step: a failed copy leaves ``dst`` as it was (timm removes it first)."""
        part = dst + '.part'
        _remove(part)
        try:
            if self.can_hardlink:
                try:
                    os.link(src, part)
                except (OSError, NotImplementedError):
                    self.can_hardlink = False
            if not self.can_hardlink:
                shutil.copy2(src, part)
            os.replace(part, dst)
        except BaseException:
            _remove(part)
            raise




@dataclass
class Resumed:
    """What ``load_resume`` took from a checkpoint besides the weights and optimizer it loaded."""
    checkpoint: Optional[Dict[str, Any]] = None   # the file (None: weights only); EMA weights cleaned
    epoch: Optional[int] = None                   # the first epoch to train (None: the file has no epoch)
    lrs: Optional[List[float]] = field(default=None)   # the resumed optimizer's lrs (None: not resumed)
    afresh: List[str] = field(default_factory=list)    # what the file lacked and starts afresh (partial=True)


def check_rng_state(state: Any) -> None:
    """``state`` is one rank's ``get_rng_state()`` that ``set_rng_state`` takes (tried, then this process's
    streams are put back); else ValueError. A crafted or damaged state fails here, not after the run
    has written its folder."""
    saved = get_rng_state()
    try:
        set_rng_state(state)
    except Exception as e:   # a wrong type, size or key: whatever the setters raise
        raise ValueError(f'malformed ({_first_line(e)})') from None
    finally:
        set_rng_state(saved)


def check_resume_contents(checkpoint: Mapping[str, Any], model: Optional[torch.nn.Module] = None) -> None:
    """What a resume takes from ``checkpoint`` besides the weights is well-formed (ValueError otherwise):
    ``epoch`` an integer >= 0 (the last completed epoch), every RNG state one ``set_rng_state`` takes,
    ``state_dict_ema`` (when present) a non-empty state dict that fits ``model``."""
    from timm.models import clean_state_dict
    if 'epoch' in checkpoint:
        epoch = checkpoint['epoch']
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f'its epoch is {epoch!r}, not a completed epoch (an integer >= 0)')
    states = checkpoint.get('rng_states')
    if states is not None and not isinstance(states, (list, tuple)):
        raise ValueError(f'its RNG states (rng_states) are a {type(states).__name__}, not one state per rank')
    for rank, state in enumerate(states or []):
        try:
            check_rng_state(state)
        except ValueError as e:
            raise ValueError(f'the RNG state of rank {rank} (rng_states) is {e}') from None
    if checkpoint.get('rng_state') is not None:
        try:
            check_rng_state(checkpoint['rng_state'])
        except ValueError as e:
            raise ValueError(f'its RNG state (rng_state) is {e}') from None
    if 'state_dict_ema' in checkpoint:
        ema = checkpoint['state_dict_ema']
        if not isinstance(ema, Mapping):
            raise ValueError(f'its EMA weights (state_dict_ema) are a {type(ema).__name__}, not a state dict')
        if not ema:
            raise ValueError("its EMA weights (state_dict_ema) are empty, not the model's state dict")
        mismatch = state_dict_mismatch(model, clean_state_dict(ema)) if model is not None else None
        if mismatch:
            raise ValueError(f'its EMA weights (state_dict_ema) do not fit the model: {mismatch}')


def missing_for_resume(checkpoint: Mapping[str, Any], optimizer: bool = False, scaler_key: Optional[str] = None,
                       ema: bool = False) -> List[str]:
    """The states an exact continuation needs that ``checkpoint`` lacks: the optimizer's (``optimizer``:
    it is resumed), the loss scaler's (``scaler_key``: the key of a resumed fp16 scaler), the EMA weights
    (``ema``: the run keeps an EMA), the RNG states (always: the data order and augmentations)."""
    missing = []
    if optimizer and checkpoint.get('optimizer') is None:
        missing.append('the optimizer state')
    if scaler_key is not None and checkpoint.get(scaler_key) is None:
        missing.append(f'the loss scaler state ({scaler_key})')
    if ema and 'state_dict_ema' not in checkpoint:
        missing.append('the EMA weights (state_dict_ema)')
    if not checkpoint.get('rng_states') and checkpoint.get('rng_state') is None:
        missing.append('the RNG states')
    return missing


def load_resume(path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                loss_scaler=None, opt_name: str = '', ema: bool = False, partial: bool = False) -> Resumed:
    """Load a checkpoint to resume from into ``model``, ``optimizer`` (None: a fresh optimizer) and
    ``loss_scaler``.

    Also reads checkpoints of timm's own train.py (``args`` as a Namespace, DDP's ``module.`` prefix)
    and bare weights (training starts at epoch 0, as timm's ``resume_checkpoint``). Raises on a file
    that is not a checkpoint of this model; an optimizer state of another layout is a ValueError that
    names ``--no-resume-opt``. Before anything is loaded, the file's epoch, RNG and EMA states are
    checked (``check_resume_contents``), and a checkpoint that lacks a state the run needs
    (``missing_for_resume``; ``ema``: the run keeps an EMA) is a ValueError naming the way out:
    ``--no-resume-opt`` for the optimizer, ``partial`` (``--resume-partial``) for the others, which are then
    listed in ``Resumed.afresh``.
    """
    from timm.models import clean_state_dict
    checkpoint = read_checkpoint(path)
    if 'state_dict' not in checkpoint:   # weights only, as timm's resume_checkpoint: from epoch 0
        _load_weights(model, clean_state_dict(checkpoint))
        return Resumed()
    weights = clean_state_dict(checkpoint['state_dict'])
    _check_weights(model, weights, checkpoint.get('arch'))   # first: a file of another model is refused as such
    check_resume_contents(checkpoint, model)
    scaler_key = loss_scaler.state_dict_key if loss_scaler is not None and optimizer is not None else None
    missing = missing_for_resume(checkpoint, optimizer is not None, scaler_key, ema)
    blocking = [m for m in missing if m == 'the optimizer state' or not partial]
    if blocking:
        ways = []
        if 'the optimizer state' in blocking:
            ways.append('--no-resume-opt resumes with a fresh optimizer')
        others = [m for m in blocking if m != 'the optimizer state']
        if others:
            ways.append(f"--resume-partial starts {' and '.join(others)} afresh")
        raise ValueError(f"it lacks {' and '.join(blocking)}, which an exact continuation needs: "
                         f"{'; '.join(ways)}")
    resumed = Resumed(checkpoint=checkpoint, afresh=missing)
    _load_weights(model, weights, checkpoint.get('arch'))
    if optimizer is not None and 'optimizer' in checkpoint:
        try:   # refused when saved by another kind of optimizer
            load_optimizer_state(optimizer, checkpoint['optimizer'])
        except (ValueError, KeyError) as e:
            raise ValueError(f'its optimizer state does not fit --opt {opt_name} ({_first_line(e)}); '
                             f'--no-resume-opt resumes weights and epoch with a fresh optimizer') from None
        resumed.lrs = [group['lr'] for group in optimizer.param_groups]
        if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
            loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    if 'state_dict_ema' in checkpoint:
        checkpoint['state_dict_ema'] = clean_state_dict(checkpoint['state_dict_ema'])
    resumed.epoch = checkpoint['epoch'] + 1 if 'epoch' in checkpoint else None
    return resumed


def resume_rng(checkpoint: Dict[str, Any], rank: int, world_size: int) -> Optional[str]:
    """Continue this rank's random streams exactly where the checkpoint left them.

    Returns None when done, else what the file holds instead (another number of ranks, or no RNG
    states): the caller reseeds, and the data order differs from an uninterrupted run.
    """
    states = checkpoint.get('rng_states') or [checkpoint.get('rng_state')]
    if len(states) == world_size and all(s is not None for s in states):
        set_rng_state(states[rank])
        return None
    return f'RNG states of {len(states)} rank(s)' if all(s is not None for s in states) else 'no RNG states'


def resume_saver(saver: CheckpointSaver, checkpoint: Optional[Dict[str, Any]], path: str, output_dir: str) -> None:
    """The saver's history (best and recent checkpoints) from a checkpoint of the same run folder."""
    if checkpoint is not None and 'saver' in checkpoint and hasattr(saver, 'load_state_dict') and \
            os.path.abspath(os.path.dirname(path)) == os.path.abspath(output_dir):
        saver.load_state_dict(checkpoint['saver'])


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict a checkpoint file holds (timm's ``args`` Namespace allowed; weights-only load), or a
    ValueError that says what the file is instead."""
    import pickle
    import zipfile
    with open(path, 'rb') as f:
        legacy = f.read(1) == b'\x80'   # a pickle (protocol 2+): torch.save's format before 1.6
    if not legacy and not zipfile.is_zipfile(path):
        raise ValueError("not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e):
            raise ValueError('the file holds Python objects other than tensors and plain values, which a safe '
                             '(weights-only) load refuses') from None
        raise ValueError('not a PyTorch checkpoint (torch.load cannot read it)') from None
    except (RuntimeError, KeyError, EOFError) as e:   # a truncated or foreign file
        raise ValueError(f'not a PyTorch checkpoint (torch.load cannot read it: {type(e).__name__})') from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f'the file holds a {type(checkpoint).__name__}, not a checkpoint (a dict of weights)')
    return checkpoint


def _check_weights(model: torch.nn.Module, state_dict: Mapping[str, Any], arch: Optional[str] = None) -> None:
    """The weights of another model: ValueError naming its first mismatched keys."""
    mismatch = state_dict_mismatch(model, state_dict)
    if mismatch:
        raise ValueError(f"the weights are of another model{f' ({arch!r})' if arch else ''}: {mismatch}")


def _load_weights(model: torch.nn.Module, state_dict: Mapping[str, Any], arch: Optional[str] = None) -> None:
    """Strict load; the weights of another model name its first mismatched keys."""
    _check_weights(model, state_dict, arch)
    model.load_state_dict(state_dict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
