"""The paper's ablations: --fix-norm (B.4), --train-only-norm (B.5) and --sam-epochs (Section 5.4)."""
import csv
import math

import pytest
import timm
import torch
from torch import nn

import sam_on_timm
import train
from sam_on_timm.ablations import fix_norm, in_window, parse_epoch_window, train_only_norm
from sam_on_timm.train_step import train_step

BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0',
        '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2', '--seed', '3',
        '--weight-decay', '1e-3']


def run(image_folder, out, *extra):
    return train.main(['--data-dir', image_folder, '--output', str(out), *BASE, *extra])


def initial_checkpoint(tmp_path):
    """Fixed initial weights (BatchNorm gammas and betas made non-trivial, so that fixing them is visible)."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=2)
    with torch.no_grad():
        for p in sam_on_timm.norm_parameters(model):
            p.uniform_(0.5, 1.5)
    path = tmp_path / 'init.pth'
    torch.save(model.state_dict(), path)
    return str(path), {k: v.clone() for k, v in model.named_parameters()}


def final_params(path):
    state = torch.load(path, weights_only=True)['state_dict']
    model = timm.create_model('test_resnet', num_classes=2)
    model.load_state_dict(state)
    norm = {p for p in sam_on_timm.norm_parameters(model)}
    return {k: (v.detach(), v in norm) for k, v in model.named_parameters()}


# --- --fix-norm / --train-only-norm --------------------------------------------------------------------
@pytest.mark.parametrize('opt', ['sgd', 'sam'])
def test_fix_norm_keeps_gamma_one_beta_zero(image_folder, tmp_path, opt, one_thread):
    init, before = initial_checkpoint(tmp_path)
    assert run(image_folder, tmp_path, '--opt', opt, '--experiment', 'f', '--fix-norm', '--epochs', '1',
               '--initial-checkpoint', init) == 0
    after = final_params(tmp_path / 'f' / 'last.pth.tar')
    n_norm = 0
    for name, (p, is_norm) in after.items():
        if is_norm:
            n_norm += 1
            assert torch.equal(p, torch.full_like(p, 1.0 if name.endswith('weight') else 0.0)), name
        else:
            assert not torch.equal(p, before[name]), name   # everything else trained
    assert n_norm == 30


@pytest.mark.parametrize('opt', ['sgd', 'sam'])
def test_train_only_norm_changes_only_norm_parameters(image_folder, tmp_path, opt, one_thread):
    init, before = initial_checkpoint(tmp_path)
    assert run(image_folder, tmp_path, '--opt', opt, '--experiment', 't', '--train-only-norm', '--epochs', '1',
               '--initial-checkpoint', init) == 0
    after = final_params(tmp_path / 't' / 'last.pth.tar')
    changed = {name for name, (p, _) in after.items() if not torch.equal(p, before[name])}
    norm = {name for name, (_, is_norm) in after.items() if is_norm}
    assert changed == norm   # every norm tensor moved, nothing else (not even by weight decay)


def test_norm_ablations_refuse_models_without_norm_layers(image_folder, tmp_path, capsys):
    for flag in ('--fix-norm', '--train-only-norm'):
        with pytest.raises(ValueError, match='no normalization layers'):
            (fix_norm if flag == '--fix-norm' else train_only_norm)(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        assert run(image_folder, tmp_path, flag, '--model', 'test_nfnet', '--experiment', 'x') == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and 'no normalization layers' in err[0]
    assert run(image_folder, tmp_path, '--fix-norm', '--train-only-norm', '--experiment', 'x') == 2
    assert 'nothing to train' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_fix_norm_sets_identity_and_freezes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    assert fix_norm(model) == 16
    for m in (model[1], model[3]):
        assert torch.equal(m.weight, torch.ones(4)) and torch.equal(m.bias, torch.zeros(4))
        assert not m.weight.requires_grad and not m.bias.requires_grad
    assert model[0].weight.requires_grad and model[2].weight.requires_grad
    assert train_only_norm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == 4


# --- --sam-epochs -----------------------------------------------------------------------------------
def test_parse_epoch_window():
    assert parse_epoch_window('0:100') == (0, 100)
    assert parse_epoch_window('100:') == (100, math.inf)
    assert parse_epoch_window(':50') == (0, 50)
    for bad in ('5:5', '7:3', '-1:4', 'a:b', '10', '1:2:3'):
        with pytest.raises(ValueError, match='--sam-epochs'):
            parse_epoch_window(bad)
    assert in_window(3, (3, 5)) and not in_window(5, (3, 5)) and not in_window(2, (3, 5))


def test_plain_steps_of_a_sam_optimizer_equal_sgd_and_share_its_state(one_thread):
    """sam_step=False is the base optimizer's step on the base state: the same weights and momentum as
    timm's sgd; switching SAM on then continues from that momentum."""
    from timm.optim import create_optimizer_v2
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(3)]
    models, opts = [], []
    for name in ('sgd', 'sam'):
        torch.manual_seed(0)
        models.append(timm.create_model('test_resnet', num_classes=2))
        kwargs = dict(rho=0.05) if name == 'sam' else {}
        opts.append(create_optimizer_v2(models[-1], opt=name, lr=0.05, momentum=0.9, weight_decay=1e-3, **kwargs))
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches[:2]:
        train_step(models[0], opts[0], [(x, y)], loss_fn)
        stats = train_step(models[1], opts[1], [(x, y)], loss_fn, sam_step=False)
        assert stats.ascent_loss is None
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(opts[0].state[a]['momentum_buffer'], opts[1].state[b]['momentum_buffer']), n
    # the SAM step that follows uses that momentum: it differs from a SAM step from a fresh state
    x, y = batches[2]
    fresh_model = timm.create_model('test_resnet', num_classes=2)
    fresh_model.load_state_dict(models[1].state_dict())
    fresh = create_optimizer_v2(fresh_model, opt='sam', lr=0.05, momentum=0.9, weight_decay=1e-3, rho=0.05)
    assert train_step(models[1], opts[1], [(x, y)], loss_fn).eps_norm > 0
    train_step(fresh_model, fresh, [(x, y)], loss_fn)
    assert not torch.equal(models[1].fc.weight, fresh_model.fc.weight)


