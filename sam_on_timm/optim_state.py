"""Loading an optimizer state safely: one saved by another kind of optimizer is refused.

A leaf module: the SAM optimizer (``sam.py``) and the checkpoint tools (``checkpoint.py``) both use it,
and the optimizer does not import the checkpoint module.
"""
import copy
from typing import Any, Dict

import torch

__all__ = ['load_optimizer_state']


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Dict[str, Any], load=None) -> None:
    """``optimizer.load_state_dict(state_dict)`` (or ``load(state_dict)``), refused when the state was saved
    by an optimizer of another kind: ValueError, and the optimizer keeps its state.

    torch checks only the number of groups and parameters, then replaces each group's settings with
    the saved ones: an AdamW state loaded into momentum SGD loses ``momentum`` and fails with a
    KeyError at the first step (and the other way round ``betas``). A setting this optimizer has
    that the loaded groups lack (after the optimizer's own fill-in of settings newer than the file)
    marks another kind.
    """
    load = optimizer.load_state_dict if load is None else load
    before = [set(group) for group in optimizer.param_groups]
    kept = copy.deepcopy(optimizer.state_dict())
    failed = None
    try:
        load(state_dict)
        after = optimizer.param_groups
    except (KeyError, TypeError) as e:   # the optimizer's own fill-in met state of another kind (Adam: no 'step')
        failed, after = e, state_dict.get('param_groups', [])
    lost = sorted(set().union(*(b - set(g) for b, g in zip(before, after))))
    if failed is not None or lost:
        load(kept)
    if failed is not None and not lost:
        raise failed
    if lost:
        raise ValueError(f"the optimizer state was saved by another kind of optimizer than this "
                         f"{type(optimizer).__name__} (its parameter groups lack {', '.join(lost)}); "
                         f"load the weights without it (train.py: --no-resume-opt)")
