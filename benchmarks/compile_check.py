"""Does a torch.compile'd SAM-ON step equal the eager one on this torch? (CPU, and CUDA if present.)

The lean ascent switches ``requires_grad`` off outside the perturbed set. Some torch versions (2.11
among them) skip dynamo's guards on module parameters whose dict is unchanged, reuse the lean ascent
graph for the descent and compute no weight gradient there. ``train_step`` switches that skip off
(``docs/design.md``, section 4). This script runs 3 updates compiled and eager, with that switch and
with it disabled, and prints the largest weight difference of each run: 0 (or rounding) with it, and,
on an affected torch, a visible difference without it. Exit code 1 if the run with the switch differs.

    python benchmarks/compile_check.py
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def max_difference(device: str, with_switch: bool, backend: str) -> float:
    import torch._dynamo
    from timm.optim import create_optimizer_v2
    from sam_on_timm import train_step as ts
    torch._dynamo.reset()
    torch._dynamo.config.skip_tensor_guards_with_matching_dict_tags = True
    switch = ts._guard_requires_grad
    if not with_switch:
        ts._guard_requires_grad = lambda: None
    try:
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 6, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device)
        model, eager = small_net().to(device), small_net().to(device)
        kwargs = dict(lr=0.1, momentum=0.9, rho=0.05)
        opt, eager_opt = create_optimizer_v2(model, 'sam-on', **kwargs), create_optimizer_v2(eager, 'sam-on', **kwargs)
        compiled = torch.compile(model, backend=backend)
        worst = 0.0
        for _ in range(3):
            ts.train_step(compiled, opt, ts.split_chunks(x, y, 4), F.cross_entropy, chunk_path='sequential')
            ts.train_step(eager, eager_opt, ts.split_chunks(x, y, 4), F.cross_entropy, chunk_path='sequential')
            worst = max(worst, max((p - q).abs().max().item() for p, q in zip(model.parameters(), eager.parameters())))
        return worst
    finally:
        ts._guard_requires_grad = switch


def main() -> int:
    import sam_on_timm  # noqa: F401  (registers the SAM names)
    print('torch', torch.__version__)
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    bad = 0
    for device, with_switch in itertools.product(devices, (True, False)):
        worst = max_difference(device, with_switch, 'aot_eager')
        ok = worst < 1e-5
        bad += with_switch and not ok
        print(f'{device}, guard switch {"on " if with_switch else "off"}: max |w_compiled - w_eager| after 3 updates '
              f'= {worst:.3g}{"" if ok else "  (differs)"}', flush=True)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
