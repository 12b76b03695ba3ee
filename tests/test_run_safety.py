"""Run safety: one writer per run folder (a lock that a crash never leaves held), the run folder inside
--output, resumes that are exact or say what they lack, well-formed checkpoint contents, output paths of
sharpness / plot checked before the work, and one line where a user met a traceback (non-finite weights
to sharpness, a non-UTF-8 summary.csv to plot, a rank killed under torchrun)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import train
from sam_on_timm.checkpoint import check_resume_contents, check_rng_state, get_rng_state, load_resume
from sam_on_timm.outputs import LOCK_NAME, RunLock, check_experiment_name, lock_holder
from tests.helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2', '--seed', '3',
        '--opt', 'sam-on']
# a second process holding a run folder's lock with sam_on_timm.outputs.RunLock (loaded by path: no torch import)
HOLD = ("import importlib.util, sys, time; s = importlib.util.spec_from_file_location('o', sys.argv[1]); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); m.RunLock(sys.argv[2]).acquire(); "
        "print('held', flush=True); time.sleep(300)")


def run(data, out, *extra):
    return train.main(['--data-dir', data, '--output', str(out), *BASE, *extra])


def last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and 'Traceback' not in '\n'.join(err), err
    return err[-1]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hold_lock(folder):
    """A second process that holds ``folder``'s run lock until killed."""
    p = subprocess.Popen([sys.executable, '-c', HOLD, os.path.join(ROOT, 'sam_on_timm', 'outputs.py'), str(folder)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == 'held\n'
    return p


@pytest.fixture(scope='module')
def stopped(tmp_path_factory):
    """A run (SAM-ON, EMA) of 2 epochs stopped after epoch 0: its data and complete last.pth.tar."""
    root = tmp_path_factory.mktemp('safety')
    data = make_image_folder(root / 'data')
    assert run(data, root / 'out', '--experiment', 'src', '--model-ema', '--epochs', '2', '--stop-epoch', '1') == 0
    return data, str(root / 'out' / 'src' / 'last.pth.tar')


# ---------------------------------------------------------------------------------------------
# one writer per run folder
# ---------------------------------------------------------------------------------------------
def test_a_live_run_holds_its_folder_and_a_killed_one_does_not(tmp_path, capsys, one_thread):
    """While another process holds the folder's lock, a resume into it (which the folder's contents
    allow) is refused in one line naming that process, and nothing there changes; once the holder is
    killed (SIGKILL: no clean-up), the lock file it leaves blocks nothing and the resume runs."""
    data = make_image_folder(tmp_path / 'data')
    d = tmp_path / 'out' / 'e'
    common = ['--experiment', 'e', '--epochs', '2']
    assert run(data, tmp_path / 'out', *common, '--stop-epoch', '1') == 0
    assert lock_holder(str(d)) is None   # released when the run ended
    holder = hold_lock(d)
    try:
        before = files(d)
        for extra in (['--resume', str(d / 'last.pth.tar')], []):
            assert run(data, tmp_path / 'out', *common, *extra) == 2
            line = last_error(capsys)
            assert f"output folder '{d}' is in use by another run (pid {holder.pid} on " in line, line
            assert files(d) == before
    finally:
        holder.kill()
        holder.wait()
    assert (d / LOCK_NAME).is_file() and lock_holder(str(d)) is None
    assert run(data, tmp_path / 'out', *common, '--resume', str(d / 'last.pth.tar')) == 0
    assert [r.split(',')[0] for r in (d / 'summary.csv').read_text().strip().splitlines()[1:]] == ['0', '1']


def test_a_second_run_started_while_the_first_trains_is_refused(tmp_path, capsys, monkeypatch, one_thread):
    """Two runs with the same --output and --experiment: the second, started while the first is in its
    epoch, stops in one line (exit 2) and the first run finishes with its own files."""
    data = make_image_folder(tmp_path / 'data')
    first = ['--experiment', 'e', '--epochs', '1', '--rho', '0.07']
    second = []
    real = train.train_one_epoch

    def epoch_with_a_second_run(*a, **k):
        if not second:
            second.append(run(data, tmp_path / 'out', '--experiment', 'e', '--epochs', '1', '--rho', '0.2'))
            second.append(capsys.readouterr().err)
        return real(*a, **k)
    monkeypatch.setattr(train, 'train_one_epoch', epoch_with_a_second_run)
    assert run(data, tmp_path / 'out', *first) == 0
    assert second[0] == 2
    err = second[1].strip().splitlines()
    assert f'is in use by another run (pid {os.getpid()} on ' in err[-1] and 'Traceback' not in second[1], err
    d = tmp_path / 'out' / 'e'
    ckpt = torch.load(d / 'last.pth.tar', weights_only=True)
    assert ckpt['args']['rho'] == 0.07 and 'rho: 0.07' in (d / 'args.yaml').read_text()
    assert len((d / 'summary.csv').read_text().strip().splitlines()) == 2   # header + the first run's epoch


def test_the_lock_is_taken_before_the_first_write_and_the_folder_checked_again(tmp_path, capsys, monkeypatch,
                                                                              one_thread):
    """A run that passed the folder check and then lost the folder to another run (it took the lock, or
    wrote a checkpoint and ended, while this one built its data) writes nothing: one line, exit 2."""
    data = make_image_folder(tmp_path / 'data')
    d = tmp_path / 'out' / 'e'
    real = train.create_data   # (built after the folder check)
    other = RunLock(str(d))

    def other_run_takes_the_folder(*args):
        d.mkdir(parents=True, exist_ok=True)
        other.acquire()
        return real(*args)
    monkeypatch.setattr(train, 'create_data', other_run_takes_the_folder)
    try:
        assert run(data, tmp_path / 'out', '--experiment', 'e', '--epochs', '1') == 2
        assert f"output folder '{d}' is in use by another run (pid {os.getpid()}" in last_error(capsys)
        assert sorted(os.listdir(d)) == [LOCK_NAME]   # no args.yaml, no summary of this run
    finally:
        other.release()

    def other_run_wrote_a_checkpoint(*args):
        torch.save({'epoch': 0}, d / 'last.pth.tar')
        return real(*args)
    monkeypatch.setattr(train, 'create_data', other_run_wrote_a_checkpoint)
    assert run(data, tmp_path / 'out', '--experiment', 'e', '--epochs', '1') == 2
    assert 'already holds checkpoints of another run' in last_error(capsys)
    assert sorted(os.listdir(d)) == ['last.pth.tar', LOCK_NAME]


# ---------------------------------------------------------------------------------------------
# the run folder stays inside --output
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['../x', '../../x', 'a/../../x', '.', '..', 'a//b', 'a/./b', 'ABS'])
def test_an_experiment_name_that_leaves_output_is_refused(tmp_path, capsys, name):
    data = make_image_folder(tmp_path / 'data', n_train=4, n_val=2)
    name = str(tmp_path / 'abs') if name == 'ABS' else name
    before = sorted(os.listdir(tmp_path))
    assert run(data, tmp_path / 'o1' / 'o2', '--experiment', name, '--epochs', '1') == 2
    line = last_error(capsys)
    assert f"--experiment '{name}' must name a folder inside --output" in line, line
    assert sorted(os.listdir(tmp_path)) == before   # nothing written, inside or outside --output
    with pytest.raises(ValueError, match='must name a folder inside --output'):
        check_experiment_name(name)


def test_an_experiment_may_be_a_sub_folder_of_output(tmp_path, one_thread):
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4)
    assert run(data, tmp_path / 'out', '--experiment', 'cifar/run1', '--epochs', '1') == 0
    assert (tmp_path / 'out' / 'cifar' / 'run1' / 'last.pth.tar').is_file()


