"""timm's train.py options beyond the core ones, each shown having its effect with a SAM --opt.

Every run records what ``train.train_one_epoch`` was handed (model, loader, optimizer, loss) and the
chunks ``train_step`` saw, so the tests look at the built objects and the trained pixels rather than at
the flags; options that act only where the tests cannot go (iterable / Hugging Face datasets, a CUDA
device) are shown reaching the timm call that takes them. A real offline wandb run is read back with
wandb's own reader.
"""
import csv
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import timm
import torch

import train
from sam_on_timm.train_step import find_sam, split_chunks

REPO = Path(__file__).resolve().parents[1]
BASE = ['--img-size', '16', '-b', '8', '--device', 'cpu', '--workers', '0', '--epochs', '1', '--warmup-epochs', '0',
        '--lr', '0.05', '--log-interval', '2', '--seed', '3', '--opt', 'sam-on-layerl2', '--rho', '0.5']


@pytest.fixture
def data16(tmp_path):
    """16 training images, each its own class (a label names the image), 32 px; 8 validation images."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(0)
    for split, n in (('train', 16), ('validation', 8)):
        for c in range(n):
            os.makedirs(tmp_path / 'data16' / split / f'class{c:02d}')
            img = rng.randint(0, 256, size=(32, 32, 3)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / 'data16' / split / f'class{c:02d}' / 'img.png')
    return str(tmp_path / 'data16')


@pytest.fixture
def record(monkeypatch):
    """What train_one_epoch and train_step were handed, per call."""
    import sam_on_timm.train_step as ts
    seen = types.SimpleNamespace(epochs=[], chunks=[])
    one_epoch, step = train.train_one_epoch, ts.train_step

    def recording_one_epoch(epoch, model, loader, optimizer, loss_fn, args, *a, **k):
        seen.epochs.append(dict(model=model, loader=loader, optimizer=optimizer, loss_fn=loss_fn, args=args,
                                model_ema=a[4], mixup_fn=a[5]))
        return one_epoch(epoch, model, loader, optimizer, loss_fn, args, *a, **k)

    def recording_step(model, optimizer, chunks, *a, **k):
        seen.chunks.extend((x.clone(), y) for x, y in chunks)
        return step(model, optimizer, chunks, *a, **k)

    monkeypatch.setattr(train, 'train_one_epoch', recording_one_epoch)
    monkeypatch.setattr(ts, 'train_step', recording_step)
    return seen


def run(data, out, *extra):
    return train.main(['--data-dir', data, '--output', str(out), '--num-classes', '16', *BASE, *extra])


def summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_split_chunks_keep_each_images_splits_together():
    """AugMix rows come as [clean | aug1 | aug2], B images each: a chunk of m images holds those m images'
    rows of every split, in the same layout (what JsdCrossEntropy and SplitBatchNorm2d cut apart)."""
    B, S, m = 4, 3, 2
    x = torch.arange(B * S).float().view(-1, 1) + 100 * torch.arange(S).repeat_interleave(B).view(-1, 1)
    y = torch.arange(B).repeat(S)
    chunks = split_chunks(x, y, m * S, splits=S)
    assert len(chunks) == B // m
    for j, (cx, cy) in enumerate(chunks):
        rows = [s * B + j * m + i for s in range(S) for i in range(m)]
        assert torch.equal(cx, x[rows]) and torch.equal(cy, y[rows])
        assert torch.equal(cy, torch.arange(j * m, (j + 1) * m).repeat(S))   # each split: the same m images
    with pytest.raises(ValueError, match='cannot hold 3 equal splits'):
        split_chunks(x, y, 4, splits=3)


def test_rsb_a2_style_recipe(data16, tmp_path, record):
    """LAMB base, BCE with a target threshold, repeated augmentation (one rank), RandAugment, mixup/cutmix."""
    assert run(data16, tmp_path, '--experiment', 'a2', '--sam-base', 'lamb', '--bce-loss', '--bce-target-thresh', '0.2',
               '--aug-repeats', '3', '--aa', 'rand-m7-mstd0.5-inc1', '--mixup', '0.1', '--cutmix', '1.0',
               '--smoothing', '0', '--drop-path', '0.05', '--weight-decay', '0.02', '--opt-eps', '1e-6') == 0
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.loss import BinaryCrossEntropy
    e = record.epochs[0]
    assert isinstance(e['loss_fn'], BinaryCrossEntropy) and e['loss_fn'].target_threshold == 0.2
    sampler = e['loader'].sampler
    assert isinstance(sampler, RepeatAugSampler) and sampler.num_repeats == 3 and sampler.num_replicas == 1
    expected = RepeatAugSampler(e['loader'].dataset, num_replicas=1, rank=0, num_repeats=3)
    expected.set_epoch(0)
    assert list(sampler) == list(expected) and len(set(sampler)) < len(list(sampler))   # images repeated
    assert 'RandAugment' in str(e['loader'].dataset.transform)
    assert e['mixup_fn'].mixup_alpha == 0.1 and e['mixup_fn'].cutmix_alpha == 1.0
    sam = find_sam(e['optimizer'])
    assert type(sam.base_optimizer).__name__ == 'Lamb' and sam.base_optimizer.defaults['eps'] == 1e-6
    assert len(record.chunks) == 2 and all(y.shape == (8, 16) for _, y in record.chunks)   # mixed soft targets
    row = summary(tmp_path / 'a2' / 'summary.csv')[0]
    assert float(row['train_eps_norm']) > 0


def test_deit_style_recipe(data16, tmp_path, record):
    """ViT, AdamW base, repeated augmentation, mixup/cutmix, random erasing, EMA."""
    assert run(data16, tmp_path, '--experiment', 'deit', '--model', 'test_vit', '--sam-base', 'adamw',
               '--aug-repeats', '3', '--mixup', '0.8', '--cutmix', '1.0', '--reprob', '0.25', '--remode', 'pixel',
               '--model-ema', '--model-ema-decay', '0.9', '--smoothing', '0.1', '--aa', 'rand-m9-mstd0.5-inc1',
               '--weight-decay', '0.05', '--drop-path', '0.1') == 0
    from timm.data.distributed_sampler import RepeatAugSampler
    from timm.loss import SoftTargetCrossEntropy
    e = record.epochs[0]
    assert isinstance(e['loss_fn'], SoftTargetCrossEntropy) and isinstance(e['loader'].sampler, RepeatAugSampler)
    assert 'RandomErasing' in str(e['loader'].dataset.transform) and e['mixup_fn'].label_smoothing == 0.1
    assert type(find_sam(e['optimizer']).base_optimizer).__name__ == 'AdamW'
    assert e['model_ema'] is not None and 'eval_ema_top1' in summary(tmp_path / 'deit' / 'summary.csv')[0]
    sam = find_sam(e['optimizer'])
    assert {id(p) for p in sam.perturbed} == {id(p) for m in e['model'].modules()
                                              if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}


def test_augmix_jsd_recipe_with_split_bn(data16, tmp_path, record):
    """--aug-splits 3 --jsd-loss --split-bn: split BatchNorms in the model, SAM-ON perturbs the affine
    parameters of every one of them (auxiliary ones included), and each SAM chunk keeps its images' splits."""
    from timm.layers import SplitBatchNorm2d
    from timm.loss import JsdCrossEntropy
    assert run(data16, tmp_path, '--experiment', 'augmix', '--sam-base', 'momentum', '--aug-splits', '3', '--jsd-loss',
               '--split-bn', '--aa', 'augmix-m3-w1', '--sam-m', '4', '--smoothing', '0.1') == 0
    e = record.epochs[0]
    assert isinstance(e['loss_fn'], JsdCrossEntropy) and e['loss_fn'].num_splits == 3
    splits = [m for m in e['model'].modules() if isinstance(m, SplitBatchNorm2d)]
    assert splits and all(len(m.aux_bn) == 2 for m in splits)
    assert not any(type(m) is torch.nn.BatchNorm2d and m not in {a for s in splits for a in s.aux_bn}
                   for m in e['model'].modules())
    sam = find_sam(e['optimizer'])
    bn_params = {id(p) for s in splits for p in s.parameters()}   # weight, bias of the main and the two aux BNs
    assert {id(p) for p in sam.perturbed} == bn_params and len(bn_params) == 6 * len(splits)
    assert all(not torch.equal(a.weight, torch.ones_like(a.weight)) for s in splits for a in s.aux_bn)   # trained
    assert len(record.chunks) == 2 * 2
    for x, y in record.chunks:   # 4 images x 3 splits, split after split
        assert x.shape[0] == 12 and torch.equal(y[0:4], y[4:8]) and torch.equal(y[0:4], y[8:12])
        assert len(set(y[0:4].tolist())) == 4 and not torch.equal(x[0:4], x[4:8])   # clean and augmented views


