"""The SAM optimizer names and how an optimizer name is read: ``[lookahead_]sam[-MODE][-VARIANT]``.

MODE in {on, nonorm} (omitted: all), VARIANT in {eleml2, eleml2orig, elemlinf, layerl2, fisher} (omitted: plain SAM),
plus the sparse baselines (sam-rand, ssam-f, ssam-d). No underscores: timm splits optimizer names on '_'
(``lookahead_`` prefix). The one definition of what counts as a SAM name, below the optimizer (which checks its
base with it) and the registry (which registers the names with timm).
"""
from typing import Any, Dict, Tuple

from timm.optim import list_optimizers

from .family import FAMILIES
from .perturbations import VARIANTS

__all__ = ['MODES', 'SPARSE_NAMES', 'SAM_OPTIMIZERS', 'SPARSE_OPTIMIZERS', 'FAMILY_OPTIMIZERS', 'OPT_PREFIXES',
           'sam_name', 'split_opt_name', 'parse_sam_name', 'sam_family', 'is_sam_name', 'check_base_opt']

MODES = ('all', 'on', 'nonorm')   # the perturbed set: every parameter, the norm layers' only, all but them
SPARSE_NAMES = {'rand': 'sam-rand', 'fisher': 'ssam-f', 'dynamic': 'ssam-d'}   # sparse.py's mask kind -> name

# the prefixes timm's factory understands before an optimizer name ('lookahead_sgd')
OPT_PREFIXES = ('lookahead',)


def sam_name(mode: str, variant: str) -> str:
    return 'sam' + ('' if mode == 'all' else f'-{mode}') + ('' if variant == 'sam' else f'-{variant}')


# name -> (mode, variant)
SAM_OPTIMIZERS: Dict[str, Tuple[str, str]] = {sam_name(m, v): (m, v) for m in MODES for v in VARIANTS}


# sparse-perturbation baselines (sparse.py): name -> mask kind; plain SAM on every parameter, eps masked
SPARSE_OPTIMIZERS: Dict[str, str] = {name: kind for kind, name in SPARSE_NAMES.items()}


# the SAM family (family.py): name -> (family, mode); ``msam[-MODE]``, ``gsam[-MODE]``, ... plain T = 1 perturbation
FAMILY_OPTIMIZERS: Dict[str, Tuple[str, str]] = {
    f + ('' if m == 'all' else f'-{m}'): (f, m) for f in FAMILIES if f != 'sam' for m in MODES}


def split_opt_name(opt: str) -> Tuple[str, str]:
    """``(prefix, name)`` of an optimizer name as timm's factory reads it: lower case, the part after the
    last '_' names the optimizer, the rest is a prefix ('' or 'lookahead'). timm itself ignores any
    other prefix; this is refused here (ValueError), so that a typo such as 'lookahed_sgd' is not
    silently plain SGD."""
    if not isinstance(opt, str) or not opt:
        raise ValueError(f'an optimizer name must be a non-empty string, got {opt!r}')
    prefix, _, name = opt.lower().rpartition('_')
    if prefix not in ('',) + OPT_PREFIXES:
        raise ValueError(f"optimizer name '{opt}': unknown prefix '{prefix}_' (valid: {', '.join(OPT_PREFIXES)})")
    return prefix, name


def parse_sam_name(opt: str) -> Tuple[str, str]:
    """(mode, variant) of a SAM optimizer name (a ``lookahead_`` prefix is allowed); ValueError for any
    other name. The one definition of what counts as a SAM name."""
    name = split_opt_name(opt)[1]
    if name in SPARSE_OPTIMIZERS:
        return 'all', 'sam'
    if name in FAMILY_OPTIMIZERS:
        return FAMILY_OPTIMIZERS[name][1], 'sam'
    if name not in SAM_OPTIMIZERS:
        valid = list(SAM_OPTIMIZERS) + list(SPARSE_OPTIMIZERS) + list(FAMILY_OPTIMIZERS)
        raise ValueError(f"unknown SAM optimizer '{opt}'; valid: {', '.join(valid)}")
    return SAM_OPTIMIZERS[name]


def sam_family(opt: str) -> str:
    """The family of a SAM name ('sam' for the sam-* and sparse names, else 'msam', 'gsam', ...); ValueError
    for a name that is not a SAM name."""
    parse_sam_name(opt)
    return FAMILY_OPTIMIZERS.get(split_opt_name(opt)[1], ('sam',))[0]


def is_sam_name(opt: str) -> bool:
    """Whether ``parse_sam_name`` accepts ``opt``."""
    try:
        parse_sam_name(opt)
    except ValueError:
        return False
    return True


def check_base_opt(base_opt: Any, name: str = 'base_opt') -> None:
    """The optimizer of SAM's descent step: a timm optimizer name (``lookahead_`` prefix allowed) that
    is not itself a SAM name."""
    try:
        known = split_opt_name(base_opt)[1] in list_optimizers()
    except ValueError:
        known = False
    if not known or is_sam_name(base_opt):
        raise ValueError(f"unknown {name} '{base_opt}': a timm optimizer name that is not a SAM name "
                         f"(e.g. sgd, momentum, adamw)")
