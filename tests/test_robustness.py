"""Nothing non-finite, reversed or misread passes silently: divergence, numbers, splits, disks,
resume layouts and messages (docs/robustness.md)."""
import errno
import json
import math
import os

import pytest
import timm
import torch

import train
from sam_on_timm import SAM, is_sam_name, names, parse_sam_name
from sam_on_timm.checkpoint import RngCheckpointSaver, load_optimizer_state, state_dict_mismatch
from sam_on_timm.registry import split_opt_name

BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2', '--seed', '3']


def run(image_folder, out, *extra):
    return train.main(['--data-dir', image_folder, '--output', str(out), *BASE, *extra])


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and 'Traceback' not in '\n'.join(err), err
    return err[-1]


def epochs_in_summary(path):
    import csv
    with open(path) as f:
        return [int(r['epoch']) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------------------------
def test_a_diverging_run_stops_in_its_first_non_finite_epoch(image_folder, tmp_path, capsys):
    """A huge lr: the run ends in epoch 0 with one line naming the epoch and the step, exit 1, no
    checkpoint of non-finite weights, and the --result JSON is valid."""
    code = run(image_folder, tmp_path, '--experiment', 'd', '--opt', 'sam', '--lr', '1e30', '--epochs', '3',
               '--eval-metric', 'loss')
    out, err = capsys.readouterr()
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith('train.py: error: the training loss is not finite in epoch 0, step ') and 'of 4' in line
    assert 'Traceback' not in err
    d = tmp_path / 'd'
    assert not (d / 'model_best.pth.tar').exists() and not (d / 'last.pth.tar').exists()
    assert not (d / 'summary.csv').exists()   # no row for the diverged epoch
    assert '--result' not in out   # no epoch completed


@pytest.mark.parametrize('nan_epoch', [0, 1])
def test_a_non_finite_metric_never_ranks_as_best(image_folder, tmp_path, capsys, monkeypatch, nan_epoch):
    """--eval-metric loss with a NaN validation: the run stops before saving that epoch. timm would keep
    a first-epoch NaN as best for ever (every comparison with NaN is False)."""
    real = train.validate
    calls = []

    def nan_once(*a, **k):
        metrics = real(*a, **k)
        calls.append(1)
        if len(calls) == nan_epoch + 1:
            metrics['loss'] = float('nan')
        return metrics

    monkeypatch.setattr(train, 'validate', nan_once)
    assert run(image_folder, tmp_path, '--experiment', 'm', '--epochs', '3', '--eval-metric', 'loss') == 1
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == (f'train.py: error: validation after epoch {nan_epoch}: loss not finite: '
                                            f'the run diverged; the checkpoints are those of the epochs before')
    if nan_epoch == 0:
        assert not (tmp_path / 'm' / 'model_best.pth.tar').exists() and '--result' not in out
        return
    best = torch.load(tmp_path / 'm' / 'model_best.pth.tar', weights_only=True)
    assert best['epoch'] == 0 and math.isfinite(best['metric'])
    assert torch.load(tmp_path / 'm' / 'last.pth.tar', weights_only=True)['epoch'] == 0
    assert not (tmp_path / 'm' / 'checkpoint-1.pth.tar').exists()
    result = json.loads(out.split('--result\n', 1)[1])
    assert [r['epoch'] for r in result] == [0]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason='needs torch.distributed gloo')
