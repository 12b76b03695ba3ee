"""Argument checks shared by the library and train.py: each rule is written here once.

Every check raises ``ValueError`` with one line that names the argument, what it must be, and the
value given. ``name`` is how the caller calls the argument (``'rho'`` in the Python API, ``'--rho'``
in train.py, which reports the message as its own one-line error).

Numbers must be finite: ``nan`` and ``inf`` pass comparisons such as ``rho > 0`` (or fail them
silently), and ``eta = inf`` would make every perturbation zero, so that SAM quietly becomes its
base optimizer.
"""
import math
import numbers
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ['RANGES', 'check_number', 'check_arg', 'check_sam_m', 'check_optimizer_args']

# argument -> (low, high, low excluded, high excluded); None: unbounded on that side
RANGES: Dict[str, Tuple[Optional[float], Optional[float], bool, bool]] = {
    'rho': (0, None, True, False),            # the neighbourhood radius
    'eta': (0, None, False, False),           # the variants' T_w offset
    'ascent_frac': (0, 1, True, False),       # share of a chunk the ascent pass uses
    'lr': (0, None, False, False),
    'momentum': (0, 1, False, True),          # a buffer weight of 1 or more never forgets
    'weight_decay': (0, None, False, False),  # negative decay grows the weights
    'eps': (0, None, True, False),            # the base optimizer's denominator epsilon
    'betas': (0, 1, False, True),             # Adam-style averaging weights
    'clip_grad': (0, None, True, False),      # a negative bound reverses the gradient (value mode)
}


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ''


def check_number(value: Any, name: str, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number (not a bool; a one-element tensor counts) within the interval;
    else ValueError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:   # torch optimizers take a tensor lr
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        shown = value if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)
        raise ValueError(f'{name} must be a finite number{_interval(low, high, low_open, high_open)}, got {shown}')


def check_arg(key: str, value: Any, name: Optional[str] = None) -> None:
    """``value`` of the argument ``key`` of ``RANGES`` (each element of a list or tuple) is in its range."""
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if v is not None:   # (e.g. Adafactor's betas hold a None)
            check_number(v, name or key, *RANGES[key])


def check_sam_m(m: Any, batch: Optional[int], name: str = 'm', batch_name: str = 'the per-GPU batch size') -> None:
    """m-sharpness: chunks of ``m`` samples must tile the local batch exactly. ``batch`` None: a batch whose
    size varies (NaFlex), cut with a smaller last chunk: m must be a positive integer."""
    bad = isinstance(m, bool) or not isinstance(m, numbers.Integral) or m <= 0
    if batch is None:
        if bad:
            raise ValueError(f'{name} {m} must be a positive integer')
    elif bad or batch % m:
        raise ValueError(f'{name} {m} must be a positive divisor of {batch_name} {batch}')


def check_optimizer_args(kwargs: Dict[str, Any], names: Optional[Dict[str, str]] = None) -> None:
    """The base optimizer's numbers among ``kwargs`` or a param group (lr, momentum, weight_decay, eps, betas;
    None: not given)."""
    for key in ('lr', 'momentum', 'weight_decay', 'eps', 'betas'):
        if kwargs.get(key) is not None:
            check_arg(key, kwargs[key], (names or {}).get(key, key))
