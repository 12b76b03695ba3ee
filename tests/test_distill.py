"""Feature and token distillation through train.py, with a SAM --opt and with plain SGD.

Each run is spied on: the teacher's forward (called once per SAM chunk, on the chunk's samples), the
student's forward (the teacher's weights are the file's in every SAM pass), what ``train_one_epoch`` was
handed (the trained module is snapshot before the first update) and what ``train_step`` saw and returned.
The student's loss is checked against timm's own task (``FeatureDistillationTask`` /
``TokenDistillationTask``) built here from the snapshot and the teacher file, on the same chunks:
the ascent loss L(w) for SAM, the loss for SGD. Feature distillation's projection is in the optimizer,
moves, is left unperturbed by SAM-ON (perturbed by SAM over all parameters), and is saved and resumed.
"""
import copy
import types

import pytest
import timm
import torch

import train
from sam_on_timm.train_step import find_sam
from tests.helpers import make_image_folder

BASE = ['--img-size', '16', '-b', '8', '--device', 'cpu', '--workers', '0', '--epochs', '1', '--warmup-epochs', '0',
        '--lr', '0.05', '--log-interval', '2', '--seed', '3', '--num-classes', '16']
SAM = ['--opt', 'sam-on-layerl2', '--rho', '0.5', '--sam-m', '4']
DEIT = ['--model', 'deit_tiny_distilled_patch16_224', '--model-kwargs', 'img_size=16', 'patch_size=8', 'embed_dim=32',
        'depth=1', 'num_heads=2']   # a tiny student with a distillation token


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('kd') / 'data')   # 2 classes of 16 outputs


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    """A test_resnet teacher (16 classes, 96 pooled features) saved as --kd-pretrained-path: no download."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save(timm.create_model('test_resnet', num_classes=16).state_dict(), path)
    return path


def teacher_from(path):
    teacher = timm.create_model('test_resnet', num_classes=16)
    teacher.load_state_dict(torch.load(path, weights_only=True))
    return teacher


@pytest.fixture
def spy(monkeypatch, one_thread):
    """What the teacher, train_one_epoch and train_step saw during a train.py run."""
    import sam_on_timm.train_step as ts
    from timm.task.distillation import DistillationTeacher
    seen = types.SimpleNamespace(teacher_calls=[], epochs=[], chunks=[], stats=[], teacher_moved=[])
    forward, one_epoch, step = DistillationTeacher.forward, train.train_one_epoch, ts.train_step

    def teacher_forward(self, x, return_features=False):
        seen.teacher_calls.append((x.shape[0], return_features))
        return forward(self, x, return_features=return_features)

    def recording_one_epoch(epoch, model, loader, optimizer, loss_fn, *a, **k):
        seen.epochs.append(dict(model=model, start=copy.deepcopy(model), optimizer=optimizer, loss_fn=loss_fn))
        seen.teacher_calls.clear()   # the epoch's calls only (feature distillation's setup checks one image)
        original = {k: v.clone() for k, v in loss_fn.task.teacher.state_dict().items()}

        def teacher_unchanged(*_):   # in every pass of the student, the perturbed ones included
            now = loss_fn.task.teacher.state_dict()
            seen.teacher_moved.append(any(not torch.equal(v, now[k]) for k, v in original.items()))
        hook = model.register_forward_hook(teacher_unchanged)
        try:
            return one_epoch(epoch, model, loader, optimizer, loss_fn, *a, **k)
        finally:
            hook.remove()

    def recording_step(model, optimizer, chunks, *a, **k):
        seen.chunks.append([(x.clone(), y) for x, y in chunks])
        stats = step(model, optimizer, chunks, *a, **k)
        seen.stats.append(stats)
        return stats

    monkeypatch.setattr(DistillationTeacher, 'forward', teacher_forward)
    monkeypatch.setattr(train, 'train_one_epoch', recording_one_epoch)
    monkeypatch.setattr(ts, 'train_step', recording_step)
    return seen


def run(data, out, teacher_file, *extra):
    return train.main(['--data-dir', data, '--output', str(out), *BASE, '--kd-model-name', 'test_resnet',
                       '--kd-pretrained-path', str(teacher_file), *extra])


def check_teacher(spy, teacher_file, features: bool):
    """Once per chunk on the chunk's samples (both SAM passes reuse it), never trained, never perturbed."""
    chunk_sizes = [x.shape[0] for update in spy.chunks for x, _ in update]
    assert spy.teacher_calls == [(n, features) for n in chunk_sizes]
    e = spy.epochs[0]
    teacher = e['loss_fn'].task.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    ids = {id(p) for p in teacher.parameters()}
    assert not ids & {id(p) for g in e['optimizer'].param_groups for p in g['params']}
    sam = find_sam(e['optimizer'])
    assert sam is None or (sam.perturbed and not ids & {id(p) for p in sam.perturbed})
    assert spy.teacher_moved and not any(spy.teacher_moved)
    for k, v in teacher_from(teacher_file).state_dict().items():
        assert torch.equal(v, teacher.model.state_dict()[k]), k


