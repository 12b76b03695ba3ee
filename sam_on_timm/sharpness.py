"""Sharpness of a trained model: worst-case (Auto-PGD), 1-step and average-case m-sharpness.

For each batch B of m examples (mean cross-entropy L_B, logits optionally divided by their l2 norm)
and a parameter set P (``all``, ``on``: the normalization layers' affine parameters, ``nonorm``: the rest):

    worst-case   s = max_{||delta / T||_p <= rho} L_B(w + delta) - L_B(w)    (delta = 0 outside P)
    1-step       s = L_B(w + eps) - L_B(w),  eps = the SAM / ASAM perturbation from grad L_B(w)
    average      s = mean over n samples of L_B(w + T u) - L_B(w),  u = rho z / ||z||_p,  z ~ N(0, I)

with T = |w| elementwise (``--adaptive``) or 1. The reported value is the mean over batches.
The worst case is maximised with Auto-PGD in u = delta / T, where the ball is ||u||_p <= rho (see
``apgd_max``). docs/analysis.md states the formulas and how to read the numbers.

    python -m sam_on_timm.sharpness --checkpoint output/demo/sam-on/last.pth.tar --params on
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import norm_parameters
from .options import ArgumentParser
from .outputs import check_output_file
from .perturbations import compute_eps
from .sam import MODES

__all__ = ['Ball', 'METRICS', 'select_params', 'apgd_checkpoints', 'apgd_max', 'one_step', 'average_case',
           'batch_sharpness', 'normalized_logits', 'main']

METRICS = ('worst', 'one-step', 'average')
PS = {'inf': math.inf, '2': 2.0}


@dataclass(frozen=True)
class Ball:
    """The set {delta : ||delta / T||_p <= rho} with T = |w| (adaptive) or 1, as ||u||_p <= rho for u = delta / T."""
    rho: float
    p: float = math.inf          # 2 or inf
    adaptive: bool = True

    def __post_init__(self) -> None:
        if self.p not in (2.0, math.inf):
            raise ValueError(f'p must be 2 or inf, got {self.p}')
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ValueError(f'rho must be a finite number >= 0, got {self.rho}')

    def norm(self, u: Sequence[Tensor]) -> Tensor:
        """||u||_p over the whole set."""
        if self.p == 2:
            return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in u]))
        return torch.stack([t.abs().max() if t.numel() else t.new_zeros(()) for t in u]).max()

    def project(self, u: List[Tensor]) -> List[Tensor]:
        """Euclidean projection onto ||u||_p <= rho, in place."""
        if self.p == 2:
            n = self.norm(u)
            if n > self.rho:
                torch._foreach_mul_(u, (self.rho / n).item())
        else:
            for t in u:
                t.clamp_(-self.rho, self.rho)
        return u

    def direction(self, g_u: Sequence[Tensor]) -> List[Tensor]:
        """The steepest-ascent unit direction for the gradient in u: sign(g) (inf), g / ||g||_2 (2);
        zero where the gradient is zero or not finite."""
        if self.p == 2:
            n = self.norm(g_u)
            if not (torch.isfinite(n) and n > 0):
                return [torch.zeros_like(t) for t in g_u]
            return torch._foreach_div(list(g_u), n.item())
        return [torch.nan_to_num(t.sign(), nan=0.0) for t in g_u]


def select_params(model: nn.Module, which: str) -> List[nn.Parameter]:
    """The parameters delta may move, by the module-type selection SAM-ON uses (trainable ones only)."""
    if which not in MODES:
        raise ValueError(f"unknown parameter set '{which}'; valid: {', '.join(MODES)}")
    norm = set(norm_parameters(model))
    if which != 'all' and not norm:
        raise ValueError(f"--params {which}: the model has no normalization layers (BatchNorm, LayerNorm, GroupNorm, "
                         f"RMSNorm, ...); use --params all")
    keep = {'all': lambda p: True, 'on': lambda p: p in norm, 'nonorm': lambda p: p not in norm}[which]
    params = [p for p in model.parameters() if p.requires_grad and keep(p)]
    if not params:
        raise ValueError(f'--params {which}: no trainable parameter in that set')
    return params


class _Perturbation:
    """Sets w_P = w0 + T u and puts w0 back by copy (bit-exact, never by subtraction)."""

    def __init__(self, params: Sequence[nn.Parameter], ball: Ball) -> None:
        self.params = list(params)
        self.ball = ball
        self.w0 = [p.detach().clone() for p in self.params]
        self.t = [w.abs() for w in self.w0] if ball.adaptive else None

    def delta(self, u: Sequence[Tensor]) -> List[Tensor]:
        return torch._foreach_mul(list(u), self.t) if self.t is not None else list(u)

    @torch.no_grad()
    def set_u(self, u: Sequence[Tensor]) -> None:
        self.set_delta(self.delta(u))

    @torch.no_grad()
    def set_delta(self, delta: Sequence[Tensor]) -> None:
        torch._foreach_copy_(self.params, torch._foreach_add(self.w0, list(delta)))

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.params, self.w0)

    def grad_u(self, g: Sequence[Tensor]) -> List[Tensor]:
        """d L / d u = T g (chain rule through delta = T u)."""
        return torch._foreach_mul(list(g), self.t) if self.t is not None else list(g)


def _loss_and_grad(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], need_grad: bool
                   ) -> Tuple[float, Optional[List[Tensor]]]:
    """L and, if asked, dL/dP (zeros for parameters the loss does not reach). Every forward runs with
    autograd on, grad or not, so that equal weights always give bit-equal losses."""
    with torch.enable_grad():
        loss = loss_fn()
        if not need_grad:
            return loss.item(), None
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.item(), [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def apgd_checkpoints(n_iters: int) -> List[int]:
    """Auto-PGD's checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p, w = [0.0, 0.22], [math.ceil(0.22 * n_iters)]   # w_0 = 0 is the start, not a checkpoint
    while w[-1] < n_iters:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(round(p[-1] * n_iters, 9)))   # 0.57 * 100 is 57.000000001 in floating point
    return sorted(set(x for x in w if 0 < x <= n_iters))