def test_sharpness_and_plot_check_their_output_before_any_work(tmp_path, capsys, monkeypatch):
    import sam_on_timm.plot as plot
    import sam_on_timm.sharpness as sharpness

    def no_work(*a, **k):
        raise AssertionError('the work started before the output path was checked')
    monkeypatch.setattr(sharpness, '_build', no_work)
    for name in ('plot_curves', 'plot_norms', 'plot_sharpness', '_pyplot'):
        monkeypatch.setattr(plot, name, no_work)
    (tmp_path / 'afile').write_text('x')
    ckpt = tmp_path / 'run' / 'last.pth.tar'
    ckpt.parent.mkdir()
    ckpt.write_bytes(b'x')
    (tmp_path / 'fig.png').mkdir()
    through_file = str(tmp_path / 'afile' / 'out.json')
    assert sharpness.main(['--checkpoint', str(ckpt), '--output', through_file]) == 2
    assert f"'{tmp_path / 'afile'}' is a file" in last_error(capsys)
    assert sharpness.main(['--checkpoint', str(ckpt), '--output', str(tmp_path)]) == 2
    assert 'is a folder: pass a file name' in last_error(capsys)
    for argv in (['curves', str(tmp_path)], ['norms', str(ckpt)], ['sharpness', str(ckpt)]):
        assert plot.main([*argv, '--output', str(tmp_path / 'afile' / 'x.png')]) == 2
        assert f"'{tmp_path / 'afile'}' is a file" in last_error(capsys)
        assert plot.main([*argv, '--output', str(tmp_path / 'fig.png')]) == 2
        assert 'is a folder: pass a file name' in last_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ['afile', 'fig.png', 'run'] and not os.listdir(tmp_path / 'fig.png')


