"""sam_on_timm.checkpoint without train.py: the copies to model_best / checkpoint-N are atomic (a crash
during the copy, by hard link or by copy, leaves the old file whole), the args a checkpoint stores keep
their list values, the RNG states and a weights-only read round-trip. Fast: a 2x2 linear model."""
import argparse
import errno
import os
import random
import shutil

import numpy as np
import pytest
import torch

from sam_on_timm.checkpoint import (RngCheckpointSaver, get_rng_state, load_resume, plain_args, read_checkpoint,
                                    set_rng_state)


def _saver(tmp_path, model, args=None):
    return RngCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), args=args,
                              checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=True)


def _weight(path):
    return torch.load(path, weights_only=True)['state_dict']['weight']


@pytest.mark.parametrize('crash', ['link', 'copy', 'replace', 'interrupt'])
def test_a_crash_while_copying_to_model_best_leaves_the_old_file_whole(tmp_path, monkeypatch, crash):
    """A new best epoch: ``last`` is copied over ``model_best``. The copy fails midway (after writing part of
    the file, by hard link or by copy, or in the final rename, or with Ctrl-C): model_best is byte for byte
    the old one, no temporary file is left, and the same save without the crash then makes model_best the
    new epoch's (the old file is not merely left alone by never being written)."""
    model = torch.nn.Linear(2, 2)
    saver = _saver(tmp_path, model)
    saver.save_checkpoint(0, metric=2.0)
    best = tmp_path / 'model_best.pth.tar'
    old = best.read_bytes()
    real_copy, real_link, real_replace = shutil.copy2, os.link, os.replace

    def half_copy(src, dst, *a, **k):   # a partial file where the copy writes, then the failure
        real_copy(src, dst)
        if 'model_best' not in os.path.basename(dst):   # checkpoint-1 is copied first: let it through
            return dst
        with open(dst, 'r+b') as f:
            f.truncate(10)
        raise (KeyboardInterrupt() if crash == 'interrupt' else OSError(errno.ENOSPC, 'No space left on device'))

    def half_link(src, dst):
        real_link(src, dst)
        if 'model_best' not in os.path.basename(dst):
            return
        raise OSError(errno.EIO, 'I/O error')

    def failing_replace(src, dst):
        if os.path.basename(dst) == 'model_best.pth.tar':
            raise OSError(errno.EIO, 'I/O error')
        return real_replace(src, dst)

    if crash == 'link':
        monkeypatch.setattr(os, 'link', half_link)
    else:
        monkeypatch.setattr(os, 'link', lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, 'no links')))
        saver.can_hardlink = True
    if crash in ('copy', 'interrupt'):
        monkeypatch.setattr(shutil, 'copy2', half_copy)
    if crash == 'replace':
        monkeypatch.setattr(os, 'replace', failing_replace)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises((OSError, KeyboardInterrupt)):
        saver.save_checkpoint(1, metric=1.0)
    # the crash was at model_best: checkpoint-1 was written whole
    assert torch.equal(_weight(tmp_path / 'checkpoint-1.pth.tar'), model.weight.detach())
    assert best.read_bytes() == old
    assert not list(tmp_path.glob('*.part'))
    monkeypatch.undo()
    saver = _saver(tmp_path, model)
    saver.save_checkpoint(2, metric=0.5)
    assert torch.equal(_weight(best), model.weight.detach()) and not list(tmp_path.glob('*.part'))


@pytest.mark.parametrize('hardlink', [True, False])
def test_copies_hold_the_saved_epoch(tmp_path, monkeypatch, hardlink):
    """Without a crash, by hard link or by copy: model_best holds the best epoch's weights, last the latest,
    checkpoint-N epoch N's; an existing model_best is replaced, not appended to."""
    if not hardlink:
        monkeypatch.setattr(os, 'link', lambda *a: (_ for _ in ()).throw(OSError(errno.EXDEV, 'no links')))
    model = torch.nn.Linear(2, 2)
    saver = _saver(tmp_path, model)
    weights = []
    for epoch, metric in enumerate((3.0, 1.0, 2.0)):
        with torch.no_grad():
            model.weight.add_(1)
        weights.append(model.weight.detach().clone())
        saver.save_checkpoint(epoch, metric=metric)
    assert torch.equal(_weight(tmp_path / 'model_best.pth.tar'), weights[1])
    assert torch.equal(_weight(tmp_path / 'last.pth.tar'), weights[2])
    for epoch in range(3):
        assert torch.equal(_weight(tmp_path / f'checkpoint-{epoch}.pth.tar'), weights[epoch])
    assert not list(tmp_path.glob('*.part')) and not (tmp_path / 'tmp.pth.tar').exists()


