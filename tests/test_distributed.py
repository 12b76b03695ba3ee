"""Per-GPU m-sharpness under DDP (docs/design.md, section 4), on CPU with the gloo backend.

One 2-process launch (``torch.multiprocessing.spawn``) runs every in-process check; its ranks write
what they saw to files and the tests below compare them across ranks. A second launch runs
``distributed_train.sh 2`` end to end. Both together take a few tens of seconds on 2 CPU cores.
"""
import csv
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs torch.distributed gloo'),
    pytest.mark.skipif(sys.platform == 'win32', reason='bash launcher and file:// rendezvous'),
]

WORLD = 2               # ranks
B = 4                   # per-rank batch
IMG = 64                # BatchNorm over 2-sample chunks is ill-conditioned at 16 px (1x1 maps at the last stage):
                        # there float32 rounding (order of the chunk sums) grows by x1e4 per update
NUM_CLASSES = 5
CHUNKS = (1, 1, 2, 2)   # chunks per rank in each update: 2 plain updates, then 2 with --grad-accum-steps-style chunks
OPTS = ('sgd', 'sam', 'sam-on-layerl2', 'msam', 'gsam-on', 'looksam', 'esam')
RHO = {'sam': 0.05, 'sam-on-layerl2': 0.5, 'msam': 0.05, 'gsam-on': 0.5, 'looksam': 0.05, 'esam': 0.05}
# the SAM family (docs/design.md, section 8): GSAM and LookSAM average their kept g over the ranks
FAMILY = {'gsam-on': dict(gsam_alpha=0.3, rho_min=0.1, lr_min=0.01), 'looksam': dict(interval=2, looksam_alpha=0.5),
          'esam': dict(esam_beta=0.5, esam_gamma=0.5)}
BUCKET_MB = 100         # the whole test_resnet (1.5 MB) in one DDP bucket: one hook call per all-reduce


# ---------------------------------------------------------------------------------------------
# what every rank runs (module level: torch.multiprocessing.spawn pickles it by name)
# ---------------------------------------------------------------------------------------------
def _make_model():
    import timm
    torch.manual_seed(0)
    # float64: the comparisons with one process must not depend on how this CPU's float32 kernels round
    return timm.create_model('test_resnet', num_classes=NUM_CLASSES).double()   # BatchNorm, zero-init last gamma


def _make_opt(model, name):
    import sam_on_timm  # noqa: F401  (registers the SAM names)
    from timm.optim import create_optimizer_v2
    kwargs = dict(lr=0.1, weight_decay=1e-4, momentum=0.9)
    if name in RHO:
        kwargs['rho'] = RHO[name]
    kwargs.update(FAMILY.get(name, {}))
    return create_optimizer_v2(model, opt=name, **kwargs)


def _global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * B, 3, IMG, IMG, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (WORLD * B,), generator=g)
    return x, y


def _clone(tensors):
    return [t.detach().clone() for t in tensors]


