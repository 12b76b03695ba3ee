"""sam-on-timm: SAM and SAM-ON (perturb only the normalization layers) for timm.

``import sam_on_timm`` registers the SAM optimizer names in timm's optimizer factory and the paper's
CIFAR models (``cifar_*``, see ``cifar_models``) in timm's model registry.
"""
from .norms import NORM_TYPES, bias_parameters, is_norm_module, named_norm_parameters, norm_parameters
from .perturbations import VARIANTS, compute_eps
from .registry import (FAMILY_OPTIMIZERS, SAM_OPTIMIZERS, SPARSE_OPTIMIZERS, is_sam_name, parse_sam_name,
                       register_sam_optimizers, sam_name)
from .sam import MODES, SAM
from . import cifar_models  # noqa: F401  (registers the paper's CIFAR models with timm)

__all__ = ['NORM_TYPES', 'bias_parameters', 'is_norm_module', 'named_norm_parameters', 'norm_parameters',
           'VARIANTS', 'compute_eps', 'FAMILY_OPTIMIZERS', 'SAM_OPTIMIZERS', 'SPARSE_OPTIMIZERS', 'is_sam_name',
           'parse_sam_name',
           'register_sam_optimizers', 'sam_name', 'MODES', 'SAM']
__version__ = '0.1.0'

register_sam_optimizers()