def test_model_optimizer_and_ema_options_reach_their_objects(data16, tmp_path, record):
    assert run(data16, tmp_path, '--experiment', 'mo', '--model', 'test_efficientnet', '--bn-momentum', '0.2',
               '--bn-eps', '1e-3', '--model-kwargs', 'channel_multiplier=1.5',
               '--sam-base', 'sgd', '--opt-kwargs', 'nesterov=False', '--model-ema', '--model-ema-force-cpu',
               '--save-images', '--log-interval', '1') == 0
    e = record.epochs[0]
    model = e['model']
    assert model.num_features == 384   # 256 at channel_multiplier 1.0
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.2 and m.eps == 1e-3 for m in bns)
    assert find_sam(e['optimizer']).base_optimizer.param_groups[0]['nesterov'] is False   # timm's sgd: True
    assert e['model_ema'].device == torch.device('cpu')
    row = summary(tmp_path / 'mo' / 'summary.csv')[0]
    assert 'eval_ema_top1' not in row   # as timm: an EMA forced to the CPU is not validated
    assert os.path.isfile(tmp_path / 'mo' / 'train-batch-1.jpg')


def test_schedule_ema_clip_and_checkpoint_options_as_used(data16, tmp_path, record, monkeypatch, one_thread):
    """One 3-epoch run, each option read where timm uses it and compared to a value computed here:

    --warmup-lr, --min-lr, --cooldown-epochs, --layer-decay: the lr of every parameter group at every update is
    the cosine schedule written out here (epoch 0 the warmup lr, epoch 1 halfway to --min-lr, the cooldown epoch
    --min-lr) times the group's layer-decay scale (0.5 per layer group from the head down);
    --model-ema-decay --model-ema-warmup: the decay each EMA update applied, timm's warmup rule at update k;
    --clip-grad --clip-mode value: the value and mode the clipping call got at every update;
    --mixup --mixup-off-epoch 1 --smoothing 0.2: from epoch 1 on, the targets are the smoothed one-hot labels;
    --checkpoint-hist 1 --eval-metric loss: the one checkpoint kept is the epoch of the lowest EMA loss."""
    import sam_on_timm.train_step as ts
    from timm.utils import ModelEmaV3
    lrs, clips, decays = [], [], []
    step, clip, apply_update = ts.train_step, ts._clip, ModelEmaV3.apply_update_

    def spy_step(model, optimizer, chunks, *a, **k):
        lrs.append([(g['lr'], g.get('lr_scale', 1.0)) for g in optimizer.param_groups])
        return step(model, optimizer, chunks, *a, **k)

    monkeypatch.setattr(ts, 'train_step', spy_step)
    monkeypatch.setattr(ts, '_clip', lambda params, value, mode: clips.append((value, mode)) or clip(params, value,
                                                                                                      mode))
    monkeypatch.setattr(ModelEmaV3, 'apply_update_', lambda self, m, decay: decays.append(decay) or
                        apply_update(self, m, decay))
    record.chunks.clear()
    assert run(data16, tmp_path, '--experiment', 'sched', '--epochs', '2', '--cooldown-epochs', '1', '--sched',
               'cosine', '--warmup-epochs', '1', '--warmup-lr', '0.01', '--min-lr', '0.002', '--layer-decay', '0.5',
               '--model-ema', '--model-ema-decay', '0.5', '--model-ema-warmup', '--clip-grad', '0.5', '--clip-mode',
               'value', '--mixup', '1.0', '--mixup-off-epoch', '1', '--smoothing', '0.2', '--checkpoint-hist', '1',
               '--eval-metric', 'loss') == 0
    base, low = 0.05, 0.002
    want = [0.01, low + 0.5 * (base - low) * (1 + math.cos(math.pi * 1 / 2)), low]   # per epoch; 2 updates each
    assert len(lrs) == 6
    for i, groups in enumerate(lrs):
        assert all(lr == pytest.approx(want[i // 2] * scale, rel=1e-12) for lr, scale in groups), (i, groups)
    scales = sorted({scale for g in lrs for _, scale in g})
    assert scales[-1] == 1.0 and len(scales) > 2 and all(a == pytest.approx(b / 2) for a, b in zip(scales, scales[1:]))
    # ModelEmaV3's warmup: update k (from 1) decays by min(1 - k^(-2/3), 0.5), 0 at the first (a copy); the default
    # decay 0.9998 or no update count (the fixed decay) would differ at every update
    assert decays == pytest.approx([0.0] + [min(1 - k ** (-2 / 3), 0.5) for k in range(2, 7)], rel=1e-12)
    assert clips == [(0.5, 'value')] * 6
    assert len(record.chunks) == 6
    for x, y in record.chunks[2:]:   # mixup off: each target the smoothed one-hot of one label
        assert torch.allclose(y, torch.full_like(y, 0.2 / 16) + 0.8 * (y == y.max(1, keepdim=True).values), atol=1e-7)
        assert ((y == y.max(1, keepdim=True).values).sum(1) == 1).all()
    assert not torch.allclose(record.chunks[0][1].max(1).values, torch.full((8,), 0.8 + 0.2 / 16))   # epoch 0 mixed
    rows = summary(tmp_path / 'sched' / 'summary.csv')
    assert len(rows) == 3   # 2 epochs + 1 cooldown
    best = min(rows, key=lambda r: float(r['eval_ema_loss']))['epoch']
    assert sorted(p.name for p in (tmp_path / 'sched').glob('checkpoint-*')) == [f'checkpoint-{best}.pth.tar']


@pytest.mark.parametrize('bce', [False, True])
def test_smoothing_reaches_the_training_loss(bce):
    """--smoothing 0.2 without mixup: the training loss is the smoothed one, recomputed here from log-softmax
    (cross-entropy: 0.8 * NLL + 0.2 * mean of -log p over the classes) or the sigmoid (BCE: targets
    0.2 / C off and 0.8 + 0.2 / C on); the validation loss is plain cross-entropy."""
    import torch.nn.functional as F
    args = train.parse_args(['--data-dir', 'x', '--smoothing', '0.2', *(['--bce-loss'] if bce else [])])
    train_loss, val_loss = train.create_losses(args, False, torch.device('cpu'))
    torch.manual_seed(0)
    out, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    logp = F.log_softmax(out, -1)
    if bce:
        target = torch.full_like(out, 0.2 / 5).scatter_(1, y[:, None], 0.8 + 0.2 / 5)
        want = F.binary_cross_entropy_with_logits(out, target)
    else:
        want = (0.8 * -logp.gather(1, y[:, None]).squeeze(1) + 0.2 * -logp.mean(-1)).mean()
    assert train_loss(out, y).item() == pytest.approx(want.item(), rel=1e-12)
    assert val_loss(out, y).item() == pytest.approx(F.nll_loss(logp, y).item(), rel=1e-12)


@pytest.mark.parametrize('on_updates', [False, True])
def test_resumed_schedule_continues_at_the_start_epoch(on_updates):
    """A run resumed at epoch 2 of a 4-epoch cosine with a 1-epoch warmup (3 updates an epoch) starts at the lr
    written out here, 0.1 * (1 + cos(pi * 2 / 4)) / 2 = 0.05, per epoch or per update alike (not the warmup
    start, and not update 2 of the warmup); --start-epoch does the same without a checkpoint."""
    from sam_on_timm.checkpoint import Resumed
    flags = ['--data-dir', 'x', '--sched', 'cosine', '--epochs', '4', '--warmup-epochs', '1', '--lr', '0.1',
             '--min-lr', '0', *(['--sched-on-updates'] if on_updates else [])]
    data = types.SimpleNamespace(loader_train=[None] * 3, loader_eval=None)
    want = 0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2
    for extra, resumed in (([], Resumed(checkpoint={'epoch': 1}, epoch=2)), (['--start-epoch', '2'], Resumed())):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = train.create_schedule(train.parse_args(flags + extra), optimizer, data, resumed)
        assert (schedule.start_epoch, schedule.num_epochs, schedule.updates_per_epoch) == (2, 4, 3)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(want, rel=1e-12), extra


def test_head_init_and_tta_in_validation(data16, tmp_path, monkeypatch):
    """--head-init-bias with --head-init-scale 0: the untrained model predicts the bias for every image;
    --tta 2 averages pairs of outputs and keeps one target per pair (as timm's validate)."""
    outputs = []
    validate = train.validate

    def recording_validate(model, loader, loss_fn, args, *a):
        metrics = validate(model, loader, lambda out, y: outputs.append((out.clone(), y.clone())) or loss_fn(out, y),
                           args, *a)
        return metrics

    monkeypatch.setattr(train, 'validate', recording_validate)
    assert run(data16, tmp_path, '--experiment', 't', '--opt', 'sgd', '--lr', '0', '--head-init-scale', '0',
               '--head-init-bias', '0.25', '--tta', '2', '-vb', '4') == 0
    out, y = outputs[0]
    assert out.shape == (2, 16) and y.shape == (2,)   # -vb 4: 4 images, 2 pairs
    assert torch.allclose(out, torch.full_like(out, 0.25))


def test_recovery_checkpoint_resumes_and_val_interval(data16, tmp_path):
    """--recovery-interval 1 writes recovery-EPOCH-UPDATE files (the last two kept); --resume of the one at the
    epoch's last update continues at the next epoch (timm's rule) with the weights of that epoch's checkpoint.
    --val-interval 2: no validation, summary row or checkpoint in epoch 0."""
    common = ['--experiment', 'r', '--recovery-interval', '1', '--val-interval', '2']
    assert run(data16, tmp_path, *common, '--epochs', '2') == 0
    d = tmp_path / 'r'
    rows = summary(d / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['1']
    # the schedule stepped after the unvalidated epoch too: epoch 1 of the 2-epoch cosine, half the base lr
    assert float(rows[0]['lr']) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)), rel=1e-9)
    assert not (d / 'checkpoint-0.pth.tar').exists() and (d / 'checkpoint-1.pth.tar').exists()
    assert sorted(p.name for p in d.glob('recovery-*')) == ['recovery-1-0.pth.tar', 'recovery-1-1.pth.tar']
    rec = torch.load(d / 'recovery-1-1.pth.tar', weights_only=True)
    end = torch.load(d / 'checkpoint-1.pth.tar', weights_only=True)
    assert rec['epoch'] == 1 and all(torch.equal(v, end['state_dict'][k]) for k, v in rec['state_dict'].items())
    mid = torch.load(d / 'recovery-1-0.pth.tar', weights_only=True)
    assert any(not torch.equal(v, end['state_dict'][k]) for k, v in mid['state_dict'].items())
    assert run(data16, tmp_path, *common, '--epochs', '3', '--resume', str(d / 'recovery-1-1.pth.tar')) == 0
    assert [r['epoch'] for r in summary(d / 'summary.csv')] == ['1', '2']


def test_distillation_perturbs_the_student_only_and_calls_the_teacher_once_per_chunk(data16, tmp_path, record,
                                                                                     monkeypatch):
    from sam_on_timm.distill import LogitDistillation
    from timm.task.distillation import DistillationTeacher
    torch.manual_seed(7)
    teacher = timm.create_model('test_resnet', num_classes=16)
    path = tmp_path / 'teacher.pth'
    torch.save(teacher.state_dict(), path)
    calls = []
    forward = DistillationTeacher.forward
    monkeypatch.setattr(DistillationTeacher, 'forward',
                        lambda self, x, **k: calls.append(x.shape[0]) or forward(self, x, **k))
    assert run(data16, tmp_path, '--experiment', 'kd', '--model', 'test_resnet', '--kd-model-name', 'test_resnet',
               '--kd-pretrained-path', str(path), '--sam-m', '4', '--kd-temperature', '2',
               '--task-loss-weight', '0.3') == 0
    e = record.epochs[0]
    loss_fn = e['loss_fn']
    assert isinstance(loss_fn, LogitDistillation)
    assert loss_fn.task.task_loss_weight == 0.3 and loss_fn.task.distill_loss_weight == pytest.approx(0.7)
    assert calls == [4] * len(record.chunks) and len(record.chunks) == 4   # 2 updates x 2 chunks, 2 passes each
    teacher_params = {id(p) for p in loss_fn.task.teacher.parameters()}
    sam = find_sam(e['optimizer'])
    assert sam.perturbed and not teacher_params & {id(p) for p in sam.perturbed}
    assert not teacher_params & {id(p) for g in e['optimizer'].param_groups for p in g['params']}
    for k, v in loss_fn.task.teacher.model.state_dict().items():   # never trained, never left perturbed
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_distillation_loss_is_timms_task_loss():
    """LogitDistillation with the teacher's logits given equals LogitDistillationTask's own forward."""
    from sam_on_timm.distill import LogitDistillation
    from timm.task import LogitDistillationTask
    torch.manual_seed(0)
    student, teacher = timm.create_model('test_vit', num_classes=5), timm.create_model('test_vit', num_classes=5)
    task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_loss_weight=0.6,
                                 task_loss_weight=0.9, temperature=3.0, verbose=False)
    task.train()
    student.eval()   # no dropout differences between the two forwards
    x, y = torch.randn(4, 3, 160, 160), torch.tensor([0, 1, 2, 4])
    kd = LogitDistillation(task)
    ours = kd(student(x), kd.targets(x, y))
    assert torch.allclose(ours, task(x, y)['loss'], atol=1e-6)
    assert torch.equal(kd.targets(x, y)[1:3].target, y[1:3])


