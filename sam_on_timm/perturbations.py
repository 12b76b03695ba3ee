"""The perturbation models of (A)SAM, paper Eq. 4 and Table 10.

    p = 2:   eps = rho * T^2 g / ||T g||_2        (norm over the perturbed set P only)
    p = inf: eps = rho * T sign(g)

T is diagonal; outside P it is 0, which is why the functions here only ever see the tensors of P.
Everything is written over lists of tensors with ``torch._foreach_*`` ops and never reads a value
back to the host, so the step stays asynchronous on a GPU.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ['Variant', 'VARIANTS', 'scaling', 'compute_eps']


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
        return [p.new_full((), 1.0 + eta) if b else next(t_w) for p, b in zip(params, is_bias)]
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
# tensor: the per-parameter loop SPEC 7 warns of. On CUDA, per-tensor values therefore go through one
# flat buffer; on CPU a foreach op is a loop over tensors anyway and the flat copies only add traffic.
# The flat buffers hold a copy of the whole set: kept to sets of up to FLAT_MAX_NUMEL elements (every
# SAM-ON set; ResNet-50's is 53,120). Above it (SAM-all on a large model) the copy's memory and traffic
# would outweigh the launches it saves, and the per-tensor path is taken.
FUSED_DEVICE_TYPES = {'cuda'}
FLAT_MAX_NUMEL = 1 << 22
_COUNTS = {}  # (device, numels) -> the numels as a device tensor (a host-to-device copy would sync)


def _fused(tensors: Sequence[Tensor]) -> bool:
    return len(tensors) > 1 and tensors[0].device.type in FUSED_DEVICE_TYPES


def _flat_ok(tensors: Sequence[Tensor]) -> bool:
    """One buffer can hold the set: one dtype (a factor is never rounded to another), small enough."""
    return (_fused(tensors) and all(t.dtype == tensors[0].dtype for t in tensors)
            and sum(t.numel() for t in tensors) <= FLAT_MAX_NUMEL)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def match_layout(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> List[Tensor]:
    """``tensors`` as views with the strides of ``like`` where they differ only in size-1 dimensions
    (a 1x1 conv weight and its channels_last gradient): same elements, and CUDA's fused foreach
    kernels, which compare strides literally, stay in use. Other tensors are returned as they are."""
    if not _fused(like):
        return list(tensors)
    out = []
    for t, l in zip(tensors, like):
        if t.shape == l.shape and t.stride() != l.stride() and all(
                a == b or n == 1 for a, b, n in zip(t.stride(), l.stride(), t.shape)):
            t = t.as_strided(t.shape, l.stride(), t.storage_offset())
        out.append(t)
    return out


def _fill_like(values: Sequence[Tensor], like: Sequence[Tensor]) -> List[Tensor]:
    """Tensors with the sizes and strides of ``like``, the i-th filled with the 0-dim ``values[i]``:
    segments of one buffer written by one kernel, so that ``_foreach_mul(like, out)`` stays fused."""
    numels = tuple(t.numel() for t in like)
    key = (like[0].device, numels)
    if key not in _COUNTS:
        if len(_COUNTS) >= 16:
            _COUNTS.clear()
        _COUNTS[key] = torch.tensor(numels, device=like[0].device)
    vals = torch.stack([v.reshape(()) for v in values]).to(like[0].dtype)
    flat = torch.repeat_interleave(vals, _COUNTS[key], output_size=sum(numels))
    out, off = [], 0
    for t, n in zip(like, numels):  # a dense tensor covers exactly n consecutive slots, in any order
        out.append(flat.as_strided(t.size(), t.stride(), off) if _dense(t) else flat[off:off + n].view(t.shape))
        off += n
    return out


def _full_factors(factors: Optional[List[Tensor]], like: Sequence[Tensor]) -> Optional[List[Tensor]]:
    """Where fused: 0-dim factors (layerwise T, ASAM biases) filled out to their tensor's size, and every
    factor laid out like its tensor, so that ``_foreach_mul(like, factors)`` is one kernel, not one per tensor."""
    if factors is None or not _fused(like):
        return factors
    scalar = [i for i, (f, t) in enumerate(zip(factors, like)) if f.shape != t.shape]
    if scalar and _flat_ok(like):
        factors = list(factors)
        for i, f in zip(scalar, _fill_like([factors[i] for i in scalar], [like[i] for i in scalar])):
            factors[i] = f
    return match_layout(factors, like)


def _zero_where(skip: Tensor, tensors: Sequence[Tensor]) -> None:
    """Every tensor set to 0 where the 0-dim bool ``skip`` is set, NaN and inf too (no multiply can do
    that: NaN * 0 = NaN). Fused: through one concatenated copy, five launches instead of one per tensor."""
    flat = [t.as_strided((t.numel(),), (1,), t.storage_offset()) if _dense(t) else None
            for t in tensors] if _flat_ok(tensors) else []
    if sum(f is not None for f in flat) > 1:
        dense = [f for f in flat if f is not None]
        buf = torch.cat(dense)
        buf.masked_fill_(skip, 0.0)
        torch._foreach_copy_(dense, list(buf.split([f.numel() for f in dense])))
        tensors = [t for t, f in zip(tensors, flat) if f is None]
    for t in tensors:
        t.masked_fill_(skip, 0.0)


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
) -> tuple:
    """Perturbation of P from the ascent gradient.

    Returns ``(eps, eps_norm, skipped)``: the list of eps tensors, ||eps||_2 (0-dim tensor) and a
    0-dim float tensor that is 1.0 where the perturbation was skipped. The step is skipped (eps = 0)
    when ||T g|| is 0 or not finite, or when ``found_inf`` (e.g. an fp16 overflow) is non-zero: no
    division by zero, no NaN ever reaches eps.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant '{variant}'; valid: {', '.join(VARIANTS)}")
    p = VARIANTS[variant].p
    grads = list(grads)
    t = _full_factors(scaling(variant, params, grads, eta, is_bias), grads)
    if p == 2:
        tg = torch._foreach_mul(grads, t) if t is not None else grads
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tg)))
        ok = torch.isfinite(norm) & (norm > 0)
        if t is not None:
            torch._foreach_mul_(tg, match_layout(t, tg))   # T^2 g, in the buffers _foreach_mul just made
            eps, owned = tg, True
        else:
            # write into the caller's buffers only if no two of them share storage (autograd may hand
            # the same tensor to two parameters, e.g. both inputs of an add)
            eps, owned = grads, grads_writable and _writable_in_place(grads)
        scale = rho / norm
    else:
        eps, owned = torch._foreach_sign(grads), True
        torch._foreach_mul_(eps, match_layout(t, eps))              # T sign(g)
        # the l-inf step is not normalised; a non-finite gradient still skips it
        ok = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        scale = torch.full_like(ok, rho, dtype=grads[0].dtype)
    if found_inf is not None:
        ok = ok & (found_inf.reshape(()) == 0)
    scale = torch.where(ok, scale, 0.0)
    if owned:
        torch._foreach_mul_(eps, scale)     # no new buffers: fresh allocations cost page faults on CPU
    else:
        eps = torch._foreach_mul(eps, scale)
    # a non-finite gradient entry would still give inf * 0 = NaN: zero it (in place, no host sync)
    skip = ~ok
    _zero_where(skip, eps)
    eps_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(eps)))
    # counted as skipped: no perturbation at all (for l-inf too, where T g = 0 gives eps = 0)
    return eps, eps_norm, (skip | (eps_norm == 0)).to(eps_norm.dtype)