def _ddp_run(name, rank):
    """4 updates of train_step on a DDP test_resnet; returns what the parent compares across ranks."""
    from timm.utils import ModelEmaV3, distribute_bn
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    from sam_on_timm.train_step import find_sam, split_chunks, train_step

    model = _make_model()
    optimizer = _make_opt(model, name)                    # as train.py: optimizer and EMA on the bare model
    ema = ModelEmaV3(model, decay=0.9)
    ddp = DDP(model, device_ids=None, bucket_cap_mb=BUCKET_MB)

    counts = dict(allreduce=0, broadcast=0)

    def counting_hook(state, bucket):                      # torch's default all-reduce, counted
        state['allreduce'] += 1
        return allreduce_hook(None, bucket)
    ddp.register_comm_hook(counts, counting_hook)
    broadcast = ddp._distributed_broadcast_coalesced       # DDP's forward buffer broadcast (BN stats)

    def counting_broadcast(*args, **kwargs):
        counts['broadcast'] += 1
        return broadcast(*args, **kwargs)
    ddp._distributed_broadcast_coalesced = counting_broadcast

    eps_log = []
    sam = find_sam(optimizer)
    if sam is not None:
        perturb = sam.perturb

        def logging_perturb(grads=None, found_inf=None, **kwargs):   # the perturbation each rank / chunk applies
            before = _clone(sam.perturbed)
            eps_norm = perturb(grads, found_inf, **kwargs)
            eps_log.append(dict(norm=eps_norm.detach().clone(),
                                eps=torch.cat([(p.detach() - b).flatten() for p, b in zip(sam.perturbed, before)])))
            return eps_norm
        sam.perturb = logging_perturb

    out = dict(allreduce=[], broadcast=[], grads=[], eps=eps_log)
    for step, k in enumerate(CHUNKS):
        x, y = _global_batch(step)
        x, y = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]
        before = dict(counts)
        # sequential: the eps log hooks SAM.perturb (the batched path: tests/test_batched_chunks.py)
        train_step(ddp, optimizer, split_chunks(x, y, B // k), F.cross_entropy, chunk_path='sequential')
        out['allreduce'].append(counts['allreduce'] - before['allreduce'])
        out['broadcast'].append(counts['broadcast'] - before['broadcast'])
        out['grads'].append(_clone(p.grad for p in model.parameters()))   # the averaged descent gradient
        ema.update(ddp, step=step + 1)
        if step == CHUNKS.index(2) - 1:
            out['params_one_chunk'] = _clone(model.parameters())   # after the updates with one chunk per rank

    out['params'] = _clone(model.parameters())
    out['ema_params'] = _clone(ema.module.parameters())
    out['buffers_local'] = _clone(model.buffers())
    out['ema_buffers_local'] = _clone(ema.module.buffers())
    distribute_bn(ddp, WORLD, reduce=True)                 # what train.py does at epoch end
    distribute_bn(ema, WORLD, reduce=True)
    out['buffers'] = _clone(model.buffers())
    out['ema_buffers'] = _clone(ema.module.buffers())
    out['buffer_names'] = [n for n, _ in model.named_buffers()]
    return out


def _reference_run(name):
    """One process, no DDP: the global batch of every update cut into WORLD * k chunks."""
    from sam_on_timm.train_step import split_chunks, train_step
    model = _make_model()
    optimizer = _make_opt(model, name)
    out = {}
    for step, k in enumerate(CHUNKS):
        x, y = _global_batch(step)
        train_step(model, optimizer, split_chunks(x, y, B // k), F.cross_entropy, chunk_path='sequential')
        if step == CHUNKS.index(2) - 1:
            out['params_one_chunk'] = _clone(model.parameters())
    out['params'] = _clone(model.parameters())
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = {name: _ddp_run(name, rank) for name in OPTS}
        if rank == 0:   # same process, same thread settings as the DDP runs
            result['reference'] = {name: _reference_run(name) for name in OPTS}
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='module')
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp('ddp')
    mp.spawn(_worker, args=(WORLD, str(d / 'rendezvous'), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f'rank{r}.pt', weights_only=True) for r in range(WORLD)]


def _all_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _max_abs_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# replicas stay identical
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', OPTS)
def test_parameters_bit_identical_across_ranks(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert _all_equal(r0['params'], r1['params'])
    assert not _all_equal(r0['params'], _clone(_make_model().parameters()))   # it did train


@pytest.mark.parametrize('name', OPTS)
def test_descent_gradients_identical_after_all_reduce(ranks, name):
    for step in range(len(CHUNKS)):
        assert _all_equal(ranks[0][name]['grads'][step], ranks[1][name]['grads'][step]), f'update {step}'


@pytest.mark.parametrize('name', OPTS)
def test_bn_buffers_identical_after_distribute_bn(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    # each rank normalises its own batch, so the running statistics drift apart between updates ...
    diverged = [n for n, a, b in zip(r0['buffer_names'], r0['buffers_local'], r1['buffers_local'])
                if not torch.equal(a, b)]
    assert any('running_mean' in n for n in diverged)
    assert not any('num_batches_tracked' in n for n in diverged)
    # ... and distribute_bn (epoch end in train.py) makes them identical again
    assert _all_equal(r0['buffers'], r1['buffers'])


@pytest.mark.parametrize('name', OPTS)
def test_ema_identical_across_ranks(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    assert _all_equal(r0['ema_params'], r1['ema_params'])
    assert not _all_equal(r0['ema_params'], r0['params'])
    # the EMA averages each rank's own BN statistics: train.py runs distribute_bn on the EMA too
    assert not _all_equal(r0['ema_buffers_local'], r1['ema_buffers_local'])
    assert _all_equal(r0['ema_buffers'], r1['ema_buffers'])


# ---------------------------------------------------------------------------------------------
# m-sharpness: each rank (and chunk) perturbs with its own gradient
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['sam', 'sam-on-layerl2'])
def test_perturbations_differ_across_ranks(ranks, name):
    e0, e1 = ranks[0][name]['eps'], ranks[1][name]['eps']
    assert len(e0) == len(e1) == sum(CHUNKS)       # one perturbation per chunk
    for a, b in zip(e0, e1):
        assert a['norm'] > 0 and b['norm'] > 0
        assert not torch.equal(a['eps'], b['eps'])
        if name == 'sam':   # ||eps|| = rho: only the direction tells the ranks apart
            assert abs(a['norm'].item() - RHO[name]) < 1e-6 and abs(b['norm'].item() - RHO[name]) < 1e-6
        else:
            assert not torch.equal(a['norm'], b['norm'])
    # within a rank, the two chunks of an update perturb differently as well
    assert not torch.equal(e0[-1]['eps'], e0[-2]['eps'])


@pytest.mark.parametrize('name', ['sam', 'sam-on-layerl2', 'msam', 'gsam-on', 'looksam', 'esam'])
def test_two_ranks_match_one_rank_with_chunks(ranks, name):
    """2 ranks x batch 4 == 1 rank x batch 8 in chunks of 4; then 2 ranks x 2 chunks of 2 == 1 rank x 4 chunks of 2."""
    ref = ranks[0]['reference'][name]
    for r in range(WORLD):
        one = _max_abs_diff(ranks[r][name]['params_one_chunk'], ref['params_one_chunk'])
        two = _max_abs_diff(ranks[r][name]['params'], ref['params'])
        print(f'\n{name} rank {r}: max |w_ddp - w_1rank| = {one:.3g} after 2 updates 2x4 vs 1x(2x4), '
              f'{two:.3g} after 2 more 2x(2x2) vs 1x(4x2)')
        assert one < 1e-12 and two < 1e-12


def test_sgd_reference_matches_too(ranks):
    diff = _max_abs_diff(ranks[0]['sgd']['params'], ranks[0]['reference']['sgd']['params'])
    print(f'\nsgd: max |w_ddp - w_1rank| = {diff:.3g}')
    assert diff < 1e-12


# ---------------------------------------------------------------------------------------------
# communication: exactly what SGD does
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['sam', 'sam-on-layerl2', 'msam', 'gsam-on', 'looksam', 'esam'])
def test_one_gradient_all_reduce_per_update(ranks, name):
    """DDP's own gradient all-reduce, counted by its comm hook. (GSAM / LookSAM add one of their kept g, of
    P's size, outside DDP: docs/design.md, section 8.)"""
    for r in range(WORLD):
        sgd, sam = ranks[r]['sgd'], ranks[r][name]
        assert sam['allreduce'] == sgd['allreduce'] == [1] * len(CHUNKS)    # one bucket, one all-reduce
        assert sam['broadcast'] == sgd['broadcast'] == [1] * len(CHUNKS)    # DDP's BN buffer broadcast


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------
def _write_image_folder(root: Path, n_per_class: int, classes=('a', 'b')):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / c / f'{i}.png')


def _launcher_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('NNODES', 'NODE_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHRUN_ARGS', 'RANK', 'WORLD_SIZE',
                        'LOCAL_RANK')}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS='1', **extra)
    return env


def _launch_cmd(tmp_path, *args):
    """distributed_train.sh 2 on CPU over a tiny generated ImageFolder, plus ``args``."""
    data = tmp_path / 'data'
    _write_image_folder(data / 'train', 8)
    _write_image_folder(data / 'validation', 4)
    return [str(REPO / 'distributed_train.sh'), '2', '--data-dir', str(data), '--device', 'cpu',
            '--model', 'test_resnet', '--img-size', '32', '--workers', '0', '--opt', 'sam-on-layerl2',
            '--warmup-epochs', '0', '--output', str(tmp_path / 'out'), *args]


def test_distributed_train_sh_end_to_end(tmp_path):
    cmd = _launch_cmd(tmp_path, '-b', '4', '--epochs', '1', '--sam-m', '2', '--model-ema', '--grad-accum-steps', '2',
                      '--channels-last', '--amp', '--amp-dtype', 'bfloat16', '--experiment', 'x')
    r = subprocess.run(cmd, cwd=tmp_path, env=_launcher_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    log = r.stdout + r.stderr
    assert 'rank 1 of 2' in log
    assert 'broadcast_buffers' not in log   # torch's deprecation FutureWarning, once per rank
    run_dir = tmp_path / 'out' / 'x'
    assert (run_dir / 'summary.csv').is_file()
    with open(run_dir / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 'train_sharpness' in rows[0] and 'train_eps_norm' in rows[0]
    # the log line at the epoch's last update shows both ranks' averages, as the summary does (not rank 0's)
    last = [line for line in log.splitlines() if 'Train: 0 [' in line][-1]
    shown = dict(zip(*[iter(last.split('%)]')[1].replace('|eps|', 'eps').split())] * 2))
    assert float(shown['loss']) == pytest.approx(float(rows[0]['train_loss']), abs=1e-4), (last, rows[0])
    assert float(shown['ascent-loss']) == pytest.approx(float(rows[0]['train_ascent_loss']), abs=1e-4), (last, rows[0])
    ckpt = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['args']['world_size'] == 2 and ckpt['args']['distributed'] is True
    assert ckpt['epoch'] == 0
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])   # unwrapped from DDP
    assert 'state_dict_ema' in ckpt
    # each rank's own random streams are saved (ranks are seeded differently)
    assert len(ckpt['rng_states']) == 2
    assert not torch.equal(ckpt['rng_states'][0]['torch'], ckpt['rng_states'][1]['torch'])


def test_distributed_stop_and_resume_equals_uninterrupted_run(tmp_path):
    base = _launch_cmd(tmp_path, '-b', '2', '--epochs', '2', '--reprob', '0.5', '--drop-path', '0.1')
    part = tmp_path / 'out' / 'part'
    for extra in (['--experiment', 'full'], ['--experiment', 'part', '--stop-epoch', '1'],
                  ['--experiment', 'part', '--resume', str(part / 'last.pth.tar')]):
        r = subprocess.run(base + extra, cwd=tmp_path, env=_launcher_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    a = torch.load(tmp_path / 'out' / 'full' / 'last.pth.tar', map_location='cpu', weights_only=True)
    b = torch.load(part / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1
    dw = max((a['state_dict'][k].double() - b['state_dict'][k].double()).abs().max().item() for k in a['state_dict'])
    assert dw < 1e-5, dw


def _fake_python(tmp_path):
    """A PYTHON that prints the arguments it was given instead of running torchrun."""
    fake = tmp_path / 'fake_python'
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    return str(fake)


def test_launcher_arguments(tmp_path):
    script, fake = str(REPO / 'distributed_train.sh'), _fake_python(tmp_path)

    def launch(*args, **env):
        r = subprocess.run([script, *args], env=dict(_launcher_env(**env), PYTHON=fake), capture_output=True, text=True)
        return r.returncode, r.stdout.split('\n')[:-1], r.stderr

    rc, argv, _ = launch('8', '-b', '64')
    assert rc == 0
    assert argv == ['-m', 'torch.distributed.run', '--standalone', '--nnodes=1', '--nproc_per_node=8',
                    str(REPO / 'train.py'), '-b', '64']
    rc, argv, _ = launch('8', '-c', 'x.yaml', NNODES='2', NODE_RANK='1', MASTER_ADDR='10.0.0.1')
    assert rc == 0
    assert argv[2:7] == ['--nnodes=2', '--node_rank=1', '--master_addr=10.0.0.1', '--master_port=29500',
                         '--nproc_per_node=8']
    rc, argv, _ = launch('4', TORCHRUN_ARGS='--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=h:29400 --rdzv-id=j')
    assert rc == 0
    assert argv[2:7] == ['--nnodes=2', '--rdzv-backend=c10d', '--rdzv-endpoint=h:29400', '--rdzv-id=j',
                         '--nproc_per_node=4']
    for bad_args, bad_env in ((), {}), (('-b', '64'), {}), (('0',), {}), (('8',), dict(NNODES='2')):
        rc, argv, err = launch(*bad_args, **bad_env)
        assert rc == 2 and argv == [] and ('usage' in err or 'error' in err)
