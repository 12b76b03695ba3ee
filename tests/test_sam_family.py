"""The SAM family beside SAM-ON (sam_on_timm/family.py, docs/design.md section 8): Momentum-SAM, GSAM and
interval SAM through ``train_step``, each against a float64 reference written from its paper's formulas
(three whole updates on a small model, in every mode), their arguments' one-line errors, and exact resume.

The references compute gradients with autograd on a dict of float64 tensors (``torch.func.functional_call``)
and write the base step (timm's ``sgd``: Nesterov momentum SGD with weight decay) out by hand.
"""
import copy
import csv

import pytest
import torch
from torch import nn
from torch.func import functional_call

import sam_on_timm  # noqa: F401  (registers the names)
from sam_on_timm import FAMILY_OPTIMIZERS, SAM, is_sam_name
from sam_on_timm.train_step import split_chunks, train_step
from timm.optim import create_optimizer_v2, list_optimizers

LR, MOM, WD, RHO = 0.1, 0.9, 1e-3, 0.2
MODES = ('all', 'on', 'nonorm')


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(step, n=8):
    gen = torch.Generator().manual_seed(10 + step)
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def _in_p(name, mode):
    """Whether parameter ``name`` of ``_model`` is perturbed in ``mode`` (the LayerNorm is module 1)."""
    norm = name.startswith('1.')
    return {'all': True, 'on': norm, 'nonorm': not norm}[mode]


def _grad(model, w, x, y):
    w = {k: v.detach().clone().requires_grad_(True) for k, v in w.items()}
    loss = nn.functional.cross_entropy(functional_call(model, w, (x,)), y)
    return dict(zip(w, torch.autograd.grad(loss, list(w.values()))))


def _norm(d):
    return torch.sqrt(sum((v * v).sum() for v in d.values()))


class RefSGD:
    """Nesterov momentum SGD with L2 weight decay (torch.optim.SGD's formulas, written out); as timm's factory
    sets it up, no decay for 1-d tensors (biases, norm parameters)."""

    def __init__(self):
        self.v = {}

    def step(self, w, g, lr):
        out = {}
        for k in w:
            d = g[k] + (WD * w[k] if w[k].dim() > 1 else 0)
            self.v[k] = d.clone() if k not in self.v else MOM * self.v[k] + d
            out[k] = w[k] - lr * (d + MOM * self.v[k])
        return out


