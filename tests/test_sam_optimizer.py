"""The SAM optimizer: Table 10 formulas against float64, exact restores, names, state, errors."""
import copy
import io
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sam_on_timm
from sam_on_timm import SAM, SAM_OPTIMIZERS, norm_parameters
from sam_on_timm.sparse import SparseMask
from timm.optim import Lookahead, create_optimizer_v2, list_optimizers

DEFAULT_ETA = {'sam': 0.0, 'eleml2': 0.0, 'eleml2orig': 0.01, 'elemlinf': 0.0, 'layerl2': 0.0, 'fisher': 1.0}
MODELS = {  # name -> input size: BN2d + unnamed downsample BN (test_resnet: resnet18's layout, 0.5M weights not 11M),
    'test_resnet': 32, 'test_efficientnet': 32, 'test_vit': 32, 'test_convnext': 32}


def independent_norm_set(model):
    """Test-side definition of the SAM-ON set (not the package's code)."""
    types = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    out = []
    for m in model.modules():
        if isinstance(m, types):
            out += [p for p in (m.weight, m.bias) if p is not None]
    return out


def reference_eps(mode, variant, model, rho, eta):
    """Table 10 in float64, element by element on the whole model (T = 0 outside P)."""
    norm = {id(p) for p in independent_norm_set(model)}
    ts, gs, ws = [], [], []
    for name, p in model.named_parameters():
        in_norm = id(p) in norm
        in_p = mode == 'all' or (mode == 'on' and in_norm) or (mode == 'nonorm' and not in_norm)
        w, g = p.detach().double(), p.grad.double()
        if not in_p:
            t = torch.zeros_like(w)
        elif variant == 'sam':
            t = torch.ones_like(w)
        elif variant in ('eleml2', 'elemlinf'):
            t = w.abs() + eta
        elif variant == 'eleml2orig':
            t = torch.full_like(w, 1 + eta) if name.split('.')[-1] == 'bias' else w.abs() + eta
        elif variant == 'layerl2':
            t = torch.full_like(w, math.sqrt((w ** 2).sum().item()) + eta)
        elif variant == 'fisher':
            t = (1 + eta * g ** 2) ** -0.5
        ts.append(t), gs.append(g), ws.append(p)
    if variant == 'elemlinf':
        return {p: rho * t * torch.sign(g) for p, t, g in zip(ws, ts, gs)}
    denom = math.sqrt(sum(((t * g) ** 2).sum().item() for t, g in zip(ts, gs)))
    return {p: rho * t * t * g / denom for p, t, g in zip(ws, ts, gs)}


@pytest.fixture(scope='module', params=list(MODELS))
def model_with_grad(request, device):
    """A model in float64 with its gradient: eps is then computed in float64 and compared with the
    float64 reference to ~1e-10 (float32 would only allow ~1e-4, too loose to see a weight decay leak)."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, num_classes=5).to(device, torch.float64)
    with torch.no_grad():  # make zero-initialised gammas/betas non-trivial so every T is exercised
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    x = torch.randn(4, 3, MODELS[request.param], MODELS[request.param]).to(device, torch.float64)
    F.cross_entropy(model(x), torch.arange(4, device=device) % 5).backward()
    return model


def _spy_eps(monkeypatch):
    """Record eps where SAM computes it (the return of compute_eps, copied: the flat path reuses its buffer)."""
    from sam_on_timm import sam as sam_module
    seen = []
    compute_eps = sam_module.compute_eps

    def spy(*args, **kwargs):
        out = compute_eps(*args, **kwargs)
        seen.append([e.detach().clone() for e in out[0]])
        return out
    monkeypatch.setattr(sam_module, 'compute_eps', spy)
    return seen


def _check_first_step(model, opt, ref, seen):
    """first_step computed eps == the float64 reference ``ref`` on P, and moved P by exactly eps and
    nothing else; restore() gives every bit back."""
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.first_step()
    eps = dict(zip(opt.perturbed, seen[-1]))
    scale = max(float(e.abs().max()) for e in ref.values())
    n_changed = 0
    for p in model.parameters():
        if p not in eps:
            assert not ref[p].any() and torch.equal(p, before[p]), 'a parameter outside the perturbed set changed'
            continue
        n_changed += 1
        # float64 against float64: only rounding differs (~1e-15 relative); 1e-10 leaves room and no more
        torch.testing.assert_close(eps[p], ref[p], rtol=1e-10, atol=1e-14 * scale)
        assert torch.equal(p, before[p] + eps[p]), 'w_P did not move by exactly eps'
    assert n_changed == len(opt.perturbed) > 0
    opt.restore()
    for p in model.parameters():
        assert torch.equal(p, before[p]), 'restore() is not bit-exact'


@pytest.mark.parametrize('name', list(SAM_OPTIMIZERS))
def test_first_step_matches_table10_float64(model_with_grad, name, fused, monkeypatch):
    """Each name's default eta (Table 10), weight decay set (it must not enter the ascent)."""
    model = model_with_grad
    mode, variant = SAM_OPTIMIZERS[name]
    rho = 0.05 if variant != 'elemlinf' else 0.001
    seen = _spy_eps(monkeypatch)
    opt = create_optimizer_v2(model, name, lr=0.1, weight_decay=1e-4, rho=rho)
    assert opt.eta == DEFAULT_ETA[variant]
    _check_first_step(model, opt, reference_eps(mode, variant, model, rho, DEFAULT_ETA[variant]), seen)


# eta away from each default and large enough to change T by far more than the tolerance: |w| + 0.3
# against |w| for ASAM; ||W|| + 0.3 for layerwise; (1 + 300 g^2)^-1/2 against (1 + g^2)^-1/2 for Fisher
OTHER_ETA = {'eleml2': 0.3, 'eleml2orig': 0.3, 'elemlinf': 0.3, 'layerl2': 0.3, 'fisher': 300.0}


@pytest.mark.parametrize('variant', list(OTHER_ETA))
@pytest.mark.parametrize('mode', ['all', 'on'])
def test_first_step_with_non_default_eta_matches_float64(model_with_grad, mode, variant, fused, monkeypatch):
    """A given eta is the one used: every formula of Table 10 with eta away from its default."""
    model = model_with_grad
    name = sam_on_timm.sam_name(mode, variant)
    rho, eta = (0.05 if variant != 'elemlinf' else 0.001), OTHER_ETA[variant]
    seen = _spy_eps(monkeypatch)
    opt = create_optimizer_v2(model, name, lr=0.1, weight_decay=1e-4, rho=rho, eta=eta)
    assert opt.eta == eta
    _check_first_step(model, opt, reference_eps(mode, variant, model, rho, eta), seen)


def test_sam_on_set_is_the_module_type_set():
    m = timm.create_model('resnet50')
    named = sam_on_timm.named_norm_parameters(m)
    assert (len(named), sum(p.numel() for _, p in named)) == (106, 53120)
    # includes the unnamed downsample BatchNorms that name matching misses
    assert any(n.endswith('downsample.1.weight') for n, _ in named)
    v = timm.create_model('vit_small_patch16_224', init_values=1e-5)  # with LayerScale gammas
    named = sam_on_timm.named_norm_parameters(v)
    assert (len(named), sum(p.numel() for _, p in named)) == (50, 19200)
    gammas = [p for n, p in v.named_parameters() if n.endswith('.gamma')]
    assert gammas and not set(gammas) & set(p for _, p in named)
    opt = create_optimizer_v2(v, 'sam-on', lr=0.1, rho=0.05)
    assert set(opt.perturbed) == set(p for _, p in named)