def test_log_wandb_without_the_package_is_one_line(data16, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'wandb', None)   # not installed
    assert run(data16, tmp_path, '--experiment', 'w2', '--log-wandb') == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        ["train.py: error: --log-wandb needs the wandb package: pip install -e '.[wandb]'"]
    assert not (tmp_path / 'w2').exists()


def wandb_records(run_dir):
    """The records of an offline wandb run, read back from its .wandb file by wandb's own reader (the
    ``wandb leet inspect --json`` command line, one JSON record a line)."""
    r = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', str(run_dir)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{')]


def test_wandb_offline_run_holds_the_summary_rows(data16, tmp_path, monkeypatch, one_thread):
    """A real wandb run (offline: no network, its files in tmp_path): the history holds one row per epoch with
    every summary.csv column, the SAM ones (ascent loss, sharpness, ||eps||, skips) included, at the values
    summary.csv holds; the run has the project, tags, name and config train.py gave it, and is finished."""
    wandb = pytest.importorskip('wandb')
    from packaging.version import Version
    if Version(wandb.__version__) < Version('0.31'):
        pytest.skip(f'wandb {wandb.__version__}: reading an offline run back needs wandb >= 0.31 (wandb leet inspect)')
    for key, value in dict(WANDB_MODE='offline', WANDB_DIR=tmp_path, WANDB_CONFIG_DIR=tmp_path / 'config',
                           WANDB_CACHE_DIR=tmp_path / 'cache', WANDB_DATA_DIR=tmp_path / 'data', WANDB_CONSOLE='off',
                           WANDB_SILENT='true', WANDB_DISABLE_GIT='true', WANDB_X_DISABLE_STATS='true',
                           WANDB_X_DISABLE_MACHINE_INFO='true').items():
        monkeypatch.setenv(key, str(value))
    inits, init = [], wandb.init
    monkeypatch.setattr(wandb, 'init', lambda **kw: inits.append(kw) or init(**kw))
    try:
        assert run(data16, tmp_path, '--experiment', 'w', '--epochs', '2', '--log-wandb', '--wandb-project', 'p',
                   '--wandb-tags', 'a', 'b') == 0
        runs = list((tmp_path / 'wandb').glob('offline-run-*'))
        assert len(runs) == 1
        records = wandb_records(runs[0])   # before teardown, which would finish a run train.py left open
        rows = summary(tmp_path / 'w' / 'summary.csv')
        # --wandb-resume-id with --resume: the resumed run continues the first one's wandb id (resume='must';
        # offline, wandb keeps the id)
        run_id = runs[0].name.rsplit('-', 1)[1]
        assert run(data16, tmp_path, '--experiment', 'w', '--epochs', '3', '--log-wandb', '--wandb-project', 'p',
                   '--resume', str(tmp_path / 'w' / 'last.pth.tar'), '--wandb-resume-id', run_id) == 0
        resumed = set((tmp_path / 'wandb').glob('offline-run-*')) - set(runs)
        assert len(resumed) == 1 and resumed.pop().name.endswith(f'-{run_id}')
        assert [(kw['id'], kw['resume']) for kw in inits] == [(None, None), (run_id, 'must')]
    finally:
        wandb.teardown()   # the wandb service this process started
    # train.py finished the run (wandb.finish): the log is complete, with its exit code
    assert [r['exit'].get('exit_code', 0) for r in records if r['type'] == 'exit'] == [0], records[-3:]
    info = next(r['run'] for r in records if r['type'] == 'run')
    assert info['project'] == 'p' and info['tags'] == ['a', 'b'] and info['display_name'] == 'w'
    assert info['config']['update']['opt'] == 'sam-on-layerl2' and info['config']['update']['rho'] == 0.5
    history = [r['history']['item'] for r in records if r['type'] == 'history']
    assert len(history) == len(rows) == 2
    for logged, row in zip(history, rows):
        for column in ('train_ascent_loss', 'train_sharpness', 'train_eps_norm', 'train_skipped_perturbations'):
            assert column in logged, column
        for column, value in row.items():
            assert logged[column] == float(value), (column, logged[column], value)   # the same float64 numbers
    assert history[0]['train_eps_norm'] > 0 and history[0]['train_ascent_loss'] != history[0]['train_loss']


