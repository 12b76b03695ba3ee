"""train.py's wiring, each value checked where it is used against a rule written out here: the lr from
--lr-base / --lr-base-size / --lr-base-scale / --grad-accum-steps (timm's rule), the --bce-* options in the
loss the training calls (with and without mixup), the stop on a non-finite validation metric, the run
folder's name and its refusal to clobber a run, and args.yaml (repeats the run, never resumes it)."""
import math
import os
import re
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import train

BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--log-interval', '2', '--seed', '3']


def timm_lr(lr_base, batch, world, accum, base_size, scale, opt):
    """timm's train.py rule: lr = lr_base * (global batch / lr_base_size), square-rooted for 'sqrt', which is
    the default for adaptive optimizers (names with 'ada' or 'lamb')."""
    ratio = batch * world * accum / base_size
    scale = scale or ('sqrt' if any(o in opt for o in ('ada', 'lamb')) else 'linear')
    return lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


@pytest.mark.parametrize('extra,opt_for_rule,world', [
    (['--opt', 'sgd', '--lr-base', '0.2', '--lr-base-size', '8', '--grad-accum-steps', '3'], 'sgd', 1),
    (['--opt', 'sgd', '--lr-base', '0.2', '--lr-base-size', '8', '--lr-base-scale', 'sqrt'], 'sgd', 2),
    (['--opt', 'adamw', '--lr-base', '0.01', '--lr-base-size', '2', '--grad-accum-steps', '2'], 'adamw', 1),
    (['--opt', 'adamw', '--lr-base', '0.01', '--lr-base-size', '2', '--lr-base-scale', 'linear'], 'adamw', 1),
    # SAM: the scale follows the base optimizer that takes the step
    (['--opt', 'sam-on', '--sam-base', 'adamw', '--lr-base', '0.01', '--lr-base-size', '32'], 'adamw', 1),
    (['--opt', 'sam', '--lr-base', '0.3', '--lr-base-size', '1', '--grad-accum-steps', '2'], 'sgd', 3),
])
def test_lr_from_lr_base_is_timms_rule_and_reaches_the_optimizer(image_folder, extra, opt_for_rule, world):
    args = train.parse_args(['--data-dir', image_folder, *BASE, *extra])
    train.validate_args(args)
    train.setup_device(args)
    args.world_size = world   # as under torchrun with that many processes
    model = timm.create_model('test_resnet', num_classes=2)
    opt = train.create_optimizer(args, model)
    get = dict(zip(extra[::2], extra[1::2])).get
    want = timm_lr(float(get('--lr-base')), 4, world, int(get('--grad-accum-steps', 1)), int(get('--lr-base-size')),
                   get('--lr-base-scale', ''), opt_for_rule)
    assert args.lr == pytest.approx(want, rel=1e-12)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([want] * len(opt.param_groups), rel=1e-12)
    # an --lr given wins over the rule
    args = train.parse_args(['--data-dir', image_folder, *BASE, *extra, '--lr', '0.0123'])
    train.validate_args(args)
    train.setup_device(args)
    assert {g['lr'] for g in train.create_optimizer(args, model).param_groups} == {0.0123}


def _bce_reference(x, target, thresh, sum_classes, pos_weight, smoothing):
    """Binary cross-entropy written out: integer labels become smoothed one-hot targets, soft targets are
    kept; a threshold makes them 0 / 1; -pw t log s(x) - (1 - t) log(1 - s(x)), averaged over everything, or
    summed over classes then averaged over the batch."""
    x = x.double()
    if target.shape != x.shape:
        n = x.shape[-1]
        t = torch.full_like(x, smoothing / n).scatter_(1, target.view(-1, 1), 1 - smoothing + smoothing / n)
    else:
        t = target.double()
    if thresh is not None:
        t = (t > thresh).double()
    pw = 1.0 if pos_weight is None else pos_weight
    ls, l1s = F.logsigmoid(x), F.logsigmoid(-x)
    loss = -(pw * t * ls + (1 - t) * l1s)
    return float(loss.sum(-1).mean() if sum_classes else loss.mean())