# every norm layer type the SAM-ON set must hold, spelled out here: torch's and timm's (those not derived from
# a torch norm class are picked by name in norm_params, so a name left out of that list drops the layer)
NORM_LAYERS = ['BatchNorm1d', 'BatchNorm2d', 'SyncBatchNorm', 'InstanceNorm2d', 'LayerNorm', 'GroupNorm', 'RMSNorm',
               'tl.RmsNorm', 'tl.RmsNorm2d', 'tl.RmsNormFp32', 'tl.RmsNorm2dFp32', 'tl.SimpleNorm', 'tl.SimpleNorm2d',
               'tl.SimpleNormFp32', 'tl.SimpleNorm2dFp32', 'tl.EvoNorm2dB0', 'tl.EvoNorm2dB1', 'tl.EvoNorm2dB2',
               'tl.EvoNorm2dS0', 'tl.EvoNorm2dS0a', 'tl.EvoNorm2dS1', 'tl.EvoNorm2dS1a', 'tl.EvoNorm2dS2',
               'tl.EvoNorm2dS2a', 'tl.FilterResponseNormTlu2d', 'tl.FilterResponseNormAct2d', 'tl.BatchNormAct2d',
               'tl.GroupNormAct', 'tl.LayerNormAct', 'tl.LayerNorm2d', 'tl.LayerNormAct2d', 'tl.GroupNorm1']


def test_sam_on_set_holds_every_norm_layer_type_and_only_its_own_parameters():
    """Each norm layer type between a conv and a LayerScale: the set is exactly that layer's own parameters
    (EvoNorm's v and FRN's tau included), never the conv's or the LayerScale gamma; a norm layer holding a
    submodule with parameters contributes only its direct ones."""
    import timm.layers as tl
    for name in NORM_LAYERS:
        cls = getattr(tl, name[3:], None) if name.startswith('tl.') else getattr(nn, name, None)
        if cls is None:   # an older torch / timm without it
            continue
        if 'Group' in name:
            layer = cls(8) if name.endswith('GroupNorm1') else cls(2, 8) if cls is nn.GroupNorm else cls(8, 2)
        else:
            layer = cls(8, affine=True) if cls is nn.InstanceNorm2d else cls(8)
        model = nn.Sequential(nn.Conv2d(3, 8, 1), layer, tl.LayerScale2d(8))
        own = list(layer.parameters())
        assert own and [id(p) for p in norm_parameters(model)] == [id(p) for p in own], name

    class NormWithLinear(nn.LayerNorm):
        def __init__(self, n):
            super().__init__(n)
            self.proj = nn.Linear(n, n)
    layer = NormWithLinear(8)
    assert [id(p) for p in norm_parameters(nn.Sequential(layer))] == [id(layer.weight), id(layer.bias)]


def test_sam_on_eps_norm_is_rho_and_over_p_only():
    torch.manual_seed(0)
    m = timm.create_model('test_resnet', num_classes=3)
    F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    before = {p: p.detach().clone() for p in m.parameters()}
    grads = {p: p.grad.clone() for p in m.parameters()}
    opt = create_optimizer_v2(m, 'sam-on', lr=0.1, rho=0.07)
    opt.first_step()
    sq = sum(((p.detach().double() - before[p].double()) ** 2).sum() for p in m.parameters())
    assert abs(math.sqrt(sq) - 0.07) < 1e-5
    assert abs(float(opt.last_eps_norm) - 0.07) < 1e-6 * 0.07
    # first_step leaves .grad alone (eps is computed in buffers of its own): every gradient bit as it was
    assert all(torch.equal(p.grad, grads[p]) for p in m.parameters())


@pytest.mark.parametrize('flush_denormal', [False, True])
def test_backup_and_restore_are_bit_exact_without_foreach_clone(monkeypatch, flush_denormal):
    """torch 2.11 has no torch._foreach_clone; restore() gives back every bit, -0.0 and denormals too,
    also when the CPU flushes denormals in arithmetic."""
    if hasattr(torch, '_foreach_clone'):
        monkeypatch.delattr(torch, '_foreach_clone')
    model, x, y = _toy_problem()
    bn = model[1]
    with torch.no_grad():
        bn.weight[:4] = torch.tensor([-0.0, 0.0, 1e-45, -3.5])
    opt = create_optimizer_v2(model, 'sam-on-layerl2', lr=0.05, rho=0.05)
    before = [p.detach().clone() for p in opt.perturbed]
    F.cross_entropy(model(x), y).backward()
    try:
        torch.set_flush_denormal(flush_denormal)  # returns False where the CPU cannot: then a no-op
        opt.first_step()
        assert any(not torch.equal(p, b) for p, b in zip(opt.perturbed, before))
        opt.restore()
    finally:
        torch.set_flush_denormal(False)
    for p, b in zip(opt.perturbed, before):
        assert torch.equal(p.view(torch.int32), b.view(torch.int32)), 'restore() changed some bits'


