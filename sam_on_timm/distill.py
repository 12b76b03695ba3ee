"""Logit distillation inside the SAM step: the teacher runs once per chunk, both passes reuse its logits.

timm's ``LogitDistillationTask`` calls the teacher inside every forward; a SAM update runs two
forwards per chunk (at w and at w + eps), so the teacher would run twice on the same images. Here
the task still builds the teacher (weights, eval mode, input normalization) and fixes the loss
weights; ``LogitDistillation.targets`` computes the teacher's logits for a chunk once, carried with
the labels, and ``LogitDistillation`` is the task's loss given those logits:

    loss = w_task * criterion(s, y) + w_kd * T^2 * KL(softmax(t / T) || softmax(s / T))

(KL averaged over the batch), with s the student's logits and t the teacher's. The teacher is not a
parameter of the optimizer, so no SAM mode ever perturbs it.
"""
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['TeacherTargets', 'LogitDistillation']


class TeacherTargets:
    """A chunk's labels with the teacher's logits for the same samples; indexing slices both."""

    def __init__(self, target: Tensor, logits: Tensor):
        self.target, self.logits = target, logits

    def __getitem__(self, index: Any) -> 'TeacherTargets':
        return TeacherTargets(self.target[index], self.logits[index])

    def __len__(self) -> int:
        return len(self.target)


class LogitDistillation:
    """The loss of a timm ``LogitDistillationTask`` for ``(student_logits, TeacherTargets)``."""

    def __init__(self, task):
        self.task = task

    @torch.no_grad()
    def targets(self, x: Tensor, target: Tensor) -> TeacherTargets:
        """The teacher's logits for the (student-normalized) images ``x``, once per chunk."""
        task = self.task
        task.teacher.eval()
        x_kd = task.teacher.normalize_input(x, task.student_mean, task.student_std)
        return TeacherTargets(target, task.teacher(x_kd.detach(), return_features=False))

    def __call__(self, student_logits: Tensor, targets: TeacherTargets) -> Tensor:
        task = self.task
        task_loss = task.criterion(student_logits, targets.target)
        log_p_student = F.log_softmax(student_logits / task.temperature, dim=-1)
        log_p_teacher = F.log_softmax(targets.logits / task.temperature, dim=-1)
        kd_loss = F.kl_div(log_p_student, log_p_teacher, reduction='batchmean', log_target=True) * task.temperature ** 2
        return task.task_loss_weight * task_loss + task.distill_loss_weight * kd_loss
