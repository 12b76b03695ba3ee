"""The SAM family beside SAM-ON: what each method changes in the one SAM update (docs/design.md, section 8).

- ``msam`` (Becker et al. 2024, "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead"):
  eps = -rho m / ||m||_P from the base optimizer's momentum buffer m (SGD ``momentum_buffer``, Adam-style
  ``exp_avg``), no ascent pass. Before the first base step there is no buffer: eps = 0 (a plain step), as in
  the authors' code, whose buffer starts at zero.
- ``gsam`` (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"): the descent
  gradient is g_p - alpha g_orth, g_orth = g - (g . g_p / ||g_p||^2) g_p the part of the gradient at w
  orthogonal to the gradient g_p at w + eps (over P), and rho_t follows the learning rate:
  rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min), clamped to [rho_min, rho].
- ``looksam`` (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization"): on
  the SAM updates (every ``interval`` K) a full SAM step that also keeps g_v = g_s - (g . g_s / ||g||^2) g,
  the part of the SAM gradient g_s orthogonal to g (over P); on the others one pass and
  g_s = g + alpha (||g|| / ||g_v||) g_v (over P) instead of the plain step.
- ``esam`` (Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for Improved Training of Neural
  Networks"): stochastic weight perturbation (each update a random subset of P's tensors, each kept with
  probability beta; eps = (rho / beta) g_S / ||g_S|| on the subset S, 0 elsewhere; the ascent computes only
  S's gradients) and sharpness-sensitive data selection (the descent at w + eps uses the top gamma
  fraction of the chunk by L_i(w + eps) - L_i(w)). Needs ``train_step`` (per-sample losses).
- interval SAM (any SAM name, ``interval`` K > 1; MosaicML Composer's ``SAMOptimizer(interval=K)``): the
  SAM update on updates 0, K, 2K, ... of the optimizer's own counter, the base optimizer's plain step on
  the others. The counter is part of the optimizer state, so a resumed run keeps the same phase.
"""
import inspect
import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .checks import check_number

__all__ = ['FAMILIES', 'MOMENTUM_KEYS', 'check_family_args', 'momentum_buffers', 'gsam_rho', 'gsam_descent',
           'looksam_direction', 'looksam_reuse', 'esam_selection']

# family -> what it is (the registry's descriptions)
FAMILIES: Dict[str, str] = {
    'sam': 'SAM',
    'msam': 'Momentum-SAM: eps = -rho m / ||m|| from the base optimizer\'s momentum, no ascent pass',
    'gsam': 'GSAM: descent gradient g_p - alpha g_orth, rho following the lr from rho to rho_min',
    'looksam': 'LookSAM: every interval-th update SAM keeping g_v, between g + alpha ||g|| / ||g_v|| g_v',
    'esam': 'ESAM: a random beta of P perturbed by rho / beta, the descent on the gamma of the samples whose loss '
            'rose most',
}

# the state keys under which timm / torch base optimizers keep their first moment
MOMENTUM_KEYS = ('momentum_buffer', 'exp_avg')


def check_family_args(family: str, interval=1, gsam_alpha=None, rho_min=None, rho=None,
                      names: Optional[Dict[str, str]] = None, what: Optional[str] = None,
                      looksam_alpha=None, esam_beta=None, esam_gamma=None) -> None:
    """The family's own arguments: ``interval`` a positive integer; ``gsam_alpha`` (>= 0) and ``rho_min``
    (in [0, rho]) only for GSAM, ``looksam_alpha`` (>= 0) only for LookSAM (elsewhere they would do nothing:
    refused). ValueError, one line; ``names``: how the caller calls them (train.py: its flags), ``what``: how
    it calls the optimizer."""
    names = names or {}
    what = what or f"'{family}'"
    if family not in FAMILIES:
        raise ValueError(f"unknown SAM family '{family}'; valid: {', '.join(FAMILIES)}")
    n_int = names.get('interval', 'interval')
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
        raise ValueError(f'{n_int} must be a positive integer (1: SAM on every update), got {interval}')
    for key, value, owner in (('gsam_alpha', gsam_alpha, 'gsam'), ('rho_min', rho_min, 'gsam'),
                              ('looksam_alpha', looksam_alpha, 'looksam'), ('esam_beta', esam_beta, 'esam'),
                              ('esam_gamma', esam_gamma, 'esam')):
        if value is not None and family != owner:
            raise ValueError(f"{names.get(key, key)} {value} has no effect with {what}: it is an option of "
                             f"{owner}, {owner}-on, {owner}-nonorm")
    if looksam_alpha is not None:
        check_number(looksam_alpha, names.get('looksam_alpha', 'looksam_alpha'), 0)
    for key, value in (('esam_beta', esam_beta), ('esam_gamma', esam_gamma)):
        if value is not None:   # a fraction: 0 would perturb (or descend on) nothing
            check_number(value, names.get(key, key), 0, 1, True, False)
    if gsam_alpha is not None:
        check_number(gsam_alpha, names.get('gsam_alpha', 'gsam_alpha'), 0)
    if rho_min is not None:
        high = rho if isinstance(rho, numbers.Real) and math.isfinite(rho) else None
        check_number(rho_min, names.get('rho_min', 'rho_min'), 0, high)


