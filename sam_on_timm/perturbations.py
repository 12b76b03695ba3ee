"""The perturbation models of (A)SAM, paper Eq. 4 and Table 10.

    p = 2:   eps = rho * T^2 g / ||T g||_2        (norm over the perturbed set P only)
    p = inf: eps = rho * T sign(g)

T is diagonal; outside P it is 0, which is why the functions here only ever see the tensors of P.
Everything is written over lists of tensors with ``torch._foreach_*`` ops and never reads a value
back to the host, so the step stays asynchronous on a GPU.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ['Variant', 'VARIANTS', 'FlatSet', 'flat_ok', 'scaling', 'compute_eps']


@dataclass(frozen=True)
class Variant:
    name: str
    p: float              # 2 or inf
    default_eta: float
    description: str


VARIANTS = {v.name: v for v in (
    Variant('sam', 2, 0.0, 'SAM: T = 1'),
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
    raise ValueError(f"unknown SAM variant '{variant}'; valid: {', '.join(VARIANTS)}")


# CUDA runs a foreach op as one fused kernel only if, at every index, the operands share shape and
# strides. A 0-dim operand (layerwise T, ASAM biases) or a per-tensor masked_fill_ costs one launch per
# tensor: the per-parameter loop docs/design.md section 7 warns of. On CUDA the perturbation is therefore computed in one
# flat buffer (FlatSet): whole-buffer kernels, and views of it laid out like P for w + eps. On CPU a
# foreach op is a loop over tensors anyway and the flat copies only add traffic.
# The buffer holds a copy of the whole set: kept to sets of up to FLAT_MAX_NUMEL elements (every
# SAM-ON set; ResNet-50's is 53,120). Above it (SAM-all on a large model) the copy's memory and traffic
# would outweigh the launches it saves, and the per-tensor path is taken.
FUSED_DEVICE_TYPES = {'cuda'}
FLAT_MAX_NUMEL = 1 << 22


def _fused(tensors: Sequence[Tensor]) -> bool:
    return len(tensors) > 1 and tensors[0].device.type in FUSED_DEVICE_TYPES


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def flat_ok(params: Sequence[Tensor]) -> bool:
    """Whether ``FlatSet(params)`` is the way to compute eps: a fused device, one dtype (a factor is
    never rounded to another), dense tensors, at most FLAT_MAX_NUMEL elements."""
    return (_fused(params) and all(p.dtype == params[0].dtype and _dense(p) for p in params)
            and sum(p.numel() for p in params) <= FLAT_MAX_NUMEL)


def match_layout(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> List[Tensor]:
    """``tensors`` as views with the strides of ``like`` where they differ only in size-1 dimensions
    (a 1x1 conv weight and its channels_last gradient): same elements, and CUDA's fused foreach
    kernels, which compare strides literally, stay in use. Other tensors are returned as they are."""
    if not _fused(like):
        return list(tensors)
    return [_restride(t, l) for t, l in zip(tensors, like)]


def _restride(t: Tensor, like: Tensor) -> Tensor:
    if t.shape == like.shape and t.stride() != like.stride() and all(
            a == b or n == 1 for a, b, n in zip(t.stride(), like.stride(), t.shape)):
        return t.as_strided(t.shape, like.stride(), t.storage_offset())
    return t


class FlatSet:
    """A working buffer for the perturbation of a set P (see ``flat_ok``): one flat tensor, and one view
    of it per tensor of P with that tensor's sizes and strides, made once. eps is computed in the buffer
    by a handful of whole-buffer kernels, whatever the variant, and ``views`` hold it laid out like P,
    so that ``w + eps`` is one fused foreach op: no per-tensor launch and no per-tensor Python per step.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.layout = [(p.size(), p.stride()) for p in params]
        self.buf = torch.empty(self.numel, device=params[0].device, dtype=params[0].dtype)
        self.views = self._views(self.buf)
        self.counts = torch.tensor(self.numels, device=params[0].device)
        # a gradient may differ from its tensor's strides in size-1 dims only where there are some
        self._ambiguous = [i for i, p in enumerate(params) if p.dim() > 1 and 1 in p.shape]
        self._t = self._t_views = None
        self._scalar_mask = {}

    def _views(self, buf: Tensor) -> List[Tensor]:
        out, off = [], 0
        for (size, stride), n in zip(self.layout, self.numels):   # a dense tensor covers n consecutive slots
            out.append(buf.as_strided(size, stride, off))
            off += n
        return out

    def load(self, tensors: Sequence[Tensor]) -> Tensor:
        """The buffer, holding a copy of ``tensors`` (one per tensor of P, any strides)."""
        tensors = list(tensors)
        for i in self._ambiguous:
            tensors[i] = _restride(tensors[i], self.views[i])
        torch._foreach_copy_(self.views, tensors)
        return self.buf

    def spread(self, factors: Sequence[Tensor]) -> Tensor:
        """T as one flat tensor from the per-tensor factors of ``scaling`` (full-size or 0-dim)."""
        scalar = tuple(f.dim() == 0 and n != 1 for f, n in zip(factors, self.numels))
        if all(scalar):   # layerwise: each tensor's value repeated over its slots, one kernel
            return torch.repeat_interleave(torch.stack(list(factors)), self.counts, output_size=self.numel)
        if self._t is None:
            self._t = torch.empty_like(self.buf)
            self._t_views = self._views(self._t)
        full = [i for i, s in enumerate(scalar) if not s]
        torch._foreach_copy_([self._t_views[i] for i in full], [factors[i] for i in full])
        if not any(scalar):
            return self._t
        if scalar not in self._scalar_mask:   # ASAM: 0-dim factors of the biases among full-size ones
            mask = torch.tensor(scalar, device=self.buf.device)
            self._scalar_mask[scalar] = torch.repeat_interleave(mask, self.counts, output_size=self.numel)
        zero = self._t.new_zeros(())
        values = torch.stack([f if s else zero for f, s in zip(factors, scalar)])
        spread = torch.repeat_interleave(values, self.counts, output_size=self.numel)
        return torch.where(self._scalar_mask[scalar], spread, self._t)


def _writable_in_place(tensors: Sequence[Tensor]) -> bool:
    """No two tensors share storage and none is an expanded (stride-0) view."""
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    return 0 not in ptrs and len(set(ptrs)) == len(ptrs) and all(
        st != 0 for t in tensors for st, n in zip(t.stride(), t.shape) if n > 1)


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
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant '{variant}'; valid: {', '.join(VARIANTS)}")
    grads = list(grads)
    t = scaling(variant, params, grads, eta, is_bias)
    if flat is None and flat_ok(params):
        flat = FlatSet(params)
    if flat is not None:   # the same formulas over one-element lists: the buffer, and T spread over it
        g = flat.load(grads)
        t = None if t is None else [flat.spread(t)]
        _, eps_norm, skipped = _eps(VARIANTS[variant].p, [g], t, rho, found_inf, writable=True, norm=_flat_norm)
        return flat.views, eps_norm, skipped
    writable = grads_writable and _writable_in_place(grads)
    return _eps(VARIANTS[variant].p, grads, match_layout(t, grads) if t is not None else None, rho, found_inf,
                writable)


def _set_norm(tensors: List[Tensor]) -> Tensor:
    """||all of tensors||_2 without concatenating them."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def _flat_norm(tensors: List[Tensor]) -> Tensor:
    """The same for one flat buffer, accumulated in float64 (one float32 reduction over millions of
    elements drifts by 1e-5 on CPU, where per-tensor norms do not)."""
    return torch.linalg.vector_norm(tensors[0], dtype=torch.float64).to(tensors[0].dtype)


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
