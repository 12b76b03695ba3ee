"""train.py end to end on generated data: summaries, checkpoints, exact resume, bad input."""
import csv
import os
import subprocess
import sys

import pytest
import timm
import torch

import train
from tests.helpers import evaluate_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0',
        '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2', '--seed', '3']
SAM_COLUMNS = ['train_ascent_loss', 'train_descent_loss', 'train_sharpness', 'train_eps_norm',
               'train_skipped_perturbations']


def run(image_folder, out, *extra):
    return train.main(['--data-dir', image_folder, '--output', str(out), *BASE, *extra])


def read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('opt', ['sgd', 'sam', 'sam-on-layerl2'])
def test_train_end_to_end(image_folder, tmp_path, opt):
    flags = ['--opt', opt, '--experiment', 'e', '--rho', '0.05', '--model-ema', '--eval-metric', 'loss']
    assert run(image_folder, tmp_path, *flags) == 0
    d = tmp_path / 'e'
    rows = read_summary(d / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    for r in rows:
        assert float(r['train_loss']) > 0 and 'eval_ema_top1' in r
        if opt == 'sgd':
            assert not any(c in r for c in SAM_COLUMNS)
        else:
            assert all(c in r for c in SAM_COLUMNS)
            assert float(r['train_eps_norm']) > 0 and int(r['train_skipped_perturbations']) == 0
            if opt == 'sam':   # plain SAM: ||eps|| = rho exactly (float32 rounding)
                assert float(r['train_eps_norm']) == pytest.approx(0.05, rel=1e-6)
    assert os.path.isfile(d / 'last.pth.tar') and os.path.isfile(d / 'checkpoint-1.pth.tar')
    ckpt = torch.load(d / 'last.pth.tar', weights_only=True)
    assert {'state_dict', 'optimizer', 'epoch', 'state_dict_ema', 'rng_state', 'arch'} <= set(ckpt)
    # the last epoch's validation numbers are those of the saved weights (model and EMA), evaluated here
    for key, prefix in (('state_dict', 'eval_'), ('state_dict_ema', 'eval_ema_')):
        model = timm.create_model('test_resnet', num_classes=2)
        model.load_state_dict(ckpt[key])
        loss, top1 = evaluate_folder(model, os.path.join(image_folder, 'validation'), 32)
        assert float(rows[-1][prefix + 'loss']) == pytest.approx(loss, rel=1e-5), key
        assert float(rows[-1][prefix + 'top1']) == pytest.approx(top1, abs=1e-9), key
    # as timm's train.py, the EMA's metric ranks the checkpoints when there is an EMA
    assert ckpt['metric'] == pytest.approx(float(rows[-1]['eval_ema_loss']))
    assert ckpt['metric'] != pytest.approx(float(rows[-1]['eval_loss']))
    # args.yaml holds the arguments as given (no computed values): -c args.yaml parses to the same run
    given = train.given_args(train.parse_args(['--data-dir', image_folder, '--output', str(tmp_path), *BASE, *flags]))
    again = train.parse_args(['-c', str(d / 'args.yaml')])
    assert train.given_args(again) == given
    # timm reads the weights as its own checkpoint (EMA preferred, as timm's loader does)
    model = timm.create_model('test_resnet', num_classes=2, checkpoint_path=str(d / 'last.pth.tar'))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt['state_dict_ema'][k]), k


def _spy_on_steps(monkeypatch):
    """Record what train.py's updates use: train_step's keyword arguments, the SAM inside the optimizer,
    the batch size of every loss evaluation, and the arguments eps is computed with."""
    import sam_on_timm.sam as sam_module
    import sam_on_timm.train_step as ts
    steps, eps_args = [], []
    train_step, compute_eps = ts.train_step, sam_module.compute_eps

    def spy_train_step(model, optimizer, chunks, loss_fn, **kwargs):
        sizes = []

        def counting_loss(out, target):
            sizes.append(out.shape[0])
            return loss_fn(out, target)
        stats = train_step(model, optimizer, chunks, counting_loss, **kwargs)
        steps.append(dict(kwargs, sam=ts.find_sam(optimizer), sizes=sizes, stats=stats,
                          lr=optimizer.param_groups[0]['lr']))
        return stats

    def spy_compute_eps(variant, params, grads, rho, eta, *args, **kwargs):
        eps_args.append((variant, rho, eta, len(params)))
        return compute_eps(variant, params, grads, rho, eta, *args, **kwargs)
    monkeypatch.setattr(ts, 'train_step', spy_train_step)
    # SAM.perturbation: the one place eps is made, for the sequential and the batched chunk path
    monkeypatch.setattr(sam_module, 'compute_eps', spy_compute_eps)
    return steps, eps_args