def momentum_buffers(state: Dict, params: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """The first-moment buffer of each tensor of ``params`` in a base optimizer's ``state`` (None: none yet)."""
    out = []
    for p in params:
        s = state.get(p, {})
        out.append(next((s[k] for k in MOMENTUM_KEYS if isinstance(s.get(k), Tensor)), None))
    return out


def keeps_momentum_buffer(optimizer: torch.optim.Optimizer) -> Optional[bool]:
    """Whether an optimizer of ``optimizer``'s class and settings keeps a first moment under one of
    ``MOMENTUM_KEYS`` (Momentum-SAM's direction), known before any real step: one step of a scratch copy
    on a two-element tensor (on the device of its parameters) tells. None where such a copy cannot be
    built or stepped (a wrapper taking another optimizer, a step that needs a closure)."""
    first = next((p for g in optimizer.param_groups for p in g['params']), None)
    scratch = torch.zeros(2, requires_grad=True, device=None if first is None else first.device)
    try:
        takes = inspect.signature(type(optimizer)).parameters
        open_kw = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in takes.values())
        kw = {k: v for k, v in optimizer.defaults.items() if open_kw or k in takes}   # AdamW: no decoupled_...
        probe = type(optimizer)([scratch], **kw)
        scratch.grad = torch.ones_like(scratch)
        probe.step()
    except Exception:   # noqa: BLE001  (any constructor or step that needs more than its defaults: unknown)
        return None
    return momentum_buffers(probe.state, [scratch])[0] is not None


def gsam_rho(rho_max: float, rho_min: float, lr: float, lr_max: float, lr_min: float) -> float:
    """rho_t = rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min), within [rho_min, rho_max]
    (a warmup below lr_min, or an lr above lr_max, does not leave the range). lr_max == lr_min: rho_max."""
    if lr_max <= lr_min:
        return rho_max
    t = (lr - lr_min) / (lr_max - lr_min)
    return rho_min + (rho_max - rho_min) * min(1.0, max(0.0, t))


@torch.no_grad()
def gsam_descent(descent: List[Tensor], ascent: List[Tensor], alpha: float) -> None:
    """descent <- g_p - alpha (g - (g . g_p / ||g_p||^2) g_p) in place, g = ``ascent``, g_p = ``descent``
    (lists over P). A non-finite g (an fp16 overflow in the ascent) or a zero g_p leaves g_p as it is."""
    dot = torch.stack([(a.double() * d.double()).sum() for a, d in zip(ascent, descent)]).sum()
    gp2 = torch.stack([(d.double() * d.double()).sum() for d in descent]).sum()
    ok = torch.isfinite(dot) & torch.isfinite(gp2) & (gp2 > 0)
    coef = torch.where(ok, dot / torch.where(ok, gp2, 1.0), 0.0)
    a_scale = torch.where(ok, torch.full_like(dot, -alpha), 0.0)
    for d, a in zip(descent, ascent):
        # g_p (1 + alpha coef) - alpha g
        d.mul_((1.0 + alpha * coef).to(d.dtype))
        d.add_(torch.where(ok, a, torch.zeros((), dtype=a.dtype, device=a.device)) * a_scale.to(a.dtype))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


@torch.no_grad()
def looksam_direction(sam_grad: List[Tensor], ascent: List[Tensor]) -> Optional[List[Tensor]]:
    """g_v = g_s - (g . g_s / ||g||^2) g over P (new tensors), g_s = ``sam_grad``, g = ``ascent``; None when it
    is not finite or g is zero (an overflowed pass, a skipped perturbation): the kept g_v stays as it was.
    g_s may carry a loss scale: only g_v's direction is used."""
    dot, g2 = _dot(ascent, sam_grad), _dot(ascent, ascent)
    if not (bool(torch.isfinite(dot)) and bool(torch.isfinite(g2)) and g2.item() > 0):
        return None
    coef = dot / g2
    out = [s.detach().clone() for s in sam_grad]
    for o, a in zip(out, ascent):
        o.sub_(a * coef.to(a.dtype))
    return out if bool(torch.isfinite(_dot(out, out))) else None


@torch.no_grad()
def looksam_reuse(grads: List[Tensor], g_v: List[Tensor], alpha: float) -> None:
    """grads <- g + alpha (||g|| / ||g_v||) g_v in place, over P (``grads`` = g). A zero g_v changes nothing.
    Scale-free in g: a loss-scaled g gets a correction scaled alike."""
    gv2 = _dot(g_v, g_v)
    ratio = torch.where(gv2 > 0, torch.sqrt(_dot(grads, grads)) / torch.sqrt(torch.where(gv2 > 0, gv2, 1.0)), 0.0)
    scale = alpha * ratio
    for g, v in zip(grads, g_v):
        g.add_(v.to(g.dtype) * scale.to(g.dtype))


def esam_selection(after: Tensor, before: Tensor, gamma: float) -> Tensor:
    """ESAM's sharpness-sensitive data selection: the indices (ascending) of the max(1, round(gamma n))
    samples whose loss rose most from w to w + eps (``after - before``, per sample)."""
    n = after.shape[0]
    keep = max(1, int(round(gamma * n)))
    if keep >= n:
        return torch.arange(n, device=after.device)
    return torch.topk((after - before).float(), keep).indices.sort().values