def _run(name, mode, steps=3, chunks=1, chunk_path='sequential', lrs=None, **kw):
    model = _model()
    opt = create_optimizer_v2(model, name, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, **kw)
    for step in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group['lr'] = lrs[step]
        x, y = _data(step)
        train_step(model, opt, split_chunks(x, y, len(x) // chunks), nn.functional.cross_entropy,
                   chunk_path=chunk_path)
    return model, opt


def _close(model, ref):
    worst = max((p.detach() - ref[k]).abs().max().item() for k, p in model.named_parameters())
    assert worst < 1e-10, worst
    return worst


def _suffix(mode):
    return '' if mode == 'all' else f'-{mode}'


# -- registration ----------------------------------------------------------------------------------------------
def test_the_family_names_are_registered_in_timm_in_three_modes():
    assert sorted(FAMILY_OPTIMIZERS) == sorted(f + _suffix(m) for f in ('msam', 'gsam', 'looksam', 'esam')
                                               for m in MODES)
    for name in FAMILY_OPTIMIZERS:
        assert name in list_optimizers() and is_sam_name(name) and is_sam_name('lookahead_' + name)
        opt = create_optimizer_v2(_model(), name, lr=0.1)
        assert isinstance(opt, SAM) and opt.name == name


# -- Momentum-SAM ------------------------------------------------------------------------------------------
def _msam_reference(mode, steps=3, chunks=1):
    """Becker et al. 2024, Alg. 1: w~ = w - rho v / ||v|| (v the momentum; none before the first step: w~ = w),
    g = grad L(w~), then the base step from w with g. P only is perturbed; ||v|| over P."""
    model = _model()
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    sgd = RefSGD()
    for step in range(steps):
        x, y = _data(step)
        vp = {k: v for k, v in sgd.v.items() if _in_p(k, mode)}
        eps = {k: torch.zeros_like(v) for k, v in w.items()}
        if vp:
            n = _norm(vp)
            eps.update({k: -RHO * v / n for k, v in vp.items()})
        wt = {k: w[k] + eps[k] for k in w}
        m = len(x) // chunks
        g = {k: torch.zeros_like(v) for k, v in w.items()}
        for c in range(chunks):
            gc = _grad(model, wt, x[c * m:(c + 1) * m], y[c * m:(c + 1) * m])
            g = {k: g[k] + gc[k] / chunks for k in g}
        w = sgd.step(w, g, LR)
    return w


@pytest.mark.parametrize('mode', MODES)
def test_msam_matches_the_float64_reference(mode):
    model, opt = _run('msam' + _suffix(mode), mode)
    _close(model, _msam_reference(mode))
    assert opt.updates == 3 and opt.last_eps_norm.item() == pytest.approx(RHO)


def test_msam_with_chunks_takes_one_eps_for_the_update():
    for path in ('sequential', 'auto'):
        model, _ = _run('msam-on', 'on', chunks=2, chunk_path=path)
        _close(model, _msam_reference('on', chunks=2))


def test_msam_first_update_is_a_plain_step_and_needs_no_ascent_pass():
    model = _model()
    opt = create_optimizer_v2(model, 'msam', lr=LR, momentum=MOM, rho=RHO)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = _data(0)
    stats = train_step(model, opt, [(x, y)], nn.functional.cross_entropy)
    assert len(calls) == 1 and stats.ascent_loss is None
    assert stats.eps_norm.item() == 0 and stats.skipped.item() == 1   # no momentum yet: eps = 0, counted
    train_step(model, opt, [(x, y)], nn.functional.cross_entropy)
    assert len(calls) == 2 and opt.last_eps_norm.item() == pytest.approx(RHO)


def _closure_steps(model, opt, n, lrs=None):
    """``n`` updates through ``opt.step(closure)`` on ``_data(step)``; ``lrs`` set per update. Returns the
    update index of every closure call (how many passes each update took)."""
    calls = []
    for step in range(n):
        if lrs is not None:
            for group in opt.param_groups:
                group['lr'] = lrs[step]
        x, y = _data(step)

        def closure():
            calls.append(step)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return calls


def test_msam_closure_step_matches_the_reference():
    model = _model()
    opt = create_optimizer_v2(model, 'msam-on', lr=LR, momentum=MOM, weight_decay=WD, rho=RHO)
    _closure_steps(model, opt, 3)
    _close(model, _msam_reference('on'))


@pytest.mark.parametrize('base', ['adamw', 'momentum'])
def test_msam_reads_the_momentum_of_sgd_and_adam_bases(base):
    model = _model()
    opt = create_optimizer_v2(model, 'msam', base_opt=base, lr=1e-2, momentum=MOM, rho=RHO)
    for step in range(2):
        train_step(model, opt, [_data(step)], nn.functional.cross_entropy)
    assert opt.last_eps_norm.item() == pytest.approx(RHO)


def test_msam_refuses_a_base_without_momentum_in_one_line():
    for kwargs in ({'momentum': 0.0}, {'base_opt': 'adagrad'}):
        with pytest.raises(ValueError) as e:
            create_optimizer_v2(_model(), 'msam', lr=0.1, **kwargs)
        assert '\n' not in str(e.value) and 'momentum' in str(e.value), e.value


# -- GSAM --------------------------------------------------------------------------------------------------
ALPHA, RHO_MIN, LRS, LR_MIN = 0.3, 0.05, [0.1, 0.06, 0.02], 0.01


def _gsam_reference(mode, chunks=1, interval=1, steps=3, lrs=LRS, alpha=ALPHA):
    """Zhuang et al. 2022, Alg. 1: rho_t = rho_min + (rho_max - rho_min)(lr_t - lr_min) / (lr_max - lr_min);
    eps = rho_t g / ||g||; g_p = grad L(w + eps); descent d = g_p - alpha (g - (g . g_p / ||g_p||^2) g_p), over P
    (g is known on P only; outside P d = g_p). m-sharpness: each chunk its own eps from its own g_c; g and g_p
    the means over the chunks. ``interval``: plain steps between SAM updates (interval SAM)."""
    model = _model()
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    sgd = RefSGD()
    for step in range(steps):
        x, y = _data(step)
        lr = lrs[step]
        m = len(x) // chunks
        if step % interval:
            g = _grad(model, w, x, y)
            w = sgd.step(w, g, lr)
            continue
        rho_t = RHO_MIN + (RHO - RHO_MIN) * (lr - LR_MIN) / (LRS[0] - LR_MIN)
        g_w = {k: torch.zeros_like(v) for k, v in w.items() if _in_p(k, mode)}
        g_p = {k: torch.zeros_like(v) for k, v in w.items()}
        for c in range(chunks):
            xc, yc = x[c * m:(c + 1) * m], y[c * m:(c + 1) * m]
            gc = {k: v for k, v in _grad(model, w, xc, yc).items() if _in_p(k, mode)}
            n = _norm(gc)
            wt = {k: w[k] + (rho_t * gc[k] / n if k in gc else 0) for k in w}
            gpc = _grad(model, wt, xc, yc)
            g_w = {k: g_w[k] + gc[k] / chunks for k in g_w}
            g_p = {k: g_p[k] + gpc[k] / chunks for k in g_p}
        dot = sum((g_w[k] * g_p[k]).sum() for k in g_w)
        gp2 = sum((g_p[k] * g_p[k]).sum() for k in g_w)
        d = dict(g_p)
        for k in g_w:
            d[k] = g_p[k] - alpha * (g_w[k] - dot / gp2 * g_p[k])
        w = sgd.step(w, d, lr)
    return w


@pytest.mark.parametrize('mode', MODES)
def test_gsam_matches_the_float64_reference(mode):
    model, _ = _run('gsam' + _suffix(mode), mode, lrs=LRS, gsam_alpha=ALPHA, rho_min=RHO_MIN, lr_min=LR_MIN)
    _close(model, _gsam_reference(mode))


@pytest.mark.parametrize('path', ['sequential', 'auto'])
def test_gsam_with_chunks_matches_the_reference(path):
    model, _ = _run('gsam-on', 'on', chunks=2, chunk_path=path, lrs=LRS, gsam_alpha=ALPHA, rho_min=RHO_MIN,
                    lr_min=LR_MIN)
    _close(model, _gsam_reference('on', chunks=2))


def test_gsam_closure_step_matches_the_reference():
    model = _model()
    opt = create_optimizer_v2(model, 'gsam', lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, gsam_alpha=ALPHA,
                              rho_min=RHO_MIN, lr_min=LR_MIN)
    _closure_steps(model, opt, 3, lrs=LRS)
    _close(model, _gsam_reference('all'))


def test_gsam_rho_follows_the_lr_and_alpha_zero_is_sam():
    model, opt = _run('gsam', 'all', steps=1, lrs=[0.1], rho_min=RHO_MIN, lr_min=LR_MIN)
    assert opt.current_rho() == pytest.approx(RHO)
    opt.param_groups[0]['lr'] = LR_MIN
    assert opt.current_rho() == pytest.approx(RHO_MIN)
    opt.param_groups[0]['lr'] = 0.0   # a warmup below lr_min stays at rho_min
    assert opt.current_rho() == pytest.approx(RHO_MIN)
    gsam, _ = _run('gsam-on', 'on')   # alpha 0, rho_min = rho: SAM-ON
    sam, _ = _run('sam-on', 'on')
    for a, b in zip(gsam.parameters(), sam.parameters()):
        assert torch.equal(a, b)


# -- LookSAM -----------------------------------------------------------------------------------------------
LOOK_ALPHA = 0.5


def _looksam_reference(mode, k=2, steps=4, chunks=1):
    """Liu et al. 2022, Alg. 1 (over P): t % k == 0: g = grad L(w), eps = rho g / ||g||, g_s = grad L(w + eps),
    g_v = g_s - (g . g_s / ||g||^2) g, descent g_s; otherwise g = grad L(w), descent
    g + alpha (||g|| / ||g_v||) g_v. Chunks: each its own eps; g, g_s the chunk means."""
    model = _model()
    w = {k_: p.detach().clone() for k_, p in model.named_parameters()}
    sgd, g_v = RefSGD(), None
    for step in range(steps):
        x, y = _data(step)
        m = len(x) // chunks
        if step % k:
            g = _grad(model, w, x, y)
            gp = {n: v for n, v in g.items() if _in_p(n, mode)}
            ratio = _norm(gp) / _norm(g_v)
            g = {n: g[n] + LOOK_ALPHA * ratio * g_v[n] if n in g_v else g[n] for n in g}
            w = sgd.step(w, g, LR)
            continue
        g_w = {n: torch.zeros_like(v) for n, v in w.items() if _in_p(n, mode)}
        g_s = {n: torch.zeros_like(v) for n, v in w.items()}
        for c in range(chunks):
            xc, yc = x[c * m:(c + 1) * m], y[c * m:(c + 1) * m]
            gc = {n: v for n, v in _grad(model, w, xc, yc).items() if _in_p(n, mode)}
            wt = {n: w[n] + (RHO * gc[n] / _norm(gc) if n in gc else 0) for n in w}
            gsc = _grad(model, wt, xc, yc)
            g_w = {n: g_w[n] + gc[n] / chunks for n in g_w}
            g_s = {n: g_s[n] + gsc[n] / chunks for n in g_s}
        coef = sum((g_w[n] * g_s[n]).sum() for n in g_w) / sum((g_w[n] * g_w[n]).sum() for n in g_w)
        g_v = {n: g_s[n] - coef * g_w[n] for n in g_w}
        w = sgd.step(w, g_s, LR)
    return w


@pytest.mark.parametrize('mode', MODES)
def test_looksam_matches_the_float64_reference(mode):
    model, opt = _run('looksam' + _suffix(mode), mode, steps=4, interval=2, looksam_alpha=LOOK_ALPHA)
    _close(model, _looksam_reference(mode))
    assert opt.looksam_gv is not None


@pytest.mark.parametrize('path', ['sequential', 'auto'])
def test_looksam_with_chunks_matches_the_reference(path):
    model, _ = _run('looksam-on', 'on', steps=4, chunks=2, chunk_path=path, interval=2, looksam_alpha=LOOK_ALPHA)
    _close(model, _looksam_reference('on', chunks=2))


def test_looksam_closure_step_matches_the_reference():
    model = _model()
    opt = create_optimizer_v2(model, 'looksam-nonorm', lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, interval=2,
                              looksam_alpha=LOOK_ALPHA)
    calls = _closure_steps(model, opt, 4)
    _close(model, _looksam_reference('nonorm'))
    assert calls == [0, 0, 1, 2, 2, 3]   # two passes on the SAM updates, one on the reuse updates


# -- ESAM --------------------------------------------------------------------------------------------------
BETA, GAMMA = 0.5, 0.5


def _per_sample(model, w, x, y):
    out = functional_call(model, w, (x,))
    return nn.functional.cross_entropy(out, y, reduction='none')


def _esam_reference(mode, subsets, chunks=1, steps=3):
    """Du et al. 2022, Alg. 1 (over P): S the update's tensors (``subsets``, drawn by the optimizer: an input
    here); g = grad L(w) on S; eps = (rho / beta) g / ||g||_S on S, 0 elsewhere; per sample
    s_i = L_i(w + eps) - L_i(w); the descent gradient is grad of the mean loss at w + eps over the
    round(gamma n) samples with the largest s_i. Chunks: each its own eps and selection, the mean of their
    descent gradients."""
    model = _model()
    w = {k: p.detach().clone() for k, p in model.named_parameters()}
    sgd = RefSGD()
    for step in range(steps):
        x, y = _data(step)
        s_set = subsets[step]
        m = len(x) // chunks
        g_d = {k: torch.zeros_like(v) for k, v in w.items()}
        for c in range(chunks):
            xc, yc = x[c * m:(c + 1) * m], y[c * m:(c + 1) * m]
            g = {k: v for k, v in _grad(model, w, xc, yc).items() if k in s_set}
            n = _norm(g)
            wt = {k: w[k] + (RHO / BETA * g[k] / n if k in g else 0) for k in w}
            sharp = _per_sample(model, wt, xc, yc) - _per_sample(model, w, xc, yc)
            keep = int(round(GAMMA * m))
            order = sorted(range(m), key=lambda i: -sharp[i].item())[:keep]
            idx = torch.tensor(sorted(order))
            gc = _grad(model, wt, xc[idx], yc[idx])
            g_d = {k: g_d[k] + gc[k] / chunks for k in g_d}
        w = sgd.step(w, g_d, LR)
    return w


def _esam_run(mode, chunks=1, steps=3):
    model = _model()
    opt = create_optimizer_v2(model, 'esam' + _suffix(mode), lr=LR, momentum=MOM, weight_decay=WD, rho=RHO,
                              esam_beta=BETA, esam_gamma=GAMMA, esam_seed=3)
    subsets, name_of = [], {id(p): k for k, p in model.named_parameters()}
    for step in range(steps):
        x, y = _data(step)
        train_step(model, opt, split_chunks(x, y, len(x) // chunks), nn.functional.cross_entropy)
        assert len(opt.swp) == len(opt.perturbed)
        subsets.append({name_of[id(p)] for p, keep in zip(opt.perturbed, opt.swp) if keep})
    return model, subsets


@pytest.mark.parametrize('mode', MODES)
def test_esam_matches_the_float64_reference(mode):
    model, subsets = _esam_run(mode)
    n_p = sum(_in_p(k, mode) for k, _ in _model().named_parameters())
    assert all(s for s in subsets)   # never empty (an empty one would be a plain step)
    assert mode == 'on' or any(len(s) < n_p for s in subsets)   # a real subset (-on: 2 tensors, both drawn here)
    _close(model, _esam_reference(mode, subsets))


def test_esam_with_chunks_matches_the_reference():
    model, subsets = _esam_run('all', chunks=2)
    _close(model, _esam_reference('all', subsets, chunks=2))


def test_esam_descends_on_the_selected_samples_only_and_refuses_what_it_cannot_do():
    model = _model()
    opt = create_optimizer_v2(model, 'esam-on', lr=LR, rho=RHO, esam_gamma=0.25)
    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    train_step(model, opt, [_data(0)], nn.functional.cross_entropy)
    assert seen == [8, 8, 2]   # ascent, the no-grad pass at w + eps, the descent on 2 of 8
    with pytest.raises(ValueError, match='cannot share one pass'):
        train_step(model, opt, split_chunks(*_data(1), 4), nn.functional.cross_entropy, chunk_path='batched')
    with pytest.raises(ValueError, match='ascent_frac'):
        train_step(model, opt, [_data(1)], nn.functional.cross_entropy, ascent_frac=0.5)


def test_esam_ascent_computes_the_gradients_of_its_subset_only():
    """ESAM's saving: during the ascent only the tensors of this update's subset S require gradients (no
    weight-gradient kernels for the rest of P, nor outside P); every flag is back afterwards."""
    model = _model()
    opt = create_optimizer_v2(model, 'esam', lr=LR, rho=RHO, esam_beta=0.5)
    flags = []
    model.register_forward_pre_hook(lambda mod, inp: flags.append([p.requires_grad for p in model.parameters()]))
    proper = 0
    for step in range(4):
        flags.clear()
        train_step(model, opt, [_data(step)], nn.functional.cross_entropy)
        assert flags[0] == opt.swp, (step, flags[0], opt.swp)   # esam: P is every parameter, in order
        assert all(flags[2]) and all(p.requires_grad for p in model.parameters())   # the descent: all
        proper += 0 < sum(opt.swp) < len(opt.swp)
    assert proper >= 2   # the draws left some tensors out (else the check above says nothing)


@pytest.mark.parametrize('name', ['esam', 'esam-on'])
def test_esam_under_a_grad_scaler_equals_the_unscaled_run(name):
    """fp16's GradScaler (here on float32, scale 2^10: scaling is exact) changes nothing: the ascent's
    scaled gradient is unscaled for eps, the selection reads the unscaled per-sample losses, the descent is
    unscaled by the step; three updates equal those without a scaler."""
    weights = []
    for scaler in (None, torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)):
        model = _model().float()
        opt = create_optimizer_v2(model, name, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, esam_beta=BETA,
                                  esam_gamma=GAMMA)
        for step in range(3):
            x, y = _data(step)
            stats = train_step(model, opt, [(x.float(), y)], nn.functional.cross_entropy, loss_scaler=scaler)
            assert float(stats.skipped) == 0
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** 10   # no overflow: every step ran
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_esam_with_an_empty_subset_takes_a_plain_step_and_an_unreached_tensor_is_not_an_error():
    """A draw that perturbs no tensor (beta 0.05 over esam-on's two LayerNorm tensors: most draws) is a
    skipped perturbation: the update is the base step at w, counted in ``skipped``. A tensor of S that
    the loss does not reach (beta 1: every tensor drawn) has a zero gradient, not an error."""
    model = _model()
    opt = create_optimizer_v2(model, 'esam-on', lr=LR, rho=RHO, esam_beta=0.05)
    empty = 0
    for step in range(6):
        stats = train_step(model, opt, [_data(step)], nn.functional.cross_entropy)
        if not any(opt.swp):
            empty += 1
            assert float(stats.skipped) == 1.0 and float(stats.eps_norm) == 0.0
    assert empty >= 3

    model = nn.Sequential(_model(), nn.LayerNorm(3)).double()   # the second LayerNorm's output is not used
    model.forward = lambda x: model[0](x)
    opt = create_optimizer_v2(model, 'esam-on', lr=LR, rho=RHO, esam_beta=1.0)
    stats = train_step(model, opt, [_data(0)], nn.functional.cross_entropy)
    assert all(opt.swp) and float(stats.skipped) == 0.0 and float(stats.eps_norm) == pytest.approx(RHO)
    opt = create_optimizer_v2(model, 'esam-on', lr=LR, rho=RHO, esam_beta=0.5)
    unreached_only = 0   # draws of the unused LayerNorm's tensors alone: a loss that needs no gradient at all
    for step in range(12):
        stats = train_step(model, opt, [_data(step)], nn.functional.cross_entropy)
        if any(opt.swp) and not any(opt.swp[:2]):
            unreached_only += 1
            assert float(stats.skipped) == 1.0
    assert unreached_only >= 1


def test_esam_chunk_weights_weight_the_descent():
    """With chunk weights (1, 0) the update is that of chunk 0 alone (one SWP draw per update either way;
    chunk 1's ascent and selection change nothing with a LayerNorm model)."""
    x, y = _data(0)
    runs = []
    for chunks, weights in (([(x[:4], y[:4]), (x[4:], y[4:])], [1.0, 0.0]), ([(x[:4], y[:4])], None)):
        model = _model()
        opt = create_optimizer_v2(model, 'esam', lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, esam_beta=BETA,
                                  esam_gamma=GAMMA)
        train_step(model, opt, chunks, nn.functional.cross_entropy, chunk_weights=weights)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    model = _model()   # unequal chunks, no weights: n_c / N, not 1 / k
    opt = create_optimizer_v2(model, 'esam', lr=LR, rho=RHO, esam_beta=1.0, esam_gamma=1.0)
    train_step(model, opt, [(x[:6], y[:6]), (x[6:], y[6:])], nn.functional.cross_entropy)
    ref = _model()
    ref_opt = create_optimizer_v2(ref, 'esam', lr=LR, rho=RHO, esam_beta=1.0, esam_gamma=1.0)
    train_step(ref, ref_opt, [(x[:6], y[:6]), (x[6:], y[6:])], nn.functional.cross_entropy,
               chunk_weights=[0.75, 0.25])
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_esam_bn_update_ascent_keeps_the_ascent_statistics_only():
    """``bn_update='ascent'``: BatchNorm's running statistics are those of the ascent pass over the whole chunk
    at w (one train-mode forward, written here), the no-gradient pass and the descent leave them alone;
    with 'both' the descent on the selected samples moves them again."""
    def bn_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()

    x, y = _data(0)
    ref = bn_model()
    ref(x)   # train mode: one update of the running statistics
    stats = {}
    for bn_update in ('ascent', 'both'):
        model = bn_model()
        opt = create_optimizer_v2(model, 'esam-on', lr=LR, rho=RHO, esam_beta=1.0, esam_gamma=0.5)
        train_step(model, opt, [(x, y)], nn.functional.cross_entropy, bn_update=bn_update)
        stats[bn_update] = (model[1].running_mean.clone(), model[1].running_var.clone())
    torch.testing.assert_close(stats['ascent'][0], ref[1].running_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(stats['ascent'][1], ref[1].running_var, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(stats['both'][0], ref[1].running_mean)


def test_esam_logs_the_means_over_its_chunks():
    """Two chunks, beta 1 and gamma 1 (every tensor, every sample): ``ascent_loss`` is the mean of the chunks'
    losses at w, ``loss`` the mean of their losses at w + rho g_c / ||g_c||, ``eps_norm`` rho, computed here."""
    x, y = _data(0)
    model = _model()
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    ascent, descent = [], []
    for xc, yc in ((x[:4], y[:4]), (x[4:], y[4:])):
        ascent.append(nn.functional.cross_entropy(functional_call(model, w, (xc,)), yc))
        g = _grad(model, w, xc, yc)
        at = {k: w[k] + RHO * g[k] / _norm(g) for k in w}
        descent.append(nn.functional.cross_entropy(functional_call(model, at, (xc,)), yc))
    opt = create_optimizer_v2(model, 'esam', lr=LR, rho=RHO, esam_beta=1.0, esam_gamma=1.0)
    stats = train_step(model, opt, [(x[:4], y[:4]), (x[4:], y[4:])], nn.functional.cross_entropy)
    torch.testing.assert_close(stats.ascent_loss, (ascent[0] + ascent[1]).detach() / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.loss, (descent[0] + descent[1]).detach() / 2, rtol=1e-12, atol=0)
    assert float(stats.eps_norm) == pytest.approx(RHO, rel=1e-12) and float(stats.skipped) == 0.0

    # unequal chunks (6 + 2) log n_c / N shares; a chunk whose loss is 0 (zero gradient) is one skip
    def loss_fn(out, target):   # labels 3.. weigh 0
        return nn.functional.cross_entropy(out, target % 3, reduction='none').mul((target < 3).double()).mean()

    z = y.clone()
    z[:6] += 3
    model = _model()
    opt = create_optimizer_v2(model, 'esam', lr=LR, rho=RHO, esam_beta=1.0, esam_gamma=1.0)
    stats = train_step(model, opt, [(x[:6], z[:6]), (x[6:], z[6:])], loss_fn)
    want = nn.functional.cross_entropy(functional_call(model, w, (x[6:],)), y[6:]).detach() * 0.25
    torch.testing.assert_close(stats.ascent_loss, want, rtol=1e-12, atol=0)   # 0.75 * 0 + 0.25 * L_1
    g = _grad(model, w, x[6:], y[6:])
    at = {k: w[k] + RHO * g[k] / _norm(g) for k in w}
    want = nn.functional.cross_entropy(functional_call(model, at, (x[6:],)), y[6:]).detach() * 0.25
    torch.testing.assert_close(stats.loss, want, rtol=1e-12, atol=0)
    assert float(stats.skipped) == 1.0 and float(stats.eps_norm) == pytest.approx(RHO / 2, rel=1e-12)


# -- interval SAM ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', MODES)
def test_interval_sam_matches_the_float64_reference(mode):
    """K = 2 over three updates: SAM, plain, SAM (GSAM with alpha 0 and constant rho is plain SAM)."""
    model, opt = _run('sam' + _suffix(mode), mode, interval=2)
    _close(model, _gsam_reference(mode, interval=2, lrs=[LR] * 3, alpha=0.0))
    assert opt.updates == 3


def test_interval_gsam_matches_the_reference():
    model, _ = _run('gsam-nonorm', 'nonorm', interval=2, lrs=LRS, gsam_alpha=ALPHA, rho_min=RHO_MIN, lr_min=LR_MIN)
    _close(model, _gsam_reference('nonorm', interval=2))


def test_interval_sam_skips_the_ascent_between():
    model = _model()
    opt = create_optimizer_v2(model, 'sam-on', lr=LR, rho=RHO, interval=3)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for step in range(4):
        train_step(model, opt, [_data(step)], nn.functional.cross_entropy)
    assert len(calls) == 2 + 1 + 1 + 2   # updates 0 and 3 are SAM updates


@pytest.mark.parametrize('name', ['sam-on', 'msam', 'gsam-on', 'looksam-on', 'esam'])
def test_resume_mid_run_equals_the_uninterrupted_run(name):
    """The update counter (interval SAM's phase) and the momentum (Momentum-SAM's direction) come back from
    ``state_dict``: 4 updates, a new optimizer from the state, 3 more = 7 updates in one go."""
    kw = dict(interval=3, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO)
    if name.startswith('gsam'):
        kw.update(gsam_alpha=ALPHA, rho_min=RHO_MIN, lr_min=LR_MIN)
    if name.startswith('looksam'):
        kw.update(looksam_alpha=LOOK_ALPHA)
    if name.startswith('esam'):
        kw.update(esam_beta=BETA, esam_gamma=GAMMA)
    whole = _model()
    opt = create_optimizer_v2(whole, name, **kw)
    for step in range(7):
        train_step(whole, opt, [_data(step)], nn.functional.cross_entropy)

    part = _model()
    opt = create_optimizer_v2(part, name, **kw)
    for step in range(4):
        train_step(part, opt, [_data(step)], nn.functional.cross_entropy)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(part.state_dict())
    assert state['sam_updates'] == 4
    resumed = _model()
    resumed.load_state_dict(weights)
    opt = create_optimizer_v2(resumed, name, **kw)
    opt.load_state_dict(state)
    for step in range(4, 7):
        train_step(resumed, opt, [_data(step)], nn.functional.cross_entropy)
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_looksam_direction_is_loaded_in_the_dtype_of_the_parameters():
    """g_v saved from a float64 run and loaded into the same model in float32 comes back as float32 (as
    torch casts the momentum buffers), with the saved values; the next reuse step then runs."""
    _, opt = _run('looksam-on', 'on', steps=1, interval=2, looksam_alpha=LOOK_ALPHA)
    state = copy.deepcopy(opt.state_dict())
    assert all(v.dtype == torch.float64 for v in state['sam_looksam_gv'])
    model = _model().float()
    loaded = create_optimizer_v2(model, 'looksam-on', lr=LR, momentum=MOM, weight_decay=WD, rho=RHO,
                                 interval=2, looksam_alpha=LOOK_ALPHA)
    loaded.load_state_dict(state)
    assert [v.dtype for v in loaded.looksam_gv] == [torch.float32] * len(loaded.perturbed)
    for v, s in zip(loaded.looksam_gv, state['sam_looksam_gv']):
        torch.testing.assert_close(v, s.float())
    x, y = _data(1)
    train_step(model, loaded, [(x.float(), y)], nn.functional.cross_entropy)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_esam_state_loads_into_another_sam_name():
    """Changing the optimizer name on resume (an ESAM run continued with SAM-ON) keeps the base optimizer's
    state; ESAM's generator state in the file is not needed there."""
    _, opt = _run('esam-on', 'on', steps=2, esam_beta=0.5, esam_gamma=0.5)
    state = copy.deepcopy(opt.state_dict())
    assert state.get('sam_esam_rng') is not None
    _, other = _run('sam-on', 'on', steps=0)
    other.load_state_dict(state)
    assert other.updates == 2
    for k, v in state['state'].items():
        assert torch.equal(other.state_dict()['state'][k]['momentum_buffer'], v['momentum_buffer'])


@pytest.mark.parametrize('base', ['madgrad', 'sgdp'])
def test_msam_refuses_a_base_whose_momentum_has_another_name_at_construction(base):
    """madgrad and sgdp have momentum but keep it under other state keys: refused when the optimizer is made,
    in one line, not at the first perturbation."""
    with pytest.raises(ValueError) as e:
        create_optimizer_v2(_model(), 'msam-on', lr=LR, rho=RHO, base_opt=base)
    assert '\n' not in str(e.value) and f"base '{base}' keeps none" in str(e.value), e.value


def test_momentum_probe_tells_the_bases_apart():
    from sam_on_timm.family import keeps_momentum_buffer
    from timm.optim import Lookahead
    w = [nn.Parameter(torch.zeros(3))]
    assert keeps_momentum_buffer(torch.optim.SGD(w, lr=0.1, momentum=0.9)) is True
    assert keeps_momentum_buffer(torch.optim.SGD(w, lr=0.1)) is False
    assert keeps_momentum_buffer(torch.optim.AdamW(w, lr=0.1)) is True
    assert keeps_momentum_buffer(Lookahead(torch.optim.SGD(w, lr=0.1, momentum=0.9))) is None
    assert torch.equal(w[0], torch.zeros(3)) and w[0].grad is None   # the probe steps a copy, not the model


def test_msam_whose_base_keeps_no_buffer_fails_at_its_first_perturbation(monkeypatch):
    """Where the probe cannot tell (None), the first perturbation after a base step finds no buffer and says so,
    instead of going on with eps = 0 for ever."""
    import sam_on_timm.sam as sam_module
    monkeypatch.setattr(sam_module, 'keeps_momentum_buffer', lambda opt: None)
    model = _model()
    opt = create_optimizer_v2(model, 'msam-on', lr=LR, rho=RHO, base_opt='madgrad')
    train_step(model, opt, [_data(0)], nn.functional.cross_entropy)   # no state yet: a plain step
    with pytest.raises(RuntimeError, match="base optimizer 'madgrad' keeps no momentum buffer"):
        train_step(model, opt, [_data(1)], nn.functional.cross_entropy)


# -- arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, kwargs, words', [
    ('sam', {'interval': 0}, 'interval'),
    ('sam', {'interval': 1.5}, 'interval'),
    ('gsam', {'gsam_alpha': float('nan')}, 'gsam_alpha'),
    ('gsam', {'gsam_alpha': -0.1}, 'gsam_alpha'),
    ('gsam', {'rho_min': 0.5}, 'rho_min'),      # above rho (0.2)
    ('gsam', {'rho_min': float('inf')}, 'rho_min'),
    ('sam-on', {'gsam_alpha': 0.1}, 'gsam'),   # an option of another name
    ('msam', {'rho_min': 0.01}, 'gsam'),
    ('msam', {'variant': 'layerl2'}, 'T = 1'),
    ('looksam', {'looksam_alpha': float('nan')}, 'looksam_alpha'),
    ('looksam', {'looksam_alpha': -1.0}, 'looksam_alpha'),
    ('gsam', {'looksam_alpha': 0.5}, 'looksam'),
    ('esam', {'esam_beta': 0.0}, 'esam_beta'),
    ('esam', {'esam_beta': 1.5}, 'esam_beta'),
    ('esam', {'esam_gamma': float('nan')}, 'esam_gamma'),
    ('sam', {'esam_gamma': 0.5}, 'esam'),
])
def test_bad_family_arguments_are_refused_in_one_line(name, kwargs, words):
    with pytest.raises(ValueError) as e:
        create_optimizer_v2(_model(), name, lr=0.1, rho=RHO, **kwargs)
    assert '\n' not in str(e.value) and words in str(e.value), e.value


# -- train.py ----------------------------------------------------------------------------------------------
TRAIN = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
         '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2',
         '--seed', '3']


def _train(image_folder, out, *extra):
    import train
    return train.main(['--data-dir', image_folder, '--output', str(out), *TRAIN, *extra])


@pytest.mark.parametrize('extra, flag', [
    (['--opt', 'sam-on', '--sam-interval', '0'], '--sam-interval'),
    (['--opt', 'sgd', '--sam-interval', '2'], '--sam-interval'),
    (['--opt', 'gsam-on', '--gsam-alpha', 'nan'], '--gsam-alpha'),
    (['--opt', 'gsam-on', '--gsam-alpha', '-1'], '--gsam-alpha'),
    (['--opt', 'gsam-on', '--rho-min', '0.1'], '--rho-min'),   # above --rho 0.05
    (['--opt', 'sam-on', '--gsam-alpha', '0.1'], '--gsam-alpha'),
    (['--opt', 'msam-on', '--rho-min', '0.01'], '--rho-min'),
    (['--opt', 'sgd', '--gsam-alpha', '0.1'], '--gsam-alpha'),
    (['--opt', 'looksam-on', '--looksam-alpha', 'inf'], '--looksam-alpha'),
    (['--opt', 'sam-on', '--looksam-alpha', '0.5'], '--looksam-alpha'),
    (['--opt', 'esam', '--esam-beta', '0'], '--esam-beta'),
    (['--opt', 'esam-on', '--esam-gamma', '1.5'], '--esam-gamma'),
    (['--opt', 'gsam', '--esam-gamma', '0.5'], '--esam-gamma'),
    (['--opt', 'esam-on', '--sam-ascent-frac', '0.5'], '--sam-ascent-frac'),
    (['--opt', 'esam-on', '--sam-m', '2', '--sam-chunks', 'batched'], '--sam-chunks'),
    (['--opt', 'msam-on', '--sam-base', 'madgrad'], 'madgrad'),
])
def test_train_refuses_bad_family_flags_in_one_line(image_folder, tmp_path, capsys, extra, flag):
    assert _train(image_folder, tmp_path, *extra, '--experiment', 'bad') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error:') and flag in err[0], err
    assert not (tmp_path / 'bad').exists()


def test_train_runs_the_family(image_folder, tmp_path):
    for i, extra in enumerate((['--opt', 'msam-on'], ['--opt', 'gsam-on', '--gsam-alpha', '0.2', '--rho-min', '0.01'],
                               ['--opt', 'sam-on', '--sam-interval', '2', '--sam-m', '2'],
                               ['--opt', 'looksam-on', '--sam-interval', '2', '--looksam-alpha', '0.5'],
                               ['--opt', 'esam', '--esam-beta', '0.5', '--esam-gamma', '0.5'])):
        assert _train(image_folder, tmp_path, *extra, '--experiment', f'run{i}') == 0
        assert (tmp_path / f'run{i}' / 'last.pth.tar').exists()
        with open(tmp_path / f'run{i}' / 'summary.csv') as f:
            row = next(csv.DictReader(f))
        # msam has no ascent pass: no ascent loss; interval SAM's is the mean over its SAM updates, and the
        # sharpness (descent minus ascent loss over the same updates) is left out
        assert (row['train_ascent_loss'] == '') == (i == 0), row
        assert (row['train_sharpness'] == '') == (i not in (1, 4)), row
        if i in (2, 3):   # ||eps|| = rho on each SAM update (T = 1); the plain updates between do not count
            assert float(row['train_eps_norm']) == pytest.approx(0.05, rel=1e-5), row
