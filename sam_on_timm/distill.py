"""Knowledge distillation inside the SAM step: the teacher runs once per chunk, both passes reuse its output.

timm's distillation tasks (``timm.task``: ``LogitDistillationTask``, ``FeatureDistillationTask``,
``TokenDistillationTask``) call the teacher inside every forward; a SAM update runs two forwards per
chunk (at w and at w + eps), so the teacher would run twice on the same images. Here the task still
builds the teacher (weights, eval mode, input normalization), the trainable module and the loss
weights; ``targets`` computes the teacher's output for a chunk once (no grad), carried with the
labels as ``TeacherTargets``, and the loss object is the task's loss given that output:

    logit:   w_task * criterion(s, y) + w_kd * T^2 * KL(softmax(t / T) || softmax(s / T))
    feature: w_task * criterion(s, y) + w_kd * MSE(proj(f_s), f_t)
    token:   w_task * criterion(s, y) + w_kd * (soft: T^2 * KL(softmax(t / T) || softmax(d / T));
                                                hard: CE(d, argmax t))

(KL averaged over the batch): s the student's logits, t the teacher's, f_s / f_t the pooled
pre-logits features (the student's through the task's projection when the widths differ), d the
logits of the student's distillation token. The student's output is what the task's trainable module
returns: logits (logit), ``(logits, projected features)`` (feature: timm's
``FeatureDistillationTrainableModule``, student + projection), ``(logits, distillation logits)``
(token: a DeiT-distilled student in distilled-training mode).

The teacher is in no optimizer and outside the module the SAM step drives, so no SAM mode perturbs
it and nothing updates it. Feature distillation's projection is a trainable parameter of the task's
module: the optimizer trains it; SAM-ON leaves it unperturbed (a Linear layer, not a norm layer),
SAM over all parameters (``--opt sam``) and ``nonorm`` perturb it like the student's weights.
"""
from typing import Any, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['TeacherTargets', 'LogitDistillation', 'FeatureDistillation', 'TokenDistillation', 'distillation_loss',
           'student_of', 'check_feature_dims', 'set_student_normalization']


class TeacherTargets:
    """A chunk's labels with the teacher's output (logits, or pooled features) for the same samples;
    indexing slices both."""

    def __init__(self, target: Tensor, teacher: Tensor):
        self.target, self.teacher = target, teacher

    def __getitem__(self, index: Any) -> 'TeacherTargets':
        return TeacherTargets(self.target[index], self.teacher[index])

    def __len__(self) -> int:
        return len(self.target)


class _Distillation:
    """The loss of a timm distillation task for ``(student_output, TeacherTargets)``; ``targets``
    computes the teacher's part once per chunk. ``criterion`` (default: the task's) is the task loss."""
    features = False   # the teacher's pooled pre-logits features instead of its logits

    def __init__(self, task: nn.Module, criterion: Optional[Any] = None):
        self.task = task
        if criterion is not None:   # the task and this loss agree on it
            task.criterion = criterion

    @torch.no_grad()
    def targets(self, x: Tensor, target: Tensor) -> TeacherTargets:
        """The teacher's output for the (student-normalized) images ``x``, once per chunk."""
        task = self.task
        task.teacher.eval()
        x_kd = task.teacher.normalize_input(x, task.student_mean, task.student_std)
        return TeacherTargets(target, task.teacher(x_kd.detach(), return_features=self.features))

    def _pair(self, output: Any) -> Any:
        if not isinstance(output, (tuple, list)) or len(output) != 2:
            raise ValueError(f'{type(self).__name__}: the student must return (logits, '
                             f'{"features" if self.features else "distillation logits"}), got '
                             f'{type(output).__name__}; run it through the task\'s trainable module in training mode')
        return output

    def distill(self, output: Any, teacher: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, output: Any) -> Tensor:
        return output

    def __call__(self, output: Any, targets: TeacherTargets) -> Tensor:
        task = self.task
        task_loss = task.criterion(self.logits(output), targets.target)
        return task.task_loss_weight * task_loss + task.distill_loss_weight * self.distill(output, targets.teacher)


def _soft_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * temperature ** 2


class LogitDistillation(_Distillation):
    """``LogitDistillationTask``'s loss: the student's logits against the teacher's (KL at temperature T)."""

    def distill(self, output: Tensor, teacher: Tensor) -> Tensor:
        return _soft_kl(output, teacher, self.task.temperature)


class FeatureDistillation(_Distillation):
    """``FeatureDistillationTask``'s loss: the (projected) pooled features of the student against the
    teacher's (MSE); the student's output is ``(logits, features)`` from the task's trainable module."""
    features = True

    def logits(self, output: Any) -> Tensor:
        return self._pair(output)[0]

    def distill(self, output: Any, teacher: Tensor) -> Tensor:
        return F.mse_loss(self._pair(output)[1], teacher)


