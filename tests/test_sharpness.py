"""Sharpness evaluation: Auto-PGD against closed-form maxima, the ball, the 1-step value, invariances,
exact restores, the command line and 2 gloo ranks (sam_on_timm.sharpness)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sam_on_timm import compute_eps, norm_parameters
from sam_on_timm.sharpness import Ball, _Perturbation, apgd_checkpoints, apgd_max, batch_sharpness, main, one_step

from tests.helpers import make_image_folder

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# closed forms
# ---------------------------------------------------------------------------------------------
class Vec(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def _concave_case(p, adaptive, seed=0, n=40):
    """L(w0 + delta) = g.delta - 1/2 sum lam_i delta_i^2 (lam_i > 0): concave, so the maximum over the ball
    has a closed form; coordinates whose optimum lies inside the ball make sign steps overshoot, and
    the unequal lam_i turn the l2 optimum away from g (one normalised step does not reach it)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=gen, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    lam, rho = 10.0 ** (2.0 * torch.rand(n, generator=gen, dtype=torch.float64) - 1.0), 0.5
    model = Vec(w0)

    def loss_fn():
        d = model.w - w0
        return (g * d).sum() - 0.5 * (lam * d * d).sum()

    t = w0.abs() if adaptive else torch.ones_like(w0)
    if p == math.inf:   # separable: delta_i = clip(g_i / lam, +-rho t_i)
        d = torch.maximum(torch.minimum(g / lam, rho * t), -rho * t)
        best = ((g * d).sum() - 0.5 * (lam * d * d).sum()).item()
    else:   # in u = delta / t: max (t g).u - 1/2 sum lam t^2 u^2, ||u|| <= rho:
        # u = tg / (lam t^2 + mu), the multiplier mu >= 0 by bisection
        tg = t * g

        def u_of(mu):
            return tg / (lam * t * t + mu)
        lo, hi = 0.0, 1e6
        if u_of(0.0).norm() > rho:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if u_of(mid).norm() > rho else (lo, mid)
            mu = hi
        else:
            mu = 0.0
        d = t * u_of(mu)
        best = ((g * d).sum() - 0.5 * (lam * d * d).sum()).item()
    return model, loss_fn, Ball(rho, p, adaptive), best, t


@pytest.mark.parametrize('p', [math.inf, 2.0])
@pytest.mark.parametrize('adaptive', [True, False])
def test_apgd_reaches_closed_form_concave(p, adaptive):
    model, loss_fn, ball, best, _ = _concave_case(p, adaptive)
    pert = _Perturbation([model.w], ball)
    found, f0 = apgd_max(loss_fn, pert, n_iters=20)
    assert f0 == 0.0
    assert found <= best + 1e-12          # never above the true maximum
    assert found >= 0.99 * best           # and within 1% of it
    # for l-inf the 1-step value (a corner of the box) is clearly below: the iterations reach the optimum
    first = one_step(loss_fn, pert)[0]
    assert first <= found and (p == 2.0 or first < 0.95 * best)


def _linear_classifier(seed=0, n=6, d=5, k=4):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, k).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, d, generator=gen, dtype=torch.float64))
        lin.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=gen)
    return lin, x, y


def test_apgd_linear_classifier_linf_adaptive_closed_form():
    """One example: the worst W + delta with |delta| <= rho |W| lowers the true logit by
    r_y = rho sum_j |W_yj x_j| + rho |b_y| and raises every other by its r_k, which is exact."""
    lin, x, y = _linear_classifier()
    rho = 0.3
    ball = Ball(rho, math.inf, True)
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        z = lin(xi)[0].detach()
        r = rho * ((lin.weight * xi).abs().sum(1) + lin.bias.abs()).detach()
        z_worst = z + r
        z_worst[yi] = z[yi] - r[yi]
        exact = (torch.logsumexp(z_worst, 0) - z_worst[yi]).item() - F.cross_entropy(z[None], yi).item()
        res = batch_sharpness(lin, list(lin.parameters()), lambda: F.cross_entropy(lin(xi), yi), ball,
                              metrics=['worst'])
        assert exact * 0.99 <= res['worst'] <= exact + 1e-10


def test_ball_respected_every_iterate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    w0 = [p.detach().clone() for p in net.parameters()]
    for ball in (Ball(0.2, math.inf, True), Ball(0.2, 2.0, True), Ball(0.2, math.inf, False), Ball(0.2, 2.0, False)):
        seen = []

        def loss_fn():
            delta = [p.detach() - w for p, w in zip(net.parameters(), w0)]
            if ball.adaptive:
                u = [torch.where(w == 0, torch.zeros_like(d), d / w.abs()) for d, w in zip(delta, w0)]
            else:
                u = delta
            flat = torch.cat([t.flatten() for t in u])
            seen.append(flat.abs().max().item() if ball.p == math.inf else flat.norm().item())
            return F.cross_entropy(net(x), y)
        batch_sharpness(net, list(net.parameters()), loss_fn, ball, metrics=['worst', 'one-step', 'average'],
                        n_iters=15, n_samples=3)
        assert len(seen) >= 15 and max(seen) > 0.5 * ball.rho
        assert max(seen) <= ball.rho * (1 + 1e-9)


