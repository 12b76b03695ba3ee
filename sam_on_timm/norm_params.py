"""List the parameters SAM-ON perturbs in a timm model (the selection rules: ``sam_on_timm.norms``).

    python -m sam_on_timm.norm_params resnet50
    # ... resnet50: 106 tensors, 53,120 of 25,557,032 parameters (0.208%)

The selection lives in ``sam_on_timm.norms``, which the package imports; this tool module is imported
by nothing, so ``python -m`` runs it once (runpy warns when the package has already imported the
module it is asked to run). Its names stay importable from here for code written against the old
location.
"""
from typing import Iterable, Optional

from .norms import NORM_TYPES, bias_parameters, is_norm_module, named_norm_parameters, norm_parameters
from .options import ArgumentParser

__all__ = ['NORM_TYPES', 'is_norm_module', 'named_norm_parameters', 'norm_parameters', 'bias_parameters']


def _main(argv: Optional[Iterable[str]] = None) -> None:
    parser = ArgumentParser(prog='python -m sam_on_timm.norm_params',
                            description='List the parameters SAM-ON perturbs in a timm model.')
    parser.add_argument('model', help='timm model name, e.g. resnet50')
    args = parser.parse_args(argv)
    import timm
    model = timm.create_model(args.model, pretrained=False)
    named = named_norm_parameters(model)
    for name, p in named:
        print(f'{name:60s} {tuple(p.shape)}')
    total = sum(p.numel() for p in model.parameters())
    n = sum(p.numel() for _, p in named)
    print(f'{args.model}: {len(named)} tensors, {n:,} of {total:,} parameters ({100.0 * n / total:.3f}%)')


if __name__ == '__main__':
    _main()