@pytest.mark.parametrize('mixup', [False, True])
def test_bce_options_reach_the_training_loss(image_folder, tmp_path, monkeypatch, one_thread, mixup):
    """--bce-loss with --bce-target-thresh 0.3, --bce-sum, --bce-pos-weight 2.5: every training loss the run
    computes equals the formula with those options on the logits and targets it was given (soft mixed
    targets with mixup, smoothed integer labels without)."""
    seen = []
    import sam_on_timm.run_data as run_data   # where create_data looks create_losses up
    real = run_data.create_losses

    class Spy(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x, target):
            out = self.fn(x, target)
            seen.append((x.detach().clone(), target.detach().clone(), float(out.detach())))
            return out

    monkeypatch.setattr(run_data, 'create_losses', lambda *a, **k: (lambda t, v: (Spy(t), v))(*real(*a, **k)))
    extra = ['--mixup', '0.8', '--smoothing', '0.1'] if mixup else ['--smoothing', '0.2']
    code = train.main(['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'b', *BASE,
                       '--lr', '0.05', '--opt', 'sgd', '--bce-loss', '--bce-target-thresh', '0.3', '--bce-sum',
                       '--bce-pos-weight', '2.5', *extra])
    assert code == 0 and len(seen) >= 4
    soft = False
    for x, target, got in seen:
        soft |= target.shape == x.shape and bool(((target > 0.06) & (target < 0.9)).any())
        want = _bce_reference(x, target, 0.3, True, 2.5, 0.0 if mixup else 0.2)
        assert got == pytest.approx(want, rel=1e-5)
        # the options matter: without them the loss is another number
        assert abs(_bce_reference(x, target, None, False, None, 0.0 if mixup else 0.2) - want) > 1e-3
    assert soft == mixup   # mixup really gave the loss mixed (soft) targets


@pytest.mark.parametrize('metric', ['top1', 'top5'])
def test_a_non_finite_validation_metric_other_than_the_loss_stops_the_run(image_folder, tmp_path, capsys,
                                                                          monkeypatch, one_thread, metric):
    """Validation top-1 / top-5 NaN (the loss finite): the run stops in one line naming the metric, before the
    epoch is saved or ranked."""
    real = train.validate

    def nan_metric(*a, **k):
        metrics = real(*a, **k)
        metrics[metric] = float('nan')
        return metrics

    monkeypatch.setattr(train, 'validate', nan_metric)
    code = train.main(['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'n', *BASE,
                       '--lr', '0.05', '--eval-metric', 'loss'])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'train.py: error: validation after epoch 0: {metric} not finite: the run diverged; the checkpoints are '
        f'those of the epochs before')
    assert not (tmp_path / 'n' / 'last.pth.tar').exists() and not (tmp_path / 'n' / 'summary.csv').exists()


@pytest.mark.parametrize('model,safe', [('resnet18', 'resnet18'), ('local-dir:../../etc', '______etc'),
                                        ('hf-hub:timm/vit_tiny.augreg_in21k', 'timm_vit_tiny_augreg_in21k')])
def test_run_folder_name_is_timestamp_model_size_and_stays_inside_output(tmp_path, model, safe):
    """Without --experiment: <output>/<YYYYmmdd-HHMMSS>-<model, source prefix dropped, other characters '_'>-<size>
    (timm's train.py), one folder directly inside --output ('/' or '..' in the model name never lead out of it);
    with it: <output>/<experiment>."""
    args = SimpleNamespace(experiment='', output=str(tmp_path), model=model, input_size=(3, 48, 40))
    path = train.output_dir_for(args)
    assert os.path.dirname(path) == str(tmp_path)
    assert re.fullmatch(rf'\d{{8}}-\d{{6}}-{re.escape(safe)}-40', os.path.basename(path)), path
    args.experiment = 'mine'
    assert train.output_dir_for(args) == os.path.join(str(tmp_path), 'mine')
    args.output = ''
    assert train.output_dir_for(args) == os.path.join('./output/train', 'mine')


