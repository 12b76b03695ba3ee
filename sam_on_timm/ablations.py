"""The paper's ablations as model / schedule switches: frozen norms, only-trained norms, SAM by epoch.

- ``fix_norm``: every normalization layer's gamma = 1 and beta = 0, frozen (paper Appendix B.4).
- ``train_only_norm``: every parameter outside the normalization layers frozen (Appendix B.5, after
  Frankle et al., "Training BatchNorm and only BatchNorm"); the classifier head is frozen too.
- ``parse_epoch_window`` / ``in_window``: SAM only in epochs [START, END) (Section 5.4, Figure 5);
  the base optimizer's plain step, on the same base state, elsewhere.

Both model switches select the normalization layers by module type, exactly as SAM-ON does
(``norm_params``), and must run before the optimizer is built: frozen parameters are left out of
timm's parameter groups, so they get neither updates nor weight decay.
"""
import math
from typing import List, Tuple

import torch
from torch import nn

from .norms import is_norm_module, named_norm_parameters

__all__ = ['fix_norm', 'train_only_norm', 'parse_epoch_window', 'check_window_in_run', 'in_window']


def _norm_params_or_raise(model: nn.Module, what: str) -> List[Tuple[str, nn.Parameter]]:
    named = named_norm_parameters(model)
    if not named:
        raise ValueError(f'{what}: the model has no normalization layers with affine parameters (BatchNorm, '
                         f'LayerNorm, GroupNorm, RMSNorm, EvoNorm, ...); use a model with norm layers')
    return named


@torch.no_grad()
def fix_norm(model: nn.Module) -> int:
    """Set every norm layer's ``weight`` (gamma) to 1 and ``bias`` (beta) to 0 and freeze them.

    A norm layer with another kind of direct parameter (EvoNorm's ``v``) has no "identity" value
    here and is refused. Returns the number of frozen elements.
    """
    named = _norm_params_or_raise(model, '--fix-norm')
    n = 0
    for mod_name, module in model.named_modules():
        if not is_norm_module(module):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p_name not in ('weight', 'bias'):
                raise ValueError(f"--fix-norm: '{mod_name}.{p_name}' of {type(module).__name__} is neither a norm "
                                 f"weight (set to 1) nor a bias (set to 0); use a model with BatchNorm / LayerNorm / "
                                 f"GroupNorm layers")
    for name, p in named:
        p.fill_(1.0 if name.rsplit('.', 1)[-1] == 'weight' else 0.0)
        p.requires_grad_(False)
        n += p.numel()
    return n


def train_only_norm(model: nn.Module) -> int:
    """Freeze every parameter that is not an affine parameter of a norm layer. Returns the number of
    trainable elements left."""
    keep = {p for _, p in _norm_params_or_raise(model, '--train-only-norm')}
    for p in model.parameters():
        if p not in keep:
            p.requires_grad_(False)
    return sum(p.numel() for p in keep if p.requires_grad)


def parse_epoch_window(text: str) -> Tuple[int, float]:
    """``'START:END'`` -> (START, END) with 0 <= START < END; an empty START is 0, an empty END is
    the end of training (``math.inf``)."""
    parts = str(text).split(':')
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0].strip() else 0
        end = int(parts[1]) if parts[1].strip() else math.inf
    except ValueError:
        raise ValueError(f"--sam-epochs '{text}': expected START:END in epochs (e.g. 0:100, 100:, 50:150)") from None
    if start < 0 or not end > start:
        raise ValueError(f"--sam-epochs '{text}': need 0 <= START < END, got START {start}, END {end}")
    return start, end


def check_window_in_run(window: Tuple[int, float], num_epochs: int, text: str) -> None:
    """A window that starts at or after the run's last epoch (``num_epochs``: the schedule's length, cooldown
    included) would never switch SAM on: ValueError, rather than a run of the base optimizer that was asked
    to be SAM. A window that ends past the run is fine (it ends with the run)."""
    if window[0] >= num_epochs:
        raise ValueError(f"--sam-epochs '{text}' starts at epoch {window[0]}, but the run trains epochs 0 to "
                         f"{num_epochs - 1} (--epochs and the schedule): SAM would never run; start the window "
                         f"before epoch {num_epochs}")


def in_window(epoch: int, window: Tuple[int, float]) -> bool:
    """Whether ``epoch`` lies in [START, END)."""
    return window[0] <= epoch < window[1]
