"""The speed path of the perturbation: one flat buffer for the whole perturbed set on CUDA.

CUDA runs a ``torch._foreach_*`` op as one fused kernel only if, at every index, the operands share
shape and strides. A 0-dim operand (layerwise T, ASAM biases) or a per-tensor ``masked_fill_`` costs
one launch per tensor: a per-parameter loop, which costs up to +40% of a ResNet-50 step at batch 64
(docs/design.md, section 7). On CUDA the perturbation is therefore computed in one flat buffer
(``FlatSet``): whole-buffer kernels, and views of it laid out like P for ``w + eps``. The formula is
``perturbations._eps``, run over the backend ``Flat`` here instead of the per-tensor ``perturbations.Tensors``.

Measured (``benchmarks/perturb_cost.py``, ResNet-50's SAM-ON set of 106 tensors, NVIDIA H200, torch
2.11, 2026-12-01): host time of perturb + restore 0.42 ms flat against 1.93 ms per tensor for
``sam-on``, 0.88 ms against 3.25 ms for ``sam-on-layerl2``, 0.81 against 2.18 ms for
``sam-on-fisher``. On CPU a foreach op is a loop over tensors anyway and the flat copies only add
traffic, so the per-tensor path is taken there.
"""
from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ['FUSED_DEVICE_TYPES', 'FLAT_MAX_NUMEL', 'FlatSet', 'Flat', 'flat_ok', 'flat_norm', 'match_layout',
           'writable_in_place']

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
    return [_restride(t, ref) for t, ref in zip(tensors, like)]


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


def writable_in_place(tensors: Sequence[Tensor]) -> bool:
    """No two tensors share storage and none is an expanded (stride-0) view."""
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    return 0 not in ptrs and len(set(ptrs)) == len(ptrs) and all(
        st != 0 for t in tensors for st, n in zip(t.stride(), t.shape) if n > 1)


def flat_norm(tensors: List[Tensor]) -> Tensor:
    """The same for one flat buffer, accumulated in float64 (one float32 reduction over millions of
    elements drifts by 1e-5 on CPU, where per-tensor norms do not)."""
    return torch.linalg.vector_norm(tensors[0], dtype=torch.float64).to(tensors[0].dtype)


class Flat:
    """The flat backend of ``perturbations._eps`` (the methods of ``perturbations.Tensors``) over a ``FlatSet``:
    every value is the one-element list of a whole-set buffer, every op a single kernel in place, and eps is
    returned as the FlatSet's views laid out like P (valid until its next use)."""

    def __init__(self, flat: FlatSet):
        self.flat, self.dtype = flat, flat.buf.dtype

    def load(self, grads: Sequence[Tensor]) -> List[Tensor]:
        return [self.flat.load(grads)]

    def factor(self, t: Optional[Sequence[Tensor]]) -> Optional[List[Tensor]]:
        return None if t is None else [self.flat.spread(t)]

    def mul(self, x: List[Tensor], t: List[Tensor]) -> List[Tensor]:
        torch._foreach_mul_(x, t)
        return x

    def sign(self, x: List[Tensor]) -> List[Tensor]:
        torch._foreach_sign_(x)
        return x

    def scaled(self, x: List[Tensor], scale: Tensor, skip: Tensor) -> List[Tensor]:
        torch._foreach_mul_(x, scale)
        x[0].masked_fill_(skip, 0.0)
        return x

    def norm(self, x: List[Tensor]) -> Tensor:
        return flat_norm(x)

    def result(self, eps: List[Tensor]) -> List[Tensor]:
        return self.flat.views