@pytest.mark.parametrize('p,adaptive,variant', [(math.inf, True, 'elemlinf'), (2.0, True, 'eleml2'),
                                                (2.0, False, 'sam')])
def test_one_step_is_loss_at_compute_eps(p, adaptive, variant):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = list(net.parameters())
    rho = 0.05
    net.eval()
    with torch.no_grad():
        l0 = F.cross_entropy(net(x), y).item()
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    eps, _, _ = compute_eps(variant, [p.detach() for p in params], list(g), rho, 0.0)
    with torch.no_grad():
        for p_, e in zip(params, eps):
            p_.add_(e)
        l1 = F.cross_entropy(net(x), y).item()
        for p_, e in zip(params, eps):
            p_.sub_(e)
    net.train()
    res = batch_sharpness(net, params, lambda: F.cross_entropy(net(x), y), Ball(rho, p, adaptive),
                          metrics=['one-step'])
    assert res['one-step'] == pytest.approx(l1 - l0, rel=1e-9, abs=1e-12)
    assert res['one-step'] > 0


@pytest.mark.parametrize('p,adaptive', [(math.inf, True), (math.inf, False), (2.0, True)])
def test_average_case_is_the_mean_loss_on_the_ball_surface(p, adaptive):
    """Average-case sharpness recomputed here: the same Gaussian draws z (one CPU generator, in parameter
    order), each scaled onto the ball's surface in the ball's own norm (||u||_p = rho; l-inf: the largest
    |z| is rho, not the l2 length) and multiplied by |w| when adaptive; the mean loss there minus L(w)."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    params, rho, n = list(net.parameters()), 0.05, 3
    w0 = [q.detach().clone() for q in params]
    gen = torch.Generator().manual_seed(11)
    losses = []
    with torch.no_grad():
        l0 = F.cross_entropy(net(x), y).item()
        for _ in range(n):
            z = [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in w0]
            flat = torch.cat([t.flatten() for t in z])
            size = flat.abs().max() if p == math.inf else flat.norm()
            for q, w, t in zip(params, w0, z):
                q.copy_(w + rho * t / size * (w.abs() if adaptive else 1.0))
            losses.append(F.cross_entropy(net(x), y).item())
        for q, w in zip(params, w0):
            q.copy_(w)
    res = batch_sharpness(net, params, lambda: F.cross_entropy(net(x), y), Ball(rho, p, adaptive),
                          metrics=['average'], n_samples=n, generator=torch.Generator().manual_seed(11))
    assert res['average'] == pytest.approx(sum(losses) / n - l0, rel=1e-9, abs=1e-13)
    assert all(torch.equal(q, w) for q, w in zip(params, w0))   # restored


def test_zero_at_rho_zero_and_nondecreasing():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    params = list(net.parameters())
    vals = []
    for rho in (0.0, 0.01, 0.02, 0.05, 0.1):
        res = batch_sharpness(net, params, lambda: F.cross_entropy(net(x), y), Ball(rho, math.inf, True),
                              metrics=['worst', 'one-step', 'average'], n_samples=4)
        vals.append(res)
    assert all(vals[0][k] == 0.0 for k in ('worst', 'one-step', 'average'))
    for a, b in zip(vals, vals[1:]):
        assert b['worst'] >= a['worst'] and b['one-step'] >= a['one-step']
        assert b['worst'] >= b['one-step'] - 1e-12   # Auto-PGD's first iterate is the 1-step point
    assert vals[-1]['worst'] > 0


def _relu_net_value(scale, adaptive):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    with torch.no_grad():
        net[0].weight.mul_(scale)
        net[0].bias.mul_(scale)
        net[2].weight.div_(scale)
    res = batch_sharpness(net, list(net.parameters()), lambda: F.cross_entropy(net(x), y),
                          Ball(0.05, math.inf, adaptive), metrics=['worst', 'one-step'])
    return res


def test_adaptive_linf_scale_invariant_relu():
    base, scaled = _relu_net_value(1.0, True), _relu_net_value(3.0, True)
    assert scaled['clean_loss'] == pytest.approx(base['clean_loss'], rel=1e-12)
    for k in ('worst', 'one-step'):
        assert scaled[k] == pytest.approx(base[k], rel=1e-8)
    # the fixed (non-adaptive) ball is not invariant: the test can tell the two apart
    assert _relu_net_value(3.0, False)['worst'] != pytest.approx(_relu_net_value(1.0, False)['worst'], rel=1e-2)


def _bn_net():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():   # non-trivial running statistics and affine parameters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return net, torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))


@pytest.mark.parametrize('bn_batch_stats', [False, True])
def test_params_on_moves_only_norm_and_model_restored(bn_batch_stats):
    from sam_on_timm.sharpness import select_params
    net, x, y = _bn_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    norm = set(norm_parameters(net))
    params = select_params(net, 'on')
    assert set(params) == norm and len(params) == 2
    others = [(p, p.detach().clone()) for p in net.parameters() if p not in norm]
    moved = []

    def loss_fn():
        assert all(torch.equal(p, p0) for p, p0 in others)
        assert not net[0].training and net[1].training == bn_batch_stats
        moved.append(not all(torch.equal(p, before[n]) for n, p in net.named_parameters() if p in norm))
        return F.cross_entropy(net(x), y)
    batch_sharpness(net, params, loss_fn, Ball(0.1, math.inf, True), n_iters=5, n_samples=2,
                    bn_batch_stats=bn_batch_stats)
    assert any(moved)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # bit-identical, running stats included
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_select_params_errors():
    from sam_on_timm.sharpness import select_params
    net = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match='no normalization layers'):
        select_params(net, 'on')
    with pytest.raises(ValueError, match='valid: all, on, nonorm'):
        select_params(net, 'bn')
    with pytest.raises(ValueError, match='rho'):
        Ball(float('nan'))


def test_apgd_checkpoints():
    # p: 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of N = 100 (Croce & Hein 2020)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(20)[-1] == 20


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ckpt_and_data(tmp_path_factory):
    import timm
    root = tmp_path_factory.mktemp('sharp')
    # 3 classes: with 2 the normalised logits are +-1/sqrt(2) and the loss is piecewise constant
    data = make_image_folder(root / 'data', n_train=18, n_val=3, classes=3, size=32)
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=3)
    ckpt = root / 'run' / 'last.pth.tar'
    ckpt.parent.mkdir()
    torch.save({'arch': 'test_resnet', 'state_dict': model.state_dict(), 'metric': 50.0,
                'args': {'model': 'test_resnet', 'num_classes': 3, 'data_dir': data, 'dataset': '',
                         'input_size': (3, 32, 32), 'crop_pct': 1.0}}, ckpt)
    return str(ckpt), data


CLI = ['--n-examples', '8', '--batch-size', '4',   # torchrun's parser would take --m for one of its options
       '--n-iters', '3', '--n-samples', '2', '--workers', '0', '--quiet',
       '--metrics', 'worst,one-step,average', '--rho', '0.01']


def test_cli_writes_json(ckpt_and_data, tmp_path):
    ckpt, _ = ckpt_and_data
    out = tmp_path / 's.json'
    before = os.path.getmtime(ckpt)
    assert main(['--checkpoint', ckpt, '--params', 'on', '--output', str(out)] + CLI) == 0
    r = json.loads(out.read_text())
    assert r['params'] == 'on' and r['rho'] == 0.01 and r['m'] == 4 and r['input_size'] == [3, 32, 32]
    assert len(r['per_batch']['worst']) == 2 and r['checkpoint_metric'] == 50.0
    assert r['sharpness']['worst'] == pytest.approx(sum(r['per_batch']['worst']) / 2, rel=1e-12)
    assert r['sharpness']['worst'] >= r['sharpness']['one-step'] - 1e-7 and r['sharpness']['worst'] > 0
    assert 0 <= r['clean_top1'] <= 100 and r['clean_loss'] > 0
    assert os.path.getmtime(ckpt) == before


def test_cli_ema_evaluates_the_ema_weights(ckpt_and_data, tmp_path):
    """--ema: every number is the one of the checkpoint's EMA weights: equal to a run on a checkpoint whose
    plain weights are those EMA weights, and unlike the run on the plain weights of the same file."""
    import timm
    ckpt, _ = ckpt_and_data
    state = torch.load(ckpt, weights_only=False)
    torch.manual_seed(5)
    ema = timm.create_model('test_resnet', num_classes=3).state_dict()
    both, ema_only = tmp_path / 'both' / 'last.pth.tar', tmp_path / 'ema_only' / 'last.pth.tar'
    for path, sd, sd_ema in ((both, state['state_dict'], ema), (ema_only, ema, None)):
        path.parent.mkdir()
        torch.save(dict(state, state_dict=sd, **({'state_dict_ema': sd_ema} if sd_ema else {})), path)
    results = []
    for path, extra in ((both, ['--ema']), (ema_only, []), (both, [])):
        out = tmp_path / f'{len(results)}.json'
        assert main(['--checkpoint', str(path), '--params', 'on', '--output', str(out), *extra] + CLI
                    + ['--metrics', 'one-step']) == 0
        results.append(json.loads(out.read_text()))
    with_ema, reference, plain = results
    for key in ('per_batch', 'clean_top1', 'sharpness'):
        assert with_ema[key] == reference[key], key
    assert with_ema['per_batch']['clean_loss'] != plain['per_batch']['clean_loss'] and with_ema['ema']


@pytest.mark.parametrize('argv,msg', [
    (['--n-examples', '6', '--m', '4'], 'not a multiple of --m'),
    (['--rho', 'nan'], '--rho must be a finite number'),
    (['--metrics', 'worst,best'], 'valid: worst, one-step, average'),
    (['--n-examples', '64', '--m', '4'], 'fewer than --n-examples'),
])
def test_cli_bad_input_one_line(ckpt_and_data, capsys, argv, msg):
    ckpt, _ = ckpt_and_data
    assert main(['--checkpoint', ckpt] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_cli_needs_weights(capsys):
    assert main(['--model', 'test_resnet']) == 2
    assert 'exactly one of --checkpoint FILE or --pretrained' in capsys.readouterr().err


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform == 'win32',
                    reason='needs torch.distributed gloo')
def test_two_gloo_ranks_equal_one_process(ckpt_and_data, tmp_path):
    ckpt, _ = ckpt_and_data
    one, two = tmp_path / 'one.json', tmp_path / 'two.json'
    args = ['--checkpoint', ckpt, '--params', 'all'] + CLI
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each rank below: the same kernels, the same rounding
    try:
        assert main(args + ['--output', str(one)]) == 0
    finally:
        torch.set_num_threads(threads)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc_per_node=2',
                    '-m', 'sam_on_timm.sharpness'] + args + ['--output', str(two)],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=180)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b['world_size'] == 2
    for k in a['per_batch']:
        assert b['per_batch'][k] == pytest.approx(a['per_batch'][k], rel=1e-6, abs=1e-9)
    for k in a['sharpness']:
        assert b['sharpness'][k] == pytest.approx(a['sharpness'][k], rel=1e-6, abs=1e-9)
    assert b['clean_top1'] == a['clean_top1']


def test_default_output_names_every_setting(tmp_path):
    # a rerun with other sample settings must not overwrite the earlier result; the same settings reuse the name
    from sam_on_timm.sharpness import _default_output, build_parser
    ckpt = str(tmp_path / 'run' / 'last.pth.tar')

    def name(*extra):
        return _default_output(build_parser().parse_args(['--checkpoint', ckpt, *extra]))
    base = name()
    assert base.startswith(str(tmp_path / 'run') + '/sharpness-all-linf-adaptive-rho0.005') and base == name()
    others = [name('--n-examples', '1024'), name('--seed', '1'), name('--m', '64'), name('--n-iters', '5'),
              name('--metrics', 'worst'), name('--n-samples', '3'), name('--split', 'validation'), name('--ema'),
              name('--bn-batch-stats'), name('--no-normalize-logits'), name('--params', 'on'), name('--rho', '0.01')]
    assert len(set(others + [base])) == len(others) + 1


# ---------------------------------------------------------------------------------------------
# Auto-PGD's schedule, against a trace worked out by hand
# ---------------------------------------------------------------------------------------------
# f(u) = -(u_1 - 0.6)^2 - (u_2 + 0.9)^2 on the l-inf ball of radius 1, N = 5 steps, eta_0 = 2 rho = 2,
# alpha = 0.75 (Croce & Hein 2020, Algorithm 1); checkpoints ceil(p_j N) for p = 0.22, 0.41, 0.57, 0.70,
# 0.80, 0.87: 2, 3, 3, 4, 4, 5.
#   u_0 = (0, 0)                                          f = -1.17      grad ( 1.2, -1.8)
#   u_1 = clip(u_0 + 2 sign(grad))    = (1, -1)             f = -0.17      grad (-0.8,  0.2)    up
#   z_2 = clip(u_1 + 2 (-1, 1))       = (-1, 1)
#   u_2 = u_1 + 0.75 (z_2 - u_1) + 0.25 (u_1 - u_0) = (-0.25, 0.25)          f = -2.045          down
#   checkpoint 2: 1 < 0.75 * 2 steps went up -> eta = 1, restart from the best u_1 (not the last u_2)
#   u_3 = u_1 + 0.75 (clip(u_1 + 1 (-1, 1)) - u_1) = (0.25, -0.25)          f = -0.545          down
#   checkpoint 3: 0 < 0.75 * 1 -> eta = 0.5, restart from the best u_1 again (not the last u_3)
#   u_4 = u_1 + 0.75 (clip(u_1 + 0.5 (-1, 1)) - u_1) = (0.625, -0.625)      f = -0.07625 (best)  up
#   checkpoint 4: 1 of 1 step up, and eta was halved at 3 -> no change   grad (-0.05, -0.55)
#   z_5 = clip(u_4 + 0.5 (-1, -1)) = (0.125, -1)
#   u_5 = u_4 + 0.75 (z_5 - u_4) + 0.25 (u_4 - u_1) = (0.15625, -0.8125)    f = -0.2045703125
#   (checkpoint 5 is the end.) The result is the best value, -0.07625, not the last.
HAND_TRACE = [(0.0, 0.0), (1.0, -1.0), (-0.25, 0.25), (0.25, -0.25), (0.625, -0.625), (0.15625, -0.8125)]
HAND_F = [-1.17, -0.17, -2.045, -0.545, -0.07625, -0.2045703125]


def _hand_f(u1, u2):
    return -(u1 - 0.6) ** 2 - (u2 + 0.9) ** 2


def test_hand_trace_is_self_consistent():
    assert [_hand_f(*u) for u in HAND_TRACE] == pytest.approx(HAND_F, abs=1e-12)
    assert apgd_checkpoints(5) == [2, 3, 4, 5]


@pytest.mark.parametrize('rho,adaptive', [(1.0, False), (0.5, False), (0.1, True)])
def test_apgd_linf_trace_by_hand(rho, adaptive):
    """The iterates Auto-PGD evaluates are the hand trace above, scaled to the ball: u in units of
    rho (the step is 2 rho, halved at the checkpoints), delta = T u with T = |w0| when adaptive. Pins the
    step size, the momentum, the clipping, the checkpoint rule and both restarts from a best iterate that
    is not the last one."""
    w0 = torch.tensor([2.0, -0.5], dtype=torch.float64)
    t = w0.abs() if adaptive else torch.ones_like(w0)
    model = Vec(w0)
    seen = []

    def loss_fn():
        seen.append(model.w.detach().clone())
        u = (model.w - w0) / (rho * t)   # the hand trace's coordinates
        return -(u[0] - 0.6) ** 2 - (u[1] + 0.9) ** 2

    best, f0 = apgd_max(loss_fn, _Perturbation([model.w], Ball(rho, math.inf, adaptive)), n_iters=5)
    got = [((w - w0) / (rho * t)).tolist() for w in seen]
    assert len(got) == 6
    for k, (g, h) in enumerate(zip(got, HAND_TRACE)):
        assert g == pytest.approx(list(h), abs=1e-12), f'iterate {k}'
    assert f0 == pytest.approx(HAND_F[0], abs=1e-12) and best == pytest.approx(max(HAND_F), abs=1e-12)


def _apgd_reference(grad_f, f, dim, n, rho, p, alpha=0.75, rho_ratio=0.75):
    """Auto-PGD in the l-p ball of radius rho (p = 2 or inf; pure-Python floats, written from Croce & Hein
    2020, Algorithm 1 and Sec. 3.2): the evaluated iterates, and which rules the run exercised."""
    def proj(v):
        if p == 2:
            n_ = math.hypot(*v)
            return list(v) if n_ <= rho else [x * rho / n_ for x in v]
        return [min(max(x, -rho), rho) for x in v]

    def step(u, g, eta):
        if p == 2:
            n_ = math.hypot(*g)
            return proj([a + eta * b / n_ for a, b in zip(u, g)]) if n_ > 0 else list(u)
        return proj([a + eta * ((b > 0) - (b < 0)) for a, b in zip(u, g)])

    # checkpoints ceil(p_j n) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    ps = [0.0, 0.22]
    while ps[-1] < 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    cps = sorted({math.ceil(round(q * n, 9)) for q in ps[1:]} & set(range(1, n)))
    u = prev = [0.0] * dim
    eta, f_cur = 2 * rho, f(u)
    best_u, best_f = u, f_cur
    trace, ups, last, halved_last, best_last = [u], 0, 0, False, best_f
    seen = dict(restart_not_last=0, tie_kept=0, stalled=0, kept_after_halving=0)
    for k in range(1, n + 1):
        z = step(u, grad_f(u), eta)
        if k == 1:
            new = z
        else:
            new = proj([a + alpha * (b - a) + (1 - alpha) * (a - c) for a, b, c in zip(u, z, prev)])
        prev, u = u, new
        f_new = f(u)
        ups += f_new > f_cur
        f_cur = f_new
        trace.append(u)
        if f_new > best_f:
            best_u, best_f = u, f_new
        if k in cps:
            # 1: fewer than rho_ratio of the steps since the last checkpoint went up; 2: the step size was not
            # reduced at the last checkpoint and the best loss has not improved since
            few_ups = ups < rho_ratio * (k - last)
            stalled = not halved_last and best_f == best_last
            seen['tie_kept'] += ups == rho_ratio * (k - last) and not stalled
            seen['stalled'] += stalled and not few_ups
            seen['kept_after_halving'] += halved_last and best_f == best_last and not few_ups
            last, ups, halved_last, best_last = k, 0, few_ups or stalled, best_f
            if few_ups or stalled:
                eta /= 2
                seen['restart_not_last'] += best_u is not u
                u = prev = best_u
                f_cur = best_f
    return trace, seen


# (maximum c, curvatures a, rho, steps, ball, adaptive): the maximum lies inside the ball, so steps overshoot
# and come back. The second case runs into the checkpoint rule's edges: exactly rho_ratio of the steps went
# up (kept), and a stalled best loss with enough steps up (halved).
L2_CASES = {'l2-inside': ((0.15, -0.1), (1.0, 3.0), 0.4, 10, False),
            'l2-inside-adaptive': ((0.15, -0.1), (1.0, 3.0), 0.4, 10, True),
            'l2-rule-edges': ((0.98, -0.1, -0.72), (2.0, 1.0, 2.0), 1.0, 20, False)}


@pytest.mark.parametrize('case', list(L2_CASES))
def test_apgd_l2_trace_matches_reference(case):
    """l2 ball: the normalised-gradient step, the projection that shrinks only points outside the ball (an
    iterate inside stays where it is), the checkpoints and the restarts, against the reference above."""
    c, a, rho, n, adaptive = L2_CASES[case]

    def f(u):
        return -sum(ai * (ui - ci) ** 2 for ai, ui, ci in zip(a, u, c))

    def grad_f(u):
        return [-2 * ai * (ui - ci) for ai, ui, ci in zip(a, u, c)]

    ref, seen = _apgd_reference(grad_f, f, len(c), n, rho, 2)
    assert seen['restart_not_last'] >= 1                           # the case exercises a restart
    if case == 'l2-rule-edges':
        assert seen['tie_kept'] and seen['stalled']
    else:
        assert any(0 < math.hypot(*u) < 0.95 * rho for u in ref[2:])   # an iterate strictly inside

    w0 = torch.tensor([1.5, -0.25, 0.75][:len(c)], dtype=torch.float64)
    t = w0.abs() if adaptive else torch.ones_like(w0)
    model = Vec(w0)
    seen_w = []
    ct, at = torch.tensor(c, dtype=torch.float64), torch.tensor(a, dtype=torch.float64)

    def loss_fn():
        seen_w.append(model.w.detach().clone())
        return -(at * ((model.w - w0) / t - ct) ** 2).sum()

    best, _ = apgd_max(loss_fn, _Perturbation([model.w], Ball(rho, 2.0, adaptive)), n_iters=n)
    got = [((w - w0) / t).tolist() for w in seen_w]
    assert len(got) == n + 1
    for k, (g, r) in enumerate(zip(got, ref)):
        assert g == pytest.approx(r, abs=1e-9), f'iterate {k}'
    assert best == pytest.approx(max(f(u) for u in ref), abs=1e-12)


def test_apgd_rule_2_needs_a_step_size_kept_since_the_last_checkpoint():
    """f(u) = sin(6 u_1 + 1.1) + sin(3.2 u_2 + 1), l2 ball of radius 1, 30 steps: at one checkpoint the best
    loss has not improved since the last one, but eta was halved there and enough steps went up, so eta is
    kept (the stalled rule asks for an unchanged eta). The iterates against the reference."""
    a, b, n = (6.0, 3.2), (1.1, 1.0), 30

    def f(u):
        return sum(math.sin(ai * ui + bi) for ai, ui, bi in zip(a, u, b))

    def grad_f(u):
        return [ai * math.cos(ai * ui + bi) for ai, ui, bi in zip(a, u, b)]

    ref, seen = _apgd_reference(grad_f, f, 2, n, 1.0, 2)
    assert seen['kept_after_halving'] and seen['restart_not_last']
    model = Vec(torch.zeros(2, dtype=torch.float64))
    at, bt = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    seen_w = []

    def loss_fn():
        seen_w.append(model.w.detach().clone())
        return torch.sin(at * model.w + bt).sum()

    apgd_max(loss_fn, _Perturbation([model.w], Ball(1.0, 2.0, False)), n_iters=n)
    for k, (w, r) in enumerate(zip(seen_w, ref)):
        assert w.tolist() == pytest.approx(r, abs=1e-9), f'iterate {k}'


def test_ball_projection():
    """l2: a point inside the ball stays, one outside goes to the sphere along its own direction;
    l-inf: coordinatewise clipping."""
    ball = Ball(1.0, 2.0, False)
    inside = [torch.tensor([0.3, -0.4]), torch.tensor([0.2])]
    assert [t.tolist() for t in ball.project([t.clone() for t in inside])] == [t.tolist() for t in inside]
    out = ball.project([torch.tensor([3.0, 0.0]), torch.tensor([4.0])])   # norm 5
    assert out[0].tolist() == pytest.approx([0.6, 0.0]) and out[1].tolist() == pytest.approx([0.8])
    box = Ball(0.5, math.inf, False).project([torch.tensor([0.7, -0.2, -3.0])])
    assert box[0].tolist() == pytest.approx([0.5, -0.2, -0.5])


@pytest.mark.parametrize('p,adaptive', [(math.inf, False), (math.inf, True), (2.0, False), (2.0, True)])
def test_one_step_point_by_hand(p, adaptive):
    """The 1-step point for a linear loss L(w) = g.w, written out: l-inf w0 + rho T sign(g) (T = 1 without
    --adaptive: the same step for every coordinate whatever |w|), l2 w0 + rho T^2 g / ||T g||."""
    w0 = torch.tensor([3.0, -0.2, 0.5], dtype=torch.float64)
    g = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    rho = 0.1
    model = Vec(w0)
    t = w0.abs() if adaptive else torch.ones_like(w0)
    if p == math.inf:
        eps = rho * t * g.sign()
    else:
        eps = rho * t * t * g / (t * g).norm()
    f, f0 = one_step(lambda: (g * model.w).sum(), _Perturbation([model.w], Ball(rho, p, adaptive)))
    assert f0 == pytest.approx((g * w0).sum().item(), rel=1e-12)
    assert f == pytest.approx((g * (w0 + eps)).sum().item(), rel=1e-12)


def test_normalized_logits_centred_then_scaled():
    """(z - mean z) / ||z - mean z||: the loss on it does not change when a constant is added to every
    logit of an example (which would be false without the centring) nor with the logits' scale."""
    from sam_on_timm.sharpness import normalized_logits
    z = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 13.0]], dtype=torch.float64)
    out = normalized_logits(z)
    r = 1 / math.sqrt(2)
    assert out[0].tolist() == pytest.approx([-r, 0.0, r])
    assert out[1].tolist() == pytest.approx([-1 / math.sqrt(6), -1 / math.sqrt(6), 2 / math.sqrt(6)])
    shifted = normalized_logits(z + torch.tensor([[5.0], [-7.0]], dtype=torch.float64))
    assert torch.allclose(shifted, out, atol=1e-12)
    assert torch.allclose(normalized_logits(3.0 * z), out, atol=1e-12)
    assert torch.allclose(normalized_logits(1e-3 * z), out, atol=1e-12)   # a centred norm below 1 too


