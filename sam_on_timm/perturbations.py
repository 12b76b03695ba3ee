"""The perturbation models of (A)SAM, paper Eq. 4 and Table 10.

    p = 2:   eps = rho * T^2 g / ||T g||_2        (norm over the perturbed set P only)
    p = inf: eps = rho * T sign(g)

T is diagonal; outside P it is 0, which is why the functions here only ever see the tensors of P. eps is 0
(the step skipped) where ||T g|| is 0 or not finite, or the loss scaler saw an overflow. Table 10 is
``VARIANTS`` and ``scaling`` (T), the formula is ``_eps``: both on the first screen of this file.

The formula is written once, over a backend that holds the tensors and does the arithmetic without reading a
value back to the host (the step stays asynchronous on a GPU): ``Tensors``, below, works on the list of P's
tensors with ``torch._foreach_*`` ops; ``flat.Flat`` on one flat buffer holding the whole set, CUDA's speed
path (not needed to read the maths).
"""
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from .flat import Flat, FlatSet, flat_ok, match_layout, writable_in_place

__all__ = ['Variant', 'VARIANTS', 'check_variant', 'check_eta_used', 'scaling', 'compute_eps', 'Tensors']


@dataclass(frozen=True)
class Variant:
    name: str
    p: float              # 2 or inf
    default_eta: float
    description: str
    has_eta: bool = True  # whether T depends on eta (plain SAM's T = 1 does not)


VARIANTS = {v.name: v for v in (   # paper Table 10
    Variant('sam', 2, 0.0, 'SAM: T = 1', has_eta=False),
    Variant('eleml2', 2, 0.0, 'ASAM elementwise l2: T = |w| + eta'),
    Variant('eleml2orig', 2, 0.01, 'original ASAM: T = |w| + eta for weights, 1 + eta for biases'),
    Variant('elemlinf', float('inf'), 0.0, 'ASAM elementwise l-inf: T = |w| + eta, eps = rho T sign(g)'),
    Variant('layerl2', 2, 0.0, 'layerwise l2: T = ||W_layer||_2 + eta (one value per tensor)'),
    Variant('fisher', 2, 1.0, 'Fisher-SAM: T = (1 + eta g^2)^-1/2'),
)}