def apgd_max(loss_fn: Callable[[], Tensor], pert: _Perturbation, n_iters: int,
             clean: Optional[Tuple[float, List[Tensor]]] = None, alpha: float = 0.75, rho_ratio: float = 0.75
             ) -> Tuple[float, float]:
    """max_{||u||_p <= rho} L(w0 + T u) by Auto-PGD (Croce & Hein 2020). Returns (best loss, L(w0)).

    From u_0 = 0 with step eta = 2 rho:
        z_{k+1} = Proj(u_k + eta d(grad_u L(u_k)))                  d = sign (inf) or g / ||g||_2 (2)
        u_{k+1} = Proj(u_k + alpha (z_{k+1} - u_k) + (1 - alpha)(u_k - u_{k-1}))   (u_1 = z_1)
    The best iterate is kept. At each checkpoint (``apgd_checkpoints``) eta is halved and the search
    restarts from the best iterate when fewer than ``rho_ratio`` of the steps since the last checkpoint
    raised the loss, or when neither eta nor the best loss changed since it. The loss is evaluated at
    u_0 .. u_N (N + 1 passes, the last without backward). The parameters are left at w0 + T u_N:
    the caller restores them.
    """
    ball = pert.ball
    if clean is None:
        pert.restore()
        clean = _loss_and_grad(loss_fn, pert.params, True)
    f0, g = clean
    u = [torch.zeros_like(w) for w in pert.w0]
    u_prev = u
    best_f, best_u, best_g = f0, u, g
    f_cur, eta = f0, 2.0 * ball.rho
    checkpoints = set(apgd_checkpoints(n_iters))
    last_cp, n_up, eta_at_cp, best_at_cp = 0, 0, eta, f0
    for k in range(n_iters):
        with torch.no_grad():
            z = ball.project(torch._foreach_add(u, ball.direction(pert.grad_u(g)), alpha=eta))
            if k == 0:
                u_next = z
            else:   # u + alpha (z - u) + (1 - alpha)(u - u_prev)
                u_next = torch._foreach_add(u, torch._foreach_sub(z, u), alpha=alpha)
                torch._foreach_add_(u_next, torch._foreach_sub(u, u_prev), alpha=1.0 - alpha)
                ball.project(u_next)
        u_prev, u = u, u_next
        pert.set_u(u)
        f, g = _loss_and_grad(loss_fn, pert.params, need_grad=k + 1 < n_iters)
        n_up += f > f_cur
        f_cur = f
        if f > best_f:
            best_f, best_u, best_g = f, u, g
        if k + 1 in checkpoints and k + 1 < n_iters:
            halve = n_up < rho_ratio * (k + 1 - last_cp) or (eta == eta_at_cp and best_f == best_at_cp)
            last_cp, n_up, eta_at_cp, best_at_cp = k + 1, 0, eta, best_f
            if halve:
                eta /= 2.0
                u = u_prev = best_u
                f_cur, g = best_f, best_g
    return best_f, f0