def check_first_update_loss(spy, timm_task, sam: bool):
    """The first update's loss (SAM: its ascent loss L(w)) is timm's task loss on the same chunks, averaged."""
    timm_task.train()
    losses = [timm_task(x, y.target)['loss'] for x, y in spy.chunks[0]]
    expected = torch.stack(losses).mean()
    got = spy.stats[0].ascent_loss if sam else spy.stats[0].loss
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (float(got), float(expected))


def test_feature_distillation_with_sam_on(data, tmp_path, teacher_file, spy):
    """test_vit student (64 features) against a test_resnet teacher (96): a 64 -> 96 projection, trained by the
    optimizer and left unperturbed by SAM-ON."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.task import FeatureDistillationTask
    assert run(data, tmp_path, teacher_file, '--experiment', 'f', '--model', 'test_vit', '--kd-distill-type', 'feature',
               '--distill-loss-weight', '2.5', '--task-loss-weight', '0.5', '--smoothing', '0.2', *SAM) == 0
    check_teacher(spy, teacher_file, features=True)
    e = spy.epochs[0]
    assert len(spy.chunks) == 2 and [x.shape[0] for x, _ in spy.chunks[0]] == [4, 4]
    start, trained = e['start'], e['model']
    assert start.projection.in_features == 64 and start.projection.out_features == 96
    projection = list(trained.projection.parameters())
    in_optimizer = {id(p) for g in e['optimizer'].param_groups for p in g['params']}
    assert all(id(p) in in_optimizer for p in projection)
    sam = find_sam(e['optimizer'])
    assert not {id(p) for p in projection} & {id(p) for p in sam.perturbed}   # SAM-ON: norm layers only
    assert all(not torch.equal(p, p0) for p, p0 in zip(projection, start.projection.parameters()))   # trained

    task = FeatureDistillationTask(copy.deepcopy(start.student), teacher_from(teacher_file),
                                   criterion=LabelSmoothingCrossEntropy(0.2), distill_loss_weight=2.5,
                                   task_loss_weight=0.5, verbose=False)
    task.load_task_state({'projection': start.projection.state_dict()})
    check_first_update_loss(spy, task, sam=True)

    ckpt = torch.load(tmp_path / 'f' / 'last.pth.tar', weights_only=True)   # timm's layout: student + task_state
    assert set(ckpt['state_dict']) == set(trained.student.state_dict())
    for k, v in trained.projection.state_dict().items():
        assert torch.equal(ckpt['task_state']['projection'][k], v), k


def test_feature_distillation_with_sgd_ema_and_resume(data, tmp_path, teacher_file, spy):
    """Plain SGD: the loss of the update is timm's task loss; the EMA holds the student; a resume continues
    with the saved projection."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.task import FeatureDistillationTask
    common = ['--experiment', 'g', '--model', 'test_vit', '--kd-distill-type', 'feature', '--task-loss-weight', '0.8',
              '--opt', 'sgd', '--model-ema', '--model-ema-decay', '0.5']
    assert run(data, tmp_path, teacher_file, *common) == 0
    check_teacher(spy, teacher_file, features=True)
    e = spy.epochs[0]
    start, trained = e['start'], e['model']
    assert find_sam(e['optimizer']) is None and len(spy.chunks[0]) == 1
    task = FeatureDistillationTask(copy.deepcopy(start.student), teacher_from(teacher_file),
                                   criterion=LabelSmoothingCrossEntropy(0.1), task_loss_weight=0.8, verbose=False)
    task.load_task_state({'projection': start.projection.state_dict()})
    assert task.distill_loss_weight == pytest.approx(0.2)   # timm's complementary weights
    check_first_update_loss(spy, task, sam=False)
    assert all(not torch.equal(p, p0) for p, p0 in zip(trained.projection.parameters(),
                                                      start.projection.parameters()))
    ckpt = torch.load(tmp_path / 'g' / 'last.pth.tar', weights_only=True)
    assert set(ckpt['state_dict_ema']) == set(ckpt['state_dict']) == set(trained.student.state_dict())

    assert run(data, tmp_path, teacher_file, *common, '--epochs', '2', '--resume',
               str(tmp_path / 'g' / 'last.pth.tar')) == 0
    resumed = spy.epochs[1]['start']   # before epoch 1's first update: the projection epoch 0 ended with
    for k, v in ckpt['task_state']['projection'].items():
        assert torch.equal(resumed.projection.state_dict()[k], v), k