def test_zero_init_tensors_and_zero_gradient_are_finite(fused):
    torch.manual_seed(0)
    m = timm.create_model('test_resnet', num_classes=3)  # zero_init_last: some BN gammas are exactly 0
    zero = [p for p in norm_parameters(m) if not p.any()]
    assert zero, 'expected zero-initialised norm tensors'
    F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    for name in ('sam-on-eleml2', 'sam-on-layerl2', 'sam-on-elemlinf', 'sam-eleml2', 'sam-on-fisher'):
        opt = create_optimizer_v2(m, name, lr=0.1, rho=0.05)
        opt.first_step()
        assert all(torch.isfinite(p).all() for p in m.parameters()), name
        assert float(opt.last_skipped) == 0.0
        opt.restore()
    # all-zero gradient: ||T g|| = 0 -> no perturbation, counted as skipped
    before = {p: p.detach().clone() for p in m.parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt = create_optimizer_v2(m, 'sam-on-layerl2', lr=0.1, rho=0.05)
    opt.first_step()
    assert all(torch.equal(p, before[p]) for p in m.parameters())
    assert float(opt.last_skipped) == 1.0 and float(opt.skipped_count) == 1.0
    opt.restore()
    # a non-finite gradient: skipped, no NaN written into the weights
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    next(iter(opt.perturbed)).grad[0] = float('nan')
    opt.first_step()
    assert all(torch.equal(p, before[p]) for p in m.parameters())
    assert float(opt.skipped_count) == 2.0
    opt.restore()


def _toy_problem(seed=0, device='cpu'):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model.to(device), x.to(device), y.to(device)


@pytest.mark.parametrize('name', ['sam', 'sam-on', 'sam-on-layerl2', 'sam-nonorm-fisher', 'sam-elemlinf'])
def test_closure_step_lowers_the_loss(name):
    model, x, y = _toy_problem()
    opt = create_optimizer_v2(model, name, lr=0.05, rho=0.01 if 'linf' not in name else 1e-3)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(30):
        opt.step(closure)
    assert not opt.is_perturbed
    assert float(F.cross_entropy(model(x), y).detach()) < 0.8 * first


def _layernorm_problem():
    """float64 net whose norm layer is a LayerNorm (the test-side norm set knows it; no running stats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[1].weight.add_(0.2 * torch.randn(16, dtype=torch.float64))
    x = torch.randn(32, 8, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


@pytest.mark.parametrize('name', ['sam', 'sam-on-layerl2', 'sam-nonorm-fisher'])
def test_closure_step_is_first_step_then_second_step_and_the_float64_reference(name):
    """``step(closure)``, the documented one-call API, is exactly ``first_step`` + ``second_step``
    (every bit), and both equal SAM written out by hand in float64 with Nesterov SGD (3 steps, so the
    momentum buffer and weight decay are in play)."""
    mode, variant = SAM_OPTIMIZERS[name]
    eta = {'sam': 0.0, 'layerl2': 0.1, 'fisher': 50.0}[variant]
    lr, mom, wd, rho = 0.05, 0.9, 1e-2, 0.05
    a, x, y = _layernorm_problem()
    b, ref = copy.deepcopy(a), copy.deepcopy(a)
    given = {} if variant == 'sam' else {'eta': eta}   # plain SAM has no eta (one given is refused)
    opt_a, opt_b = (create_optimizer_v2(m, name, lr=lr, momentum=mom, weight_decay=wd, rho=rho, **given)
                    for m in (a, b))

    def closure():
        opt_a.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    bufs = {}
    for _ in range(3):
        loss = opt_a.step(closure)
        opt_b.zero_grad()
        loss_b = F.cross_entropy(b(x), y)
        loss_b.backward()
        opt_b.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        opt_b.second_step()
        assert torch.equal(loss.detach(), loss_b.detach())   # the loss at w, returned
        # the reference: g at w, eps from Table 10, g' at w + eps, w back, Nesterov SGD on g' (+ decay, >1-d)
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        eps = reference_eps(mode, variant, ref, rho, eta)
        with torch.no_grad():
            saved = {p: p.clone() for p in ref.parameters()}
            for p in ref.parameters():
                p.add_(eps[p])
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                g = p.grad + wd * saved[p] if p.ndim > 1 else p.grad
                bufs[p] = g.clone() if p not in bufs else mom * bufs[p] + g
                p.copy_(saved[p] - lr * (g + mom * bufs[p]))
    for pa, pb, pr in zip(a.parameters(), b.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(pa, pr, rtol=1e-10, atol=1e-13)
    assert not opt_a.is_perturbed


def _closure_steps(name, steps, lr, mom, rho):
    """``steps`` calls of ``step(closure)`` on the LayerNorm problem, the closure only forward + backward (no
    zero_grad): (model after, untouched float64 copy of it before, x, y)."""
    model, x, y = _layernorm_problem()
    ref = copy.deepcopy(model)
    opt = create_optimizer_v2(model, name, lr=lr, momentum=mom, weight_decay=0.0, rho=rho)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model, ref, x, y


def test_closure_without_zero_grad_descends_on_the_perturbed_gradient_alone():
    """``step(closure)`` with a closure that only runs forward + backward (what its docstring asks; no
    ``zero_grad`` inside): the descent uses g(w + eps) alone, never g(w) + g(w + eps) accumulated in
    ``.grad``. Checked against the first Nesterov SGD step, w - lr (1 + mom) g', on the float64 SAM
    gradient g' computed here by hand."""
    lr, mom, rho = 0.5, 0.9, 0.05
    model, ref, x, y = _closure_steps('sam', 1, lr, mom, rho)
    params = list(ref.parameters())
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for p, gi in zip(params, g):
            p.add_(rho * gi / norm)
    g_adv = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    for p, w, ga in zip(model.parameters(), saved, g_adv):
        torch.testing.assert_close(p.detach(), w - lr * (1 + mom) * ga, rtol=1e-10, atol=1e-13)


def test_msam_closure_without_zero_grad_descends_on_the_perturbed_gradient_alone():
    """Momentum-SAM's one-pass ``step(closure)`` with a closure that does not zero the gradients (the
    previous step's are still in ``.grad``): the second update's descent uses g(w_1 + eps) alone, with
    eps = -rho m / ||m|| and m the first step's momentum buffer, checked against Nesterov SGD written out."""
    lr, mom, rho = 0.5, 0.9, 0.05
    model, ref, x, y = _closure_steps('msam', 2, lr, mom, rho)
    params = list(ref.parameters())
    g0 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)   # no buffer yet: eps = 0
    w1 = [p.detach() - lr * (1 + mom) * g for p, g in zip(params, g0)]   # buf = g0, d = g0 + mom buf
    norm = torch.sqrt(sum((g ** 2).sum() for g in g0))
    at = [(w - rho * g / norm).requires_grad_() for w, g in zip(w1, g0)]
    out = torch.func.functional_call(ref, dict(zip([n for n, _ in ref.named_parameters()], at)), (x,))
    g1 = torch.autograd.grad(F.cross_entropy(out, y), at)
    for p, w, b, g in zip(model.parameters(), w1, g0, g1):
        buf = mom * b + g
        torch.testing.assert_close(p.detach(), w - lr * (g + mom * buf), rtol=1e-10, atol=1e-13)