def test_wandb_init_failure_is_one_line_and_writes_nothing(data16, tmp_path, monkeypatch, capsys, one_thread):
    """A real wandb.init that fails (online mode, no API key anywhere: no network is reached) stops the run with
    one line naming --log-wandb, exit code 2, before the run folder is written (it was wandb's traceback, exit
    code 1, and a run folder holding args.yaml)."""
    wandb = pytest.importorskip('wandb')
    for key in ('WANDB_API_KEY', 'WANDB_IDENTITY_TOKEN_FILE'):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(WANDB_MODE='online', HOME=tmp_path, NETRC=tmp_path / 'netrc', WANDB_DIR=tmp_path,
                           WANDB_CONFIG_DIR=tmp_path / 'config', WANDB_CACHE_DIR=tmp_path / 'cache',
                           WANDB_DATA_DIR=tmp_path / 'data', WANDB_CONSOLE='off', WANDB_SILENT='true',
                           WANDB_DISABLE_GIT='true').items():
        monkeypatch.setenv(key, str(value))
    try:
        assert run(data16, tmp_path, '--model', 'test_resnet', '--experiment', 'nokey', '--log-wandb') == 2
    finally:
        wandb.teardown()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error: --log-wandb: wandb.init failed: ') and \
        'API key' in err[0], err
    assert not (tmp_path / 'nokey').exists()