def test_ball_norm_and_direction_edge_cases():
    """l-inf norm over a set with an empty tensor; the steepest-ascent direction of a zero or non-finite
    gradient is 0 (l2), of a NaN entry 0 (l-inf): no NaN ever reaches an iterate."""
    linf, l2 = Ball(1.0, math.inf, False), Ball(1.0, 2.0, False)
    assert float(linf.norm([torch.zeros(0), torch.tensor([-2.0, 1.0])])) == 2.0
    assert float(l2.norm([torch.zeros(0), torch.tensor([3.0, 4.0])])) == 5.0
    for g in ([torch.zeros(3)], [torch.tensor([1.0, float('inf')])], [torch.tensor([float('nan'), 1.0])]):
        assert all(not d.any() for d in l2.direction(g))
    assert linf.direction([torch.tensor([float('nan'), -3.0, 0.0, 0.5])])[0].tolist() == [0.0, -1.0, 0.0, 1.0]
    d = l2.direction([torch.tensor([3.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)])
    assert [x.tolist() for x in d] == [pytest.approx([0.6]), pytest.approx([-0.8])]


def test_select_params_sets():
    """all: every trainable parameter (also of a model without norm layers); on: the norm layers' affine
    parameters; nonorm: the rest."""
    from sam_on_timm.sharpness import select_params
    net, _, _ = _bn_net()
    norm = [net[1].weight, net[1].bias]
    assert select_params(net, 'all') == list(net.parameters())
    assert select_params(net, 'on') == norm
    assert select_params(net, 'nonorm') == [p for p in net.parameters() if all(p is not q for q in norm)]
    lin = nn.Linear(2, 2)
    assert select_params(lin, 'all') == list(lin.parameters())


def test_average_case_samples_are_on_the_sphere_and_counted():
    """One-element parameters (|z| is often below 1): every sample is scaled to |u| = rho; one sample is a mean
    of one; L(w0) is returned when not given."""
    from sam_on_timm.sharpness import average_case
    model = Vec(torch.tensor([0.5], dtype=torch.float64))
    seen = []

    def loss_fn():
        seen.append(float(model.w.detach() - 0.5))
        return 3.0 * model.w.sum()

    pert = _Perturbation([model.w], Ball(0.1, math.inf, False))
    mean, f0 = average_case(loss_fn, pert, 8, torch.Generator().manual_seed(3))
    assert f0 == 1.5 and seen[0] == 0.0
    assert [abs(d) for d in seen[1:]] == pytest.approx([0.1] * 8, rel=1e-9)
    assert mean == pytest.approx(1.5 + 3.0 * sum(seen[1:]) / 8, rel=1e-12)
    seen.clear()
    one, _ = average_case(loss_fn, pert, 1, torch.Generator().manual_seed(3), f0=1.5)
    assert one == pytest.approx(1.5 + 3.0 * seen[0], rel=1e-12)


def test_batch_sharpness_defaults_and_reproducible_average():
    """Defaults: 20 Auto-PGD steps (21 losses), 1 for the 1-step point, 10 Gaussian samples, after the clean
    loss; without a generator the samples are those of a generator seeded 0, whatever the global RNG."""
    model = Vec(torch.tensor([0.5, -1.0], dtype=torch.float64))
    calls = []

    def loss_fn():
        calls.append(1)
        return (model.w ** 2).sum() + model.w.prod()

    ball = Ball(0.05, 2.0, True)
    batch_sharpness(model, [model.w], loss_fn, ball)
    assert len(calls) == 1 + 20 + 1 + 10
    torch.manual_seed(1)
    a = batch_sharpness(model, [model.w], loss_fn, ball, metrics=['average'])
    torch.manual_seed(2)
    b = batch_sharpness(model, [model.w], loss_fn, ball, metrics=['average'])
    c = batch_sharpness(model, [model.w], loss_fn, ball, metrics=['average'],
                        generator=torch.Generator().manual_seed(0))
    assert a == b == c


def test_small_n_iters_checkpoints_ball_radius_and_unused_parameters():
    """N = 3: checkpoints ceil(0.66) = 1, ceil(1.23) = 2, 3; a negative or infinite rho is refused; a
    perturbed parameter the loss does not reach gets gradient 0 and stays at its value."""
    assert apgd_checkpoints(3) == [1, 2, 3]
    for bad in (-0.1, math.inf):
        with pytest.raises(ValueError, match='rho must be a finite number >= 0'):
            Ball(bad)
    model = Vec(torch.tensor([0.5, -1.0], dtype=torch.float64))
    unused = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    seen = []

    def loss_fn():
        seen.append(unused.detach().clone())
        return (model.w ** 2).sum()

    res = batch_sharpness(model, [model.w, unused], loss_fn, Ball(0.1, 2.0, False), metrics=['worst', 'one-step'],
                          n_iters=3)
    assert res['worst'] > 0 and all(float(u) == 2.0 for u in seen)


# the tool's documented defaults (README / --help), written out independently of build_parser
SHARPNESS_DEFAULTS = dict(checkpoint='', pretrained=False, model='', num_classes=None, ema=False, data_dir='',
                          dataset=None, split='train', n_examples=2048, m=128, img_size=None, crop_pct=None,
                          interpolation=None, workers=2, metrics='worst,one-step,average', params='all', rho=0.005,
                          p='inf', adaptive=True, normalize_logits=True, n_iters=20, n_samples=10,
                          bn_batch_stats=False, device='cpu', seed=0, output='', quiet=False)


def test_sharpness_flags_defaults_and_types():
    from sam_on_timm.sharpness import build_parser
    ap = build_parser()
    assert vars(ap.parse_args([])) == SHARPNESS_DEFAULTS
    assert ap.format_usage().startswith('usage: python -m sam_on_timm.sharpness ')
    argv = ['--checkpoint', 'c.pth', '--pretrained', '--model', 'resnet18', '--num-classes', '7', '--ema',
            '--data-dir', 'd', '--dataset', 'torch/cifar10', '--split', 'val', '--n-examples', '64',
            '--batch-size', '32', '--img-size', '96', '--crop-pct', '0.9', '--interpolation', 'bicubic',
            '--workers', '0', '--metrics', 'worst', '--params', 'on', '--rho', '0.1', '--lp', '2', '--no-adaptive',
            '--no-normalize-logits', '--n-iters', '5', '--n-samples', '3', '--bn-batch-stats', '--device', 'cuda',
            '--seed', '4', '--output', 'o.json', '--quiet']
    got = vars(ap.parse_args(argv))
    want = dict(checkpoint='c.pth', pretrained=True, model='resnet18', num_classes=7, ema=True, data_dir='d',
                dataset='torch/cifar10', split='val', n_examples=64, m=32, img_size=96, crop_pct=0.9,
                interpolation='bicubic', workers=0, metrics='worst', params='on', rho=0.1, p='2', adaptive=False,
                normalize_logits=False, n_iters=5, n_samples=3, bn_batch_stats=True, device='cuda', seed=4,
                output='o.json', quiet=True)
    assert got == want and all(type(got[k]) is type(v) for k, v in want.items())
    assert ap.parse_args(['--m', '16', '--p', '2']).m == 16 and ap.parse_args(['--p', '2']).p == '2'


def test_default_output_names_are_the_documented_pattern(tmp_path, monkeypatch):
    """sharpness-<params>-l<p>[-adaptive]-rho<rho>-n<examples>-m<m>-it<steps>-seed<seed>[...].json, next to the
    checkpoint (in the working folder without one): the names a user looks for, written out here."""
    from sam_on_timm.sharpness import _default_output, build_parser
    run = tmp_path / 'run'
    monkeypatch.chdir(tmp_path)

    def name(*extra, ckpt=True):
        return _default_output(build_parser().parse_args((['--checkpoint', str(run / 'last.pth.tar')] if ckpt
                                                          else ['--pretrained']) + list(extra)))
    assert name() == str(run / 'sharpness-all-linf-adaptive-rho0.005-n2048-m128-it20-seed0-s10.json')
    assert name('--metrics', 'worst,one-step') == str(
        run / 'sharpness-all-linf-adaptive-rho0.005-n2048-m128-it20-seed0-worst+one-step.json')
    assert name('--params', 'on', '--lp', '2', '--no-adaptive', '--rho', '0.05', '--n-examples', '64', '--m', '32',
                '--n-iters', '5', '--seed', '3', '--n-samples', '2', '--split', os.path.join('val', 'a'), '--ema',
                '--bn-batch-stats', '--no-normalize-logits') == str(
        run / 'sharpness-on-l2-rho0.05-n64-m32-it5-seed3-s2-val_a-ema-bnbatch-rawlogits.json')
    assert name(ckpt=False) == str(tmp_path / 'sharpness-all-linf-adaptive-rho0.005-n2048-m128-it20-seed0-s10.json')