def test_state_dict_round_trip_keeps_lockstep():
    model_a, x, y = _toy_problem()
    opt_a = create_optimizer_v2(model_a, 'sam-on-layerl2', lr=0.05, weight_decay=1e-4, rho=0.05)

    def step(model, opt):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)

    for _ in range(3):
        step(model_a, opt_a)
    buf = io.BytesIO()
    torch.save({'model': model_a.state_dict(), 'opt': opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_b, _, _ = _toy_problem(seed=1)
    opt_b = create_optimizer_v2(model_b, 'sam-on-layerl2', lr=0.05, weight_decay=1e-4, rho=0.05)
    model_b.load_state_dict(ckpt['model'])
    opt_b.load_state_dict(ckpt['opt'])
    assert opt_b.state[next(model_b.parameters())]['momentum_buffer'] is not None
    for _ in range(3):
        step(model_a, opt_a)
        step(model_b, opt_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_optimizer_api_shares_groups_and_deepcopies_whole():
    model, x, y = _toy_problem()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.05, weight_decay=1e-4, rho=0.05, momentum=0.8)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert isinstance(opt.base_optimizer, torch.optim.SGD) and opt.param_groups[0]['nesterov']
    assert opt.param_groups[0]['momentum'] == 0.8
    opt.param_groups[0]['lr'] = 0.01  # what an LR scheduler does
    assert opt.base_optimizer.param_groups[0]['lr'] == 0.01
    # only the perturbed set is saved: 2 BatchNorm1d tensors of 16
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    assert sum(b.numel() for b in opt._backup) == 32
    c = copy.deepcopy(opt)
    assert c.base_optimizer is not opt.base_optimizer and c.param_groups is c.base_optimizer.param_groups
    copied = {p for g in c.param_groups for p in g['params']}
    assert all(p in copied for p in c.perturbed) and c.is_perturbed
    c.restore()
    opt.restore()
    for p, q in zip((p for g in opt.param_groups for p in g['params']),
                    (p for g in c.param_groups for p in g['params'])):
        assert torch.equal(p, q)
    # any timm base optimizer
    a = create_optimizer_v2(model, 'sam-on', lr=1e-3, rho=0.05, base_opt='adamw', betas=(0.8, 0.9))
    assert isinstance(a.base_optimizer, torch.optim.AdamW) and a.param_groups[0]['betas'] == (0.8, 0.9)
    # lookahead_ prefix keeps working and its step restores: one step equals plain SAM's (Lookahead
    # only moves the weights every k = 6 steps)
    ref, la_model = copy.deepcopy(model), copy.deepcopy(model)
    la = create_optimizer_v2(la_model, 'lookahead_sam-on-layerl2', lr=0.05, rho=0.05)
    plain = create_optimizer_v2(ref, 'sam-on-layerl2', lr=0.05, rho=0.05)
    assert isinstance(la._base_optimizer, SAM)
    for m, o, sam in ((la_model, la, la._base_optimizer), (ref, plain, plain)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        sam.first_step(zero_grad=True)
        assert sam.is_perturbed
        F.cross_entropy(m(x), y).backward()
        o.step()
        assert not sam.is_perturbed
    assert any(not torch.equal(p, q) for p, q in zip(la_model.parameters(), model.parameters()))   # it stepped
    for p, q in zip(la_model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize('path', ['GradScaler.step', 'second_step', 'second_step NativeScaler'])
def test_GradScaler_step_restores_then_steps(device, path):
    """An overflow skips the base step and still leaves w restored, also through a bare
    ``scaler.step(opt)`` (docs/design.md, sections 3 and 4); otherwise the step is SGD's on the unscaled gradient at
    w + eps."""
    from timm.utils import NativeScaler
    model, x, y = _toy_problem(device=device)
    opt = create_optimizer_v2(model, 'sam-on', lr=0.05, rho=0.05, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 4)
    native = NativeScaler(device=device.type)
    native._scaler = scaler
    params = [p for g in opt.param_groups for p in g['params']]
    for overflow in (True, False):   # the skipped update first: the base optimizer has no momentum yet after it
        before = {p: p.detach().clone() for p in params}
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(zero_grad=True, scaler=native if 'Native' in path else scaler)
        assert any(not torch.equal(p, before[p]) for p in opt.perturbed)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if overflow:
            opt.perturbed[0].grad.fill_(float('inf'))
        grads = {p: p.grad.detach().clone() for p in params}
        if path == 'GradScaler.step':
            scaler.step(opt)
        else:
            opt.second_step(scaler=native if 'Native' in path else scaler)
        assert not opt.is_perturbed
        if overflow:
            assert all(torch.equal(p, before[p]) for p in params)   # restored, nothing stepped
        else:   # an independent SGD (timm's sgd: nesterov) from w, on the gradient / scale (exact: a power of 2)
            twin = {p: before[p].clone().requires_grad_() for p in params}
            for p, t in twin.items():
                t.grad = grads[p] / scaler.get_scale()   # 8: halved by the overflow
            groups = [dict(params=[twin[p] for p in g['params']], weight_decay=g['weight_decay'])
                      for g in opt.param_groups]   # timm: no weight decay on biases and norm parameters
            torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True).step()
            for p, t in twin.items():
                torch.testing.assert_close(p.detach(), t.detach(), rtol=0, atol=0)
        scale = scaler.get_scale()
        scaler.update()
        assert scaler.get_scale() == (scale / 2 if overflow else scale)   # the scaler saw the overflow
        opt.zero_grad()


def test_torch_lr_scheduler_sees_second_step():
    """second_step goes through step(), which torch's LR schedulers watch: no 'lr_scheduler.step()
    before optimizer.step()' warning, and the decayed lr reaches the base optimizer."""
    import warnings
    model, x, y = _toy_problem()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        sched.step()
    assert not [w for w in caught if 'lr_scheduler.step()' in str(w.message)], [str(w.message) for w in caught]
    assert opt.base_optimizer.param_groups[0]['lr'] == 0.05


@pytest.mark.parametrize('via', ['sam', 'lookahead'])
@pytest.mark.parametrize('name', ['sam', 'sam-on', 'sam-nonorm', 'sam-on-eleml2orig'])
def test_add_param_group_extends_the_perturbed_set(name, via):
    """Layers added later (unfrozen in fine-tuning) are perturbed as if they had been there from the
    start, and the next step saves and restores them exactly; also when the group is added through
    timm's Lookahead wrapped around SAM (its add_param_group appends to the shared group list)."""
    model = timm.create_model('test_resnet', num_classes=3)
    params = list(model.parameters())
    full = create_optimizer_v2(model, name, lr=0.1, rho=0.05)
    norm, bias = norm_parameters(model), sam_on_timm.bias_parameters(model)
    # built on the head and the last norm layer (every mode perturbs something), the rest added later
    head = {id(p) for p in [*model.get_classifier().parameters(), *norm[-2:]]}
    late = [p for p in params if id(p) not in head]
    opt = SAM([p for p in params if id(p) in head], mode=full.mode, variant=full.variant, norm_params=norm,
              bias_params=bias, lr=0.1)
    (Lookahead(opt) if via == 'lookahead' else opt).add_param_group({'params': late, 'lr': 0.01})
    assert opt.param_groups[-1]['lr'] == 0.01 and opt.param_groups[-1]['momentum'] == 0.9   # defaults filled in
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in params]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)

    def ids(ts):
        return sorted(id(t) for t in ts)
    assert ids(opt.perturbed) == ids(full.perturbed) and len(opt.perturbed) > 0
    if opt.is_bias is not None:
        assert [id(p) in {id(b) for b in bias} for p in opt.perturbed] == opt.is_bias
    assert any(not torch.equal(p, b) for p, b in zip(params, before) if id(p) not in head)
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_step_hooks_fire_once_per_sam_step():
    """torch's step pre / post hooks (and what builds on them) see one step per SAM step, however it is taken."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = create_optimizer_v2(m, 'sam-on', lr=0.1, rho=0.05)
    pre, post = [], []
    opt.register_step_pre_hook(lambda *a: pre.append(1))
    opt.register_step_post_hook(lambda *a: post.append(1))
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])

    def closure():
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert (len(pre), len(post)) == (1, 1)
    closure()
    opt.first_step(zero_grad=True)
    closure()
    opt.second_step(zero_grad=True)
    assert (len(pre), len(post)) == (2, 2)


def test_18_names_are_registered():
    names = [n for n in list_optimizers() if n.startswith('sam') and n not in sam_on_timm.SPARSE_OPTIMIZERS]
    assert sorted(names) == sorted(SAM_OPTIMIZERS) and len(names) == 18
    assert all('_' not in n for n in names)


def _one_line_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg
    for n in needles:
        assert n in msg, msg


def test_frozen_tensors_never_join_the_perturbed_set():
    """Parameters handed over with ``requires_grad`` off (a plain ``model.parameters()`` of a model whose
    norm layers are frozen) are never perturbed: SAM-ON on such a model has nothing to perturb and says
    so, and sam-rand's default sparsity (SAM-ON's) counts the trainable elements only."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    for p in model[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match='no parameter that requires grad'):
        SAM(list(model.parameters()), mode='on', model=model, lr=0.1)
    model[1].bias.requires_grad_(True)   # 8 trainable norm elements among 4 * 8 + 8 + 8 + 8 * 3 + 3 = 75
    opt = SAM(list(model.parameters()), mask=SparseMask('rand'), model=model, lr=0.1)
    assert sum(int(m.sum()) for m in opt.mask.masks) == 8