@pytest.mark.parametrize('extra, message', [
    (['--drop-connect', '0.1'], '--drop-connect is deprecated'),
    (['--aug-splits', '1'], '--aug-splits must be 0 (off) or at least 2'),
    (['--jsd-loss'], '--jsd-loss compares the AugMix splits'),
    (['--split-bn'], '--split-bn needs --aug-splits'),
    (['--aug-splits', '2', '--mixup', '0.2'], 'mixing would cross the AugMix splits'),
    (['--aug-splits', '2', '--sam-ascent-frac', '0.5'], 'would break its splits'),
    (['--split-bn', '--resplit', '--sam-m', '1', '-b', '3'], 'must be even'),
    (['--torchscript'], '--torchscript with --opt sam-on-layerl2'),
    (['--model-dtype', 'float64'], '--model-dtype must be one of float32, bfloat16, float16'),
    (['--amp', '--model-dtype', 'bfloat16'], '--amp needs a float32 model'),
    (['--kd-model-name', 'test_resnet', '--kd-distill-type', 'token'], 'needs a student with a distillation token'),
    (['--naflex-loader'], "--naflex-loader needs a NaFlex model (one that takes patch dicts"),
    (['--train-img-sizes', '16', '24', '--train-batch-sizes', '8', '6', '--sam-m', '4'], 'must divide every scheduled'),
    (['--train-img-sizes', '16', '--grad-accum-steps', '2'], 'use --grad-accum-steps 1'),
    (['--worker-seeding', 'none'], "--worker-seeding must be 'all' or 'part'"),
    (['--train-crop-mode', 'rcc'], "--train-crop-mode must be rrc, rkrc or rkrr, got 'rcc'"),
    (['--fuser', 'nvfuserr'], "--fuser 'nvfuserr': Invalid jit fuser (nvfuserr) (valid: '', te, old, nvfuser)"),
    (['--target-key', 'label'], "unexpected keyword argument 'target_key'"),   # a folder's labels: its folders
    (['--input-img-mode', 'L'], "--input-img-mode 'L': the model takes 3-channel images"),
    (['--input-img-mode', 'XYZ'], 'PIL modes with 3 band(s): HSV, LAB, RGB, YCbCr'),
    (['--bce-target-thresh', 'nan'], '--bce-target-thresh must be a finite number'),
    (['--val-interval', '0'], '--val-interval must be >= 1'),
    (['--device-modules', 'no_such_backend_module'], "cannot import 'no_such_backend_module'"),
    (['--bn-momentum', '0.1'], "cannot create model 'test_resnet'"),
    # the model's RGB statistics for a 1-channel input (timm: a broadcast error in the loader's Normalize)
    (['--in-chans', '1'], "'test_resnet' takes 1-channel images, its mean and std have 3 values"),
    (['--input-size', '1', '16', '16', '--std', '0.5'], "'test_resnet' takes 1-channel images, its mean has 3"),
    (['--in-chans', '1', '--mean', '0.5', '0.5', '0.5', '--std', '0.5'], '--mean takes 1 value, got 3'),
    (['--in-chans', '4', '--mean', '0.5', '--std', '0.5'], 'a PIL mode with 4 bands (CMYK, RGBA'),
    (['--opt-kwargs', 'momentum=0.5'], 'cannot create optimizer'),
])
def test_bad_combinations_are_one_line_errors(data16, tmp_path, capsys, extra, message):
    assert run(data16, tmp_path, '--model', 'test_resnet', '--experiment', 'bad', *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'bad').exists()