@pytest.mark.parametrize('flags,want', [
    (['--opt', 'sam', '--rho', '0.123', '--sam-bn-update', 'ascent', '--sam-ascent-frac', '0.5'],
     dict(mode='all', variant='sam', rho=0.123, eta=0.0, bn_update='ascent', ascent_frac=0.5, base='SGD',
          sizes=[2, 4])),
    (['--opt', 'sam-on-eleml2', '--rho', '0.4', '--sam-eta', '0.02', '--sam-base', 'adamw', '--sam-m', '2',
      '--lr', '0.003'],
     dict(mode='on', variant='eleml2', rho=0.4, eta=0.02, bn_update='both', ascent_frac=1.0, base='AdamW',
          sizes=[2, 2, 2, 2], lr=0.003)),
])
def test_sam_flags_are_the_values_used(image_folder, tmp_path, monkeypatch, flags, want):
    """The SAM flags as *used*, not as parsed: the optimizer the updates ran with (mode, variant, rho, eta,
    base optimizer, lr), train_step's bn_update / ascent_frac, the samples each pass saw (the ascent on
    round(frac * b) of them, --sam-m chunks), the arguments eps was computed with, and for plain SAM
    the logged ||eps|| equal to rho."""
    steps, eps_args = _spy_on_steps(monkeypatch)
    assert run(image_folder, tmp_path, '--experiment', 'w', '--epochs', '1', *flags) == 0
    assert len(steps) == 4   # 16 images, -b 4
    sam_objects = {id(s['sam']) for s in steps}
    assert len(sam_objects) == 1 and steps[0]['sam'] is not None
    sam = steps[0]['sam']
    assert (sam.mode, sam.variant, sam.rho, sam.eta) == (want['mode'], want['variant'], want['rho'], want['eta'])
    assert type(sam.base_optimizer).__name__ == want['base']
    for s in steps:
        assert s['bn_update'] == want['bn_update'] and s['ascent_frac'] == want['ascent_frac']
        assert s['sizes'] == want['sizes'] and s['lr'] == pytest.approx(want.get('lr', 0.05), rel=1e-12)
        assert float(s['stats'].skipped) == 0
    n_chunks = len(want['sizes']) // 2
    assert eps_args == [(want['variant'], want['rho'], want['eta'], len(sam.perturbed))] * (4 * n_chunks)
    row = read_summary(tmp_path / 'w' / 'summary.csv')[-1]
    if want['variant'] == 'sam':
        assert float(row['train_eps_norm']) == pytest.approx(want['rho'], rel=1e-6)
        assert all(float(s['stats'].eps_norm) == pytest.approx(want['rho'], rel=1e-6) for s in steps)
    assert float(row['train_eps_norm']) == pytest.approx(
        sum(float(s['stats'].eps_norm) for s in steps) / len(steps), rel=1e-6)
    # every SAM column is the mean of its own figure over the updates (a column shifted to its neighbour's
    # figure fails): L(w) at the ascent, L(w + eps) at the descent, their difference
    ascent = sum(float(s['stats'].ascent_loss) for s in steps) / len(steps)
    descent = sum(float(s['stats'].loss) for s in steps) / len(steps)
    assert float(row['train_ascent_loss']) == pytest.approx(ascent, rel=1e-6)
    assert float(row['train_descent_loss']) == pytest.approx(descent, rel=1e-6) == float(row['train_loss'])
    assert float(row['train_sharpness']) == pytest.approx(descent - ascent, rel=1e-5, abs=1e-7)


def test_agc_leaves_the_head_out_and_empty_train_interpolation(image_folder, tmp_path, monkeypatch):
    """--clip-mode agc clips every tensor but the classifier's two (as timm's train.py); an empty
    --train-interpolation takes the model's (it was a KeyError)."""
    import sam_on_timm.train_step as ts
    clipped = []
    original = ts._clip

    def recording_clip(parameters, value, mode):
        clipped.append([tuple(p.shape) for p in parameters])
        return original(parameters, value, mode)

    monkeypatch.setattr(ts, '_clip', recording_clip)
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 'a', '--epochs', '1', '--clip-grad', '0.01',
               '--clip-mode', 'agc', '--train-interpolation', '') == 0
    shapes = [tuple(p.shape) for p in timm.create_model('test_resnet', num_classes=2).parameters()]
    assert clipped and all(c == shapes[:-2] for c in clipped)   # the head: fc weight (2, C) and bias (2,)
    assert shapes[-2][0] == 2 and shapes[-1] == (2,)