def test_clear_errors():
    model, _, _ = _toy_problem()
    params = list(model.parameters())
    _one_line_error(lambda: SAM(params, variant='l3', norm_params=[]), 'eleml2', 'layerl2', 'fisher')
    _one_line_error(lambda: SAM(params, mode='only'), 'all', 'on', 'nonorm')
    _one_line_error(lambda: create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.0), 'rho')
    _one_line_error(lambda: create_optimizer_v2(model, 'sam', lr=0.1, rho=-1), 'rho')
    _one_line_error(lambda: create_optimizer_v2(model, 'sam-eleml2', lr=0.1, eta=-0.1), 'eta')
    _one_line_error(lambda: create_optimizer_v2(params, 'sam-on', lr=0.1), 'norm_params', 'model')
    _one_line_error(lambda: create_optimizer_v2(params, 'sam-nonorm', lr=0.1), 'norm_params')
    no_norm = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    _one_line_error(lambda: create_optimizer_v2(no_norm, 'sam-on-layerl2', lr=0.1), 'no normalization layers')
    _one_line_error(lambda: create_optimizer_v2(timm.create_model('test_nfnet'), 'sam-nonorm', lr=0.1),
                    'no normalization layers')
    _one_line_error(lambda: SAM(params, base_opt='sam-on'), 'base_opt')
    # bare parameters work for mode all, and for on with the norm set given explicitly
    opt = create_optimizer_v2(params, 'sam-on', lr=0.1, norm_params=norm_parameters(model))
    assert len(opt.perturbed) == 2
    assert isinstance(create_optimizer_v2(params, 'sam', lr=0.1), SAM)