def test_four_channel_input_normalized_per_channel(data16, tmp_path, record, one_thread):
    """--in-chans 4 with one --mean / --std value per channel and a 4-band --input-img-mode: the images reach the
    model as RGBA, each channel normalized with its own statistics (--mean took only 1 or 3 values before)."""
    import numpy as np
    from PIL import Image
    mean, std = (0.1, 0.2, 0.3, 0.4), (0.5, 0.25, 0.5, 0.25)
    assert run(data16, tmp_path, '--model', 'test_resnet', '--experiment', 'rgba', '--img-size', '32', '--in-chans',
               '4', '--mean', *map(str, mean), '--std', *map(str, std), '--input-img-mode', 'RGBA', '--no-aug') == 0
    x, y = record.chunks[0]
    assert x.shape[1] == 4
    pixels = x.double() * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
    assert torch.allclose(pixels[:, 3], torch.ones_like(pixels[:, 3]), atol=1e-6)   # the PNGs' alpha: opaque
    label = int(y[0])   # a label names its image (data16); --no-aug: the 32 px image itself
    img = Image.open(os.path.join(data16, 'train', f'class{label:02d}', 'img.png')).convert('RGB')
    expected = torch.from_numpy(np.asarray(img, dtype=np.float64)).permute(2, 0, 1) / 255
    assert torch.allclose(pixels[0, :3], expected, atol=1e-6)


def test_kwargs_options_from_the_command_line_and_yaml(tmp_path, capsys):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('model_kwargs: {channel_multiplier: 1.5}\nopt_kwargs: {nesterov: false}\nbce_loss: true\n'
                   'aug_repeats: 3\nworker_seeding: part\nkd_temperature: 2.0\n')
    args = train.parse_args(['-c', str(cfg), '--data-dir', str(tmp_path)])
    assert args.model_kwargs == {'channel_multiplier': 1.5} and args.opt_kwargs == {'nesterov': False}
    assert args.bce_loss and args.aug_repeats == 3 and args.worker_seeding == 'part' and args.kd_temperature == 2.0
    assert train.parse_args(['--model-kwargs', 'a=1', "b='x'", 'c=y']).model_kwargs == {'a': 1, 'b': 'x', 'c': 'y'}
    with pytest.raises(train.UsageError, match="--model-kwargs takes KEY=VALUE pairs, got 'oops'"):
        train.parse_args(['--model-kwargs', 'oops'])   # one line (train.py's error), not argparse's usage
    cfg.write_text('model_kwargs: [1, 2]\n')
    with pytest.raises(train.UsageError, match='takes a mapping of keyword arguments'):
        train.parse_args(['-c', str(cfg)])