def test_checkpoint_args_keep_list_and_tuple_values(tmp_path):
    """The args in the file keep lists (--mean, --input-size, --train-img-sizes) and tuples as values, plain
    numbers, strings, bools and None; what a weights-only load cannot hold (an object) is left out."""
    args = argparse.Namespace(model='m', mean=[0.5, 0.25, 0.125], input_size=(3, 32, 32), lr=0.1, epochs=2,
                              amp=False, resume=None, sizes=[[1, 2], [3]], device=torch.device('cpu'),
                              fn=len)
    want = dict(model='m', mean=[0.5, 0.25, 0.125], input_size=(3, 32, 32), lr=0.1, epochs=2, amp=False,
                resume=None, sizes=[[1, 2], [3]])
    assert plain_args(args) == want
    model = torch.nn.Linear(2, 2)
    _saver(tmp_path, model, args).save_checkpoint(0, metric=1.0)
    saved = read_checkpoint(str(tmp_path / 'last.pth.tar'))['args']
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()}
    assert saved['mean'] == [0.5, 0.25, 0.125] and list(saved['input_size']) == [3, 32, 32]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    """get_rng_state -> file -> set_rng_state: torch, numpy and python draw the same numbers again."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()   # a cached Gaussian in numpy's state
    state = get_rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.save({'rng': state}, tmp_path / 'r.pt')
    loaded = torch.load(tmp_path / 'r.pt', weights_only=True)['rng']
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(loaded)
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2:] == want[2:]


def test_load_resume_loads_weights_optimizer_and_next_epoch(tmp_path):
    """A saved epoch 4 resumes at epoch 5, with the weights and the optimizer's momentum buffers and lr."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    saver = RngCheckpointSaver(model, opt, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(4, metric=1.0)
    other = torch.nn.Linear(2, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9)
    resumed = load_resume(str(tmp_path / 'last.pth.tar'), other, other_opt)
    assert resumed.epoch == 5 and resumed.lrs == [0.3]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(other_opt.state[other.weight]['momentum_buffer'], opt.state[model.weight]['momentum_buffer'])


def test_the_file_holds_every_part_of_the_run(tmp_path):
    """What a saved checkpoint holds, key by key: timm's (epoch, arch, state_dict, optimizer, version 2,
    metric, the saver's history, the scaler's and the EMA's state) and ours (every rank's RNG state, rank 0's
    as rng_state, a plateau schedule's progress, a distillation task's state)."""
    from timm.utils import ModelEmaV3, NativeScaler
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        ema.module.weight.add_(3.0)   # EMA weights unlike the model's
    scaler = NativeScaler(device='cpu')
    args = argparse.Namespace(model='my_arch', lr=0.1)
    saver = RngCheckpointSaver(model, opt, args=args, model_ema=ema, amp_scaler=scaler,
                               checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=True)
    ranks = [get_rng_state(), get_rng_state()]
    ranks[1]['python'] = ranks[1]['python'][:1] + [list(range(3))] + ranks[1]['python'][2:]
    saver.rng_states = ranks
    saver.scheduler_state = {'restore_lr': [0.5], 'reduce_on_plateau': {'best': 1.5}}
    saver.task_state = lambda: {'projection': torch.ones(2)}
    saver.save_checkpoint(7, metric=0.25)
    ck = read_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert ck['epoch'] == 7 and ck['arch'] == 'my_arch' and ck['version'] == 2 and ck['metric'] == 0.25
    assert torch.equal(ck['state_dict']['weight'], model.weight.detach())
    assert torch.equal(ck['state_dict_ema']['weight'], ema.module.weight.detach())
    assert ck['optimizer']['param_groups'][0]['lr'] == 0.1 and ck['optimizer']['state']
    assert ck[scaler.state_dict_key] == scaler.state_dict()
    assert ck['lr_scheduler'] == {'restore_lr': [0.5], 'reduce_on_plateau': {'best': 1.5}}
    assert torch.equal(ck['task_state']['projection'], torch.ones(2))
    assert ck['args'] == {'model': 'my_arch', 'lr': 0.1}
    assert len(ck['rng_states']) == 2 and ck['rng_states'][1]['python'][1] == [0, 1, 2]
    assert torch.equal(ck['rng_state']['torch'], ranks[0]['torch']) and ck['rng_state']['python'] == ranks[0]['python']
    assert 'saver' in ck   # timm's history, for a resume into the same folder
    # without args / EMA / scaler / schedule / task: none of their keys, the arch from the model's class
    bare = RngCheckpointSaver(model, opt, checkpoint_dir=str(tmp_path / 'b'), recovery_dir=str(tmp_path / 'b'))
    os.makedirs(tmp_path / 'b')
    bare.save_checkpoint(0)
    ck = read_checkpoint(str(tmp_path / 'b' / 'last.pth.tar'))
    assert ck['arch'] == 'linear' and len(ck['rng_states']) == 1 and 'metric' not in ck
    assert not {'args', 'state_dict_ema', 'lr_scheduler', 'task_state', scaler.state_dict_key} & set(ck)