def test_sam_all_perturbs_the_projection_sam_on_does_not():
    """Where the projection goes: the optimizer is built on the task's trainable module (student +
    projection), so SAM over all parameters perturbs the projection and SAM-ON leaves it out."""
    from timm.optim import create_optimizer_v2
    from timm.task import FeatureDistillationTask
    task = FeatureDistillationTask(timm.create_model('test_vit', num_classes=4),
                                   timm.create_model('test_resnet', num_classes=4), verbose=False)
    module = task.get_trainable_module()
    projection = {id(p) for p in module.projection.parameters()}
    for opt, perturbed in (('sam', True), ('sam-on', False), ('sam-nonorm', True)):
        sam = find_sam(create_optimizer_v2(module, opt, lr=0.1, rho=0.05))
        assert (projection <= {id(p) for p in sam.perturbed}) == perturbed, opt
        assert projection <= {id(p) for g in sam.param_groups for p in g['params']}, opt


@pytest.mark.parametrize('sam', [True, False], ids=['sam-on', 'sgd'])
def test_token_distillation(data, tmp_path, teacher_file, spy, sam):
    """A tiny DeiT-distilled student: the class token against the labels, the distillation token against the
    teacher's logits (soft with SAM-ON, hard with SGD); the teacher normalizes the student's inputs (other
    mean / std) itself."""
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.task import TokenDistillationTask
    kd = (['--kd-temperature', '2', '--task-loss-weight', '0.3'] if sam else
          ['--kd-token-distill-type', 'hard', '--distill-loss-weight', '0.7'])
    assert run(data, tmp_path, teacher_file, '--experiment', 't', *DEIT, '--kd-distill-type', 'token', *kd,
               *(SAM if sam else ['--opt', 'sgd'])) == 0
    check_teacher(spy, teacher_file, features=False)
    e = spy.epochs[0]
    assert len(spy.chunks[0]) == (2 if sam else 1)
    task = TokenDistillationTask(copy.deepcopy(e['start']), teacher_from(teacher_file),
                                 criterion=LabelSmoothingCrossEntropy(0.1), distill_type='soft' if sam else 'hard',
                                 temperature=2.0 if sam else 4.0, task_loss_weight=0.3 if sam else None,
                                 distill_loss_weight=None if sam else 0.7, verbose=False)
    check_first_update_loss(spy, task, sam=sam)
    if sam:   # the distillation head is the student's: in the optimizer, unperturbed by SAM-ON
        head_dist = {id(p) for p in e['model'].head_dist.parameters()}
        assert head_dist <= {id(p) for g in e['optimizer'].param_groups for p in g['params']}
        assert not head_dist & {id(p) for p in find_sam(e['optimizer']).perturbed}