def test_first_step_with_scaler_uses_the_unscaled_gradient(device):
    """Fisher is not scale invariant: first_step(scaler=) must see the true gradient."""
    eps = []
    for scale in (None, 2.0 ** 16):
        model, x, y = _toy_problem(device=device)
        opt = create_optimizer_v2(model, 'sam-on-fisher', lr=0.05, rho=0.05)
        before = [p.detach().clone() for p in opt.perturbed]
        scaler = None if scale is None else torch.amp.GradScaler(device.type, init_scale=scale)
        loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        grads = [p.grad.clone() for p in opt.perturbed]
        opt.first_step(scaler=scaler)
        assert all(torch.equal(p.grad, g) for p, g in zip(opt.perturbed, grads))  # .grad left as it was
        eps.append([p.detach() - b for p, b in zip(opt.perturbed, before)])
    for a, b in zip(*eps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_expanded_gradients_and_zero_linf_gradient(fused):
    from sam_on_timm.perturbations import compute_eps
    w = [torch.randn(4), torch.randn(3)]
    g = [torch.ones(()).expand(4), torch.full((3,), 2.0)]   # what autograd gives for w.sum()
    eps, norm, skipped = compute_eps('sam', w, g, 0.1, 0.0, grads_writable=True)
    ref = torch.cat([torch.ones(4), torch.full((3,), 2.0)])
    torch.testing.assert_close(torch.cat(eps), 0.1 * ref / ref.norm())
    eps, norm, skipped = compute_eps('elemlinf', w, [torch.zeros(4), torch.zeros(3)], 0.1, 0.0)
    assert float(norm) == 0.0 and float(skipped) == 1.0  # no perturbation: counted as skipped


@pytest.mark.parametrize('variant', ['sam', 'fisher', 'elemlinf'])
def test_found_inf_skips_the_perturbation_even_with_a_finite_gradient(variant, fused):
    """``compute_eps(found_inf=...)``: a non-zero flag (the scaler saw an overflow) gives eps = 0 and
    counts a skip, whatever the gradient; a zero flag leaves eps as without it."""
    from sam_on_timm.perturbations import compute_eps
    torch.manual_seed(0)
    w = [torch.randn(5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    g = [torch.randn_like(t) for t in w]
    eps, norm, skipped = compute_eps(variant, w, [t.clone() for t in g], 0.1, 0.0, found_inf=torch.ones(1))
    assert all(not e.any() for e in eps) and float(norm) == 0.0 and float(skipped) == 1.0
    eps, norm, skipped = compute_eps(variant, w, [t.clone() for t in g], 0.1, 0.0, found_inf=torch.zeros(1))
    flat_w, flat_g = (torch.cat([t.reshape(-1) for t in ts]) for ts in (w, g))
    # eta 0: T = |w| for elemlinf, T = 1 for sam and fisher
    want = 0.1 * flat_w.abs() * flat_g.sign() if variant == 'elemlinf' else 0.1 * flat_g / flat_g.norm()
    torch.testing.assert_close(torch.cat([e.reshape(-1) for e in eps]), want, rtol=1e-12, atol=0)
    assert float(skipped) == 0.0


def test_a_float64_tensor_among_float32_ones_keeps_its_precision(fused):
    """A perturbed set of mixed dtypes (float32 tensors and a float64 one): the float64 tensor's eps is
    computed in float64, on the flat path too (whose buffer has one dtype: such a set stays per tensor).
    The float32 gradient is made small (1e-4) so that its float32 norm moves ||g|| by ~1e-15 only: the
    right eps is within ~1e-15 of the float64 reference, one rounded through float32 ~6e-8 off."""
    from sam_on_timm.perturbations import compute_eps
    torch.manual_seed(0)
    w = [torch.randn(6), torch.randn(7, dtype=torch.float64), torch.randn(3)]
    g = [1e-4 * torch.randn(6), torch.randn(7, dtype=torch.float64), 1e-4 * torch.randn(3)]
    eps, _, _ = compute_eps('sam', w, [t.clone() for t in g], 0.1, 0.0)
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
    assert eps[1].dtype == torch.float64
    torch.testing.assert_close(eps[1], 0.1 * g[1] / norm, rtol=1e-12, atol=0)
    for e, t in ((eps[0], g[0]), (eps[2], g[2])):
        torch.testing.assert_close(e.double(), 0.1 * t.double() / norm, rtol=1e-6, atol=0)


def test_fused_path_gives_the_same_eps_with_channels_last_and_nan(monkeypatch, device):
    """The flat-buffer path (CUDA's) against the per-tensor one: channels_last conv weights, 0-dim T
    (layerwise, ASAM biases), and a NaN gradient that must leave every eps exactly 0. Every
    _foreach_mul it issues pairs same-shape, same-stride operands (CUDA's fused-kernel condition),
    and it calls masked_fill_ once, not once per tensor."""
    from sam_on_timm import flat, perturbations
    from sam_on_timm.perturbations import compute_eps
    monkeypatch.setattr(flat, 'FLAT_MAX_NUMEL', 1 << 40)  # every set: the flat path
    torch.manual_seed(0)
    # test_resnet: 3x3 and 1x1 (downsample) convs, BatchNorm, biases; 0.5M weights (resnet18's 11M took 40 s)
    m = timm.create_model('test_resnet', num_classes=3).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(m(x), torch.tensor([0, 1], device=device)).backward()
    params = list(m.parameters())
    assert any(p.dim() == 4 and not p.grad.is_contiguous() for p in params)  # channels_last gradients
    assert any(p.dim() == 4 and p.shape[2:] == (1, 1) for p in params)      # strides ambiguous in size-1 dims
    is_bias = [p.dim() == 1 for p in params]
    calls = {'mul_pairs': [], 'masked_fill_': 0}
    foreach_mul, foreach_mul_, masked_fill_ = torch._foreach_mul, torch._foreach_mul_, torch.Tensor.masked_fill_

    def spy(fn):
        def wrapped(a, b, *args):
            if isinstance(b, (list, tuple)):
                calls['mul_pairs'] += [(x.shape, y.shape, x.stride(), y.stride()) for x, y in zip(a, b)]
            return fn(a, b, *args)
        return wrapped

    def spy_fill(self, *args):
        calls['masked_fill_'] += 1
        return masked_fill_(self, *args)

    for variant in ('layerl2', 'eleml2orig', 'fisher', 'elemlinf', 'sam'):
        for nan in (False, True):
            grads = [p.grad.clone() for p in params]
            if nan:
                grads[3][(0,) * grads[3].dim()] = float('nan')
            out = {}
            for fused in (False, True):
                monkeypatch.setattr(flat, 'FUSED_DEVICE_TYPES', {device.type} if fused else set())
                if fused:
                    calls.update(mul_pairs=[], masked_fill_=0)
                    monkeypatch.setattr(torch, '_foreach_mul', spy(foreach_mul))
                    monkeypatch.setattr(torch, '_foreach_mul_', spy(foreach_mul_))
                    monkeypatch.setattr(torch.Tensor, 'masked_fill_', spy_fill)
                out[fused] = compute_eps(variant, params, [g.clone() for g in grads], 0.05,
                                         perturbations.VARIANTS[variant].default_eta, is_bias)
                monkeypatch.setattr(torch, '_foreach_mul', foreach_mul)
                monkeypatch.setattr(torch, '_foreach_mul_', foreach_mul_)
                monkeypatch.setattr(torch.Tensor, 'masked_fill_', masked_fill_)
            (e0, n0, s0), (e1, n1, s1) = out[False], out[True]
            assert float(s0) == float(s1) == float(nan), (variant, nan)
            torch.testing.assert_close(n1, n0, rtol=1e-6, atol=1e-12, equal_nan=True)   # ||eps||: same on both paths
            for a, b in zip(e0, e1):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)
                if nan:
                    assert not b.any() and torch.isfinite(b).all()
            bad = [c for c in calls['mul_pairs'] if c[0] != c[1] or c[2] != c[3]]
            assert not bad, (variant, bad[:3])
            assert calls['masked_fill_'] == 1, (variant, calls['masked_fill_'])
    # SAM itself: w + eps pairs each 1x1 conv weight with an eps of its own strides, and restores exactly
    monkeypatch.setattr(flat, 'FUSED_DEVICE_TYPES', {device.type})
    opt = create_optimizer_v2(m, 'sam-eleml2', lr=0.1, rho=0.05)
    before = [p.detach().clone() for p in params]
    calls['mul_pairs'] = []
    monkeypatch.setattr(torch, '_foreach_add_', spy(torch._foreach_add_))
    opt.first_step()
    pairs = calls['mul_pairs']
    assert len(pairs) >= len(params) and all(c[2] == c[3] for c in pairs), [c for c in pairs if c[2] != c[3]][:3]
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # above FLAT_MAX_NUMEL (SAM-all on a large model) the NaN guard goes per tensor, with the same result
    monkeypatch.setattr(flat, 'FLAT_MAX_NUMEL', 1000)
    grads = [p.grad.clone() for p in params]
    grads[0][(0,) * grads[0].dim()] = float('inf')
    calls['masked_fill_'] = 0
    monkeypatch.setattr(torch.Tensor, 'masked_fill_', spy_fill)
    eps, _, skipped = compute_eps('layerl2', params, grads, 0.05, 0.0)
    monkeypatch.setattr(torch.Tensor, 'masked_fill_', masked_fill_)
    assert calls['masked_fill_'] == len(params) and float(skipped) == 1.0
    assert all(not e.any() for e in eps)


def test_layerwise_eps_with_expanded_and_sliced_gradients(fused):
    """Gradients that are not dense (stride-0 expand, a strided slice): the fused path's fallback view."""
    from sam_on_timm.perturbations import compute_eps
    torch.manual_seed(1)
    w = [torch.randn(4), torch.randn(3), torch.randn(2, 3)]
    g = [torch.full((), 0.5).expand(4), torch.randn(6)[::2], torch.randn(3, 2).t()]
    assert not any(x.is_contiguous() for x in g[:2])
    eps, norm, skipped = compute_eps('layerl2', w, g, 0.1, 0.0)
    t = [x.double().norm() for x in w]
    tg = [ti * gi.double() for ti, gi in zip(t, g)]
    denom = torch.sqrt(sum((x ** 2).sum() for x in tg))
    for e, ti, gi in zip(eps, t, g):
        torch.testing.assert_close(e.double(), 0.1 * ti ** 2 * gi.double() / denom, rtol=1e-5, atol=1e-8)
    assert float(skipped) == 0.0


def test_flat_path_issues_the_same_ops_whatever_the_number_of_tensors(monkeypatch):
    """On the flat path (CUDA's, forced here) a perturbation is a fixed number of operator calls, however
    many tensors P holds: no per-tensor launch, the per-parameter cost docs/design.md section 7 warns of. (The
    per-tensor path, for contrast, grows with P.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from sam_on_timm import flat

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops(n_blocks, opt_name):
        # n blocks of conv (weight, bias) + BatchNorm + LayerNorm: SAM-ON's set has 4 n tensors, SAM's 6 n
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm([4, 2, 2]))
                            for _ in range(n_blocks)])
        opt = create_optimizer_v2(m, opt_name, lr=0.1, rho=0.05)
        grads = [torch.randn_like(p) for p in opt.perturbed]
        opt.perturb([g.clone() for g in grads], grads_writable=True)   # builds the buffers
        opt.restore()
        Count.n = 0
        with Count():
            opt.perturb(grads, grads_writable=True)
            opt.restore()
        return len(opt.perturbed), Count.n

    for opt_name in ('sam-on', 'sam-on-layerl2', 'sam-on-eleml2orig', 'sam-on-fisher', 'sam-on-elemlinf'):
        monkeypatch.setattr(flat, 'FUSED_DEVICE_TYPES', {'cpu'})
        (n_small, ops_small), (n_big, ops_big) = ops(8, opt_name), ops(30, opt_name)
        assert n_big > 2 * n_small and ops_big == ops_small <= 40, (opt_name, ops_small, ops_big)
        monkeypatch.setattr(flat, 'FUSED_DEVICE_TYPES', set())
        assert ops(30, opt_name)[1] > ops(8, opt_name)[1], opt_name


@pytest.mark.parametrize('change', ['double', 'channels_last'])
def test_backup_follows_the_model_to_a_new_dtype_or_layout(change, fused):
    """model.double() / channels_last after some steps give P new storage: the backup (and the flat
    buffer) are renewed, so restore() stays bit-exact (a float32 backup would round float64 weights)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    opt = create_optimizer_v2(m, 'sam-on-layerl2' if change == 'double' else 'sam-eleml2', lr=0.1, rho=0.05)
    x = torch.randn(2, 3, 4, 4)
    for step in range(3):
        if step == 2:
            m.to(torch.float64) if change == 'double' else m.to(memory_format=torch.channels_last)
            x = x.double() if change == 'double' else x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        m(x).square().mean().backward()
        before = [p.detach().clone() for p in opt.perturbed]
        opt.first_step()
        assert any(not torch.equal(p, b) for p, b in zip(opt.perturbed, before))
        opt.restore()
        for p, b in zip(opt.perturbed, before):
            assert p.dtype == b.dtype and torch.equal(p, b), step
    assert opt._backup[0].dtype == opt.perturbed[0].dtype
    if change == 'channels_last':
        assert opt._backup[0].stride() == opt.perturbed[0].stride()


def test_pickle_loads_and_steps_and_counts_skips_in_float32():
    """A whole-object pickle (supported through __getstate__) loads and steps; the skip counter is float32
    whatever the model's dtype (a bfloat16 count would stop at 256)."""
    import pickle
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(torch.bfloat16)
    opt = create_optimizer_v2(m, 'sam-on', lr=0.1, rho=0.05)
    loaded = pickle.loads(pickle.dumps(opt))
    for p in loaded.perturbed:
        p.grad = torch.zeros_like(p)   # zero gradient: every step is skipped and counted
    for _ in range(300):
        loaded.first_step()
        loaded.restore()
    assert loaded.skipped_count.dtype == torch.float32 and float(loaded.skipped_count) == 300.0
    for p in loaded.perturbed:   # the pickle holds its own copies of the parameters
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in loaded.perturbed]
    loaded.first_step()
    assert float(loaded.last_skipped) == 0.0
    loaded.second_step()
    assert all(not torch.equal(p, b) for p, b in zip(loaded.perturbed, before))


# ---------------------------------------------------------------------------------------------
# optimizer state: saved hyperparameters, an explicit eta of 0, zero_grad in place
# ---------------------------------------------------------------------------------------------
def test_load_state_dict_takes_the_saved_groups_hyperparameters():
    """A state saved with lr 0.03 / momentum 0.5 / weight decay 1e-2, loaded into an optimizer built with
    other values, steps with the saved ones: its next step is the plain SGD step written out here, and an
    lr change made through ``param_groups`` afterwards (what a scheduler does) reaches the base optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    saved = create_optimizer_v2(model, 'sam-on', lr=0.03, momentum=0.5, weight_decay=1e-2, rho=0.05)
    state = copy.deepcopy(saved.state_dict())
    opt = create_optimizer_v2(model, 'sam-on', lr=0.7, momentum=0.9, weight_decay=1e-4, rho=0.05)
    opt.load_state_dict(state)
    wds = [g['weight_decay'] for g in saved.param_groups]
    assert sorted(wds) == [0.0, 1e-2]   # timm's factory: biases and norm parameters without decay
    for gs in (opt.param_groups, opt.base_optimizer.param_groups):
        assert [(g['lr'], g['momentum'], g['weight_decay']) for g in gs] == [(0.03, 0.5, wd) for wd in wds]
    opt.param_groups[0]['lr'] = 0.02   # a scheduler's change after the load
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {p: (p.detach().clone(), p.grad.clone()) for p in model.parameters()}
    opt.step()   # no momentum buffer yet: buf = g + wd w; timm's sgd is Nesterov: d = g + wd w + 0.5 buf
    for i, (lr, wd) in enumerate(((0.02, wds[0]), (0.03, wds[1]))):
        for p in opt.param_groups[i]['params']:
            w, g = before[p]
            d = g + wd * w
            torch.testing.assert_close(p.detach(), w - lr * (d + 0.5 * d), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', ['sam-fisher', 'sam-eleml2orig'])
def test_explicit_eta_zero_is_zero_not_the_default(name):
    """eta=0.0 given is 0, not the variant's default (fisher 1, eleml2orig 0.01): Fisher-SAM's T is then 1
    (eps = rho g / ||g||), original ASAM's T is |w| for weights and 1 for biases."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    opt = create_optimizer_v2(model, name, lr=0.1, rho=0.05, eta=0.0)
    assert opt.eta == 0.0
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    g = [p.grad.clone() for p in params]
    if name == 'sam-fisher':
        t = [torch.ones_like(p) for p in params]
    else:
        t = [torch.ones_like(p) if n.endswith('bias') else p.detach().abs() for n, p in zip(names, params)]
    denom = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g)))
    before = [p.detach().clone() for p in params]
    opt.first_step()
    for p, w, ti, gi in zip(params, before, t, g):
        torch.testing.assert_close(p.detach() - w, 0.05 * ti * ti * gi / denom, rtol=1e-9, atol=1e-15)
    opt.restore()