def test_rng_state_holds_each_generator_exactly():
    """get_rng_state: torch's state tensor, numpy's (kind, keys, position, cached Gaussian) and python's state
    as lists (what a weights-only file holds); set_rng_state takes exactly that back."""
    np.random.seed(5)
    np.random.randn()
    random.seed(6)
    state = get_rng_state()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert torch.equal(state['torch'], torch.get_rng_state())
    n = state['numpy']
    assert n['kind'] == kind and n['pos'] == pos and n['has_gauss'] == has_gauss == 1 and n['cached_gaussian'] == cached
    assert n['keys'].dtype == torch.int64 and np.array_equal(n['keys'].numpy(), keys)
    assert isinstance(state['python'], list) and isinstance(state['python'][1], list)
    assert tuple(state['python'][0:1]) + (tuple(state['python'][1]),) + tuple(state['python'][2:]) == random.getstate()
    set_rng_state(state)
    assert np.random.get_state()[4] == cached and random.getstate() == tuple(
        tuple(x) if isinstance(x, list) else x for x in state['python'])


def test_state_dict_mismatch_names_the_first_keys_of_two_kinds():
    """At most 3 keys per kind, '(+N more)' for the rest, and at most two kinds (missing, unexpected,
    reshaped, in that order)."""
    from sam_on_timm.checkpoint import state_dict_mismatch
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
    sd = model.state_dict()
    assert state_dict_mismatch(model, sd) is None
    missing = {k: v for k, v in sd.items() if not k.startswith(('1.', '2.'))}
    assert state_dict_mismatch(model, missing) == 'missing keys 1.weight, 1.bias, 2.weight (+1 more)'
    extra = dict(sd, **{f'x{i}': torch.zeros(1) for i in range(5)})
    assert state_dict_mismatch(model, extra) == 'unexpected keys x0, x1, x2 (+2 more)'
    assert state_dict_mismatch(model, extra, shown=5) == 'unexpected keys x0, x1, x2, x3, x4'
    reshaped = dict(sd, **{'0.weight': torch.zeros(3, 2)})
    assert state_dict_mismatch(model, reshaped) == 'other shapes 0.weight (3, 2) vs (2, 2)'
    both = dict(missing, y=torch.zeros(1), **{'0.weight': torch.zeros(3, 2)})
    assert state_dict_mismatch(model, both) == 'missing keys 1.weight, 1.bias, 2.weight (+1 more); unexpected keys y'
    two = dict(sd, y=torch.zeros(1), **{'0.weight': torch.zeros(3, 2)})
    assert state_dict_mismatch(model, two) == 'unexpected keys y; other shapes 0.weight (3, 2) vs (2, 2)'


class _Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


def test_the_saver_unwraps_with_its_unwrap_fn_and_keeps_timms_history(tmp_path):
    """``unwrap_fn`` gives the weights' keys of the inner model (model and EMA); the history saved in the file
    restores a saver's best epoch, best metric and kept files (what a resume into the same folder needs)."""
    from timm.utils import ModelEmaV3
    inner = torch.nn.Linear(2, 2)
    model = _Wrapped(inner)
    ema = _Wrapped(torch.nn.Linear(2, 2))
    saver = RngCheckpointSaver(model, torch.optim.SGD(model.parameters(), lr=0.1), model_ema=ModelEmaV3(ema),
                               unwrap_fn=lambda m: m.module.inner if hasattr(m, 'module') else m.inner,
                               checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=True)
    for epoch, metric in enumerate((2.0, 1.0, 3.0)):
        saver.save_checkpoint(epoch, metric=metric)
    ck = read_checkpoint(str(tmp_path / 'last.pth.tar'))
    assert set(ck['state_dict']) == set(ck['state_dict_ema']) == {'weight', 'bias'}
    fresh = _saver(tmp_path, torch.nn.Linear(2, 2))
    fresh.load_state_dict(ck['saver'])
    assert (fresh.best_epoch, fresh.best_metric) == (1, 1.0) == (saver.best_epoch, saver.best_metric)
    assert [(os.path.basename(f), m) for f, m in fresh.checkpoint_files] == [
        ('checkpoint-1.pth.tar', 1.0), ('checkpoint-0.pth.tar', 2.0), ('checkpoint-2.pth.tar', 3.0)]


@pytest.mark.parametrize('err', [OSError(errno.ENOSPC, 'No space left on device'), OSError('quota exceeded')])
def test_a_failed_write_keeps_errno_and_reason(tmp_path, monkeypatch, err):
    """The OSError of a failed save names the epoch, the folder and the reason, and keeps the errno."""
    saver = _saver(tmp_path, torch.nn.Linear(2, 2))

    def fail(*a, **k):
        raise err

    monkeypatch.setattr(torch, 'save', fail)
    with pytest.raises(OSError) as info:
        saver.save_checkpoint(3, metric=1.0)
    assert info.value.errno == err.errno
    reason = err.strerror or str(err)
    assert str(info.value).endswith(f"cannot write the checkpoint of epoch 3 into '{tmp_path}' ({reason}); the "
                                    f"checkpoints already there are intact")


