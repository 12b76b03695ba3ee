"""Exception safety of the two-pass step: whatever raises after the perturbation (a forward or loss of
the descent pass, the closure, the scaler, clipping), ``train_step`` (sequential and batched chunks),
``SAM.step(closure)``, ``second_step`` and the ``perturbed_weights()`` block leave the weights at w
bit-exactly, and the ``requires_grad`` / BatchNorm flags and module forwards as they were; a retry then
gives the update a run without the failure gives. ``state_dict()`` / ``load_state_dict()`` of the
optimizer are refused while the weights are perturbed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sam_on_timm  # noqa: F401  (registers the names)
from sam_on_timm.train_step import find_sam, split_chunks, train_step
from timm.optim import create_optimizer_v2


class Boom(RuntimeError):
    pass


def make_model():
    """BatchNorm (momentum 0.1), GroupNorm, LayerNorm, float64; one conv weight frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 3)).double().train()
    model[3].weight.requires_grad_(False)
    return model


def data(n=8, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return split_chunks(torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64),
                        torch.randint(0, 3, (n,), generator=g), m)


def flags(model):
    """Everything of the model a step may switch and must put back."""
    out = {f'{n}.requires_grad': p.requires_grad for n, p in model.named_parameters()}
    for n, mod in model.named_modules():
        out[f'{n}.training'] = mod.training
        out[f'{n}.own_forward'] = 'forward' in mod.__dict__ or '_sam_ghost' in mod.__dict__
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            out[f'{n}.momentum'], out[f'{n}.track_running_stats'] = mod.momentum, mod.track_running_stats
    return out


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_at(model, weights, flags_before):
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n   # bit-exact: restored by a copy, never w - eps
    assert flags(model) == flags_before


class RaisingScaler(torch.amp.GradScaler):
    """A GradScaler whose ``method`` raises on its ``on``-th call."""

    def __init__(self, method, on):
        super().__init__('cpu', init_scale=2.0 ** 4)
        self.method, self.on, self.calls = method, on, 0

    def _count(self):
        self.calls += 1
        if self.calls == self.on:
            raise Boom(self.method)

    def scale(self, outputs):
        if self.method == 'scale':
            self._count()
        return super().scale(outputs)

    def unscale_(self, optimizer):
        if self.method == 'unscale_':
            self._count()
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        if self.method == 'step':
            self._count()
        return super().step(optimizer, *args, **kwargs)


# where it raises: (what, on which call). 2 chunks: sequential calls the loss / forward / scale as ascent 0,
# descent 0, ascent 1, descent 1; batched as ascents 0 and 1 (one forward), then descents 0 and 1.
SEQUENTIAL = [('loss', 2), ('loss', 4), ('forward', 2), ('forward', 4), ('scale', 2), ('scale', 4),
              ('unscale_', 1), ('step', 1), ('clip', 1)]
BATCHED = [('loss', 3), ('loss', 4), ('forward', 2), ('scale', 2), ('unscale_', 1), ('step', 1), ('clip', 1)]


def _failing_step(model, opt, what, on, path, bn_update):
    calls = {'n': 0}

    def count():
        calls['n'] += 1
        if calls['n'] == on:
            raise Boom(what)

    def loss_fn(out, y):
        if what == 'loss':
            count()
        return F.cross_entropy(out, y)
    hook = model.register_forward_pre_hook(lambda mod, inp: count()) if what == 'forward' else None
    scaler = RaisingScaler(what, on) if what in ('scale', 'unscale_', 'step') else None
    kwargs = dict(clip_grad=1.0, clip_mode='bogus' if what == 'clip' else 'norm')   # timm: unknown mode raises
    try:
        with pytest.raises((Boom, AssertionError)) as e:
            train_step(model, opt, data(), loss_fn, loss_scaler=scaler, chunk_path=path, bn_update=bn_update,
                       **kwargs)
        assert what != 'clip' or 'Unknown clip mode' in str(e.value)
    finally:
        if hook is not None:
            hook.remove()