# ---------------------------------------------------------------------------------------------
# a resume is exact, or says what it lacks
# ---------------------------------------------------------------------------------------------
MISSING = {   # piece -> (keys removed, run flags, the words of the line, the way out)
    'optimizer': (['optimizer'], [], 'the optimizer state', '--no-resume-opt'),
    'ema': (['state_dict_ema'], ['--model-ema'], 'the EMA weights (state_dict_ema)', '--resume-partial'),
    'rng': (['rng_state', 'rng_states'], [], 'the RNG states', '--resume-partial'),
    'scaler': ([], ['--amp', '--amp-dtype', 'float16'], 'the loss scaler state (amp_scaler)', '--resume-partial'),
}


@pytest.mark.parametrize('piece', list(MISSING))
def test_a_checkpoint_that_lacks_a_state_the_run_needs_is_one_line_unless_told(stopped, tmp_path, capsys, caplog,
                                                                                 piece, one_thread):
    data, ckpt = stopped
    keys, flags, words, way = MISSING[piece]
    state = torch.load(ckpt, weights_only=True)
    assert all(k in state for k in keys)
    for k in keys:
        del state[k]
    path = tmp_path / 'c.pth.tar'
    torch.save(state, path)
    common = ['--experiment', 'r', '--epochs', '2', '--resume', str(path), *flags]
    tried = [[]] + ([['--resume-partial']] if way == '--no-resume-opt' else [])   # the other flag does not do
    for extra in tried:
        assert run(data, tmp_path / 'out', *common, *extra) == 2
        line = last_error(capsys)
        assert f'it lacks {words}, which an exact continuation needs' in line and way in line, line
        assert not (tmp_path / 'out').exists()
    assert run(data, tmp_path / 'out', *common, way) == 0
    rows = (tmp_path / 'out' / 'r' / 'summary.csv').read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith('1,')   # continued at epoch 1
    if way == '--resume-partial':
        assert f'lacks {words}: started afresh' in caplog.text