def test_an_existing_run_folder_is_never_reused_except_to_resume_it(tmp_path):
    """The folder of another run (any checkpoint; or a summary / unfinished tmp.pth.tar without one) is refused,
    naming the way out; an empty folder, or the folder being resumed, is used."""
    d = tmp_path / 'run'
    d.mkdir()
    args = SimpleNamespace(resume='', is_sam=False, model_ema=False, model_ema_force_cpu=False, val_split='v')
    train.check_output_dir(args, str(d))   # empty: fine
    train.check_output_dir(args, str(tmp_path / 'absent'))
    (d / 'checkpoint-3.pth.tar').write_bytes(b'x')
    with pytest.raises(train.UsageError, match=re.escape(f"--resume {d / 'checkpoint-3.pth.tar'}")):
        train.check_output_dir(args, str(d))
    (d / 'last.pth.tar').write_bytes(b'x')
    with pytest.raises(train.UsageError, match=re.escape(f"--resume {d / 'last.pth.tar'}")):
        train.check_output_dir(args, str(d))
    args.resume = str(d / 'last.pth.tar')
    train.check_output_dir(args, str(d))    # resuming this very folder
    args.resume = str(tmp_path / 'elsewhere' / 'last.pth.tar')
    with pytest.raises(train.UsageError, match='already holds checkpoints of another run'):
        train.check_output_dir(args, str(d))
    for name in ('tmp.pth.tar', 'summary.csv'):
        e = tmp_path / name.split('.')[0]
        e.mkdir()
        (e / name).write_text('epoch,train_loss\n')
        args.resume = ''
        with pytest.raises(train.UsageError, match='no complete checkpoint'):
            train.check_output_dir(args, str(e))


def test_args_yaml_repeats_the_run_and_never_resumes_or_clobbers_it(image_folder, tmp_path, capsys, one_thread):
    """A resumed-from-elsewhere run's args.yaml holds the arguments as given (a list stays a list, lr from
    --lr-base stays unset so that the rule recomputes it) and no --resume / --start-epoch / --no-resume-opt /
    -c: ``-c args.yaml`` parses to the same arguments; run again, it refuses the folder (which holds the
    first run's checkpoints) instead of resuming or overwriting it."""
    first = tmp_path / 'first'
    assert train.main(['--data-dir', image_folder, '--output', str(first), '--experiment', 'a', *BASE, '--lr', '0.05',
                       '--epochs', '1']) == 0
    cfg = tmp_path / 'given.yaml'
    cfg.write_text(yaml.safe_dump({'mean': [0.5, 0.4, 0.3]}))
    argv = ['-c', str(cfg), '--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'r', *BASE,
            '--lr-base', '0.2', '--lr-base-size', '8', '--epochs', '2', '--resume', str(first / 'a' / 'last.pth.tar'),
            '--no-resume-opt']
    assert train.main(argv) == 0
    run_dir = tmp_path / 'r'
    saved = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert not {'resume', 'start_epoch', 'no_resume_opt', 'config'} & set(saved)
    assert saved['mean'] == [0.5, 0.4, 0.3] and saved['lr'] is None and saved['lr_base'] == 0.2
    assert saved['epochs'] == 2 and saved['experiment'] == 'r' and saved['batch_size'] == 4
    again = train.parse_args(['-c', str(run_dir / 'args.yaml')])
    assert train.given_args(again) == saved and again.resume == '' and again.start_epoch is None
    before = {f: os.path.getmtime(run_dir / f) for f in os.listdir(run_dir)}
    capsys.readouterr()
    assert train.main(['-c', str(run_dir / 'args.yaml')]) == 2
    assert 'already holds checkpoints of another run' in capsys.readouterr().err
    assert {f: os.path.getmtime(run_dir / f) for f in os.listdir(run_dir)} == before
    # the checkpoint's args keep the list too
    assert torch.load(run_dir / 'last.pth.tar', weights_only=True)['args']['mean'] == [0.5, 0.4, 0.3]
    assert math.isclose(torch.load(run_dir / 'last.pth.tar', weights_only=True)['args']['lr'], 0.2 * 4 / 8)