RANK_SCRIPT = '''
import sys, torch
sys.path.insert(0, {repo!r})
import train, sam_on_timm.train_step as ts
step, seen, one_epoch, ddp = ts.train_step, [], train.train_one_epoch, []
def recording(model, optimizer, chunks, *a, **k):
    seen.extend(int(v) for _, y in chunks for v in y)
    return step(model, optimizer, chunks, *a, **k)
def counting_buffer_broadcasts(epoch, model, *a, **k):   # DDP's broadcast of rank 0's buffers before a forward
    broadcast = model._distributed_broadcast_coalesced
    model._distributed_broadcast_coalesced = lambda *b, **c: ddp.append(1) or broadcast(*b, **c)
    ddp.insert(0, model.broadcast_buffers)
    return one_epoch(epoch, model, *a, **k)
ts.train_step, train.train_one_epoch = recording, counting_buffer_broadcasts
rc = train.main(sys.argv[1:])
import os
with open(os.path.join({out!r}, 'labels-%s.txt' % os.environ['RANK']), 'w') as f:
    f.write(' '.join(map(str, seen)))
with open(os.path.join({out!r}, 'ddp-%s.txt' % os.environ['RANK']), 'w') as f:
    f.write('%s %d' % (ddp[0], len(ddp) - 1))
sys.exit(rc)
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='torchrun with gloo on CPU')
def test_repeated_augmentation_and_no_ddp_bb_on_two_gloo_ranks(data16, tmp_path):
    """Each of 2 ranks trains on exactly the images timm's RepeatAugSampler gives that rank (the labels
    name the images: one class per image). --no-ddp-bb: DDP never broadcasts rank 0's buffers (BatchNorm
    statistics) before a forward (without it: before every training forward)."""
    from timm.data import create_dataset
    from timm.data.distributed_sampler import RepeatAugSampler
    script = tmp_path / 'rank.py'
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                             'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(script),
           '--data-dir', data16, '--output', str(tmp_path / 'out'), '--num-classes', '16', *BASE, '-b', '4',
           '--val-split', '',
           '--aug-repeats', '3', '--no-aug', '--smoothing', '0', '--experiment', 'ra', '--no-ddp-bb']
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    dataset = create_dataset('', root=data16, split='train', is_training=True)
    labels = [dataset.reader.samples[i][1] for i in range(len(dataset))]
    seen = []
    for rank in range(2):
        sampler = RepeatAugSampler(dataset, num_replicas=2, rank=rank, num_repeats=3)
        sampler.set_epoch(0)
        expected = [labels[i] for i in sampler][:len(sampler) // 4 * 4]   # drop_last with -b 4
        got = [int(v) for v in (tmp_path / f'labels-{rank}.txt').read_text().split()]
        assert got == expected, (rank, got, expected)
        seen.append(set(got))
    assert seen[0] & seen[1]   # an image's repeats go to both ranks
    assert [(tmp_path / f'ddp-{rank}.txt').read_text() for rank in range(2)] == ['False 0'] * 2
    assert 'broadcast_buffers' not in r.stderr   # torch's deprecation FutureWarning, once per rank


def test_scheduled_resolution_keeps_the_sam_chunk_size(data16, tmp_path, monkeypatch):
    """--train-img-sizes / --train-batch-sizes: batches of 8 at 16 px and 4 at 24 px; --sam-m 4 cuts every
    batch into chunks of 4; --variable-batch-loss-scale linear scales each update's descent loss by batch / 6
    (6: the policy-average batch size), through the chunks' descent weights: the loss both passes take is
    the plain one (eps from the true gradient)."""
    import sam_on_timm.train_step as ts
    steps, step = [], ts.train_step

    def recording_step(model, optimizer, chunks, loss_fn, *a, **k):
        out, y = torch.zeros(2, 16), torch.tensor([0, 1])
        assert loss_fn(out, y).item() == pytest.approx(torch.nn.functional.cross_entropy(out, y).item())
        weights = k['chunk_weights']
        assert len(set(weights)) == 1 and len(weights) == len(chunks)
        steps.append(([tuple(x.shape) for x, _ in chunks], sum(weights)))
        return step(model, optimizer, chunks, loss_fn, *a, **k)

    monkeypatch.setattr(ts, 'train_step', recording_step)
    assert run(data16, tmp_path, '--experiment', 'vb', '--train-img-sizes', '16', '24', '--train-batch-sizes', '8',
               '4', '--sam-m', '4', '--variable-batch-loss-scale', 'linear', '--smoothing', '0',
               '--train-batches-per-epoch', '4', '--epochs', '2') == 0
    assert len(steps) == 8
    for shapes, scale in steps:
        assert len(set(shapes)) == 1 and shapes[0][0] == 4 and shapes[0][2] in (16, 24)
        batch = 4 * len(shapes)
        assert batch == (8 if shapes[0][2] == 16 else 4) and scale == pytest.approx(batch / 6)
    assert {s[0][0][2] for s in steps} == {16, 24}


def test_data_options_have_timms_effect(data16, tmp_path, record, monkeypatch, one_thread):
    """One run, each data option with its effect on what the model was trained on:

    --input-key .png: timm's folder reader takes it as the file types to read (the .jpg images beside are left out);
    --input-img-mode YCbCr: every image converted to it (the clean rows equal the YCbCr image, not the RGB one);
    --resplit --reprob 1: the first half of every batch (the clean split) is left unerased and the second half
    erased, on the CPU too (timm's prefetcher erases the batch so; its per-image transform could not);
    --train-crop-mode rkrc: timm's keep-ratio resize and center crop (at --scale 1 1 --ratio 1 1 the identity here);
    --worker-seeding part, --use-multi-epochs-loader: timm's worker init function and loader class;
    --epoch-repeats, --train-num-samples, --val-num-samples, --target-key, --dataset-trust-remote-code act on
    iterable and Hugging Face datasets only (their packages are not test dependencies): create_dataset gets them;
    --save-images: one image grid of the batch per log line."""
    import numpy as np
    import timm.data
    from PIL import Image
    from timm.data.loader import MultiEpochsDataLoader, _worker_init
    root = Path(data16)
    for c in range(8):   # .jpg images the --input-key .png reader must not see
        Image.open(root / 'train' / f'class{c:02d}' / 'img.png').save(root / 'train' / f'class{c:02d}' / 'extra.jpg')
    calls, create_dataset = [], timm.data.create_dataset

    def spy(name, **kwargs):
        calls.append(dict(kwargs))
        kwargs.pop('target_key')   # a folder reader takes no target key (a one-line error, see the test below)
        return create_dataset(name, **kwargs)

    monkeypatch.setattr(timm.data, 'create_dataset', spy)
    assert run(data16, tmp_path, '--experiment', 'data', '--img-size', '32', '--mean', '0.5', '0.5', '0.5', '--std',
               '0.25', '0.25', '0.25', '--input-key', '.png', '--input-img-mode', 'YCbCr', '--resplit', '--reprob', '1',
               '--remode', 'const', '--train-crop-mode', 'rkrc', '--scale', '1', '1', '--ratio', '1', '1',
               '--hflip', '0', '--color-jitter', '0', '--worker-seeding', 'part', '--use-multi-epochs-loader',
               '--epoch-repeats', '2', '--train-num-samples', '16', '--val-num-samples', '8', '--target-key', 'label',
               '--dataset-trust-remote-code', '--save-images', '--log-interval', '1') == 0
    loader = record.epochs[0]['loader']
    dataset = loader.dataset
    assert len(dataset) == 16 and all(path.endswith('.png') for path, _ in dataset.reader.samples)
    assert len(list(root.glob('train/*/*.jpg'))) == 8
    train_call, val_call = calls
    assert train_call['repeats'] == 2 and train_call['num_samples'] == 16 and val_call['num_samples'] == 8
    for call in calls:
        assert call['input_key'] == '.png' and call['target_key'] == 'label' and call['input_img_mode'] == 'YCbCr'
        assert call['trust_remote_code'] is True
    assert isinstance(loader, MultiEpochsDataLoader)
    assert loader.worker_init_fn.func is _worker_init and loader.worker_init_fn.keywords == {'worker_seeding': 'part'}
    steps = [type(t).__name__ for t in dataset.transform.transforms]
    assert steps[:2] == ['ResizeKeepRatio', 'CenterCropOrPad'] and 'RandomErasing' not in steps

    def expected(label, mode):   # the image named by the label, converted, normalized with --mean / --std
        img = Image.open(root / 'train' / f'class{label:02d}' / 'img.png').convert(mode)
        return (torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255 - 0.5) / 0.25

    assert len(record.chunks) == 2   # 16 images (the .jpg left out), -b 8; --epoch-repeats: not for a folder
    assert sorted(int(v) for _, y in record.chunks for v in y) == list(range(16))
    for x, y in record.chunks:
        for i, label in enumerate(y.tolist()):
            want = expected(label, 'YCbCr')
            if i < 4:   # the clean half: the image itself, in YCbCr
                assert torch.allclose(x[i], want, atol=1e-5) and not torch.allclose(x[i], expected(label, 'RGB'))
            else:       # erased: a box of zeros (const mode) in all three channels
                assert (x[i] != want).any() and (x[i] == 0).all(dim=0).sum() >= 0.02 * 32 * 32
    grids = sorted(p.name for p in (tmp_path / 'data').glob('train-batch-*.jpg'))
    assert grids == ['train-batch-0.jpg', 'train-batch-1.jpg']   # --log-interval 1: a grid per update
    assert Image.open(tmp_path / 'data' / 'train-batch-0.jpg').size == (8 * 32, 32)   # 8 images of 32 px in a row


@pytest.fixture
def jit_fuser_state():
    """The TorchScript fuser settings timm's set_jit_fuser changes (process-wide), restored after the test."""
    profiling_executor = torch._C._jit_set_profiling_executor(True)   # each setter returns the previous value
    torch._C._jit_set_profiling_executor(profiling_executor)
    profiling_mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(profiling_mode)
    texpr, on_gpu = torch._C._jit_texpr_fuser_enabled(), torch._C._jit_can_fuse_on_gpu()
    yield
    torch._C._jit_set_profiling_executor(profiling_executor)
    torch._C._jit_set_profiling_mode(profiling_mode)
    torch._C._jit_set_texpr_fuser_enabled(texpr)
    torch._C._jit_override_can_fuse_on_gpu(on_gpu)


def test_model_and_device_options_have_timms_effect(data16, tmp_path, record, monkeypatch, jit_fuser_state,
                                                     one_thread):
    """--fast-norm: timm's LayerNorms built in fast-norm mode, and its fast_layer_norm is what the passes run;
    --fuser old: timm's legacy TorchScript fuser settings (the tensor-expression fuser off) in force;
    --device-modules: the module imported before the device is set up (as timm's script does);
    --synchronize-step: the device synchronized after every update (on the CPU, a no-op, as in timm)."""
    import timm.layers.fast_norm
    import timm.layers.norm
    monkeypatch.setattr(timm.layers.fast_norm, '_USE_FAST_NORM', False)   # restored: a process-wide switch
    fast_calls, fast_layer_norm = [], timm.layers.norm.fast_layer_norm
    monkeypatch.setattr(timm.layers.norm, 'fast_layer_norm', lambda x, *a: fast_calls.append(x.shape[0]) or
                        fast_layer_norm(x, *a))
    module = 'sam_on_timm_test_device_module'
    (tmp_path / f'{module}.py').write_text('IMPORTED = True\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    setup_device, seen_at_setup = train.setup_device, []
    monkeypatch.setattr(train, 'setup_device', lambda args: seen_at_setup.append(module in sys.modules) or
                        setup_device(args))
    synced, synchronize_step = [], train.synchronize_step
    monkeypatch.setattr(train, 'synchronize_step', lambda device: synced.append(device) or synchronize_step(device))
    assert torch._C._jit_texpr_fuser_enabled()   # the default ('te')
    try:
        assert run(data16, tmp_path, '--experiment', 'md', '--model', 'test_vit', '--fast-norm', '--fuser', 'old',
                   '--device-modules', module, '--synchronize-step') == 0
    finally:
        sys.modules.pop(module, None)
    model = record.epochs[0]['model']
    norms = [m for m in model.modules() if isinstance(m, timm.layers.LayerNorm)]
    assert norms and all(m._fast_norm for m in norms)
    assert len(fast_calls) >= 2 * 2 * len(norms)   # every norm in both passes of both updates (and validation)
    assert not torch._C._jit_texpr_fuser_enabled()
    assert seen_at_setup == [True]
    assert synced == [torch.device('cpu')] * 2   # one per update


def test_synchronize_step_waits_for_cuda_and_npu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: calls.append('cuda'))
    train.synchronize_step(torch.device('cuda', 0))
    train.synchronize_step(torch.device('cpu'))
    assert calls == ['cuda']
    monkeypatch.setattr(torch, 'npu', types.SimpleNamespace(synchronize=lambda *a: calls.append('npu')), raising=False)
    train.synchronize_step(types.SimpleNamespace(type='npu'))   # torch.device('npu') needs the torch_npu backend
    assert calls == ['cuda', 'npu']


# the options of timm 1.0.31's train.py, read off its parser (options, dest, default, action, choices)
TIMM_TRAIN_OPTIONS = REPO / 'tests' / 'data' / 'timm_1.0.31_train_options.json'
# where train.py differs on purpose (docs/differences.md): --pretrained also takes --no-pretrained (a YAML false);
# these defaults are the ones timm's own functions take when the option is left out
DIFFERENT = {'--pretrained': {'kind'}, '--decay-epochs': {'default'}, '--grayscale-prob': {'default'},
             '--gaussian-blur-prob': {'default'}}


def test_every_option_of_timms_train_py_has_its_dest_default_and_choices():
    import json
    rows = json.loads(TIMM_TRAIN_OPTIONS.read_text())
    actions = train.build_parser()._actions
    ours = {o: a for a in actions for o in a.option_strings}
    positional = {a.dest for a in actions if not a.option_strings}
    assert len(rows) == 172
    seen_different = set()
    for row in rows:
        if not row['options']:
            assert row['dest'] in positional
            continue
        for opt in row['options']:
            assert opt in ours, f'{opt} of timm\'s train.py is missing'
            a = ours[opt]
            default = list(a.default) if isinstance(a.default, tuple) else a.default
            got = dict(dest=a.dest, default=default, kind=type(a).__name__,
                       choices=list(a.choices) if a.choices else None)
            for key, value in got.items():
                if key in DIFFERENT.get(opt, ()):
                    seen_different.add(opt)
                    assert value != row[key]
                else:
                    assert value == row[key], (opt, key, value, row[key])
    assert seen_different == set(DIFFERENT)
    # every key of a timm args.yaml is a key of ours: the YAML keys are the dests
    assert {r['dest'] for r in rows} <= {a.dest for a in actions}