def test_the_library_names_what_a_checkpoint_lacks(stopped):
    import timm
    _, ckpt = stopped
    state = torch.load(ckpt, weights_only=True)
    model = timm.create_model('test_resnet', num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    del state['optimizer'], state['rng_state'], state['rng_states']
    torch.save(state, ckpt + '.partial')
    with pytest.raises(ValueError, match=r'lacks the optimizer state and the RNG states, .*--no-resume-opt.*'
                                         r'--resume-partial starts the RNG states afresh'):
        load_resume(ckpt + '.partial', model, opt)
    resumed = load_resume(ckpt + '.partial', model, None, partial=True)
    assert resumed.afresh == ['the RNG states'] and resumed.epoch == 1


# ---------------------------------------------------------------------------------------------
# crafted checkpoint contents
# ---------------------------------------------------------------------------------------------
def _bad_rng(state):
    state['rng_states'][0]['torch'] = torch.zeros(7, dtype=torch.uint8)


def _bad_numpy(state):
    state['rng_state'] = dict(state['rng_state'], numpy='MT19937')   # (a copy: rng_states[0] is the same dict)


CRAFTED = {   # what is changed -> the words of the line
    'negative epoch': (lambda s: s.update(epoch=-3), 'its epoch is -3, not a completed epoch'),
    'epoch as text': (lambda s: s.update(epoch='1'), "its epoch is '1', not a completed epoch"),
    'malformed RNG state': (_bad_rng, 'the RNG state of rank 0 (rng_states) is malformed'),
    'malformed numpy state': (_bad_numpy, 'its RNG state (rng_state) is malformed'),
    'RNG states not a list': (lambda s: s.update(rng_states='x'), 'its RNG states (rng_states) are a str'),
    'empty EMA state': (lambda s: s.update(state_dict_ema={}), 'its EMA weights (state_dict_ema) are empty'),
    'EMA of another model': (lambda s: s.update(state_dict_ema={'w': torch.zeros(1)}),
                             'its EMA weights (state_dict_ema) do not fit the model: missing keys'),
}


@pytest.mark.parametrize('case', list(CRAFTED))
def test_a_crafted_resume_file_is_one_line_before_anything_is_written(stopped, tmp_path, capsys, case):
    data, ckpt = stopped
    change, words = CRAFTED[case]
    state = torch.load(ckpt, weights_only=True)
    change(state)
    torch.save(state, tmp_path / 'c.pth.tar')
    assert run(data, tmp_path / 'out', '--experiment', 'r', '--epochs', '2', '--model-ema',
               '--resume', str(tmp_path / 'c.pth.tar')) == 2
    line = last_error(capsys)
    assert f"--resume '{tmp_path / 'c.pth.tar'}' cannot be loaded into this run: {words}" in line, line
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match=re.escape(words)):
        import timm
        check_resume_contents(state, timm.create_model('test_resnet', num_classes=2))


def test_checking_an_rng_state_leaves_this_process_streams_alone():
    import random

    import numpy as np
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    other = get_rng_state()
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    check_rng_state(other)   # valid: tried, then put back
    with pytest.raises(ValueError, match='malformed'):
        check_rng_state(dict(other, python=[3, [1, 2], None]))   # fails after torch and numpy were set
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


# ---------------------------------------------------------------------------------------------
# one line instead of a traceback
# ---------------------------------------------------------------------------------------------
def test_plot_of_a_summary_with_non_utf8_bytes_is_one_line(tmp_path, capsys):
    from sam_on_timm.plot import main
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'summary.csv').write_bytes(b'epoch,train_loss,eval_top1\n0,1.0,5\xff0\n')
    assert main(['curves', str(tmp_path / 'run'), '--output', str(tmp_path / 'c.png')]) == 2
    line = last_error(capsys)
    assert "summary.csv' is not a UTF-8 text file (byte 0xff: invalid start byte)" in line, line
    assert not (tmp_path / 'c.png').exists()