def one_step(loss_fn: Callable[[], Tensor], pert: _Perturbation,
             clean: Optional[Tuple[float, List[Tensor]]] = None) -> Tuple[float, float]:
    """L(w0 + eps) with eps from the project's own SAM perturbation for the ball's variant:
    p = 2: eps = rho T^2 g / ||T g||_2 ('sam' for T = 1, 'eleml2' for T = |w|);
    p = inf: eps = rho T sign(g) ('elemlinf', with T = |1| = 1 when not adaptive). Returns (L(w0 + eps), L(w0))."""
    ball = pert.ball
    if clean is None:
        pert.restore()
        clean = _loss_and_grad(loss_fn, pert.params, True)
    f0, g = clean
    if ball.p == 2:
        variant = 'eleml2' if ball.adaptive else 'sam'
        scale_from = pert.w0
    else:
        variant = 'elemlinf'
        scale_from = pert.w0 if ball.adaptive else [torch.ones_like(w) for w in pert.w0]
    eps, _, _ = compute_eps(variant, scale_from, [t.clone() for t in g], ball.rho, 0.0)
    pert.set_delta(eps)
    f, _ = _loss_and_grad(loss_fn, pert.params, False)
    return f, f0


def average_case(loss_fn: Callable[[], Tensor], pert: _Perturbation, n_samples: int, generator: torch.Generator,
                 f0: Optional[float] = None) -> Tuple[float, float]:
    """Mean of L(w0 + T u) over ``n_samples`` u = rho z / ||z||_p, z ~ N(0, I) drawn from ``generator`` (on CPU).
    Returns (mean loss, L(w0))."""
    if f0 is None:
        pert.restore()
        f0, _ = _loss_and_grad(loss_fn, pert.params, False)
    total = 0.0
    for _ in range(n_samples):
        z = [torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) for w in pert.w0]
        n = pert.ball.norm(z)
        u = torch._foreach_mul(z, (pert.ball.rho / n).item()) if n > 0 else z
        pert.set_u(u)
        total += _loss_and_grad(loss_fn, pert.params, False)[0]
    return total / max(n_samples, 1), f0


