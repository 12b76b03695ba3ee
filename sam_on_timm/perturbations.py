"""The perturbation models of (A)SAM, paper Eq. 4 and Table 10.

    p = 2:   eps = rho * T^2 g / ||T g||_2        (norm over the perturbed set P only)
    p = inf: eps = rho * T sign(g)

T is diagonal; outside P it is 0, which is why the functions here only ever see the tensors of P.
Everything is written over lists of tensors with ``torch._foreach_*`` ops and never reads a value
back to the host, so the step stays asynchronous on a GPU. On CUDA the same formulas run over one
flat buffer holding the whole set (``flat.py``: the speed path, not needed to read the maths).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .checks import check_variant
from .flat import FlatSet, flat_norm, flat_ok, match_layout, writable_in_place

__all__ = ['Variant', 'VARIANTS', 'scaling', 'compute_eps']


@dataclass(frozen=True)
class Variant:
    name: str
    p: float              # 2 or inf
    default_eta: float
    description: str
    has_eta: bool = True  # whether T depends on eta (plain SAM's T = 1 does not)


VARIANTS = {v.name: v for v in (
    Variant('sam', 2, 0.0, 'SAM: T = 1', has_eta=False),
    Variant('eleml2', 2, 0.0, 'ASAM elementwise l2: T = |w| + eta'),
    Variant('eleml2orig', 2, 0.01, 'original ASAM: T = |w| + eta for weights, 1 + eta for biases'),
    Variant('elemlinf', float('inf'), 0.0, 'ASAM elementwise l-inf: T = |w| + eta, eps = rho T sign(g)'),
    Variant('layerl2', 2, 0.0, 'layerwise l2: T = ||W_layer||_2 + eta (one value per tensor)'),
    Variant('fisher', 2, 1.0, 'Fisher-SAM: T = (1 + eta g^2)^-1/2'),
)}


def scaling(
        variant: str,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        eta: float,
        is_bias: Optional[Sequence[bool]] = None,
) -> Optional[List[Tensor]]:
    """The diagonal of T for each tensor of P (None stands for T = 1).

    An entry may be a 0-dim tensor (one value for the whole tensor: layerl2, ASAM biases).
    """
    if variant == 'sam':
        return None
    if variant in ('eleml2', 'elemlinf'):
        t = torch._foreach_abs(params)
        torch._foreach_add_(t, eta)
        return t
    if variant == 'eleml2orig':
        if is_bias is None:
            raise ValueError("variant 'eleml2orig' needs to know which parameters are biases (bias_params)")
        # weights: |w| + eta; biases: 1 + eta (a 0-dim tensor broadcasts over the bias)
        weights = [p for p, b in zip(params, is_bias) if not b]
        t_w = iter(torch._foreach_add(torch._foreach_abs(weights), eta) if weights else [])
        t_b = params[0].new_full((), 1.0 + eta)   # one read-only 0-dim tensor shared by every bias
        return [t_b if b else next(t_w) for b in is_bias]
    if variant == 'layerl2':
        t = list(torch._foreach_norm(params))
        torch._foreach_add_(t, eta)
        return t
    if variant == 'fisher':
        # squared minibatch gradient: must be the true (unscaled) gradient
        t = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(t, eta)
        torch._foreach_add_(t, 1.0)
        torch._foreach_rsqrt_(t)
        return t
    check_variant(variant)
    raise NotImplementedError(f"variant '{variant}' has no scaling T")


def compute_eps(
        variant: str,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        rho: float,
        eta: float,
        is_bias: Optional[Sequence[bool]] = None,
        found_inf: Optional[Tensor] = None,
        grads_writable: bool = False,
        flat: Optional[FlatSet] = None,
) -> tuple:
    """Perturbation of P from the ascent gradient.

    Returns ``(eps, eps_norm, skipped)``: the list of eps tensors, ||eps||_2 (0-dim tensor) and a
    0-dim float tensor that is 1.0 where the perturbation was skipped. The step is skipped (eps = 0)
    when ||T g|| is 0 or not finite, or when ``found_inf`` (e.g. an fp16 overflow) is non-zero: no
    division by zero, no NaN ever reaches eps.
    ``flat``: a ``FlatSet`` of ``params`` to compute in (SAM keeps one); on CUDA, sets that ``flat_ok``
    accepts get a fresh one otherwise. eps is then the FlatSet's views (valid until its next use).
    """
    check_variant(variant)
    grads = list(grads)
    t = scaling(variant, params, grads, eta, is_bias)
    if flat is None and flat_ok(params):
        flat = FlatSet(params)
    if flat is not None:   # the same formulas over one-element lists: the buffer, and T spread over it
        g = flat.load(grads)
        t = None if t is None else [flat.spread(t)]
        _, eps_norm, skipped = _eps(VARIANTS[variant].p, [g], t, rho, found_inf, writable=True, norm=flat_norm)
        return flat.views, eps_norm, skipped
    writable = grads_writable and writable_in_place(grads)
    return _eps(VARIANTS[variant].p, grads, match_layout(t, grads) if t is not None else None, rho, found_inf,
                writable)


def _set_norm(tensors: List[Tensor]) -> Tensor:
    """||all of tensors||_2 without concatenating them."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def _eps(p: float, grads: List[Tensor], t: Optional[List[Tensor]], rho: float, found_inf: Optional[Tensor],
         writable: bool, norm: Callable[[List[Tensor]], Tensor] = _set_norm) -> tuple:
    """eps from g and T (None: T = 1), in the buffers of ``grads`` where they are ``writable``."""
    if p == 2:
        if t is None:
            tg = grads
        elif writable:
            torch._foreach_mul_(grads, t)
            tg = grads
        else:
            tg = torch._foreach_mul(grads, t)
        tg_norm = norm(tg)
        ok = torch.isfinite(tg_norm) & (tg_norm > 0)
        if t is not None:
            torch._foreach_mul_(tg, match_layout(t, tg))   # T^2 g
        eps, owned = tg, t is not None or writable
        scale = rho / tg_norm
    else:
        # the l-inf step is not normalised; a non-finite gradient still skips it
        ok = torch.isfinite(norm(grads))
        if writable:
            torch._foreach_sign_(grads)
            eps = grads
        else:
            eps = torch._foreach_sign(grads)
        torch._foreach_mul_(eps, match_layout(t, eps))   # T sign(g)
        owned = True
        scale = torch.full_like(ok, rho, dtype=grads[0].dtype)
    if found_inf is not None:
        ok = ok & (found_inf.reshape(()) == 0)
    scale = torch.where(ok, scale, 0.0)
    if owned:
        torch._foreach_mul_(eps, scale)     # no new buffers: fresh allocations cost page faults on CPU
    else:
        eps = torch._foreach_mul(eps, scale)
    # a non-finite gradient entry would still give inf * 0 = NaN: zero it (in place, no host sync;
    # one launch per tensor unless the set is one flat buffer)
    skip = ~ok
    for e in eps:
        e.masked_fill_(skip, 0.0)
    eps_norm = norm(eps)
    # counted as skipped: no perturbation at all (for l-inf too, where T g = 0 gives eps = 0)
    return eps, eps_norm, (skip | (eps_norm == 0)).to(eps_norm.dtype)