def test_a_diverging_ddp_run_stops_on_every_rank(tmp_path):
    """Both ranks see the all-reduced sums, so both stop at the same step: no rank waits for ever."""
    import subprocess
    from tests.test_distributed import _launch_cmd, _launcher_env
    cmd = _launch_cmd(tmp_path, '-b', '4', '--epochs', '2', '--lr', '1e30', '--experiment', 'd')
    r = subprocess.run(cmd, cwd=tmp_path, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    # both ranks write to the same stderr at once: their lines may run together, so count occurrences
    msg = 'train.py: error: the training loss is not finite in epoch 0, '
    assert r.stderr.count(msg) == 2 and r.stderr.count('train.py: error:') == 2, r.stderr[-3000:]
    assert not (tmp_path / 'out' / 'd' / 'last.pth.tar').exists()


def test_the_saver_refuses_a_non_finite_metric(tmp_path):
    model = torch.nn.Linear(2, 2)
    saver = RngCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                               recovery_dir=str(tmp_path), decreasing=True)
    saver.save_checkpoint(0, metric=1.0)
    for bad in (float('nan'), float('inf'), float('-inf')):
        with pytest.raises(ValueError, match='not finite'):
            saver.save_checkpoint(1, metric=bad)
    assert saver.best_metric == 1.0 and sorted(os.listdir(tmp_path)) == ['checkpoint-0.pth.tar', 'last.pth.tar',
                                                                        'model_best.pth.tar']


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
NAN, INF = 'nan', 'inf'
BAD_NUMBERS = [
    (['--opt', 'sam', '--rho', NAN], '--rho must be a finite number > 0, got nan'),
    (['--opt', 'sam', '--rho', INF], '--rho must be a finite number > 0, got inf'),
    (['--opt', 'sam', '--sam-eta', INF], '--sam-eta must be a finite number >= 0, got inf'),
    (['--opt', 'sam', '--sam-ascent-frac', NAN], '--sam-ascent-frac must be a finite number in (0, 1], got nan'),
    (['--lr', NAN], '--lr must be a finite number >= 0, got nan'),
    (['--lr-base', INF], '--lr-base must be a finite number > 0, got inf'),
    (['--momentum', INF], '--momentum must be a finite number in [0, 1), got inf'),
    (['--momentum', '1.5'], '--momentum must be a finite number in [0, 1), got 1.5'),
    (['--weight-decay', '-0.0001'], '--weight-decay must be a finite number >= 0, got -0.0001'),
    (['--weight-decay', NAN], '--weight-decay must be a finite number >= 0, got nan'),
    (['--clip-grad', '-1'], '--clip-grad must be a finite number > 0, got -1.0'),
    (['--clip-grad', NAN], '--clip-grad must be a finite number > 0, got nan'),
    (['--model-ema', '--model-ema-decay', NAN], '--model-ema-decay must be a finite number in [0, 1], got nan'),
    (['--drop', '2'], '--drop must be a finite number in [0, 1), got 2.0'),
    (['--drop-path', '1'], '--drop-path must be a finite number in [0, 1), got 1.0'),
    (['--smoothing', '2'], '--smoothing must be a finite number in [0, 1), got 2.0'),
    (['--mixup', '-1'], '--mixup must be a finite number >= 0, got -1.0'),
    (['--cutmix', INF], '--cutmix must be a finite number >= 0, got inf'),
    (['--opt', 'adamw', '--opt-betas', '0.9', '1.0'], '--opt-betas must be a finite number in [0, 1), got 1.0'),
    (['--opt', 'adamw', '--opt-eps', '0'], '--opt-eps must be a finite number > 0, got 0.0'),
    (['--scale', '0.9', '0.1'], '--scale is a (min, max) pair: got 0.9 > 0.1'),
    (['--warmup-lr', NAN], '--warmup-lr must be a finite number >= 0, got nan'),
    (['--decay-rate', '0'], '--decay-rate must be a finite number in (0, 1], got 0.0'),
    (['--color-jitter', '-0.4'], '--color-jitter must be a finite number >= 0, got -0.4'),
    (['--crop-pct', '0'], '--crop-pct must be a finite number > 0, got 0.0'),
    (['--lr-noise', NAN], '--lr-noise must be a finite number >= 0, got nan'),
    (['--layer-decay-min-scale', INF], '--layer-decay-min-scale must be a finite number >= 0, got inf'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be a finite number >= 0, got -1'),
    (['--lr-cycle-limit', '-1'], '--lr-cycle-limit must be a finite number >= 0, got -1'),
]


@pytest.mark.parametrize('extra,message', BAD_NUMBERS, ids=[' '.join(e) for e, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_before_anything_is_written(image_folder, tmp_path, capsys, monkeypatch, extra,
                                                            message):
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('checked only after building the model'))
    assert run(image_folder, tmp_path, '--experiment', 'bad', *extra) == 2
    assert last_error(capsys) == f'train.py: error: {message}'
    assert not (tmp_path / 'bad').exists()


def test_every_float_option_is_checked_to_be_finite(image_folder):
    """Also the float options no range is written for (a new option cannot slip through)."""
    for action in train.build_parser()._actions:
        if action.type is not float or action.dest in ('rho', 'sam_eta', 'sam_ascent_frac'):
            continue
        value = [math.nan] * (action.nargs if isinstance(action.nargs, int) else 2) if action.nargs else math.nan
        args = train.parse_args(['--data-dir', image_folder, '--opt', 'sgd'])
        setattr(args, action.dest, value)
        with pytest.raises(train.UsageError, match=f'--{action.dest.replace("_", "-")} .*nan'):
            train.validate_args(args)


def test_yaml_null_means_the_default(image_folder, tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('opt: null\nbatch_size: null\ndrop: null\nsmoothing: null\nscale: null\nrho: null\n'
                   'model_ema: null\nclip_grad: null\n')
    args = train.parse_args(['-c', str(cfg), '--data-dir', image_folder])
    defaults = train.parse_args(['--data-dir', image_folder])
    assert vars(args) == {**vars(defaults), 'config': str(cfg)}
    train.validate_args(args)
    cfg.write_text('batchsize: null\n')   # a misspelt key stays an error, null or not
    assert train.main(['-c', str(cfg), '--data-dir', image_folder]) == 2
    assert "unknown key 'batchsize'" in last_error(capsys)


@pytest.mark.parametrize('kwargs,message', [
    (dict(rho=math.nan), 'rho must be a finite number > 0, got nan'),
    (dict(rho=math.inf), 'rho must be a finite number > 0, got inf'),
    (dict(eta=math.inf, variant='eleml2'), 'eta must be a finite number >= 0, got inf'),
    (dict(lr=math.nan), 'lr must be a finite number >= 0, got nan'),
    (dict(momentum=math.inf), 'momentum must be a finite number in [0, 1), got inf'),
    (dict(weight_decay=-1.0), 'weight_decay must be a finite number >= 0, got -1.0'),
    (dict(base_opt='adamw', betas=(0.9, math.nan)), 'betas must be a finite number in [0, 1), got nan'),
    (dict(base_opt='adamw', base_args={'eps': math.inf}), 'eps must be a finite number > 0, got inf'),
    (dict(base_opt='adamw', base_args=[('eps', 1e-8)]), 'base_args must be a dict of base optimizer arguments'),
    (dict(base_opt='lookahed_sgd'), "unknown base_opt 'lookahed_sgd'"),
    (dict(base_opt='lookahead_sam-on'), "unknown base_opt 'lookahead_sam-on'"),
    (dict(variant='nosuch'), "unknown SAM variant 'nosuch'; valid: sam, eleml2"),
])
def test_the_python_api_checks_the_same_numbers(kwargs, message):
    model = timm.create_model('test_resnet', num_classes=2)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')):
        SAM(model.parameters(), model=model, **{'lr': 0.1, **kwargs})
    if 'variant' not in kwargs and 'base_opt' not in kwargs:   # the same through timm's factory
        with pytest.raises(ValueError, match='must be a finite number'):
            timm.optim.create_optimizer_v2(model, 'sam-on', **{'lr': 0.1, **kwargs})


def test_train_step_refuses_a_reversing_clip_and_a_bad_ascent_fraction():
    from sam_on_timm.train_step import split_chunks, train_step
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = SAM(model.parameters(), lr=0.1)
    chunks = split_chunks(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), None)
    before = [p.detach().clone() for p in model.parameters()]
    for kw, message in ((dict(clip_grad=-1.0), 'clip_grad must be a finite number > 0, got -1.0'),
                        (dict(clip_grad=math.nan), 'clip_grad must be a finite number > 0'),
                        (dict(ascent_frac=math.nan), r'ascent_frac must be a finite number in \(0, 1\], got nan')):
        with pytest.raises(ValueError, match=message):
            train_step(model, opt, chunks, torch.nn.functional.cross_entropy, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match='m 3 must be a positive divisor of the per-GPU batch size 4'):
        split_chunks(torch.randn(4, 3), torch.zeros(4), 3)


def test_optimizer_names_are_parsed_by_one_rule():
    assert split_opt_name('Lookahead_SGD') == ('lookahead', 'sgd') and split_opt_name('adamw') == ('', 'adamw')
    with pytest.raises(ValueError, match="unknown prefix 'lookahed_'"):
        split_opt_name('lookahed_sgd')   # timm would silently take plain sgd
    assert parse_sam_name('lookahead_sam-on-layerl2') == ('on', 'layerl2')
    assert is_sam_name('SAM-ON') and not is_sam_name('samfoo') and not is_sam_name('foo_sam')
    with pytest.raises(ValueError, match="unknown SAM optimizer 'samfoo'"):
        parse_sam_name('samfoo')
    with pytest.raises(ValueError, match="unknown base_opt 'samfoo'"):   # not a timm name either
        names.check_base_opt('samfoo')


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------
def test_a_split_that_does_not_exist_lists_the_splits_found(image_folder, tmp_path, capsys):
    for extra, message in ((['--train-split', 'trian'], "--train-split 'trian': no such folder in"),
                           (['--val-split', 'test'], "--val-split 'test': no such folder in")):
        assert run(image_folder, tmp_path, '--experiment', 'bad', *extra) == 2
        line = last_error(capsys)
        assert message in line and line.endswith('(folders found: train, validation)'), line
        assert not (tmp_path / 'bad').exists()
    # timm's synonyms still find the folder
    args = train.parse_args(['--data-dir', image_folder, '--val-split', 'val', '--train-split', 'training'])
    train.validate_args(args)
    train.check_splits(args)


# ---------------------------------------------------------------------------------------------
# output folder and full disks
# ---------------------------------------------------------------------------------------------
def test_an_unwritable_output_folder_is_reported_before_the_model_is_built(image_folder, tmp_path, capsys,
                                                                            monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, 'Read-only file system')

    monkeypatch.setattr(tempfile, 'TemporaryFile', read_only)
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: pytest.fail('the model was built first'))
    assert run(image_folder, tmp_path / 'out', '--experiment', 'e') == 2
    assert last_error(capsys) == (f"train.py: error: the output folder '{tmp_path / 'out' / 'e'}' cannot be written "
                                  f"('{tmp_path}': Read-only file system): pass a writable --output")
    monkeypatch.undo()
    (tmp_path / 'file').write_text('x')
    assert run(image_folder, tmp_path / 'file', '--experiment', 'e') == 2
    assert f"'{tmp_path / 'file'}' is a file" in last_error(capsys)


def test_a_full_disk_while_saving_loses_nothing_and_a_retry_adds_no_duplicate_rows(image_folder, tmp_path, capsys,
                                                                                   monkeypatch):
    common = ['--experiment', 'f', '--opt', 'sam-on', '--epochs', '3']
    assert run(image_folder, tmp_path, *common, '--stop-epoch', '1') == 0
    d = tmp_path / 'f'
    last = (d / 'last.pth.tar').read_bytes()
    real_save = torch.save

    def disk_full(obj, path, *a, **k):   # half the file written, then ENOSPC
        real_save(obj, path, *a, **k)
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    assert run(image_folder, tmp_path, *common, '--resume', str(d / 'last.pth.tar')) == 1
    assert last_error(capsys) == (f"train.py: error: [Errno 28] cannot write the checkpoint of epoch 1 into '{d}' "
                                  f"(No space left on device); the checkpoints already there are intact")
    assert (d / 'last.pth.tar').read_bytes() == last
    assert not (d / 'tmp.pth.tar').exists() and not list(d.glob('*.part'))
    assert epochs_in_summary(d / 'summary.csv') == [0, 1]   # epoch 1 trained, not saved
    monkeypatch.undo()
    assert run(image_folder, tmp_path, *common, '--resume', str(d / 'last.pth.tar'), '--stop-epoch', '2') == 0
    assert epochs_in_summary(d / 'summary.csv') == [0, 1]


def test_a_failed_copy_leaves_model_best_and_the_history_intact(tmp_path, monkeypatch):
    import shutil
    model = torch.nn.Linear(2, 2)
    saver = RngCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_dir=str(tmp_path),
                               recovery_dir=str(tmp_path), decreasing=True)
    saver.save_checkpoint(0, metric=2.0)
    best = (tmp_path / 'model_best.pth.tar').read_bytes()
    real_copy = shutil.copy2

    def full(src, dst, *a, **k):
        real_copy(src, dst)
        with open(dst, 'r+b') as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'link', lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, 'no links')))
    monkeypatch.setattr(shutil, 'copy2', full)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match='cannot write the checkpoint of epoch 1'):
        saver.save_checkpoint(1, metric=1.0)
    assert (tmp_path / 'model_best.pth.tar').read_bytes() == best
    assert not list(tmp_path.glob('*.part')) and not (tmp_path / 'tmp.pth.tar').exists()
    assert (tmp_path / 'checkpoint-0.pth.tar').exists()