def test_ssam_fisher_takes_the_distillation_loss(data, tmp_path, teacher_file, spy, monkeypatch):
    """ssam-f's empirical Fisher is taken on the training loss, here the distillation loss: its batches carry
    the teacher's logits for the same images (the loss cannot be called on bare labels)."""
    import sam_on_timm.sparse as sparse
    from sam_on_timm.distill import TeacherTargets
    seen, fisher = [], sparse.fisher_diagonal

    def recording_fisher(model, params, batches, loss_fn, num_samples):
        def recorded():
            for x, y in batches:
                seen.append((x.clone(), y))
                yield x, y
        return fisher(model, params, recorded(), loss_fn, num_samples)

    monkeypatch.setattr(sparse, 'fisher_diagonal', recording_fisher)
    assert run(data, tmp_path, teacher_file, '--experiment', 's', '--model', 'test_vit', '--opt', 'ssam-f',
               '--ssam-fisher-samples', '4') == 0
    assert seen and all(isinstance(y, TeacherTargets) for _, y in seen)
    teacher = teacher_from(teacher_file).eval()   # student and teacher share mean / std (0.5): the same input
    with torch.no_grad():
        assert torch.allclose(seen[0][1].teacher, teacher(seen[0][0]), atol=1e-6)


@pytest.mark.parametrize('extra, mean, std', [
    (['--mean', '0.2', '0.3', '0.4', '--std', '0.25', '0.25', '0.25'], (0.2, 0.3, 0.4), (0.25, 0.25, 0.25)),
    (['--in-chans', '1', '--mean', '0.4', '--std', '0.3'], (0.4,), (0.3,)),   # the teacher's stem: 1 channel
], ids=['mean-std', 'one-channel'])
def test_teacher_renormalizes_from_the_loaders_mean_and_std(data, tmp_path, teacher_file, monkeypatch, one_thread,
                                                            extra, mean, std):
    """The loader normalizes with --mean / --std; the teacher (test_resnet: trained on (p - 0.5) / 0.5) must see
    its own normalization of the same pixels. timm's task assumed the student's pretrained_cfg statistics
    (0.5 here, as the teacher's): it passed the student's input through unchanged."""
    import sam_on_timm.train_step as ts
    from timm.task.distillation import DistillationTeacher
    teacher_in, chunks, forward, step = [], [], DistillationTeacher.forward, ts.train_step
    monkeypatch.setattr(DistillationTeacher, 'forward', lambda self, x, return_features=False: (
        teacher_in.append(x.clone()), forward(self, x, return_features))[1])
    monkeypatch.setattr(ts, 'train_step', lambda model, opt, c, *a, **k: (
        chunks.extend(x.clone() for x, _ in c), step(model, opt, c, *a, **k))[1])
    assert run(data, tmp_path, teacher_file, '--experiment', 'n', '--model', 'test_resnet', '--opt', 'sgd',
               *extra) == 0
    assert len(chunks) == 2 and len(teacher_in) >= 2
    for x, seen in zip(chunks, teacher_in[-len(chunks):]):   # (the calls before: the setup's checks)
        pixels = x.double() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        assert pixels.min() > -1e-6 and pixels.max() < 1 + 1e-6   # the loader did normalize with mean / std
        assert torch.allclose(seen.double(), (pixels - 0.5) / 0.5, atol=1e-5)


@pytest.mark.parametrize('extra, message', [
    (['--model', 'test_resnet', '--kd-distill-type', 'token'], "'test_resnet' has none"),
    ([*DEIT, '--kd-distill-type', 'token', '--torchscript', '--opt', 'sgd'], 'drop --torchscript'),
    (['--model', 'test_resnet', '--torchscript', '--opt', 'sgd'], "--kd-model-name with --torchscript: timm's"),
    (['--model', 'test_vit', '--kd-distill-type', 'feature', '--kd-teacher-feature-dim', '50'],
     "the teacher's pooled features have 96 channels, the teacher feature dim is 50"),
    (['--model', 'test_vit', '--kd-distill-type', 'feature', '--kd-student-feature-dim', '32'],
     "the student's pooled features have 64 channels, the student feature dim is 32"),
    (['--model', 'test_vit', '--kd-distill-type', 'feature', '--kd-student-feature-dim', '0'],
     '--kd-student-feature-dim must be a positive number'),
])
def test_bad_distillation_combinations_are_one_line(data, tmp_path, teacher_file, capsys, extra, message):
    assert run(data, tmp_path, teacher_file, '--experiment', 'bad', *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'bad').exists()