@pytest.mark.parametrize('ema', [False, True])
def test_sharpness_of_non_finite_weights_is_refused(tmp_path, capsys, ema):
    import timm
    from sam_on_timm.sharpness import main
    model = timm.create_model('test_resnet', num_classes=2)
    sd = model.state_dict()
    bad = {k: v.clone() for k, v in sd.items()}
    name = next(k for k, v in bad.items() if v.is_floating_point() and v.numel() > 3)
    bad[name].view(-1)[3] = float('nan')
    ckpt = tmp_path / 'run' / 'last.pth.tar'
    ckpt.parent.mkdir()
    torch.save({'arch': 'test_resnet', 'args': {'model': 'test_resnet', 'num_classes': 2},
                'state_dict': sd if ema else bad, 'state_dict_ema': bad}, ckpt)
    argv = ['--checkpoint', str(ckpt), '--data-dir', str(tmp_path), '--n-examples', '4', '--m', '4']
    assert main(argv + (['--ema'] if ema else [])) == 2
    line = last_error(capsys)
    assert f'are not finite: {name} holds nan or inf (a diverged run)' in line, line
    assert sorted(os.listdir(ckpt.parent)) == ['last.pth.tar']   # no JSON


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason='needs torch.distributed gloo')
def test_a_rank_killed_under_torchrun_is_named_by_the_survivor_in_one_line(tmp_path):
    """Rank 1 SIGKILLed at its second update: rank 0's broken collective (gloo: connection reset) is one
    line naming rank 1 and its pid (the pid torchrun reports), no traceback from rank 0."""
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=2)
    wrapper = tmp_path / 'kill_rank_1.py'
    wrapper.write_text(
        'import os, signal, sys\n'
        f'sys.path.insert(0, {ROOT!r})\n'
        'import sam_on_timm.train_step as ts\n'
        'import train\n'
        "if os.environ.get('RANK') == '1':\n"
        '    calls, real = [], ts.train_step\n'
        '    def dying_train_step(*a, **k):\n'
        '        calls.append(1)\n'
        '        if len(calls) == 2:\n'
        '            os.kill(os.getpid(), signal.SIGKILL)\n'
        '        return real(*a, **k)\n'
        '    ts.train_step = dying_train_step\n'
        'sys.exit(train.main())\n')
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                            'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    # --monitor-interval 3: torchrun stops the survivor 3 s after it sees rank 1 gone (default 0.1 s), so the
    # test does not race the survivor's line against torchrun's SIGTERM
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--monitor-interval',
           '3', str(wrapper), '--data-dir', data, '--output', str(tmp_path / 'out'), '--experiment', 'k',
           *BASE, '-b', '2', '--epochs', '1']
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = r.stdout + r.stderr
    assert r.returncode != 0
    # torchrun names rank 1's pid either as the first failure or, when rank 0's exit reached it first, in
    # its summary of failures ('rank : 1 (local_rank: 1)' then 'exitcode : -9 (pid: N)')
    pid = (re.search(r'local_rank: 1 \(pid: (\d+)\)', log)
           or re.search(r'rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -?\d+ \(pid: (\d+)\)', log))
    assert pid, log[-3000:]
    lines = [x for x in log.splitlines() if x.startswith('train.py: error:')]
    assert lines == [f'train.py: error: rank 1 (pid {pid.group(1)}) ended (killed or crashed: see its own output '
                     f'for the cause); rank 0 stops too, the checkpoints are those of the epochs completed before'], log
    assert '[rank0]' not in log and log.count('Traceback') <= 1, log[-3000:]   # (torchrun's own report)


def test_another_runtime_error_keeps_its_traceback(tmp_path, monkeypatch):
    """Only a broken collective of a live process group becomes the one line: a bug of the run itself
    (here a RuntimeError in the epoch, with gloo's wording but no process group) is not hidden."""
    from sam_on_timm.peers import peer_failure
    data = make_image_folder(tmp_path / 'data', n_train=4, n_val=2)
    error = RuntimeError('[third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection reset by peer')
    assert peer_failure(error) is None

    def failing_epoch(*a, **k):
        raise error
    monkeypatch.setattr(train, 'train_one_epoch', failing_epoch)
    with pytest.raises(RuntimeError, match='Connection reset by peer'):
        run(data, tmp_path / 'out', '--experiment', 'e', '--epochs', '1')
    assert lock_holder(str(tmp_path / 'out' / 'e')) is None   # released on the way out