def test_a_run_killed_in_its_first_save_tells_how_to_recover(image_folder, tmp_path, capsys):
    d = tmp_path / 'k'
    d.mkdir()
    (d / 'args.yaml').write_text('model: test_resnet\n')
    (d / 'summary.csv').write_text('epoch,train_loss\n0,0.7\n')
    (d / 'tmp.pth.tar').write_bytes(b'PK\x03\x04 half')
    assert run(image_folder, tmp_path, '--experiment', 'k') == 2
    line = last_error(capsys)
    assert line == (f"train.py: error: output folder '{d}' already holds another run's summary.csv or tmp.pth.tar "
                    f"but no complete checkpoint (it stopped before its first save completed; nothing to resume): "
                    f"remove the folder, or choose another --experiment")
    # a kept epoch checkpoint without last.pth.tar: the pointer names a file that exists
    (d / 'checkpoint-0.pth.tar').write_bytes(b'x')
    assert run(image_folder, tmp_path, '--experiment', 'k') == 2
    assert last_error(capsys).endswith(f"--resume {d / 'checkpoint-0.pth.tar'}")


# ---------------------------------------------------------------------------------------------
# resume layout
# ---------------------------------------------------------------------------------------------
def _stepped(opt_name, with_model=False, **kw):
    model = timm.create_model('test_resnet', num_classes=2)
    opt = timm.optim.create_optimizer_v2(model, opt_name, lr=0.1, **kw)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    if isinstance(opt, SAM):
        opt.first_step(zero_grad=True)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.second_step()
    else:
        opt.step()
    return (model, opt) if with_model else opt