def _norm_train_modules(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batch_sharpness(model: nn.Module, params: Sequence[nn.Parameter], loss_fn: Callable[[], Tensor], ball: Ball,
                    metrics: Iterable[str] = METRICS, n_iters: int = 20, n_samples: int = 10,
                    generator: Optional[torch.Generator] = None, bn_batch_stats: bool = False) -> Dict[str, float]:
    """Sharpness of one batch (``loss_fn`` computes L_B from the model) for each metric, and ``clean_loss``.

    The model runs in eval mode (BatchNorm with running statistics) unless ``bn_batch_stats``, where the
    BatchNorm layers normalise with the batch's own statistics. Afterwards parameters, buffers (running
    statistics) and train/eval flags are exactly what they were."""
    metrics = list(metrics)
    for name in metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    pert = _Perturbation(params, ball)
    out = {}
    try:
        model.eval()
        if bn_batch_stats:
            for m in _norm_train_modules(model):
                m.train()
        clean = _loss_and_grad(loss_fn, pert.params, need_grad=any(m in metrics for m in ('worst', 'one-step')))
        out['clean_loss'] = clean[0]
        if 'worst' in metrics:
            out['worst'] = apgd_max(loss_fn, pert, n_iters, clean)[0] - clean[0]
        if 'one-step' in metrics:
            out['one-step'] = one_step(loss_fn, pert, clean)[0] - clean[0]
        if 'average' in metrics:
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            out['average'] = average_case(loss_fn, pert, n_samples, gen, clean[0])[0] - clean[0]
    finally:
        pert.restore()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, training in modes:
            m.training = training
    return out


def normalized_logits(logits: Tensor) -> Tensor:
    """Logits centred and divided by their l2 norm per example (floor 1e-10), so the loss does not
    grow with the logit scale alone."""
    z = logits - logits.mean(dim=-1, keepdim=True)
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-10)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad command-line input: one line for the user, no traceback."""


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog='python -m sam_on_timm.sharpness',
                                 description='Worst-case (Auto-PGD), 1-step and average-case m-sharpness of a timm '
                                             'model.')
    g = ap.add_argument_group('model')
    g.add_argument('--checkpoint', default='', metavar='FILE',
                   help="weights: a train.py checkpoint (model, classes and eval transform come from it) or timm's")
    g.add_argument('--pretrained', action='store_true', help="timm's pretrained weights for --model")
    g.add_argument('--model', default='', help='timm model name (default: the one in --checkpoint)')
    g.add_argument('--num-classes', type=int, default=None, help='classifier size (default: from the checkpoint)')
    g.add_argument('--ema', action='store_true', help="evaluate the checkpoint's EMA weights")
    g = ap.add_argument_group('data (as train.py reads it, with eval transforms)')
    g.add_argument('--data-dir', default='', help='data folder (default: the one in --checkpoint)')
    g.add_argument('--dataset', default=None, help="timm dataset name ('' = image folder; default: the checkpoint's)")
    g.add_argument('--split', default='train', help='split to draw the examples from (default: train)')
    g.add_argument('--n-examples', type=int, default=2048, help='examples, drawn with --seed (default 2048)')
    g.add_argument('--m', '--batch-size', dest='m', type=int, default=128,
                   help='examples per batch: the m of m-sharpness (default 128; under torchrun write --batch-size)')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--interpolation', default=None)
    g.add_argument('--workers', type=int, default=2)
    g = ap.add_argument_group('sharpness')
    g.add_argument('--metrics', default='worst,one-step,average',
                   help=f"comma-separated, of: {', '.join(METRICS)} (default: all)")
    g.add_argument('--params', default='all', choices=MODES, help='parameters delta may move (default: all)')
    g.add_argument('--rho', type=float, default=0.005, help='radius of the ball (default 0.005, the paper\'s Table 7)')
    g.add_argument('--p', '--lp', dest='p', default='inf', choices=tuple(PS),
                   help='norm of the ball (default: inf; under torchrun write --lp)')
    g.add_argument('--adaptive', action=argparse.BooleanOptionalAction, default=True,
                   help='T = |w| elementwise (default; --no-adaptive: T = 1)')
    g.add_argument('--normalize-logits', action=argparse.BooleanOptionalAction, default=True,
                   help='centre the logits and divide them by their l2 norm (default: on)')
    g.add_argument('--n-iters', type=int, default=20, help='Auto-PGD steps (default 20)')
    g.add_argument('--n-samples', type=int, default=10, help='Gaussian samples for the average case (default 10)')
    g.add_argument('--bn-batch-stats', action='store_true',
                   help='BatchNorm with the batch statistics (default: running statistics, as deployed)')
    g = ap.add_argument_group('run')
    g.add_argument('--device', default='cpu', help='cpu or cuda (under torchrun: each rank its local GPU)')
    g.add_argument('--seed', type=int, default=0, help='draws the examples and the Gaussian samples')
    g.add_argument('--output', default='', metavar='FILE',
                   help="JSON file (default: next to the checkpoint, named by every setting: "
                        "sharpness-<params>-l<p>[-adaptive]-rho<rho>-n<examples>-m<m>-it<steps>-seed<seed>[...].json)")
    g.add_argument('--quiet', action='store_true', help='no per-batch progress')
    return ap


def _load_checkpoint(path: str) -> dict:
    import argparse as _argparse
    try:
        with torch.serialization.safe_globals([_argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f"--checkpoint '{path}' cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"--checkpoint '{path}' holds no state dict")
    return ckpt


def _train_args(ckpt: dict) -> dict:
    a = ckpt.get('args') or {}
    return a if isinstance(a, dict) else vars(a)


def _check_args(args) -> None:
    if bool(args.checkpoint) == bool(args.pretrained):
        raise UsageError('give the weights: exactly one of --checkpoint FILE or --pretrained')
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise UsageError(f"--checkpoint '{args.checkpoint}' is not a file")
    if args.pretrained and not args.model:
        raise UsageError('--pretrained needs --model NAME')
    for name in ('n_examples', 'm', 'n_iters', 'n_samples'):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.n_examples % args.m:
        raise UsageError(f'--n-examples {args.n_examples} is not a multiple of --m {args.m}: every batch has m '
                         f'examples')
    if not (math.isfinite(args.rho) and args.rho >= 0):
        raise UsageError(f'--rho must be a finite number >= 0, got {args.rho}')
    metrics = [m.strip() for m in args.metrics.split(',') if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"--metrics {args.metrics}: valid: {', '.join(METRICS)} (comma-separated)")
    args.metrics = metrics
    if int(os.environ.get('RANK', '0')) == 0:   # the one writer: before any work, not after it
        try:
            check_output_file(args.output or _default_output(args))
        except ValueError as e:
            raise UsageError(str(e) if args.output else f'{e} (the default, next to the checkpoint): '
                                                        f'pass --output FILE') from None


def _build(args, device: torch.device):
    """The model (weights loaded, on device) and the data set with eval transforms."""
    import timm
    from timm.data import create_dataset, create_transform, resolve_data_config
    from timm.models import clean_state_dict
    ckpt, targs = None, {}
    if args.checkpoint:
        ckpt = _load_checkpoint(args.checkpoint)
        targs = _train_args(ckpt)
    args.model = args.model or targs.get('model') or (ckpt or {}).get('arch', '')
    if not args.model:
        raise UsageError(f"--checkpoint '{args.checkpoint}' does not name its model: pass --model NAME")
    if args.num_classes is None:
        args.num_classes = targs.get('num_classes')
    args.data_dir = args.data_dir or targs.get('data_dir') or ''
    if args.dataset is None:
        args.dataset = targs.get('dataset') or ''
    kwargs = {} if args.num_classes is None else dict(num_classes=args.num_classes)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, in_chans=targs.get('in_chans') or 3, **kwargs)
    except Exception as e:
        raise UsageError(f"cannot create model '{args.model}': {str(e).splitlines()[0]}") from None
    if ckpt is not None:
        key = 'state_dict_ema' if args.ema else 'state_dict'
        if args.ema and not ckpt.get(key):
            raise UsageError(f"--ema: '{args.checkpoint}' holds no EMA weights")
        state = ckpt.get(key, ckpt) if key in ckpt else ckpt
        try:
            model.load_state_dict(clean_state_dict(state))
        except Exception as e:
            raise UsageError(f"--checkpoint '{args.checkpoint}' does not fit '{args.model}' "
                             f"(--model, --num-classes): {str(e).splitlines()[0]}") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:   # the loss, its gradient and every metric would be nan: nothing to measure
        more = f' (+{len(bad) - 1} more)' if len(bad) > 1 else ''
        raise UsageError(f"the weights of {args.checkpoint or args.model!r}{' (EMA)' if args.ema else ''} are not "
                         f"finite: {bad[0]}{more} holds nan or inf (a diverged run): pass a checkpoint of a finite "
                         f"epoch")
    model.to(device)
    cfg_args = {k: targs.get(k) for k in ('input_size', 'img_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean',
                                          'std', 'in_chans')}
    for k in ('img_size', 'crop_pct', 'interpolation'):
        if getattr(args, k) is not None:
            cfg_args[k] = getattr(args, k)
            if k == 'img_size':
                cfg_args['input_size'] = None
    data_config = resolve_data_config(cfg_args, model=model)
    if not args.data_dir and not args.dataset:
        raise UsageError('no data: pass --data-dir DIR (and --dataset for a non-folder data set)')
    try:
        ds = create_dataset(args.dataset, root=args.data_dir, split=args.split, is_training=False)
        ds.transform = create_transform(**{k: data_config[k] for k in ('input_size', 'interpolation', 'mean', 'std',
                                                                       'crop_pct', 'crop_mode') if k in data_config},
                                        is_training=False)
    except Exception as e:
        raise UsageError(f"cannot read the data (--data-dir '{args.data_dir}', --dataset '{args.dataset}', "
                         f"--split '{args.split}'): {str(e).splitlines()[0]}") from None
    if len(ds) < args.n_examples:
        raise UsageError(f"--split '{args.split}' has {len(ds)} examples, fewer than --n-examples {args.n_examples}")
    return model, ds, data_config, ckpt


def _default_output(args) -> str:
    """The JSON's default name: every setting that changes the result is in it, so a rerun with other
    settings (fewer examples, another seed, other metrics ...) writes a file of its own instead of
    overwriting the earlier one; a rerun with the same settings replaces its own file."""
    parts = [f'sharpness-{args.params}', f"l{args.p}{'-adaptive' if args.adaptive else ''}", f'rho{args.rho:g}',
             f'n{args.n_examples}', f'm{args.m}', f'it{args.n_iters}', f'seed{args.seed}']
    metrics = list(args.metrics) if not isinstance(args.metrics, str) else args.metrics.split(',')
    if metrics != list(METRICS):
        parts.append('+'.join(metrics))
    if 'average' in metrics:
        parts.append(f's{args.n_samples}')
    if args.split != 'train':
        parts.append(args.split.replace(os.sep, '_'))
    parts += [flag for flag, on in (('ema', args.ema), ('bnbatch', args.bn_batch_stats),
                                    ('rawlogits', not args.normalize_logits)) if on]
    name = '-'.join(parts) + '.json'
    folder = os.path.dirname(os.path.abspath(args.checkpoint)) if args.checkpoint else os.getcwd()
    return os.path.join(folder, name)


def _init_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    world = int(os.environ.get('WORLD_SIZE', '1'))
    device = torch.device(device_name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {device_name}: CUDA is not available on this machine; use --device cpu')
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), world, device


def run(args) -> dict:
    _check_args(args)
    rank, world, device = _init_distributed(args.device)
    try:
        return _run(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> dict:
    model, ds, data_config, ckpt = _build(args, device)
    try:
        params = select_params(model, args.params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ball = Ball(args.rho, PS[args.p], args.adaptive)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.n_examples].tolist()
    n_batches = args.n_examples // args.m
    mine = [b for b in range(n_batches) if b % world == rank]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[idx[b * args.m:(b + 1) * args.m] for b in mine],
                                         num_workers=args.workers)
    keys = ['clean_loss', 'clean_ce', 'clean_correct'] + args.metrics
    values = torch.zeros(len(keys), n_batches, dtype=torch.float64)
    t0, cpu0 = time.time(), time.process_time()
    for i, (b, (x, y)) in enumerate(zip(mine, loader)):
        x, y = x.to(device), y.to(device)

        def loss_fn() -> Tensor:
            logits = model(x)
            return F.cross_entropy(normalized_logits(logits) if args.normalize_logits else logits, y)

        # each batch its own Gaussian stream: the same samples whichever rank runs it
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + b)
        res = batch_sharpness(model, params, loss_fn, ball, args.metrics, args.n_iters, args.n_samples, gen,
                              args.bn_batch_stats)
        model.eval()
        with torch.no_grad():
            logits = model(x)
        res['clean_ce'] = F.cross_entropy(logits, y).item()
        res['clean_correct'] = (logits.argmax(-1) == y).sum().item()
        for k, key in enumerate(keys):
            values[k, b] = res[key]
        if rank == 0 and not args.quiet:
            done = values[:, [c for c in mine[:i + 1]]]
            shown = '  '.join(f'{key} {done[keys.index(key)].mean().item():.4f}' for key in args.metrics)
            print(f'batch {b + 1}/{n_batches} ({time.time() - t0:.1f} s)  running mean: {shown}', flush=True)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(values)   # every batch is computed by one rank, the others hold 0: the sum is exact
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    result = dict(
        model=args.model, checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else '',
        name=os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint))) if args.checkpoint else args.model,
        pretrained=args.pretrained, ema=args.ema, data_dir=args.data_dir, dataset=args.dataset, split=args.split,
        n_examples=args.n_examples, m=args.m, seed=args.seed, params=args.params,
        n_params=sum(p.numel() for p in params), rho=args.rho, p=args.p, adaptive=args.adaptive,
        normalize_logits=args.normalize_logits, n_iters=args.n_iters, n_samples=args.n_samples,
        bn_batch_stats=args.bn_batch_stats, metrics=args.metrics, world_size=world, device=str(device),
        input_size=list(data_config['input_size']), seconds=seconds, cpu_seconds=cpu_seconds,
        checkpoint_metric=(ckpt or {}).get('metric'),
        clean_loss=values[0].mean().item(), clean_ce=values[1].mean().item(),
        clean_top1=100.0 * values[2].sum().item() / args.n_examples,
        sharpness={key: values[keys.index(key)].mean().item() for key in args.metrics},
        per_batch={key: values[keys.index(key)].tolist() for key in keys if key != 'clean_correct'},
    )
    if rank == 0:
        out = args.output or _default_output(args)   # (writable: checked in _check_args)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, 'w') as f:
            json.dump(result, f, indent=2)
        desc = (f"{args.params} params, l{args.p}{' adaptive' if args.adaptive else ''}, rho {args.rho:g}, "
                f"m {args.m}, {args.n_examples} examples{', normalized logits' if args.normalize_logits else ''}")
        print(f'{result["name"]}: {desc}; clean loss {result["clean_loss"]:.4f}, top-1 {result["clean_top1"]:.2f}%')
        for key in args.metrics:
            print(f'{key:>9} sharpness: {result["sharpness"][key]:.6f}')
        print(f'{seconds:.1f} s wall ({cpu_seconds:.1f} s CPU on rank 0) on {world} process(es); wrote {out}')
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f'sharpness: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