def test_ctrl_c_stops_without_traceback_and_keeps_checkpoints(image_folder, tmp_path, monkeypatch, capsys):
    calls = []
    validate = train.validate

    def interrupted_validate(*a, **k):
        calls.append(1)
        if len(calls) == 2:   # in the second epoch
            raise KeyboardInterrupt
        return validate(*a, **k)

    monkeypatch.setattr(train, 'validate', interrupted_validate)
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 'k') == 130
    assert 'Traceback' not in capsys.readouterr().err
    ckpt = torch.load(tmp_path / 'k' / 'last.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 0 and len(read_summary(tmp_path / 'k' / 'summary.csv')) == 1


def test_ctrl_c_outside_the_epoch_loop_has_no_traceback(image_folder, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, 'validate_args', interrupted)
    assert run(image_folder, tmp_path, '--opt', 'sam-on') == 130
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.strip().splitlines()[-1] == 'train.py: interrupted'


def test_simclr_style_augmentations_reach_the_loader(image_folder, tmp_path, monkeypatch):
    """timm's --color-jitter-prob / --grayscale-prob / --gaussian-blur-prob (flags or YAML keys of a timm
    args.yaml) build the same training transform as timm's loader does with them."""
    import timm.data
    loaders, create = [], timm.data.create_loader
    monkeypatch.setattr(timm.data, 'create_loader', lambda *a, **k: loaders.append(create(*a, **k)) or loaders[-1])
    cfg = tmp_path / 'aug.yaml'
    cfg.write_text('color_jitter_prob: 0.5\ngrayscale_prob: 0.2\ngaussian_blur_prob: 0.3\n')
    assert train.main(['-c', str(cfg), '--data-dir', image_folder, '--output', str(tmp_path), *BASE,
                       '--epochs', '1', '--experiment', 'aug']) == 0
    text = str(loaders[0].dataset.transform)
    assert 'RandomGrayscale(p=0.2)' in text and 'GaussianBlur' in text, text
    assert 'RandomApply' in text and 'p=0.5' in text and 'RandomGrayscale' not in str(loaders[1].dataset.transform)


def test_resume_takes_checkpoints_of_timms_own_train_script(image_folder, tmp_path, capsys):
    """timm's CheckpointSaver (args as an argparse.Namespace, a plain SGD optimizer) and bare weights
    with DDP's module. prefix (timm's resume_checkpoint takes both) resume here too. timm's checkpoints
    hold no RNG states: resuming one is not an exact continuation, so it takes --resume-partial."""
    import argparse
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver
    model = timm.create_model('test_resnet', num_classes=2)
    up = tmp_path / 'upstream'
    up.mkdir()
    sgd = create_optimizer_v2(model, 'sgd', lr=0.1, weight_decay=1e-4)   # two groups: no decay on biases / norms
    saver = CheckpointSaver(model, sgd, args=argparse.Namespace(model='test_resnet'), checkpoint_dir=str(up),
                            recovery_dir=str(up))
    saver.save_checkpoint(epoch=0, metric=50.0)
    timm_ckpt = ['--opt', 'sam-on', '--experiment', 'r', '--resume', str(up / 'last.pth.tar')]
    assert run(image_folder, tmp_path, *timm_ckpt) == 2
    assert 'lacks the RNG states' in capsys.readouterr().err
    assert run(image_folder, tmp_path, *timm_ckpt, '--resume-partial') == 0
    assert [r['epoch'] for r in read_summary(tmp_path / 'r' / 'summary.csv')] == ['1']   # continued after epoch 0
    # an optimizer state of another layout (one group: no weight decay there) is refused, with the way out
    (up / 'one').mkdir()
    CheckpointSaver(model, create_optimizer_v2(model, 'sgd', lr=0.1), checkpoint_dir=str(up / 'one'),
                    recovery_dir=str(up / 'one')).save_checkpoint(epoch=0, metric=50.0)
    other = ['--opt', 'sam-on', '--resume', str(up / 'one' / 'last.pth.tar'), '--resume-partial']
    assert run(image_folder, tmp_path, *other, '--experiment', 'o') == 2
    assert '--no-resume-opt resumes weights and epoch' in capsys.readouterr().err.strip().splitlines()[-1]
    assert run(image_folder, tmp_path, *other, '--experiment', 'o', '--no-resume-opt') == 0
    bare = tmp_path / 'bare.pth'
    torch.save({'module.' + k: v for k, v in model.state_dict().items()}, bare)
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 'b', '--resume', str(bare), '--epochs', '1',
               '--lr', '0') == 0
    assert [r['epoch'] for r in read_summary(tmp_path / 'b' / 'summary.csv')] == ['0']   # weights only: from epoch 0
    trained = torch.load(tmp_path / 'b' / 'last.pth.tar', weights_only=True)['state_dict']
    for k, v in model.state_dict().items():   # lr 0: the loaded weights, untouched (BN statistics aside)
        if 'running' not in k and 'num_batches' not in k:
            assert torch.equal(trained[k], v), k


def test_data_dir_may_be_an_image_tar(image_folder, tmp_path, capsys):
    """timm's create_dataset reads a .tar of images (ImageTar); another file is a one-line error."""
    import tarfile
    tar = tmp_path / 'images.tar'
    with tarfile.open(tar, 'w') as t:
        t.add(os.path.join(image_folder, 'train'), arcname='.')
    assert train.main(['--data-dir', str(tar), '--output', str(tmp_path), *BASE, '--epochs', '1',
                       '--experiment', 't']) == 0
    assert len(read_summary(tmp_path / 't' / 'summary.csv')) == 1
    assert train.main(['--data-dir', str(tmp_path / 't' / 'summary.csv'), '--output', str(tmp_path), *BASE]) == 2
    assert 'is a file: pass a folder or an image .tar' in capsys.readouterr().err


