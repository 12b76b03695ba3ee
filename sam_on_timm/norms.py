"""Which parameters are "normalization" parameters (docs/design.md, section 2).

Selection is by module type, never by parameter name: names miss timm's ``downsample.1`` or
``stem.1`` BatchNorms, and DDP / torch.compile rename everything. The affine parameters of a norm
layer are its *direct* parameters (``recurse=False``), so LayerScale or ConvNeXt ``gamma``,
attention ``q_bias``/``v_bias`` and embeddings are never included.

The tool ``python -m sam_on_timm.norm_params MODEL`` lists this set for a timm model.
"""
from typing import List, Sequence, Tuple, Type

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ['NORM_TYPES', 'is_norm_module', 'named_norm_parameters', 'norm_parameters', 'bias_parameters']


def _timm_norm_types() -> Tuple[Type[nn.Module], ...]:
    """timm's norm layers that do not derive from a torch norm class."""
    try:
        import timm.layers as tl
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the module usable alone
        return ()
    names = (
        'RmsNorm', 'RmsNorm2d', 'RmsNormFp32', 'RmsNorm2dFp32',
        'SimpleNorm', 'SimpleNorm2d', 'SimpleNormFp32', 'SimpleNorm2dFp32',
        'EvoNorm2dB0', 'EvoNorm2dB1', 'EvoNorm2dB2', 'EvoNorm2dS0', 'EvoNorm2dS0a',
        'EvoNorm2dS1', 'EvoNorm2dS1a', 'EvoNorm2dS2', 'EvoNorm2dS2a',
        'FilterResponseNormTlu2d', 'FilterResponseNormAct2d',
    )
    return tuple(getattr(tl, n) for n in names if hasattr(tl, n))


# _NormBase covers BatchNorm1/2/3d, SyncBatchNorm, timm's BatchNormAct2d and affine InstanceNorm;
# nn.LayerNorm / nn.GroupNorm cover timm's LayerNorm, LayerNorm2d, LayerNormAct, GroupNormAct.
NORM_TYPES: Tuple[Type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, 'RMSNorm') else ()) + _timm_norm_types()


def is_norm_module(module: nn.Module, extra_types: Sequence[Type[nn.Module]] = ()) -> bool:
    return isinstance(module, NORM_TYPES + tuple(extra_types))


def named_norm_parameters(
        model: nn.Module,
        extra_types: Sequence[Type[nn.Module]] = (),
) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every direct parameter of a normalization module, in model order."""
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        if not is_norm_module(module, extra_types):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p not in seen:  # a tensor set: identity, not id() numbers
                seen.add(p)
                out.append((f'{mod_name}.{p_name}' if mod_name else p_name, p))
    return out


def norm_parameters(model: nn.Module, extra_types: Sequence[Type[nn.Module]] = ()) -> List[nn.Parameter]:
    """The affine parameters of the model's normalization layers (the SAM-ON set)."""
    return [p for _, p in named_norm_parameters(model, extra_types)]


def bias_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters registered under the attribute name ``bias`` in their module (ASAM's biases)."""
    out, seen = [], set()
    for module in model.modules():
        p = module._parameters.get('bias')
        if p is not None and p not in seen:
            seen.add(p)
            out.append(p)
    return out