class TokenDistillation(_Distillation):
    """``TokenDistillationTask``'s loss: the class token's logits against the labels, the distillation
    token's against the teacher's logits (soft: KL at temperature T; hard: CE with the teacher's argmax)."""

    def logits(self, output: Any) -> Tensor:
        return self._pair(output)[0]

    def distill(self, output: Any, teacher: Tensor) -> Tensor:
        dist_logits = self._pair(output)[1]
        if self.task.distill_type == 'soft':
            return _soft_kl(dist_logits, teacher, self.task.temperature)
        return F.cross_entropy(dist_logits, teacher.argmax(dim=-1))


def distillation_loss(task: nn.Module, criterion: Optional[Any] = None) -> _Distillation:
    """The loss object for a timm distillation task (by its class), with ``criterion`` as its task loss."""
    from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
    for task_type, loss_type in ((FeatureDistillationTask, FeatureDistillation),
                                 (TokenDistillationTask, TokenDistillation),
                                 (LogitDistillationTask, LogitDistillation)):
        if isinstance(task, task_type):
            return loss_type(task, criterion)
    raise TypeError(f'not a timm distillation task: {type(task).__name__}')


def student_of(module: nn.Module) -> nn.Module:
    """The student inside a task's trainable module (DDP / torch.compile unwrapped; feature distillation's
    student + projection module gives its student): what the EMA and the checkpoints hold."""
    from timm.task.distillation import FeatureDistillationTrainableModule
    from timm.utils import unwrap_model
    bare = unwrap_model(module)
    return bare.student if isinstance(bare, FeatureDistillationTrainableModule) else bare


def set_student_normalization(task: nn.Module, mean: Iterable[float], std: Iterable[float], channels: int) -> None:
    """Make the teacher undo the normalization the run's loader applies (``mean`` / ``std``), not the one named
    in the student's ``pretrained_cfg``.

    timm's tasks take the student's mean / std from its ``pretrained_cfg``; the loader normalizes with the
    resolved data config, which ``--mean`` / ``--std`` override. With an override the teacher's
    ``normalize_input`` would undo the wrong statistics (or, when the two configs agree, skip the
    renormalization) and the teacher would see wrongly scaled images. ``channels``: the images' channels;
    a one-channel run's teacher (built with one input channel, its stem summed over RGB by timm) gets
    its own RGB statistics averaged to one channel, so that a grey pixel is normalized as it would be in RGB.
    """
    ref = task.student_mean
    task.student_mean = torch.tensor(tuple(mean), device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
    task.student_std = torch.tensor(tuple(std), device=ref.device, dtype=ref.dtype).view(1, -1, 1, 1)
    teacher = task.teacher
    if channels == 1 and teacher.mean_kd.shape[1] != 1:
        teacher.mean_kd = teacher.mean_kd.mean(dim=1, keepdim=True)
        teacher.std_kd = teacher.std_kd.mean(dim=1, keepdim=True)


@torch.no_grad()
def check_feature_dims(task: nn.Module, input_size: Iterable[int]) -> None:
    """ValueError unless the student's (projected) pooled features and the teacher's have the same shape.

    One image of ``input_size`` through both in eval mode (no running statistic changes; every module's
    mode is put back): a wrong ``student_feature_dim`` / ``teacher_feature_dim`` (``--kd-*-feature-dim``)
    would otherwise fail in the first update, or worse, be broadcast by ``mse_loss``.
    """
    module = task.get_trainable_module()
    param = next(module.parameters())
    x = torch.zeros((1, *input_size), device=param.device, dtype=param.dtype)
    modes: List[tuple] = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        student = module.student.forward_head(module.student.forward_features(x), pre_logits=True)
        teacher = task.teacher(x, return_features=True)
        projection = module.projection
        if projection is not None and student.shape[-1] != projection.in_features:
            raise ValueError(f'the student\'s pooled features have {student.shape[-1]} channels, the student feature '
                             f'dim is {projection.in_features}')
        if projection is not None and teacher.shape[-1] != projection.out_features:
            raise ValueError(f'the teacher\'s pooled features have {teacher.shape[-1]} channels, the teacher feature '
                             f'dim is {projection.out_features}')
        projected = student if projection is None else projection(student)
        if projected.shape != teacher.shape:
            raise ValueError(f'the student\'s pooled features{" (projected)" if projection is not None else ""} '
                             f'have shape {tuple(projected.shape[1:])}, the teacher\'s {tuple(teacher.shape[1:])}')
    finally:
        for m, mode in modes:
            m.training = mode