def test_yaml_of_timms_own_train_script(image_folder, tmp_path, capsys):
    """Keys of timm's train.py are this script's keys (a timm args.yaml runs with --opt sam-on); a key of
    no release of this script or timm's (a typo, or one of an older timm) is an error."""
    cfg = tmp_path / 'timm_args.yaml'
    cfg.write_text('opt: sam-on\nlog_wandb: false\naug_repeats: 0\nworker_seeding: all\n'
                   'drop_block: null\nwandb_tags: []\ndecay_epochs: 90\n'
                   'naflex_train_seq_lens: [128, 256, 576, 784, 1024]\n'
                   'kd_temperature: 4.0\nbce_loss: true\nmodel_kwargs: {}\n')
    args = train.parse_args(['-c', str(cfg), '--data-dir', image_folder])
    assert args.opt == 'sam-on' and args.decay_epochs == 90 and args.log_wandb is False and args.bce_loss is True
    for text, message in (('amp_impl: native\n', "unknown key 'amp_impl'"),
                          ('log_wandbb: false\n', "unknown key 'log_wandbb'")):
        cfg.write_text(text)
        assert train.main(['-c', str(cfg), '--data-dir', image_folder, '--output', str(tmp_path)]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_empty_val_split_trains_without_validation(image_folder, tmp_path, capsys, monkeypatch):
    """--val-split '' (timm's script): no validation; the training loss ranks the checkpoints and drives a
    plateau schedule (mode min); a resume of such a run with --model-ema is not refused for lacking EMA
    columns, and the resumed run's args.yaml repeats the run rather than resuming it again."""
    import timm.scheduler
    scheds, create = [], timm.scheduler.create_scheduler_v2
    monkeypatch.setattr(timm.scheduler, 'create_scheduler_v2',
                        lambda *a, **k: scheds.append(create(*a, **k)) or scheds[-1])
    common = ['--opt', 'sam-on', '--experiment', 'v', '--val-split', '', '--model-ema', '--epochs', '2',
              '--sched', 'plateau']
    assert run(image_folder, tmp_path, *common, '--stop-epoch', '1') == 0
    assert scheds[0][0].lr_scheduler.mode == 'min'
    assert run(image_folder, tmp_path, *common, '--resume', str(tmp_path / 'v' / 'last.pth.tar')) == 0
    again = train.parse_args(['-c', str(tmp_path / 'v' / 'args.yaml')])
    assert again.resume == '' and again.sched == 'plateau' and again.val_split == ''
    rows = read_summary(tmp_path / 'v' / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1'] and not any(k.startswith('eval_') for k in rows[0])
    best = torch.load(tmp_path / 'v' / 'model_best.pth.tar', weights_only=True)
    assert best['metric'] == pytest.approx(min(float(r['train_loss']) for r in rows))
    # stdout ends with timm's '--result' block: this run's epochs, best last
    import json
    out = capsys.readouterr().out
    result = json.loads(out.split('--result\n')[-1])
    assert [r['epoch'] for r in result] == [1] and result[0]['train']['loss'] == pytest.approx(
        float(rows[1]['train_loss']))


def test_stop_and_resume_equals_uninterrupted_run(image_folder, tmp_path):
    common = ['--opt', 'sam-on-layerl2', '--rho', '0.05', '--sam-m', '2', '--model-ema', '--epochs', '3',
              '--reprob', '0.25', '--smoothing', '0.1']
    assert run(image_folder, tmp_path, *common, '--experiment', 'full') == 0
    assert run(image_folder, tmp_path, *common, '--experiment', 'part', '--stop-epoch', '1') == 0
    part = tmp_path / 'part'
    assert not os.path.isfile(part / 'checkpoint-1.pth.tar')
    assert run(image_folder, tmp_path, *common, '--experiment', 'part', '--resume', str(part / 'last.pth.tar')) == 0
    a = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    b = torch.load(part / 'last.pth.tar', weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('state_dict', 'state_dict_ema'):
        dw = max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key])
        assert dw < 1e-5, (key, dw)
    assert len(read_summary(part / 'summary.csv')) == 3
    # resuming the finished run (or with a --stop-epoch already reached) trains and writes nothing
    files = {f: (part / f).read_bytes() for f in os.listdir(part)}
    assert run(image_folder, tmp_path, *common, '--experiment', 'part', '--resume', str(part / 'last.pth.tar'),
               '--stop-epoch', '2', '--lr', '0.5') == 0
    assert {f: (part / f).read_bytes() for f in os.listdir(part)} == files


def test_stop_and_resume_of_a_plateau_schedule_equals_uninterrupted_run(image_folder, tmp_path):
    """A plateau schedule is not a function of the epoch: the resumed run keeps the lr the plateau had
    reached (not the warmup start timm's factory sets) and its best metric / patience count."""
    common = ['--opt', 'sam-on', '--sched', 'plateau', '--warmup-epochs', '1', '--epochs', '5',
              '--patience-epochs', '0', '--eval-metric', 'loss', '--decay-rate', '0.5']
    assert run(image_folder, tmp_path, *common, '--experiment', 'full') == 0
    assert run(image_folder, tmp_path, *common, '--experiment', 'part', '--stop-epoch', '3') == 0
    assert run(image_folder, tmp_path, *common, '--experiment', 'part',
               '--resume', str(tmp_path / 'part' / 'last.pth.tar')) == 0
    lrs = [[float(r['lr']) for r in read_summary(tmp_path / e / 'summary.csv')] for e in ('full', 'part')]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 3, lrs   # warmup, base lr and a reduction: each resumed
    a = torch.load(tmp_path / 'full' / 'last.pth.tar', weights_only=True)
    b = torch.load(tmp_path / 'part' / 'last.pth.tar', weights_only=True)
    assert a['lr_scheduler']['reduce_on_plateau']['best'] == b['lr_scheduler']['reduce_on_plateau']['best']
    assert max((a['state_dict'][k].double() - b['state_dict'][k].double()).abs().max().item()
               for k in a['state_dict']) < 1e-5


def test_rng_states_survive_a_weights_only_file_and_each_rank_resumes_its_own():
    """Exact resume needs every random stream a run draws from: torch, numpy (with its cached Gaussian)
    and Python's ``random`` (timm's RandomErasing, RandAugment). Two ranks' states go through a
    weights-only file; ``resume_rng`` gives each rank its own states (rank 1 draws what rank 1 would
    have drawn, not rank 0), and another number of ranks is reported, not applied."""
    import io
    import random

    import numpy as np
    from sam_on_timm.checkpoint import get_rng_state, resume_rng

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.standard_normal()),
                float(torch.rand(())))
    states, want = [], []
    for rank in range(2):
        random.seed(10 + rank), np.random.seed(10 + rank), torch.manual_seed(10 + rank)
        np.random.standard_normal()   # leaves numpy's second Gaussian cached
        states.append(get_rng_state())
        want.append(draws())
    buf = io.BytesIO()
    torch.save({'rng_state': states[0], 'rng_states': states}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    for rank in (1, 0):
        random.seed(99), np.random.seed(99), torch.manual_seed(99)
        assert resume_rng(checkpoint, rank, 2) is None
        assert draws() == want[rank]
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert resume_rng(checkpoint, 0, 4) == 'RNG states of 2 rank(s)'
    assert draws() != want[0]


def test_resume_plateau_takes_progress_not_settings():
    """The checkpoint carries the plateau's progress; patience, factor and direction are the resumed
    run's (a best metric of the other direction is dropped); lr noise noted before the lrs were put
    back is not replayed."""
    from sam_on_timm.checkpoint import plateau_state, resume_plateau
    from timm.scheduler import create_scheduler_v2

    def sched(**kw):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return create_scheduler_v2(opt, sched='plateau', num_epochs=20, **{'warmup_epochs': 1, **kw})[0]
    old = sched(patience_epochs=10, plateau_mode='max')
    for epoch, metric in enumerate([1.0, 3.0, 2.0, 2.5], start=1):
        old.step(epoch, metric)
    state = plateau_state(old)
    assert state['reduce_on_plateau']['best'] == 3.0 and state['reduce_on_plateau']['num_bad_epochs'] == 2
    for mode, best, bad in (('max', 3.0, 2), ('min', float('inf'), 0)):
        new = sched(patience_epochs=2, decay_rate=0.5, plateau_mode=mode)
        resume_plateau(new, 5, [0.07], state)
        p = new.lr_scheduler
        assert (p.best, p.num_bad_epochs, p.patience, p.factor, p.mode) == (best, bad, 2, 0.5, mode)
        assert new.optimizer.param_groups[0]['lr'] == 0.07 and p.last_epoch == old.lr_scheduler.last_epoch
    noisy = sched(noise=[0.0], noise_pct=0.5)   # noise from epoch 0 on
    noisy.step(5)   # what the resume's re-stepping does: noise on the warmup-start lr, noted in restore_lr
    assert noisy.restore_lr is not None
    resume_plateau(noisy, 5, [0.07], None)   # a checkpoint without plateau state (timm's own)
    assert noisy.restore_lr is None and noisy.optimizer.param_groups[0]['lr'] == 0.07
    # the optimizer not resumed (--no-resume-opt, or --start-epoch alone): past the warmup the base lr, afresh
    fresh = sched()
    fresh.step(5)
    resume_plateau(fresh, 5, None, state)
    assert fresh.optimizer.param_groups[0]['lr'] == 0.1 and fresh.lr_scheduler.best == float('-inf')
    warm = sched(warmup_epochs=3)
    warm.step(2)
    resume_plateau(warm, 2, None, state)
    assert warm.optimizer.param_groups[0]['lr'] == pytest.approx(1e-5 + 2 * (0.1 - 1e-5) / 3)   # still warming up


def test_config_file_and_flags(image_folder, tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('opt: sam-on\nrho: 0.1\nweight_decay: 1e-4\nsam_m: 2\nsam_bn_update: ascent\n')
    args = train.parse_args(['-c', str(cfg), '--data-dir', image_folder, '--rho', '0.2', '--device', 'cpu'])
    assert (args.opt, args.rho, args.weight_decay, args.sam_m, args.sam_bn_update) == ('sam-on', 0.2, 1e-4, 2, 'ascent')
    train.validate_args(args)
    assert args.is_sam
    # --lr-noise takes one or more values, as timm's (a second one went to the positional data argument)
    args = train.parse_args(['--lr-noise', '0.4', '0.9', '--data-dir', image_folder])
    assert args.lr_noise == [0.4, 0.9] and args.data is None
    # the default run folder names the model as timm's script does (no hub prefix, no '.' or '/')
    args = train.parse_args(['--model', 'hf-hub:timm/resnet18.a1_in1k', '--data-dir', image_folder])
    args.input_size = (3, 224, 224)
    assert train.output_dir_for(args).endswith('-timm_resnet18_a1_in1k-224')
    # a base optimizer name with timm's lookahead_ prefix, as the optimizer API takes it
    args = train.parse_args(['--opt', 'sam-on', '--sam-base', 'lookahead_sgd', '--data-dir', image_folder])
    train.validate_args(args)


BAD_INPUTS = [
    (['--opt', 'sam-on-layer2'], "unknown --opt 'sam-on-layer2'"),
    (['--opt', 'sam', '--rho', '0'], '--rho must be a finite number > 0, got'),
    (['--opt', 'sam', '--rho', '-0.1'], '--rho must be a finite number > 0, got'),
    (['--opt', 'sam', '--sam-m', '3'], '--sam-m 3 must be a positive divisor of the per-GPU batch size -b 4'),
    (['--opt', 'sam-on', '--model', 'test_nfnet'], 'no normalization layers'),
    (['--opt', 'sam', '--sam-base', 'sam-on'], "unknown --sam-base 'sam-on'"),
    (['--opt', 'sam', '--sam-base', 'lookahead_sam'], "unknown --sam-base 'lookahead_sam'"),
    (['--opt', 'sam', '--sam-base', 'lookahead_sgdd'], "unknown --sam-base 'lookahead_sgdd'"),
    (['--opt', 'sam', '--amp', '--amp-dtype', 'float8'], '--amp-dtype must be float16 or bfloat16'),
    (['--epochs', '0'], '--epochs must be positive, got 0'),
    (['--img-size', '0'], '--img-size / --input-size must be positive'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist must be at least 1, got 0'),
    (['--eval-metric', 'top-1'], "--eval-metric must be one of top1, top5, loss, got 'top-1'"),
    (['--device', 'foo'], "--device 'foo' is not a torch device"),
    (['--log-interval', '0'], '--log-interval must be positive, got 0'),
    (['--scale', '0.5'], '--scale takes 2 values, got 1'),
    (['--mean', '0.5', '0.5'], '--mean takes 1 or 3 values, got 2'),
    (['--aa', 'bogus'], 'cannot build the data pipeline (--aa,'),
    (['--workers', '-1'], 'num_workers option should be non-negative'),
    (['--dataset', 'torch/foo'], "cannot read the data (--dataset 'torch/foo'"),
    (['--class-map', '/nonexistent/map.txt'], 'Cannot locate specified class map file'),
    (['--start-epoch', '-1'], '--start-epoch must be >= 0, got -1'),
    (['--grayscale-prob', '1.5'], '--grayscale-prob must be a finite number in [0, 1], got 1.5'),
    (['--hflip', '-0.5'], '--hflip must be a finite number in [0, 1], got -0.5'),
    (['--gaussian-blur-prob', '0.5', '--img-size', '8'], '--gaussian-blur-prob needs images of at least 12 px'),
    (['--model-ema', '--model-ema-decay', '2'], '--model-ema-decay must be a finite number in [0, 1], got 2.0'),
    (['--opt', 'sam-on', '--sam-m', '1'],
     "'test_resnet' has BatchNorm, which needs at least 2 samples per pass: a chunk has 1"),
    (['--opt', 'sam-on', '--sam-ascent-frac', '0.1'], 'the ascent chunk has 1 (--sam-m / -b 4, --sam-ascent-frac 0.1)'),
] + ([(['--device', 'cuda'], '--device cuda: CUDA is not available on this machine; use --device cpu')]
     if not torch.cuda.is_available() else [])   # on a CUDA machine '--device cuda' is good input


@pytest.mark.parametrize('extra,message', BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(image_folder, tmp_path, capsys, extra, message):
    assert run(image_folder, tmp_path, '--experiment', 'bad', *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('train.py: error:') and message in err[-1], err
    assert 'Traceback' not in '\n'.join(err)
    assert not os.path.exists(tmp_path / 'bad')


def test_bad_yaml_key_missing_data_and_existing_run(image_folder, tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('opt: sam\nbatchsize: 64\n')
    assert train.main(['-c', str(cfg), '--data-dir', image_folder]) == 2
    assert "unknown key 'batchsize'" in capsys.readouterr().err
    assert train.main(['--data-dir', str(tmp_path / 'nope'), '--opt', 'sam']) == 2
    assert f"data directory '{tmp_path / 'nope'}' does not exist" in capsys.readouterr().err
    # an existing run's checkpoints are never overwritten by a new run
    assert run(image_folder, tmp_path, '--experiment', 'done', '--epochs', '1') == 0
    last = tmp_path / 'done' / 'last.pth.tar'
    stamp = (last.stat().st_mtime_ns, last.read_bytes())
    assert run(image_folder, tmp_path, '--experiment', 'done', '--epochs', '1') == 2
    assert 'already holds checkpoints' in capsys.readouterr().err
    assert (last.stat().st_mtime_ns, last.read_bytes()) == stamp


def test_subprocess_error_has_no_traceback(image_folder, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--data-dir', image_folder,
                        '--opt', 'sam', '--rho', '0', '--output', str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == 'train.py: error: --rho must be a finite number > 0, got 0.0'
    assert 'Traceback' not in p.stderr


def test_pretrained_path_loads_offline_weights_with_a_new_head(image_folder, tmp_path):
    """The ViT fine-tune recipes' offline path: --pretrained-path FILE, head replaced for --num-classes."""
    src = timm.create_model('test_vit', num_classes=7)
    torch.save(src.state_dict(), tmp_path / 'in21k.pth')
    # lr 0 and no weight decay: SAM-ON perturbs and restores, so the backbone must end exactly as loaded
    rc = train.main(['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'ft',
                     '--model', 'test_vit', '--pretrained-path', str(tmp_path / 'in21k.pth'), '--num-classes', '2',
                     '-b', '4', '--device', 'cpu', '--workers', '0', '--epochs', '1',
                     '--warmup-epochs', '0', '--lr', '0', '--weight-decay', '0', '--opt', 'sam-on', '--rho', '0.1'])
    assert rc == 0
    ckpt = torch.load(tmp_path / 'ft' / 'last.pth.tar', weights_only=True)
    assert ckpt['state_dict']['head.weight'].shape == (2, 64)
    for k, v in src.state_dict().items():
        if not k.startswith('head.'):
            assert torch.equal(ckpt['state_dict'][k], v), k


def test_yaml_values_are_checked_like_command_line_values(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('scale: 0.5\n')
    assert train.main(['-c', str(cfg)]) == 2
    assert "key 'scale' takes a list of values (a number each), e.g. [0.5], got the number 0.5" in \
        capsys.readouterr().err
    cfg.write_text('rho: 1\ninput_size: [3, 32, 32]\npretrained: true\n')
    args = train.parse_args(['-c', str(cfg)])
    assert type(args.rho) is float and args.input_size == [3, 32, 32] and args.pretrained
    assert train.parse_args(['-c', str(cfg), '--no-pretrained']).pretrained is False  # a recipe's hub weights off


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_amp_paths_run_end_to_end_on_cpu(image_folder, tmp_path, dtype):
    """--amp on CPU autocast: bf16 without a scaler, fp16 with timm's NativeScaler (saved in the checkpoint)."""
    assert run(image_folder, tmp_path, '--opt', 'sam-on-fisher', '--experiment', dtype, '--epochs', '1',
               '--amp', '--amp-dtype', dtype, '--clip-grad', '1.0', '--channels-last', '--grad-accum-steps', '2') == 0
    ckpt = torch.load(tmp_path / dtype / 'last.pth.tar', weights_only=True)
    assert ('amp_scaler' in ckpt) == (dtype == 'float16')
    assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
    row = read_summary(tmp_path / dtype / 'summary.csv')[-1]
    # some perturbation was applied; bfloat16 skips none, float16 only ascents that overflowed at the
    # scaler's first scales (2 of the 4 here: 16 images, -b 4)
    skipped = int(row['train_skipped_perturbations'])
    assert float(row['train_eps_norm']) > 0 and (skipped < 4 if dtype == 'float16' else skipped == 0)


def test_sam_flags_with_a_plain_optimizer_warn(image_folder, tmp_path, caplog):
    caplog.set_level('WARNING')
    assert run(image_folder, tmp_path, '--opt', 'adamw', '--experiment', 'a', '--epochs', '1', '--rho', '0.2',
               '--sam-base', 'sgd', '--sam-ascent-frac', '0.5') == 0
    assert any(r.getMessage() == '--rho 0.2, --sam-ascent-frac 0.5: no effect with --opt adamw (not a SAM optimizer)'
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_sync_bn_with_sam_warns(image_folder, tmp_path, caplog):
    caplog.set_level('WARNING')
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 's', '--epochs', '1', '--sync-bn') == 0
    assert any('--sync-bn shares BatchNorm statistics across ranks' in r.getMessage() for r in caplog.records)


def test_more_bad_inputs_are_one_line(image_folder, tmp_path, capsys):
    readme = os.path.join(ROOT, 'README.md')
    for extra, message in ((['--model', 'no_such_model'], "cannot create model 'no_such_model'"),
                           (['--sched', 'nosuch'], "--sched 'nosuch'"),
                           (['--sched', 'plateau', '--sched-on-updates'],
                            "--sched 'plateau': Plateau LR only supports step per epoch"),
                           (['--resume', readme],
                            f"--resume '{readme}' cannot be loaded into this run: not a PyTorch checkpoint"),
                           (['--opt', 'sam', '--sam-base', 'adamw', '--opt-betas', '0.9'],
                            "cannot create optimizer 'sam'"),
                           (['--num-classes', '1'], 'the training data has 2 classes but the model head has 1')):
        assert run(image_folder, tmp_path, '--experiment', 'bad', *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and 'Traceback' not in '\n'.join(err), err
        assert not os.path.exists(tmp_path / 'bad')


def test_grad_checkpointing_gives_the_same_run(image_folder, tmp_path):
    """--grad-checkpointing (timm's non-reentrant checkpoints) recomputes activations but changes no
    gradient: the SAM-ON run's training losses, eps norms and weights equal the run without it. (Not the
    BatchNorm running statistics: torch's recomputation updates them a second time, as in timm.)"""
    common = ['--opt', 'sam-on-layerl2', '--rho', '0.05', '--epochs', '1', '--sam-m', '2']
    assert run(image_folder, tmp_path, *common, '--experiment', 'plain') == 0
    assert run(image_folder, tmp_path, *common, '--experiment', 'ckpt', '--grad-checkpointing') == 0
    a, b = (read_summary(tmp_path / e / 'summary.csv')[-1] for e in ('plain', 'ckpt'))
    for key in ('train_loss', 'train_ascent_loss', 'train_eps_norm'):
        assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    assert float(b['train_eps_norm']) > 0 and int(b['train_skipped_perturbations']) == 0
    wa, wb = (torch.load(tmp_path / e / 'last.pth.tar', weights_only=True)['state_dict'] for e in ('plain', 'ckpt'))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if k.endswith('running_mean'))   # recomputation ran
    params = [k for k in wa if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert len(params) > 10 and max((wa[k].double() - wb[k].double()).abs().max().item() for k in params) < 1e-5


def test_compile_and_checkpointing_flags_reject_bad_values(image_folder, tmp_path, capsys):
    for extra, message in ((['--torchcompile', 'nosuch'], "--torchcompile nosuch"),
                           (['--torchcompile', 'inductor', '--torchcompile-mode', 'nosuch'],
                            'Unrecognized mode=nosuch'),
                           (['--model', 'dla34', '--grad-checkpointing'],
                            "--grad-checkpointing: model 'dla34' does not support activation checkpointing")):
        assert run(image_folder, tmp_path, '--experiment', 'bad', *extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and 'Traceback' not in '\n'.join(err), err
        assert not os.path.exists(tmp_path / 'bad')


def test_demo_data_never_replaces_a_foreign_folder(image_folder, tmp_path, capsys):
    """--demo-data with a --data-dir that holds the user's own data: refused before anything is written
    (the demo writer used to delete such a folder); an empty folder is fine for the writer."""
    from sam_on_timm.demo_data import check_demo_dir
    before = sorted(str(p.relative_to(image_folder)) for p in __import__('pathlib').Path(image_folder).rglob('*'))
    assert run(image_folder, tmp_path, '--experiment', 'bad', '--demo-data', 'mnist5k') == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'already holds other files (it is not a demo data folder)' in err[-1] and 'Traceback' not in '\n'.join(err)
    after = sorted(str(p.relative_to(image_folder)) for p in __import__('pathlib').Path(image_folder).rglob('*'))
    assert after == before and not os.path.exists(tmp_path / 'bad')
    empty = tmp_path / 'empty'
    empty.mkdir()
    check_demo_dir(str(empty))                    # no error: the writer may fill it
    (empty / '.complete').write_text('')
    (empty / 'x').write_text('')
    check_demo_dir(str(empty))                    # an earlier copy of the demo: no error


def test_yaml_syntax_and_choices_are_one_line_errors(image_folder, tmp_path, capsys):
    for text, message in (('lr: [1\n', 'is not valid YAML'),
                          ('sam_bn_update: bogus\n',
                           "key 'sam_bn_update': 'bogus' is not a valid choice (choose from both, ascent)"),
                          ('epochs: 1.5\n', "key 'epochs' takes an integer, got the number 1.5")):
        cfg = tmp_path / 'c.yaml'
        cfg.write_text(text)
        assert train.main(['-c', str(cfg), '--data-dir', image_folder, '--output', str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and 'Traceback' not in '\n'.join(err), err


def test_resume_or_reuse_never_mixes_summary_columns(image_folder, tmp_path, capsys):
    """summary.csv rows always match its header: resuming a SAM run as SGD (other columns) and reusing the
    folder of a run that stopped before its first checkpoint are refused, and nothing is written."""
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 's', '--epochs', '2',
               '--stop-epoch', '1') == 0
    d = tmp_path / 's'
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    assert run(image_folder, tmp_path, '--opt', 'sgd', '--experiment', 's', '--epochs', '2',
               '--resume', str(d / 'last.pth.tar')) == 2
    assert 'its summary.csv was written with SAM columns' in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files
    for f in d.glob('*.pth.tar'):        # as a crash before the first checkpoint leaves it
        f.unlink()
    assert run(image_folder, tmp_path, '--opt', 'sgd', '--experiment', 's', '--epochs', '1') == 2
    assert "already holds another run's summary.csv" in capsys.readouterr().err
    # the right resume still works
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 's2', '--epochs', '2',
               '--stop-epoch', '1') == 0
    assert run(image_folder, tmp_path, '--opt', 'sam-on', '--experiment', 's2', '--epochs', '2',
               '--resume', str(tmp_path / 's2' / 'last.pth.tar')) == 0
    assert len(read_summary(tmp_path / 's2' / 'summary.csv')) == 2
