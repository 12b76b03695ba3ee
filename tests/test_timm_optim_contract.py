"""timm's optimizer contract, for every SAM name in timm's registry.

timm's own optimizer suite (``tests/test_optim.py`` in timm's sdist, not installed with the wheel) asks every
registered optimizer for the properties below; ``tests/README.md`` says how to run that file on our names (it
passes for every name built from bare parameters). This file asks the same of our names without it, and
asks it of the full two-pass SAM step (``step(closure)``), which timm's suite never takes: it steps with
``.grad`` set and no closure, our base step alone.

A SAM name is built from bare parameters unless it must know the model: SAM-ON and no-norm names (which
tensors are norm layers), ``eleml2orig`` (which are biases) and ``sam-rand`` (its default sparsity is SAM-ON's
on the model). Those keep a one-line error saying what to pass.
"""
import copy
import inspect
import pickle

import pytest
import torch
from torch import nn
from torch.nn import Parameter

from sam_on_timm import FAMILY_OPTIMIZERS, SAM, SAM_OPTIMIZERS, SPARSE_OPTIMIZERS
from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

NAMES = sorted(SAM_OPTIMIZERS) + sorted(SPARSE_OPTIMIZERS) + sorted(FAMILY_OPTIMIZERS)
# the rule above, written out by name (not read from the package)
BARE = [n for n in NAMES if not (n.endswith(('-on', '-nonorm')) or n.startswith(('sam-on', 'sam-nonorm'))
                                 or 'eleml2orig' in n or n == 'sam-rand')]


def test_the_names_built_from_bare_parameters():
    assert sorted(BARE) == ['esam', 'gsam', 'looksam', 'msam', 'sam', 'sam-eleml2', 'sam-elemlinf', 'sam-fisher',
                            'sam-layerl2', 'ssam-d', 'ssam-f']
    assert len(NAMES) == 33 and set(NAMES) <= set(list_optimizers())


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))


@pytest.mark.parametrize('name', NAMES)
def test_info_flags_match_the_signature_and_common_kwargs_reach_the_base(name):
    """timm's factory reads has_eps / has_betas / has_momentum as "the class takes it". SAM takes momentum
    only; eps and betas given to the factory must still reach a base optimizer that takes them (an AdamW
    base), and be dropped for one that does not (an SGD base), as timm drops them for its own 'sgd'."""
    info = get_optimizer_info(name)
    args = inspect.signature(SAM.__init__).parameters
    assert (info.has_eps, info.has_betas, info.has_momentum) == ('eps' in args, 'betas' in args, 'momentum' in args)
    common = dict(lr=1e-3, eps=1e-6, betas=(0.5, 0.6), momentum=0.5)
    sgd = create_optimizer_v2(_model(), name, **common).param_groups[0]
    assert sgd['momentum'] == 0.5 and 'betas' not in sgd and 'eps' not in sgd
    adamw = create_optimizer_v2(_model(), name, base_opt='adamw', **common)
    assert isinstance(adamw.base_optimizer, torch.optim.AdamW)
    group = adamw.param_groups[0]
    assert tuple(group['betas']) == (0.5, 0.6) and group['eps'] == 1e-6
    # what the caller hands over itself wins over the factory's eps
    assert create_optimizer_v2(_model(), name, base_opt='adamw', eps=1e-6,
                               base_args={'eps': 1e-3}).param_groups[0]['eps'] == 1e-3


@pytest.mark.parametrize('name', sorted(set(NAMES) - set(BARE)))
def test_names_that_need_the_model_say_so_in_one_line(name):
    weight = Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError) as e:
        create_optimizer_v2([weight], name, lr=1e-2)
    msg = str(e.value)
    assert '\n' not in msg and name in msg and ('model' in msg or 'norm_params' in msg), msg
    assert isinstance(create_optimizer_v2(_model(), name, lr=1e-2), SAM)


# -- the properties, with the full SAM step -------------------------------------------------------------------
def _params(dtype=torch.float32):
    weight = Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).to(dtype))
    bias = Parameter(torch.randn(8, generator=torch.Generator().manual_seed(1)).to(dtype))
    return [weight, bias]


def _make(name, params, **kwargs):
    kwargs = {'lr': 1e-2, 'weight_decay': 0.01, 'rho': 0.05, **kwargs}
    opt = create_optimizer_v2(params, name, **kwargs)
    if name == 'ssam-f':   # give its mask Fisher scores now (else it is empty until the first mask update)
        gen = torch.Generator().manual_seed(7)
        opt.mask.set_fisher_mask([torch.rand(p.shape, generator=gen) for p in opt.perturbed])
    return opt


def _closure(params, opt, step):
    """Loss of a linear map on one input per step: the gradient depends on the weights, so the ascent matters."""
    x = torch.randn(16, generator=torch.Generator().manual_seed(100 + step)).to(params[0].dtype)

    def closure():
        opt.zero_grad()
        loss = (params[0].mv(x) + params[1]).pow(2).sum()
        loss.backward()
        return loss
    return closure


def _run(params, opt, steps, lr_fn=None):
    for step in steps:
        if lr_fn is not None:
            lr_fn(step)
        opt.step(_closure(params, opt, step))
    return [p.detach().clone() for p in params]