def test_load_resume_cases(tmp_path):
    """load_resume: the checkpoint dict it read (EMA weights without DDP's 'module.'), the next epoch (None for
    a file without one), no optimizer given (weights only), the scaler's state, another model's weights
    refused naming the file's arch and the first mismatch."""
    from timm.utils import NativeScaler
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    sd = model.state_dict()
    scaler = NativeScaler(device='cpu')
    path = str(tmp_path / 'c.pth.tar')
    torch.save({'state_dict': sd, 'epoch': 4, 'arch': 'lin', 'optimizer': {'state': {}, 'param_groups': []},
                'state_dict_ema': {f'module.{k}': v for k, v in sd.items()},
                scaler.state_dict_key: dict(scaler.state_dict(), scale=1024.0)}, path)
    fresh = torch.nn.Linear(2, 2)
    # partial: these files hold no RNG states (what a resume lacks is pinned in test_run_safety.py)
    resumed = load_resume(path, fresh, partial=True)   # no optimizer: its state is not read
    assert resumed.epoch == 5 and resumed.lrs is None and resumed.checkpoint['arch'] == 'lin'
    assert set(resumed.checkpoint['state_dict_ema']) == {'weight', 'bias'}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    torch.save({'state_dict': sd, 'epoch': 4, 'optimizer': torch.optim.SGD(model.parameters(), lr=0.2).state_dict(),
                scaler.state_dict_key: dict(scaler.state_dict(), scale=1024.0)}, path)
    resumed = load_resume(path, fresh, opt, loss_scaler=scaler, partial=True)
    assert resumed.lrs == [0.2] and scaler.state_dict()['scale'] == 1024.0
    torch.save({'state_dict': sd}, path)
    assert load_resume(path, fresh, partial=True).epoch is None
    with pytest.raises(ValueError, match=r"^the weights are of another model \('lin'\): other shapes weight \(2, 2\) "
                                         r"vs \(2, 3\)"):
        torch.save({'state_dict': sd, 'arch': 'lin'}, path)
        load_resume(path, torch.nn.Linear(3, 2))
    torch.save({'state_dict': sd}, path)   # no arch in the file: none in the message
    with pytest.raises(ValueError) as info:
        load_resume(path, torch.nn.Linear(3, 2))
    assert str(info.value) == 'the weights are of another model: other shapes weight (2, 2) vs (2, 3)'


def test_load_optimizer_state_refusal_and_other_errors():
    """Another kind's state: ValueError naming this optimizer's class and the setting missing, the state kept;
    a state without param groups: torch's own KeyError, also with the state kept; ``load`` is the loader used."""
    from sam_on_timm.checkpoint import load_optimizer_state
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))], lr=0.5)
    with pytest.raises(ValueError, match=r'than this SGD \(its parameter groups lack .*momentum'):
        load_optimizer_state(opt, adam.state_dict())
    assert opt.param_groups[0]['lr'] == 0.1 and opt.param_groups[0]['momentum'] == 0.9
    with pytest.raises(KeyError):
        load_optimizer_state(opt, {'state': {}})
    assert opt.param_groups[0]['lr'] == 0.1
    calls = []
    load_optimizer_state(opt, opt.state_dict(), load=lambda sd: calls.append(sd))
    assert len(calls) == 1


def test_read_checkpoint_formats(tmp_path):
    """torch's zip format and its legacy pickle format are read; a file of neither, and one holding Python
    objects a weights-only load refuses, are ValueErrors saying so."""
    sd = {'w': torch.arange(3.0)}
    torch.save({'state_dict': sd}, tmp_path / 'zip.pt')
    torch.save({'state_dict': sd}, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)
    for name in ('zip.pt', 'legacy.pt'):
        assert torch.equal(read_checkpoint(str(tmp_path / name))['state_dict']['w'], sd['w'])
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(ValueError) as info:
        read_checkpoint(str(tmp_path / 'text.pt'))
    assert str(info.value) == "not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    torch.save({'state_dict': sd, 'obj': _Wrapped(torch.nn.Linear(1, 1))}, tmp_path / 'obj.pt')
    with pytest.raises(ValueError) as info:
        read_checkpoint(str(tmp_path / 'obj.pt'))
    assert str(info.value) == ('the file holds Python objects other than tensors and plain values, which a safe '
                               '(weights-only) load refuses')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(ValueError, match='holds a list, not a checkpoint'):
        read_checkpoint(str(tmp_path / 'list.pt'))