def test_zero_grad_set_to_none_false_zeros_in_place():
    """``zero_grad(set_to_none=False)`` keeps every .grad tensor (the same object and storage) at zero;
    the default sets them to None."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.05)
    model(torch.randn(2, 3)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), grads))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_second_step_keeps_the_descent_gradient_unless_asked():
    """After ``second_step()`` each .grad still holds the gradient at w + eps that the step used (a user's loop
    may log or clip it); ``second_step(zero_grad=True)`` clears them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    for clear in (False, True):
        opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.05)
        model(x).square().sum().backward()
        opt.first_step(zero_grad=True)
        model(x).square().sum().backward()
        at_eps = [p.grad.clone() for p in model.parameters()]
        opt.second_step(zero_grad=True) if clear else opt.second_step()
        if clear:
            assert all(p.grad is None for p in model.parameters())
        else:
            assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), at_eps))


def test_a_scaler_that_has_not_scaled_yet_leaves_the_gradients_alone():
    """A GradScaler before its first ``scale()`` has no scale: the gradients are not scaled, so there is
    nothing to unscale (not an error)."""
    from sam_on_timm.sam import unscale_grads
    grads = [torch.tensor([2.0, -4.0]), torch.tensor([8.0])]
    scaler = torch.amp.GradScaler('cpu')
    assert unscale_grads(grads, scaler) is None
    assert grads[0].tolist() == [2.0, -4.0] and grads[1].tolist() == [8.0]
    scaler.scale(torch.ones(()))   # now the scale is set (2**16): the gradients are divided by it
    found_inf = unscale_grads(grads, scaler)
    assert float(found_inf) == 0.0 and grads[0].tolist() == [2.0 / 65536, -4.0 / 65536]