def _weights(path):
    return torch.load(path, weights_only=True)['state_dict']


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sam_epochs_sgd_outside_sam_inside_and_exact_resume(image_folder, tmp_path, one_thread):
    def run(image_folder, out, *extra):   # 2 updates per epoch, no validation: six short runs
        return train.main(['--data-dir', image_folder, '--output', str(out), *BASE, '-b', '8', '--val-split', '',
                           *extra])

    # epoch 0 outside the window: the same weights as an SGD run
    assert run(image_folder, tmp_path, '--opt', 'sam', '--sam-epochs', '1:', '--experiment', 'w',
               '--stop-epoch', '1') == 0
    assert run(image_folder, tmp_path, '--opt', 'sgd', '--experiment', 'sgd', '--stop-epoch', '1') == 0
    assert _equal_states(_weights(tmp_path / 'w' / 'last.pth.tar'), _weights(tmp_path / 'sgd' / 'last.pth.tar'))
    # epoch 0 inside the window: the same weights as a SAM run, which differ from SGD's
    assert run(image_folder, tmp_path, '--opt', 'sam', '--sam-epochs', '0:1', '--experiment', 'in',
               '--stop-epoch', '1') == 0
    assert run(image_folder, tmp_path, '--opt', 'sam', '--experiment', 'sam', '--stop-epoch', '1') == 0
    assert _equal_states(_weights(tmp_path / 'in' / 'last.pth.tar'), _weights(tmp_path / 'sam' / 'last.pth.tar'))
    assert not _equal_states(_weights(tmp_path / 'in' / 'last.pth.tar'), _weights(tmp_path / 'sgd' / 'last.pth.tar'))
    # resume 'w' across its switch to SAM == the uninterrupted run
    assert run(image_folder, tmp_path, '--opt', 'sam', '--sam-epochs', '1:', '--experiment', 'w',
               '--resume', str(tmp_path / 'w' / 'last.pth.tar')) == 0
    assert run(image_folder, tmp_path, '--opt', 'sam', '--sam-epochs', '1:', '--experiment', 'full') == 0
    resumed, full = torch.load(tmp_path / 'w' / 'last.pth.tar', weights_only=True), \
        torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    assert resumed['epoch'] == full['epoch'] == 1
    assert _equal_states(resumed['state_dict'], full['state_dict'])
    with open(tmp_path / 'full' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert rows[0]['train_ascent_loss'] == rows[0]['train_sharpness'] == rows[0]['train_eps_norm'] == ''
    assert float(rows[1]['train_ascent_loss']) > 0 and float(rows[1]['train_eps_norm']) > 0


def test_sam_epochs_bad_input(image_folder, tmp_path, capsys):
    for extra in (['--opt', 'sam', '--sam-epochs', '3:1'], ['--opt', 'sgd', '--sam-epochs', '0:1'],
                  ['--opt', 'sam', '--sam-epochs', 'x']):
        assert run(image_folder, tmp_path, *extra, '--experiment', 'bad') == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and '--sam-epochs' in err[0], err
    assert not (tmp_path / 'bad').exists()