@pytest.mark.parametrize('saved,loaded,lacks', [
    (('sam', dict(base_opt='adamw')), ('sam', dict(base_opt='sgd')), 'dampening, momentum'),
    (('sam', dict(base_opt='sgd')), ('sam', dict(base_opt='adamw')), 'amsgrad, betas'),
    (('adamw', {}), ('momentum', {}), 'dampening, momentum'),
    (('momentum', {}), ('adamw', {}), 'amsgrad, betas'),
])
def test_an_optimizer_state_of_another_kind_is_refused(saved, loaded, lacks):
    state = _stepped(saved[0], **saved[1]).state_dict()
    target = _stepped(loaded[0], **loaded[1])
    before = target.state_dict()
    load = target.load_state_dict if isinstance(target, SAM) else None
    with pytest.raises(ValueError, match=f'lack {lacks}.*--no-resume-opt'):
        if load is not None:
            load(state)
        else:
            load_optimizer_state(target, state)
    after = target.state_dict()   # unchanged, and it still steps
    assert after['param_groups'] == before['param_groups']
    assert all(torch.equal(after['state'][i][k], v) for i, s in before['state'].items() for k, v in s.items())


def test_train_py_refuses_another_optimizer_layout_both_ways(image_folder, tmp_path, capsys):
    for src, base in (('a', 'adamw'), ('s', 'momentum')):   # what train.py --opt sam --sam-base BASE saves
        model, opt = _stepped('sam', with_model=True, base_opt=base, weight_decay=1e-4)
        (tmp_path / src).mkdir()
        RngCheckpointSaver(model, opt, checkpoint_dir=str(tmp_path / src), recovery_dir=str(tmp_path / src)
                           ).save_checkpoint(0, metric=50.0)
    for src, base in (('a', 'momentum'), ('s', 'adamw')):
        assert run(image_folder, tmp_path, '--experiment', f'{src}2', '--opt', 'sam', '--sam-base', base,
                   '--epochs', '2', '--resume', str(tmp_path / src / 'last.pth.tar')) == 2
        line = last_error(capsys)
        assert 'its optimizer state does not fit' in line and '--no-resume-opt resumes weights' in line, line
        assert not (tmp_path / f'{src}2').exists()


