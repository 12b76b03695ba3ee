"""The 18 SAM names in timm's optimizer registry: ``sam[-MODE][-VARIANT]``.

MODE in {on, nonorm} (omitted: all), VARIANT in {eleml2, eleml2orig, elemlinf, layerl2, fisher}
(omitted: plain SAM). No underscores: timm splits optimizer names on '_' (``lookahead_`` prefix).

timm's factory hands an optimizer class only the parameter groups it built from the model, so
SAM-ON could not find the norm layers from them. On import we therefore wrap the registry's
``create_optimizer`` once: for a SAM name given a model it adds ``model=model``; every other call
passes through unchanged. It also hands ``eps`` / ``betas`` on to the base optimizer (SIGNATURE_FLAGS).
"""
import functools
from typing import Dict, List

from torch import nn

from .family import FAMILIES
from .names import FAMILY_OPTIMIZERS, OPT_PREFIXES, SAM_OPTIMIZERS, SPARSE_OPTIMIZERS, is_sam_name, parse_sam_name, \
    sam_family, sam_name, split_opt_name
from .perturbations import VARIANTS
from .sam import SAM
from .sparse import MASK_ARGS, SparseMask

__all__ = ['SAM_OPTIMIZERS', 'OPT_PREFIXES', 'sam_name', 'split_opt_name', 'parse_sam_name', 'is_sam_name',
           'register_sam_optimizers', 'SPARSE_OPTIMIZERS', 'FAMILY_OPTIMIZERS', 'sam_family']

# OptimInfo flags of the SAM names. timm reads them as "the class takes this argument" (its optimizer tests check
# them against the signature, and that the group then holds the value): SAM takes ``momentum`` (handed to its base,
# SGD by default) but not ``eps`` / ``betas``, which belong to the base optimizer alone. The factory would drop
# eps / betas on that account; the wrapper in ``register_sam_optimizers`` hands them on to the base instead.
SIGNATURE_FLAGS = dict(has_eps=False, has_momentum=True, has_betas=False)


def _inject_mask(name: str, kwargs: Dict) -> None:
    """The mask arguments (``MASK_ARGS``: sparsity, mask_seed, ...) become the ``SparseMask`` handed to SAM
    for a sparse name; for another SAM name a given one is refused (it would do nothing)."""
    given = {k: kwargs.pop(k) for k in MASK_ARGS if k in kwargs}
    given = {k: v for k, v in given.items() if v is not None}
    if name in SPARSE_OPTIMIZERS:
        if 'mask' not in kwargs:
            kwargs['mask'] = SparseMask(SPARSE_OPTIMIZERS[name], **{MASK_ARGS[k]: v for k, v in given.items()})
    elif given:
        raise ValueError(f"'{name}': {', '.join(given)} is an option of the sparse baselines "
                         f"({', '.join(SPARSE_OPTIMIZERS)})")


# what each mode perturbs, in the registry's descriptions
PERTURBS = {'all': 'all parameters', 'on': 'only normalization-layer affine parameters (SAM-ON)',
            'nonorm': 'all but normalization-layer parameters'}


def register_sam_optimizers() -> List[str]:
    """Register the SAM names in timm's default registry (idempotent)."""
    from timm.optim import OptimInfo, list_optimizers
    from timm.optim._optim_factory import default_registry   # timm exports its registry's methods, not the instance
    registered = set(list_optimizers(with_description=False))
    for name, (mode, variant) in SAM_OPTIMIZERS.items():
        if name in registered:
            continue
        default_registry.register(OptimInfo(
            name=name,
            opt_class=SAM,
            description=f'{VARIANTS[variant].description}; perturbs {PERTURBS[mode]}; default eta '
                        f'{VARIANTS[variant].default_eta}',
            **SIGNATURE_FLAGS,
            defaults={'variant': variant, 'mode': mode},
        ))
    masks = dict(rand='a fixed random', fisher='a Fisher (SSAM-F)', dynamic='a dynamic (SSAM-D)')
    for name, kind in SPARSE_OPTIMIZERS.items():
        if name in registered:
            continue
        default_registry.register(OptimInfo(
            name=name, opt_class=SAM, **SIGNATURE_FLAGS,
            description=f'SAM with {masks[kind]} mask on the perturbation',
            defaults={'variant': 'sam', 'mode': 'all', 'mask': SparseMask(kind)},
        ))
    for name, (family, mode) in FAMILY_OPTIMIZERS.items():
        if name in registered:
            continue
        default_registry.register(OptimInfo(
            name=name, opt_class=SAM, **SIGNATURE_FLAGS,
            description=f'{FAMILIES[family]}; perturbs {PERTURBS[mode]}',
            defaults={'variant': 'sam', 'mode': mode, 'family': family},
        ))
    if not getattr(default_registry.create_optimizer, '_sam_on_timm', False):
        original = default_registry.create_optimizer

        @functools.wraps(original)
        def create_optimizer(model_or_params, opt, *args, **kwargs):
            if is_sam_name(opt):
                _inject_mask(split_opt_name(opt)[1], kwargs)
                if isinstance(model_or_params, nn.Module):
                    kwargs.setdefault('model', model_or_params)
                # the factory drops eps / betas for a class whose info lacks them (SIGNATURE_FLAGS): hand them
                # on to the base optimizer, whose own factory call keeps what the base takes and drops the rest
                carried = {k: kwargs.pop(k) for k in ('eps', 'betas') if kwargs.get(k) is not None}
                if carried:
                    kwargs['base_args'] = {**carried, **(kwargs.get('base_args') or {})}
            return original(model_or_params, opt, *args, **kwargs)

        create_optimizer._sam_on_timm = True
        default_registry.create_optimizer = create_optimizer
    return list(SAM_OPTIMIZERS) + list(SPARSE_OPTIMIZERS) + list(FAMILY_OPTIMIZERS)