@pytest.mark.parametrize('bn_update', ['both', 'ascent'])
@pytest.mark.parametrize('path,what,on', [('sequential', *c) for c in SEQUENTIAL] + [('batched', *c) for c in BATCHED])
def test_train_step_leaves_w_and_flags_whatever_raises(path, what, on, bn_update):
    model = make_model()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, momentum=0.9, rho=0.5)
    clean_model, clean_opt = copy.deepcopy((model, opt))   # together: the copy steps the copied model
    weights, before = params_of(model), flags(model)
    _failing_step(model, opt, what, on, path, bn_update)
    assert_at(model, weights, before)
    sam = find_sam(opt)
    assert not sam.is_perturbed and opt.state_dict()['state'] == {}   # no base step taken
    # a retry takes the update a run without the failure takes (the parameters: BatchNorm running statistics
    # did see the passes that completed before the failure, as in any training-mode forward)
    for m, o in ((model, opt), (clean_model, clean_opt)):
        train_step(m, o, data(), F.cross_entropy, chunk_path=path, bn_update=bn_update, clip_grad=1.0)
    for (n, p), q in zip(model.named_parameters(), clean_model.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_train_step_sam_all_sequential_restores_on_descent_error():
    """SAM on every parameter (the sequential path only), raising in the last chunk's descent."""
    model = make_model()
    opt = create_optimizer_v2(model, 'sam', lr=0.1, rho=0.5)
    weights, before = params_of(model), flags(model)
    _failing_step(model, opt, 'loss', 4, 'auto', 'both')
    assert_at(model, weights, before)


def _closure(model, x, y, fail_on=None):
    calls = {'n': 0}

    def closure():
        calls['n'] += 1
        if calls['n'] == fail_on:
            raise Boom('closure')
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize('name', ['sam', 'sam-on-layerl2', 'sam-rand'])
def test_step_closure_restores_when_the_closure_raises(name, fused):
    model = make_model()
    opt = create_optimizer_v2(model, name, lr=0.1, momentum=0.9, rho=0.5)
    (x, y), = data(m=8)
    weights, before = params_of(model), flags(model)
    opt.zero_grad()
    with pytest.raises(Boom):
        opt.step(_closure(model, x, y, fail_on=2))   # the pass at w + eps
    assert_at(model, weights, before)
    assert not opt.is_perturbed and opt.state_dict()['state'] == {}
    opt.zero_grad()
    opt.step(_closure(model, x, y))   # and the next step is a normal one
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())


REFUSED = (r"^sam-on: (load_)?state_dict\(\) while the weights are perturbed \(w \+ eps, between first_step\(\) "
           r"and second_step\(\)\); call it after second_step\(\) or restore\(\)$")


def test_perturbed_weights_block(fused):
    """Inside the block: w + eps, the optimizer's state_dict refused in one line; after it (normal exit or
    an exception): w, bit-exact. The documented loop with it equals step(closure) bit-exactly."""
    model = make_model()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, momentum=0.9, rho=0.5)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    (x, y), = data(m=8)
    weights, before = params_of(model), flags(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(Boom):
        with opt.perturbed_weights(zero_grad=True):
            assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
            for call in (opt.state_dict, lambda: opt.load_state_dict(ref_opt.state_dict())):
                with pytest.raises(RuntimeError, match=REFUSED):
                    call()
            raise Boom('the pass at w + eps')
    assert_at(model, weights, before)
    assert not opt.is_perturbed and opt.state_dict()['state'] == {}
    # the documented loop
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with opt.perturbed_weights(zero_grad=True):
        F.cross_entropy(model(x), y).backward()
    assert_at(model, weights, before)   # w again before the base step
    opt.second_step(zero_grad=True)
    ref_opt.zero_grad()
    ref_opt.step(_closure(ref_model, x, y))
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize('method', ['step', 'unscale_'])
def test_second_step_restores_when_the_scaler_raises(method):
    """first_step / second_step with a GradScaler whose step (or the unscale_ inside it) raises."""
    model = make_model()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, momentum=0.9, rho=0.5)
    scaler = RaisingScaler(method, 1)
    (x, y), = data(m=8)
    weights, before = params_of(model), flags(model)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    assert opt.is_perturbed
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(Boom):
        if method == 'unscale_':   # clipping before second_step, as timm's loops do
            scaler.unscale_(opt)
        opt.second_step(scaler=scaler)
    if method == 'unscale_':   # raised in the user's own code between the steps: restore() is theirs to call
        assert opt.is_perturbed
        opt.restore()
    assert_at(model, weights, before)
    assert not opt.is_perturbed and opt.state_dict()['state'] == {}


@pytest.mark.parametrize('path', ['sequential', 'batched'])
def test_train_step_refuses_a_perturbed_optimizer(path):
    """After a user's first_step(), train_step changes nothing (the batched path would take eps at w + eps,
    the sequential one would restore the user's perturbation) and says so in one line."""
    model = make_model()
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.5)
    (x, y), = data(m=8)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    perturbed = params_of(model)
    with pytest.raises(RuntimeError, match=r"^sam-on: train_step\(\) while the weights are perturbed \(after "
                                           r"first_step\(\)\); call second_step\(\) or restore\(\) first$"):
        train_step(model, opt, data(), F.cross_entropy, chunk_path=path)
    assert opt.is_perturbed and all(torch.equal(p, perturbed[n]) for n, p in model.named_parameters())