def test_first_step_with_a_scaler_unscales_skips_on_overflow_and_takes_unreached_tensors():
    """``first_step(scaler=...)``: eps from the unscaled gradient (||eps|| = rho, .grad left scaled); a tensor of P
    the loss did not reach (no .grad) has eps 0; an inf in the scaled gradient (the scaler's overflow)
    skips the perturbation: w unchanged, counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2), nn.LayerNorm(2))
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.05)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    x = torch.randn(5, 3)
    for overflow in (False, True):
        opt.zero_grad()
        scaler.scale(model[:3](x).square().sum()).backward()   # the last LayerNorm is not reached
        unreached = model[3].weight
        assert unreached.grad is None
        if overflow:
            model[1].weight.grad[0] = float('inf')
        scaled = [None if p.grad is None else p.grad.clone() for p in opt.perturbed]
        before = [p.detach().clone() for p in opt.perturbed]
        opt.first_step(scaler=scaler)
        eps = [p.detach() - b for p, b in zip(opt.perturbed, before)]
        assert all(g is None and p.grad is None or torch.equal(p.grad, g) for p, g in zip(opt.perturbed, scaled))
        if overflow:
            assert all(not e.any() for e in eps) and float(opt.last_skipped) == 1.0
        else:
            assert float(torch.sqrt(sum((e ** 2).sum() for e in eps))) == pytest.approx(0.05, rel=1e-5)
            assert not eps[[p is unreached for p in opt.perturbed].index(True)].any() and float(opt.last_skipped) == 0.0
        opt.restore()


def _stepped_sam_on(interval=1, steps=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.05, interval=interval)
    for _ in range(steps):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.first_step(zero_grad=True)
        model(torch.randn(5, 3)).square().sum().backward()
        opt.second_step(zero_grad=True)
    return model, opt


def test_state_dict_and_load_state_dict_while_perturbed_are_refused_naming_the_call():
    model, opt = _stepped_sam_on()
    state = copy.deepcopy(opt.state_dict())
    model(torch.randn(5, 3)).square().sum().backward()
    opt.first_step()
    for call, what in ((lambda: opt.load_state_dict(state), 'load_state_dict()'), (opt.state_dict, 'state_dict()')):
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value).startswith(f"sam-on: {what} while the weights are perturbed"), e.value
    opt.restore()


def test_a_state_without_an_update_count_starts_the_phase_at_zero():
    """A state saved before the count was kept (no 'sam_updates') loads as update 0: interval SAM's next
    update is a SAM update."""
    _, saved = _stepped_sam_on(interval=3, steps=1)
    state = copy.deepcopy(saved.state_dict())
    assert state.pop('sam_updates') == 1
    _, opt = _stepped_sam_on(interval=3, steps=2)
    assert opt.updates == 2 and not opt.is_sam_update()
    opt.load_state_dict(state)
    assert opt.updates == 0 and opt.is_sam_update()


@pytest.mark.parametrize('bad', [-1, 2.5, True, '3', None])
def test_a_state_whose_update_count_is_not_a_count_is_refused_and_changes_nothing(bad):
    _, saved = _stepped_sam_on(interval=3, steps=1)
    state = copy.deepcopy(saved.state_dict())
    state['sam_updates'] = bad
    model, opt = _stepped_sam_on(interval=3, steps=2)
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(state)
    assert '\n' not in str(e.value) and 'update count is not a count' in str(e.value), e.value
    assert opt.updates == 2
    after = opt.state_dict()
    for k, v in kept['state'].items():
        assert torch.equal(after['state'][k]['momentum_buffer'], v['momentum_buffer'])


# ---------------------------------------------------------------------------------------------
# gradients that share storage
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', ['sam', 'eleml2', 'layerl2', 'elemlinf', 'fisher'])
def test_eps_with_gradients_sharing_storage(variant, fused):
    """Gradients that are views of one buffer (one with strides of its own in a size-1 dimension, at an
    offset) and one gradient tensor given for two parameters, with ``grads_writable``: an in-place update
    would reach the shared storage twice. eps is the formula's, computed here per element in float64,
    on both the per-tensor and the flat path; and the shared buffer is read, never written."""
    from sam_on_timm.perturbations import compute_eps
    torch.manual_seed(0)
    w = [torch.randn(4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64),
         torch.randn(2, 2, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    buf = torch.randn(11, dtype=torch.float64)
    g = [buf[:4], buf.as_strided((3, 1), (1, 5), 4), buf[7:].view(2, 2)]
    g.append(g[0])   # the same gradient tensor for the last parameter too
    kept = buf.clone()
    eta, rho = (1.0 if variant == 'fisher' else 0.0), 0.05
    gd = [x.detach().clone() for x in g]
    if variant == 'sam':
        t = [torch.ones_like(x) for x in w]
    elif variant in ('eleml2', 'elemlinf'):
        t = [x.abs() for x in w]
    elif variant == 'layerl2':
        t = [torch.full_like(x, float(x.norm())) for x in w]
    else:
        t = [(1 + eta * x * x) ** -0.5 for x in gd]
    if variant == 'elemlinf':
        want = [rho * ti * gi.sign() for ti, gi in zip(t, gd)]
    else:
        denom = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, gd)))
        want = [rho * ti * ti * gi / denom for ti, gi in zip(t, gd)]
    eps, _, skipped = compute_eps(variant, w, g, rho, eta, grads_writable=True)
    assert float(skipped) == 0.0
    for e, ref in zip(eps, want):
        torch.testing.assert_close(e.detach().clone(), ref, rtol=1e-12, atol=1e-15)
    assert torch.equal(buf, kept)


@pytest.mark.parametrize('variant', ['sam', 'eleml2', 'eleml2orig', 'elemlinf', 'layerl2', 'fisher'])
def test_one_perturbed_tensor_and_the_callers_gradients_left_alone(variant):
    """P of a single tensor (a model whose P is one bias, say) against float64 Eq. 4, with the default
    ``grads_writable`` False: the caller's gradient is not overwritten. The skipped flag is a float
    like ||eps|| (a bool would add chunks' skips as a logical or)."""
    from sam_on_timm.perturbations import VARIANTS, compute_eps
    torch.manual_seed(3)
    w, g = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    g_before, eta, rho = g.clone(), 0.01, 0.1
    eps, norm, skipped = compute_eps(variant, [w], [g], rho, eta, is_bias=[True])
    assert torch.equal(g, g_before)
    one = torch.ones(5, dtype=torch.float64)
    t = {'sam': one, 'eleml2': w.abs() + eta, 'eleml2orig': (1.0 + eta) * one,   # a bias: 1 + eta
         'elemlinf': w.abs() + eta, 'layerl2': (w.norm() + eta).expand(5), 'fisher': (1 + eta * g * g).rsqrt()}
    t = t[variant]
    want = rho * t * g.sign() if VARIANTS[variant].p != 2 else rho * t * t * g / (t * g).norm()
    torch.testing.assert_close(eps[0], want, rtol=1e-12, atol=0)
    assert skipped.dtype == norm.dtype and float(skipped) == 0.0
    _, _, skipped = compute_eps(variant, [w], [torch.zeros(5, dtype=torch.float64)], rho, eta, is_bias=[True])
    assert skipped.dtype == torch.float64 and float(skipped) == 1.0


def test_an_eta_on_plain_sam_is_refused_in_one_line_naming_it():
    """eta only enters T: an eta given to plain SAM (T = 1) would silently be plain SAM. The message
    names the argument and the variants that have an eta."""
    from sam_on_timm.perturbations import check_eta_used
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^eta 0\.01 has no effect with variant 'sam' .*eleml2.*layerl2"):
        SAM(model.parameters(), 'sgd', rho=0.05, eta=0.01, variant='sam', lr=0.1)
    assert SAM(model.parameters(), 'sgd', rho=0.05, eta=0.01, variant='layerl2', lr=0.1).eta == 0.01
    check_eta_used('sam', None)   # unset: the variant's default
    with pytest.raises(ValueError, match=r'^--sam-eta 0\.0 has no effect with --opt sam-on '):
        check_eta_used('sam', 0.0, '--sam-eta', '--opt sam-on')