# ---------------------------------------------------------------------------------------------
# messages
# ---------------------------------------------------------------------------------------------
def test_messages_say_what_is_wrong(image_folder, tmp_path, capsys):
    assert train.main(['-c', str(tmp_path), '--data-dir', image_folder]) == 2
    assert last_error(capsys) == f"train.py: error: config file '{tmp_path}' is a folder: pass a YAML file"
    assert run(image_folder, tmp_path, '--experiment', 'x', '--resume', str(tmp_path)) == 2
    assert last_error(capsys) == f"train.py: error: --resume '{tmp_path}' is a folder: pass a checkpoint file"
    text = tmp_path / 'notes.txt'
    text.write_text('101\nnot a checkpoint\n')
    assert run(image_folder, tmp_path, '--experiment', 'x', '--resume', str(text)) == 2
    assert last_error(capsys) == (f"train.py: error: --resume '{text}' cannot be loaded into this run: not a "
                                  f"PyTorch checkpoint (neither torch.save's zip format nor a pickle)")
    vit = timm.create_model('test_vit', num_classes=2)
    torch.save({'state_dict': vit.state_dict(), 'epoch': 0, 'arch': 'test_vit'}, tmp_path / 'vit.pth.tar')
    assert run(image_folder, tmp_path, '--experiment', 'x', '--resume', str(tmp_path / 'vit.pth.tar')) == 2
    line = last_error(capsys)
    assert ("the weights are of another model ('test_vit'): missing keys conv1.0.weight, conv1.1.weight, "
            "conv1.1.bias (+89 more); ") in line, line
    assert 'unexpected keys cls_token, pos_embed, patch_embed.proj.weight (+' in line
    assert not (tmp_path / 'x').exists()


def test_state_dict_mismatch_names_reshaped_keys():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(4, 2)
    assert state_dict_mismatch(a, a.state_dict()) is None
    assert state_dict_mismatch(a, b.state_dict()) == 'other shapes weight (2, 4) vs (2, 3)'