def _equal(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize('name', BARE)
def test_sam_steps_lower_the_loss_for_plain_and_grouped_parameters(name):
    for grouped in (False, True):
        params = _params()
        spec = [{'params': [params[0]]}, {'params': [params[1]], 'lr': 2e-3}] if grouped else params
        opt = _make(name, spec, lr=2e-3)
        assert name in repr(opt)
        x = torch.randn(16, generator=torch.Generator().manual_seed(3))

        def fn():
            opt.zero_grad()
            loss = (params[0].mv(x) + params[1]).pow(2).sum()
            loss.backward()
            return loss
        initial = fn().item()
        for _ in range(50):
            opt.step(fn)
        assert fn().item() < 0.5 * initial
        if opt.mask is None or name == 'ssam-f':
            assert opt.last_eps_norm.item() > 0   # the ascent did happen


@pytest.mark.parametrize('name', BARE)
def test_a_step_without_gradients_changes_nothing(name):
    params = _params()
    opt = _make(name, params)
    before = [p.detach().clone() for p in params]
    opt.step()
    _equal(params, before)


@pytest.mark.parametrize('how', ['pickle', 'deepcopy'])
@pytest.mark.parametrize('name', BARE)
def test_a_copy_continues_exactly(name, how):
    params = _params()
    opt = _make(name, params)
    _run(params, opt, range(2))
    dup = (lambda x: pickle.loads(pickle.dumps(x))) if how == 'pickle' else copy.deepcopy
    params_copy, opt_copy = dup((params, opt))
    _equal(_run(params_copy, opt_copy, range(2, 4)), _run(params, opt, range(2, 4)))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('name', BARE)
def test_resume_from_state_dict_continues_exactly(name, dtype):
    params = _params(dtype)
    opt = _make(name, params)
    _run(params, opt, range(3))
    state = copy.deepcopy(opt.state_dict())
    resumed_params = [Parameter(p.detach().clone()) for p in params]
    expected = _run(params, opt, range(3, 6))
    resumed = create_optimizer_v2(resumed_params, name, lr=1e-2, weight_decay=0.01, rho=0.05)
    resumed.load_state_dict(state)
    _equal(_run(resumed_params, resumed, range(3, 6)), expected)


@pytest.mark.parametrize('tensor_lr', [False, True])
@pytest.mark.parametrize('name', BARE)
def test_zero_lr_leaves_the_weights_bit_exact(name, tensor_lr):
    """lr 0 (warmup from 0): the perturbation is undone exactly and the base step moves nothing."""
    lr = torch.tensor(1e-2) if tensor_lr else 1e-2
    params = _params()
    opt = _make(name, params, lr=lr)
    _run(params, opt, range(3))
    if tensor_lr:
        lr.fill_(0.)
    else:
        opt.param_groups[0]['lr'] = 0.
    before = [p.detach().clone() for p in params]
    _equal(_run(params, opt, range(3, 6)), before)


@pytest.mark.parametrize('name', BARE)
def test_tensor_lr_matches_float_lr(name):
    lrs = [1e-2, 5e-3, 0., 2e-3]
    params = _params()
    opt = _make(name, params, weight_decay=0.1)
    expected = _run(params, opt, range(4), lambda s: opt.param_groups[0].__setitem__('lr', lrs[s]))
    lr = torch.tensor(lrs[0])
    params = _params()
    opt = _make(name, params, lr=lr, weight_decay=0.1)
    for a, e in zip(_run(params, opt, range(4), lambda s: lr.fill_(lrs[s])), expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('name', BARE)
def test_low_precision_weights_stay_finite_and_keep_their_dtype(name, dtype):
    params = _params(dtype)
    opt = _make(name, params)
    start = [p.detach().clone() for p in params]
    for p, s in zip(_run(params, opt, range(3)), start):
        assert p.dtype == dtype and torch.isfinite(p).all() and not torch.equal(p, s)


@pytest.mark.parametrize('name', BARE)
def test_a_group_added_later_is_independent_of_the_others_and_joins_the_perturbed_set(name):
    """The base step of a group does not depend on the other groups (timm's property), and the group's
    tensors join the perturbed set, the sparse baselines' masks included, at the mask's sparsity."""
    other = Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    weight = Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    alone = Parameter(weight.detach().clone())
    opt = _make(name, [other])
    opt.add_param_group({'params': [weight], 'lr': 1e-4})
    opt_alone = _make(name, [alone], lr=1e-4)
    for step in range(4):
        other.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(10 + step))
        weight.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(20 + step))
        alone.grad = weight.grad.clone()
        opt.step()
        opt_alone.step()
    torch.testing.assert_close(weight.detach(), alone.detach())

    opt.first_step()
    assert [id(p) for p in opt.perturbed] == [id(other), id(weight)]
    moved = weight.detach() != alone.detach()
    opt.restore()
    if name == 'esam':   # a random subset of the tensors is perturbed: the new one joined the draw
        assert len(opt.swp) == 2 and bool(moved.all()) == opt.swp[1] and bool(moved.any()) == opt.swp[1]
    elif opt.mask is None:
        assert moved.all()
    elif name == 'ssam-f':   # no Fisher score for it yet: unperturbed until the next Fisher mask
        assert not moved.any() and opt.mask.masks[-1].sum() == 0
    else:   # drawn at the mask's sparsity, as the first mask was
        assert moved.sum().item() == opt.mask.masks[-1].sum().item() == 128 - round(128 * opt.mask.sparsity)


@pytest.mark.parametrize('name', BARE)
def test_step_leaves_the_gradient_of_the_last_pass_unchanged(name):
    """After a SAM step ``.grad`` holds the gradient at w + eps, as the second pass left it: neither the
    restore nor the base step (weight decay, momentum) writes into it (grad-norm logging reads it). (GSAM
    with alpha > 0 writes its descent gradient there, by definition: docs/design.md, section 8.)"""
    params = _params()
    opt = _make(name, params, weight_decay=0.1)
    _run(params, opt, range(1))
    closure = _closure(params, opt, 1)
    seen = []

    def spy():
        loss = closure()
        seen.append([p.grad.clone() for p in params])
        return loss
    opt.step(spy)
    _equal([p.grad for p in params], seen[-1])
