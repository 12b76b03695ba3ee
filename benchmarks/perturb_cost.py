#!/usr/bin/env python3
"""Cost of SAM's own work per chunk: ``perturb`` (eps from a given gradient, w += eps) and ``restore``.

In a launch-bound step (ResNet-50 at batch 64 on an H100) what counts is the host time to issue these
kernels, not their GPU time: this script times the host side. On CPU, ``--path flat`` forces the code
path CUDA takes (one flat buffer, a fixed number of whole-buffer kernels) so that its host cost can be
measured without a GPU; the CPU kernels' own work over a SAM-ON set is small (53,120 floats for
ResNet-50), so the figure is mostly dispatch overhead, an upper bound for CUDA's.

    python benchmarks/perturb_cost.py --model resnet50 --opts sam-on,sam-on-layerl2,sam-on-eleml2orig,sam-on-fisher
    python benchmarks/perturb_cost.py --device cuda --model resnet50       # host time, and time with sync

Reports per optimizer and path: ms per perturb+restore (minimum over ``--repeats`` blocks of
``--iters``), the number of tensors in P, and the number of operator calls issued.
"""
import argparse
import os
import sys
import time

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:   # run from a checkout without installing
    sys.path.insert(0, _ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--model', default='resnet50')
    p.add_argument('--opts', default='sam-on,sam-on-layerl2,sam-on-eleml2orig,sam-on-fisher')
    p.add_argument('--path', default='both', choices=['both', 'flat', 'per-tensor'],
                   help="perturbation code path: 'flat' is CUDA's, 'per-tensor' CPU's (default: both)")
    p.add_argument('--iters', type=int, default=300)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1, help='CPU threads (1: the host side alone)')
    return p.parse_args(argv)


def count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    import sam_on_timm  # noqa: F401  (registers the names)
    from sam_on_timm import flat
    from timm.optim import create_optimizer_v2
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: CUDA is not available')
    model = timm.create_model(args.model, pretrained=False).to(device)
    paths = ['per-tensor', 'flat'] if args.path == 'both' else [args.path]
    print(f'{args.model} on {device.type}, {torch.get_num_threads()} thread(s), torch {torch.__version__}')
    print('| opt | path | tensors in P | op calls | ms host | ms with sync |')
    print('|---|---|---:|---:|---:|---:|')
    for opt_name in args.opts.split(','):
        for path in paths:
            flat.FUSED_DEVICE_TYPES = {device.type} if path == 'flat' else set()
            opt = create_optimizer_v2(model, opt_name, lr=0.1, rho=0.05)
            g = torch.Generator(device=device).manual_seed(0)
            grads = [torch.randn(p.shape, generator=g, device=device) for p in opt.perturbed]

            def once():
                opt.perturb(grads)   # grads are not written (grads_writable False): reusable
                opt.restore()
            for _ in range(20):
                once()
            ops = count_ops(once)
            best = best_sync = float('inf')
            for _ in range(args.repeats):
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    once()
                host = (time.perf_counter() - t0) * 1e3 / args.iters
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                best = min(best, host)
                best_sync = min(best_sync, (time.perf_counter() - t0) * 1e3 / args.iters)
            print(f'| {opt_name} | {path} | {len(opt.perturbed)} | {ops} | {best:.3f} | {best_sync:.3f} |')


if __name__ == '__main__':
    main()