def check_variant(variant: Any, name: str = 'SAM variant') -> None:
    """``variant`` names a perturbation of ``perturbations.VARIANTS``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {name} '{variant}'; valid: {', '.join(VARIANTS)}")


def check_eta_used(variant: str, eta: Any, name: str = 'eta', what: Optional[str] = None) -> None:
    """An eta given to a variant whose T has no eta (plain SAM, T = 1) would change nothing: refused, so that a
    run asked for eta is never silently plain SAM. ``eta`` None (the variant's default) passes. ``what``: how
    the caller names the variant (train.py: its --opt)."""
    if eta is not None and variant in VARIANTS and not VARIANTS[variant].has_eta:
        with_eta = ', '.join(v.name for v in VARIANTS.values() if v.has_eta)
        raise ValueError(f"{name} {eta} has no effect with {what or f'variant {variant!r}'} (T = 1 has no eta): "
                         f"leave it unset, or choose a variant with an eta ({with_eta})")


def scaling(variant: str, params: Sequence[Tensor], grads: Sequence[Tensor], eta: float,
            is_bias: Optional[Sequence[bool]] = None) -> Optional[List[Tensor]]:
    """The diagonal of T for each tensor of P (None: T = 1); a 0-dim entry is one value for the whole tensor."""
    if variant == 'sam':
        return None
    if variant in ('eleml2', 'elemlinf'):   # T = |w| + eta
        t = torch._foreach_abs(params)
        torch._foreach_add_(t, eta)
        return t
    if variant == 'eleml2orig':             # T = |w| + eta for weights, 1 + eta for biases (one shared 0-dim)
        if is_bias is None:
            raise ValueError("variant 'eleml2orig' needs to know which parameters are biases (bias_params)")
        weights = [p for p, b in zip(params, is_bias) if not b]
        t_w = iter(torch._foreach_add(torch._foreach_abs(weights), eta) if weights else [])
        t_b = params[0].new_full((), 1.0 + eta)
        return [t_b if b else next(t_w) for b in is_bias]
    if variant == 'layerl2':                # T = ||W||_2 + eta, one value per tensor
        t = list(torch._foreach_norm(params))
        torch._foreach_add_(t, eta)
        return t
    if variant == 'fisher':                 # T = (1 + eta g^2)^-1/2, g the true (unscaled) gradient
        t = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(t, eta)
        torch._foreach_add_(t, 1.0)
        torch._foreach_rsqrt_(t)
        return t
    check_variant(variant)
    raise NotImplementedError(f"variant '{variant}' has no scaling T")


def _eps(p: float, B, g, t, rho: float, found_inf: Optional[Tensor]) -> tuple:
    """Eq. 4 over the backend ``B``: (eps, ||eps||_2, skipped) from g and T (None: T = 1)."""
    if p == 2:
        tg = g if t is None else B.mul(g, t)                   # T g
        norm = B.norm(tg)
        ok = torch.isfinite(norm) & (norm > 0)
        direction = tg if t is None else B.mul(tg, t)          # T^2 g
        scale = rho / norm
    else:
        ok = torch.isfinite(B.norm(g))                         # not normalised; a non-finite g still skips
        direction = B.mul(B.sign(g), t)                        # T sign(g)
        scale = torch.full_like(ok, rho, dtype=B.dtype)
    if found_inf is not None:
        ok = ok & (found_inf.reshape(()) == 0)
    skip = ~ok
    eps = B.scaled(direction, torch.where(ok, scale, 0.0), skip)   # 0 where skipped (no inf * 0 = NaN)
    eps_norm = B.norm(eps)
    # counted as skipped: no perturbation at all (for l-inf too, where T g = 0 gives eps = 0)
    return B.result(eps), eps_norm, (skip | (eps_norm == 0)).to(eps_norm.dtype)


def compute_eps(variant: str, params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, eta: float,
                is_bias: Optional[Sequence[bool]] = None, found_inf: Optional[Tensor] = None,
                grads_writable: bool = False, flat: Optional[FlatSet] = None) -> tuple:
    """Perturbation of P from the ascent gradient: ``(eps, eps_norm, skipped)``, the list of eps tensors,
    ||eps||_2 (0-dim) and a 0-dim float that is 1.0 where the perturbation was skipped (eps = 0): ||T g|| 0 or
    not finite, or ``found_inf`` (e.g. an fp16 overflow) non-zero. No division by zero, no NaN reaches eps.

    ``grads_writable``: the gradients' buffers may hold eps. ``flat``: a ``FlatSet`` of ``params`` to compute
    in (SAM keeps one); on CUDA, sets that ``flat_ok`` accepts get a fresh one otherwise. eps is then the
    FlatSet's views (valid until its next use)."""
    check_variant(variant)
    grads = list(grads)
    t = scaling(variant, params, grads, eta, is_bias)
    if flat is None and flat_ok(params):
        flat = FlatSet(params)
    B = Flat(flat) if flat is not None else Tensors(grads, grads_writable and writable_in_place(grads))
    return _eps(VARIANTS[variant].p, B, B.load(grads), B.factor(t), rho, found_inf)


class Tensors:
    """The per-tensor backend: values are lists of tensors laid out like P, arithmetic by ``torch._foreach_*``
    ops. A list this backend made (or the gradients, when writable) is a scratch buffer and is overwritten in
    place: fresh allocations cost page faults on CPU. Factors get the strides of what they multiply where those
    differ only in size-1 dims (``flat.match_layout``), so that CUDA's fused foreach kernels stay in use.
    ``Flat`` (flat.py) has the same methods over one flat buffer."""

    def __init__(self, grads: List[Tensor], writable: bool):
        self.dtype = grads[0].dtype
        self._scratch = [grads] if writable else []

    def load(self, grads: List[Tensor]) -> List[Tensor]:
        return grads

    def factor(self, t: Optional[List[Tensor]]) -> Optional[List[Tensor]]:
        return t

    def _mine(self, x: List[Tensor]) -> bool:
        return any(x is s for s in self._scratch)

    def _new(self, x: List[Tensor]) -> List[Tensor]:
        self._scratch.append(x)
        return x

    def mul(self, x: List[Tensor], t: List[Tensor]) -> List[Tensor]:
        t = match_layout(t, x)
        if self._mine(x):
            torch._foreach_mul_(x, t)
            return x
        return self._new(torch._foreach_mul(x, t))

    def sign(self, x: List[Tensor]) -> List[Tensor]:
        if self._mine(x):
            torch._foreach_sign_(x)
            return x
        return self._new(torch._foreach_sign(x))

    def scaled(self, x: List[Tensor], scale: Tensor, skip: Tensor) -> List[Tensor]:
        if self._mine(x):
            torch._foreach_mul_(x, scale)
        else:
            x = self._new(torch._foreach_mul(x, scale))
        for e in x:   # one launch per tensor unless the set is one flat buffer
            e.masked_fill_(skip, 0.0)
        return x

    def norm(self, x: List[Tensor]) -> Tensor:
        """||all of x||_2 without concatenating them."""
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(x)))

    def result(self, eps: List[Tensor]) -> List[Tensor]:
        return eps
