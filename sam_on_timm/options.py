"""train.py's command line: every option defined once, in one table, and the parser built from it.

``TIMM_GROUPS`` holds timm's train.py options (the 172 of timm 1.0.31, tests/data/timm_1.0.31_train_options.json,
plus a few of ours in their groups: --demo-data, --max-image-pixels, --resume-partial, --kd-pretrained-path,
--cifar-aug, ...), ``SAM_GROUPS`` the SAM flags (``add_sam_arguments``). Each ``Option`` carries argparse's keyword
arguments and, where a number has one, its valid interval (``range='[0, 1)'``) or the name of the library's rule
for it (``rule='rho'``: sam_on_timm.checks.RANGES); sam_on_timm.option_checks reads both from here.

The YAML side (``-c FILE``): each key is an option's dest, each value checked against the option's action as the
command line would check it (sam_on_timm.config). A usage error is one line, ``train.py: error: ...``, exit code 2.

This module imports neither torch nor timm (itself): its names are the options, not what they build.
"""
import argparse
from typing import Any, Dict, Optional, Sequence, Tuple

from .config import config_value, drop_config_key, load_config, parse_kwargs

__all__ = ['UsageError', 'ArgumentParser', 'Option', 'TIMM_GROUPS', 'SAM_GROUPS', 'OPTIONS', 'SAM_ONLY',
           'add_sam_arguments', 'build_parser', 'parse_args', 'given_args', 'option_default', 'flag_name',
           'first_line']


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``PROG: error: MESSAGE (PROG --help lists the options)``, exit code 2,
    instead of the whole usage text before the message (train.py's is over a hundred lines)."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} ({self.prog} --help lists the options)\n')


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def flag_name(dest: str) -> str:
    """The command-line flag of an option's dest: ``sam_m`` -> ``--sam-m``."""
    return '--' + dest.replace('_', '-')


class ParseKwargs(argparse.Action):
    """timm's ``KEY=VALUE ...`` option (values read as Python literals, else kept as strings), bounded in size
    and nesting (sam_on_timm.config.parse_kwargs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, parse_kwargs(values, option_string))
        except ValueError as e:
            raise UsageError(str(e)) from None


def interval(text: str) -> Tuple[Optional[float], Optional[float], bool, bool]:
    """``'[0, 1)'`` -> (low, high, low excluded, high excluded), as sam_on_timm.checks.check_number takes them;
    ``inf`` / ``-inf``: unbounded on that side (None)."""
    low, high = (None if s in ('inf', '-inf') else float(s) if '.' in s else int(s)
                 for s in (s.strip() for s in text[1:-1].split(',')))
    return low, high, low is not None and text[0] == '(', high is not None and text[-1] == ')'


class Option:
    """One command-line option: argparse's flags and keyword arguments, plus its number rule (``range``: the valid
    interval, ``rule``: the library's rule of that name). Every float option is also checked to be finite."""
    __slots__ = ('flags', 'kwargs', 'range', 'rule', 'dest')

    def __init__(self, *flags: str, range: Optional[str] = None, rule: Optional[str] = None, **kwargs: Any):
        self.flags, self.kwargs, self.rule = flags, kwargs, rule
        self.range = None if range is None else interval(range)
        longs = [f for f in flags if f.startswith('--')]
        self.dest = kwargs.get('dest') or (longs or flags)[0].lstrip('-').replace('-', '_')   # argparse's rule

    @property
    def default(self) -> Any:
        return self.kwargs.get('default')


TIMM_GROUPS = (
    ('Dataset', (
        Option('data', nargs='?', metavar='DIR', const=None,
               help='path to dataset (positional is *deprecated*, use --data-dir)'),
        Option('--data-dir', metavar='DIR', help='path to dataset (root dir)'),
        Option('--dataset', metavar='NAME', default='',
               help='dataset type + name ("<type>/<name>"), default: ImageFolder/ImageTar'),
        Option('--train-split', metavar='NAME', default='train'),
        Option('--val-split', metavar='NAME', default='validation'),
        Option('--dataset-download', action='store_true', default=False),
        Option('--class-map', default='', type=str, metavar='FILENAME'),
        Option('--max-image-pixels', default=None, type=int, metavar='N',
               help="PIL's decompression-bomb limit: it warns above N pixels, refuses above 2 N (0: no limit)"),
        Option('--train-num-samples', default=None, type=int, metavar='N',
               help='samples in the train split (iterable datasets)'),
        Option('--val-num-samples', default=None, type=int, metavar='N',
               help='samples in the validation split (iterable datasets)'),
        Option('--input-img-mode', default=None, type=str,
               help="image conversion mode (default: 'RGB', 'L' for 1 channel)"),
        Option('--input-key', default=None, type=str, help='dataset key of the input images'),
        Option('--target-key', default=None, type=str, help='dataset key of the target labels'),
        Option('--dataset-trust-remote-code', action='store_true', default=False,
               help="let a huggingface dataset run the code of its repo"),
        Option('--demo-data', default='', type=str, metavar='NAME',
               help="write a bundled demo data set ('mnist5k') into --data-dir (or the cache) if missing"),
    )),
    ('Model', (
        Option('--model', default='resnet50', type=str, metavar='MODEL'),
        Option('--pretrained', action=argparse.BooleanOptionalAction, default=False,
               help='start from timm\'s pretrained weights (--no-pretrained overrides a recipe)'),
        Option('--pretrained-path', default=None, type=str,
               help='load this file as the pretrained weights (head adapted as for hub weights)'),
        Option('--initial-checkpoint', default='', type=str, metavar='PATH',
               help='load this checkpoint into the model (strict)'),
        Option('--resume', default='', type=str, metavar='PATH',
               help='resume model, optimizer, scaler, EMA, epoch and RNG from a checkpoint'),
        Option('--no-resume-opt', action='store_true', default=False,
               help='resume weights and epoch with a fresh optimizer (and loss scaler)'),
        Option('--resume-partial', action='store_true', default=False,
               help='resume a checkpoint that lacks the loss scaler, EMA or RNG state this run needs: '
                    'those start afresh (no longer an exact continuation)'),
        Option('--num-classes', type=int, default=None, metavar='N', range='[1, inf)'),
        Option('--gp', default=None, type=str, metavar='POOL'),
        Option('--img-size', type=int, default=None, metavar='N'),
        Option('--in-chans', type=int, default=None, metavar='N', range='[1, inf)'),
        Option('--input-size', default=None, nargs=3, type=int, metavar='N N N'),
        Option('--crop-pct', default=None, type=float, metavar='N', range='(0, inf)'),
        Option('--mean', type=float, nargs='+', default=None, metavar='MEAN'),
        Option('--std', type=float, nargs='+', default=None, metavar='STD', range='(0, inf)'),
        Option('--interpolation', default='', type=str, metavar='NAME'),
        Option('-b', '--batch-size', type=int, default=128, metavar='N', help='per-GPU batch size'),
        Option('-vb', '--validation-batch-size', type=int, default=None, metavar='N', range='[1, inf)'),
        Option('--channels-last', action='store_true', default=False),
        Option('--grad-accum-steps', type=int, default=1, metavar='N'),
        Option('--torchcompile', nargs='?', type=str, default=None, const='inductor',
               help='torch.compile the model with this backend (default inductor); '
                    'the SAM ascent keeps its lean graph'),
        Option('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)'),
        Option('--grad-checkpointing', action='store_true', default=False,
               help="activation checkpointing (timm's non-reentrant checkpoints)"),
        Option('--fuser', default='', type=str, help="jit fuser for --torchscript ('', 'te', 'old', 'nvfuser')"),
        Option('--fast-norm', default=False, action='store_true', help="timm's experimental fast norm kernels"),
        Option('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
               help='extra create_model keyword arguments'),
        Option('--head-init-scale', default=None, type=float, help='scale the classifier weight and bias at init'),
        Option('--head-init-bias', default=None, type=float, help='set the classifier bias at init'),
        Option('--torchscript', action='store_true', default=False,
               help='torch.jit.script the model (plain optimizers only)'),
        Option('--device', default='cuda', type=str),
        Option('--amp', action='store_true', default=False),
        Option('--amp-dtype', default='float16', type=str, help='float16 (GradScaler) or bfloat16 (no scaler)'),
        Option('--model-dtype', default=None, type=str, help='model dtype without AMP (float32, bfloat16, float16)'),
        Option('--no-ddp-bb', action='store_true', default=False, help='DDP without buffer broadcast'),
        Option('--synchronize-step', action='store_true', default=False,
               help='synchronize the device after each update'),
        Option('--device-modules', default=None, type=str, nargs='+', help='modules to import for a device backend'),
        Option('--sync-bn', action='store_true', default=False),
        Option('--dist-bn', type=str, default='reduce',
               help='BN stats across ranks at epoch end ("broadcast", "reduce", "")'),
    )),
    ('Optimizer', (
        Option('--opt', default='sgd', type=str, metavar='OPTIMIZER',
               help='timm optimizer name, or a SAM name (sam-on-layerl2, ...)'),
        Option('--opt-eps', default=None, type=float, metavar='EPSILON', rule='eps'),
        Option('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', rule='betas'),
        Option('--momentum', type=float, default=0.9, metavar='M', rule='momentum'),
        Option('--weight-decay', type=float, default=2e-5, rule='weight_decay'),
        Option('--clip-grad', type=float, default=None, metavar='NORM', rule='clip_grad'),
        Option('--clip-mode', type=str, default='norm', help='"norm", "value" or "agc"'),
        Option('--layer-decay', type=float, default=None, range='(0, inf)'),
        Option('--layer-decay-min-scale', type=float, default=0, range='[0, inf)'),
        Option('--layer-decay-no-opt-scale', type=float, default=None, range='[0, inf)'),
        Option('--opt-foreach', action='store_true', default=None, help='force foreach optimizer kernels'),
        Option('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
               help='extra optimizer keyword arguments (for a SAM --opt: of its --sam-base)'),
    )),
    ('Learning rate schedule', (
        Option('--sched', type=str, default='cosine', metavar='SCHEDULER'),
        Option('--sched-on-updates', action='store_true', default=False),
        Option('--lr', type=float, default=None, metavar='LR',
               help='learning rate (default: lr-base scaled by global batch)', rule='lr'),
        Option('--lr-base', type=float, default=0.1, metavar='LR', range='(0, inf)'),
        Option('--lr-base-size', type=int, default=256, metavar='DIV', range='(0, inf)'),
        Option('--lr-base-scale', type=str, default='', metavar='SCALE',
               help='"linear" or "sqrt" (default by optimizer)'),
        Option('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct', range='[0, inf)'),
        Option('--lr-noise-pct', type=float, default=0.67, range='[0, 1]'),
        Option('--lr-noise-std', type=float, default=1.0, range='[0, inf)'),
        Option('--lr-cycle-mul', type=float, default=1.0, range='(0, inf)'),
        Option('--lr-cycle-decay', type=float, default=0.5, range='(0, inf)'),
        Option('--lr-cycle-limit', type=int, default=1, range='[0, inf)'),
        Option('--lr-k-decay', type=float, default=1.0, range='(0, inf)'),
        Option('--lr-decay-fn', type=str, default=None, help="decay phase of wsd / rsqrt (e.g. '1-sqrt', 'linear')"),
        Option('--lr-stable-timescale', type=float, default=None, help='rsqrt timescale in epochs', range='(0, inf)'),
        Option('--warmup-lr', type=float, default=1e-5, range='[0, inf)'),
        Option('--min-lr', type=float, default=0, range='[0, inf)'),
        Option('--epochs', type=int, default=300),
        Option('--epoch-repeats', type=float, default=0., help='repeat the dataset this many times per epoch'),
        Option('--start-epoch', default=None, type=int),
        Option('--stop-epoch', default=None, type=int,
               help='stop after this many epochs (the schedule still spans --epochs)'),
        Option('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', range='[0, inf)'),
        Option('--decay-epochs', type=float, default=None, help='step interval; wsd / rsqrt: decay length '
               '(a fraction < 1 of the schedule; default: step 90, wsd / rsqrt 0.2)', range='(0, inf)'),
        Option('--warmup-epochs', type=int, default=5, range='[0, inf)'),
        Option('--warmup-prefix', action='store_true', default=False),
        Option('--cooldown-epochs', type=int, default=0, range='[0, inf)'),
        Option('--patience-epochs', type=int, default=10, range='[0, inf)'),
        Option('--decay-rate', '--dr', type=float, default=0.1, range='(0, 1]'),
    )),
    ('Augmentation and regularization', (
        Option('--no-aug', action='store_true', default=False),
        Option('--train-crop-mode', type=str, default=None, help="training crop ('rrc', 'rkrc', 'rkrr')"),
        Option('--scale', type=float, nargs='+', default=[0.08, 1.0], range='(0, 1]'),
        Option('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], range='(0, inf)'),
        Option('--hflip', type=float, default=0.5, range='[0, 1]'),
        Option('--vflip', type=float, default=0., range='[0, 1]'),
        Option('--color-jitter', type=float, default=0.4, range='[0, inf)'),
        Option('--color-jitter-prob', type=float, default=None, metavar='P',
               help='apply the color jitter with this probability (default: always)', range='[0, 1]'),
        Option('--grayscale-prob', type=float, default=0., metavar='P', help='random grayscale probability',
               range='[0, 1]'),
        Option('--gaussian-blur-prob', type=float, default=0., metavar='P', help='random gaussian blur probability',
               range='[0, 1]'),
        Option('--aa', type=str, default=None, metavar='NAME',
               help='auto augment policy, e.g. rand-m9-mstd0.5-inc1'),
        Option('--cifar-aug', type=str, default='', metavar='NAME',
               help="the paper's CIFAR training transform instead of timm's: 'basic' (4 px padded random crop + "
                    "flip) or 'basic+aa' (+ AutoAugment, CIFAR-10 policy); "
                    "--scale/--ratio/--hflip/--color-jitter unused"),
        Option('--aug-repeats', type=float, default=0, help="repeated augmentation: each image this many times "
               "per epoch (timm's RepeatAugSampler)"),
        Option('--aug-splits', type=int, default=0, help='AugMix splits (0 or >= 2); a SAM chunk keeps its splits'),
        Option('--jsd-loss', action='store_true', default=False,
               help='Jensen-Shannon + CE loss (with --aug-splits)'),
        Option('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss'),
        Option('--bce-sum', action='store_true', default=False, help='BCE summed over classes'),
        Option('--bce-target-thresh', type=float, default=None, help='binarize soft BCE targets at this threshold'),
        Option('--bce-pos-weight', type=float, default=None, help='BCE positive weight'),
        Option('--reprob', type=float, default=0., range='[0, 1]'),
        Option('--remode', type=str, default='pixel'),
        Option('--recount', type=int, default=1, range='[0, inf)'),
        Option('--resplit', action='store_true', default=False, help='no random erasing on the first (clean) split'),
        Option('--mixup', type=float, default=0.0, range='[0, inf)'),
        Option('--cutmix', type=float, default=0.0, range='[0, inf)'),
        Option('--cutmix-minmax', type=float, nargs='+', default=None, range='[0, 1]'),
        Option('--mixup-prob', type=float, default=1.0, range='[0, 1]'),
        Option('--mixup-switch-prob', type=float, default=0.5, range='[0, 1]'),
        Option('--mixup-mode', type=str, default='batch'),
        Option('--mixup-off-epoch', default=0, type=int, range='[0, inf)'),
        Option('--smoothing', type=float, default=0.1, range='[0, 1)'),
        Option('--train-interpolation', type=str, default='random'),
        Option('--drop', type=float, default=0.0, range='[0, 1)'),
        Option('--drop-connect', type=float, default=None, help='deprecated in timm: use --drop-path'),
        Option('--drop-path', type=float, default=None, range='[0, 1)'),
        Option('--drop-block', type=float, default=None),
    )),
    ('Batch norm', (
        Option('--bn-momentum', type=float, default=None, help='BatchNorm momentum override'),
        Option('--bn-eps', type=float, default=None, help='BatchNorm epsilon override'),
        Option('--split-bn', action='store_true', default=False, help='one BatchNorm per augmentation split'),
    )),
    ('Model EMA', (
        Option('--model-ema', action='store_true', default=False),
        Option('--model-ema-decay', type=float, default=0.9998, range='[0, 1]'),
        Option('--model-ema-warmup', action='store_true'),
        Option('--model-ema-force-cpu', action='store_true', default=False,
               help='keep the EMA on the CPU (not validated)'),
    )),
    ('Knowledge distillation', (
        Option('--kd-model-name', default=None, type=str, help='teacher model (timm name, pretrained weights)'),
        Option('--kd-pretrained-path', default=None, type=str,
               help="teacher weights from this file instead of timm's hub (not in timm's script)"),
        Option('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token']),
        Option('--kd-loss-type', default='kl', type=str),
        Option('--distill-loss-weight', default=None, type=float),
        Option('--task-loss-weight', default=None, type=float),
        Option('--kd-temperature', default=4.0, type=float),
        Option('--kd-student-feature-dim', default=None, type=int),
        Option('--kd-teacher-feature-dim', default=None, type=int),
        Option('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard']),
    )),
    ('Misc', (
        Option('--seed', type=int, default=42),
        Option('--worker-seeding', type=str, default='all', help="worker seed mode ('all', 'part')"),
        Option('--log-interval', type=int, default=50),
        Option('--val-interval', type=int, default=1, metavar='N', help='validate and checkpoint every N epochs'),
        Option('--recovery-interval', type=int, default=0, metavar='N',
               help='write a recovery checkpoint every N updates (--resume takes it)'),
        Option('--checkpoint-hist', type=int, default=10),
        Option('-j', '--workers', type=int, default=4),
        Option('--save-images', action='store_true', default=False, help='save the input batch at each log line'),
        Option('--pin-mem', action='store_true', default=False),
        Option('--no-prefetcher', action='store_true', default=False),
        Option('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)'),
        Option('--experiment', default='', type=str, metavar='NAME',
               help='run folder name (default: date-model-size)'),
        Option('--eval-metric', default='top1', type=str),
        Option('--tta', type=int, default=0, metavar='N', help='test-time augmentation factor of validation'),
        Option('--use-multi-epochs-loader', action='store_true', default=False),
        Option('--log-wandb', action='store_true', default=False, help="log to wandb (pip install '.[wandb]')"),
        Option('--wandb-project', default=None, type=str),
        Option('--wandb-tags', default=[], type=str, nargs='+'),
        Option('--wandb-resume-id', default='', type=str, metavar='ID'),
        Option('--local_rank', '--local-rank', default=0, type=int),
    )),
    ('Scheduled resolution', (
        Option('--train-img-sizes', type=int, nargs='+', default=None),
        Option('--train-batch-sizes', type=int, nargs='+', default=None),
        Option('--train-size-probs', type=float, nargs='+', default=None),
        Option('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive')),
        Option('--train-size-schedule-spread', type=float, default=0.65),
        Option('--train-size-random-mix', type=float, default=0.1),
        Option('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None),
        Option('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear')),
    )),
    ('NaFlex loader', (
        Option('--naflex-loader', action='store_true', default=False),
        Option('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024], range='[1, inf)'),
        Option('--naflex-max-seq-len', type=int, default=576, range='[1, inf)'),
        Option('--naflex-patch-sizes', type=int, nargs='+', default=None, range='[1, inf)'),
        Option('--naflex-patch-size-probs', type=float, nargs='+', default=None, range='[0, inf)'),
        Option('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear')),
        Option('--naflex-patchify-channels-first', action='store_true', default=False),
    )),
)

SAM_GROUPS = (
    ('SAM', (
        Option('--rho', type=float, default=0.05, help='SAM neighbourhood size (> 0)', rule='rho'),
        Option('--sam-eta', type=float, default=None, help='variant eta (default: the variant\'s, paper Table 10)',
               rule='eta'),
        Option('--sam-base', type=str, default='sgd', help='base optimizer of the descent step (timm name)'),
        Option('--sam-m', type=int, default=None, help='m-sharpness chunk size (default: the whole per-GPU batch)'),
        Option('--sam-bn-update', type=str, default='both', choices=('both', 'ascent'),
               help='which passes update BatchNorm running statistics'),
        Option('--sam-ascent-frac', type=float, default=1.0,
               help='ascent on this fraction of each chunk (cost lever, deviates from the paper if < 1)',
               rule='ascent_frac'),
        Option('--sam-sparsity', type=float, default=None, metavar='S',
               help='sam-rand / ssam-f / ssam-d: fraction of the parameters left unperturbed (default: sam-rand '
                    'SAM-ON\'s sparsity on the model, ssam-* 0.5)', range='[0, 1)'),
        Option('--sam-mask-update', type=int, default=5, metavar='EPOCHS',
               help='ssam-f / ssam-d: recompute the mask every this many epochs (Mi et al.: 5)'),
        Option('--ssam-fisher-samples', type=int, default=1024, metavar='N',
               help='ssam-f: single-sample gradients in the empirical Fisher (per rank)'),
        Option('--ssam-drop-rate', type=float, default=0.5, help='ssam-d: fraction of the mask redrawn at the '
               'first update (decays with a cosine over the run)', range='[0, 1]'),
        Option('--sam-interval', type=int, default=1, metavar='K',
               help='the SAM update every K updates, the base optimizer\'s plain step between (interval SAM)'),
        Option('--gsam-alpha', type=float, default=None, help='gsam*: weight of the orthogonal part of g (>= 0; '
               'default 0)'),
        Option('--rho-min', type=float, default=None, help='gsam*: rho at --min-lr, rho following the lr '
               '(default: --rho, constant)'),
        Option('--looksam-alpha', type=float, default=None, help='looksam*: weight of the kept g_v on the '
               'updates between the SAM ones (>= 0; default 0.7; k is --sam-interval)'),
        Option('--esam-beta', type=float, default=None, help='esam*: fraction of the perturbed tensors drawn each '
               'update (in (0, 1]; default 0.6)'),
        Option('--esam-gamma', type=float, default=None, help='esam*: fraction of each chunk in the descent, '
               'those whose loss rose most (in (0, 1]; default 0.5)'),
        Option('--sam-epochs', type=str, default=None, metavar='START:END',
               help='SAM step only in epochs [START, END) (either may be empty), the base optimizer\'s plain step '
                    'elsewhere, on the same state (paper Figure 5)'),
    )),
    ('Normalization-layer ablations', (
        Option('--fix-norm', action='store_true', default=False,
               help='norm layers\' gamma = 1, beta = 0, frozen (paper Appendix B.4)'),
        Option('--train-only-norm', action='store_true', default=False,
               help='freeze every parameter outside the norm layers (paper Appendix B.5, Table 13)'),
        Option('--sam-chunks', type=str, default='auto', choices=('auto', 'batched', 'sequential'),
               help='--sam-m chunks of a batch: all in one ascent and one descent pass (batched, ghost '
                    'normalization), one pass pair each (sequential), or batched where possible (auto)'),
    )),
)

OPTIONS: Dict[str, Option] = {o.dest: o for _, group in TIMM_GROUPS + SAM_GROUPS for o in group}
SAM_ONLY = ('rho', 'sam_eta', 'sam_ascent_frac')   # number rules skipped (the flags warned about) without a SAM --opt


def option_default(dest: str) -> Any:
    """The option's own default (a YAML config changes only the defaults of the parser that read it)."""
    return OPTIONS[dest].default


def _add_groups(parser: argparse.ArgumentParser, groups) -> None:
    for title, options in groups:
        g = parser.add_argument_group(title)
        for o in options:
            g.add_argument(*o.flags, **o.kwargs)


def add_sam_arguments(parser: argparse.ArgumentParser) -> None:
    """The SAM flags: rho, eta, base optimizer, m-sharpness, sparse variants, --sam-epochs, the norm-layer
    ablations and the chunk path."""
    _add_groups(parser, SAM_GROUPS)


config_parser = ArgumentParser(prog='train.py', description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file; its keys are this script\'s argument names')


def build_parser() -> ArgumentParser:
    """train.py's parser: timm's groups up to the optimizer, the SAM flags, then timm's other groups."""
    p = ArgumentParser(prog='train.py', description='timm training with SAM / SAM-ON', parents=[config_parser])
    split = next(i for i, (title, _) in enumerate(TIMM_GROUPS) if title == 'Optimizer') + 1
    _add_groups(p, TIMM_GROUPS[:split])
    add_sam_arguments(p)
    _add_groups(p, TIMM_GROUPS[split:])
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line over the YAML config (``-c``) over the defaults; the parser is built once."""
    args_config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    if args_config.config:
        # the file and each value checked against its flag as the command line checks it (sam_on_timm.config)
        path = args_config.config
        try:
            cfg = load_config(path)
            drop_config_key(cfg, path)
            actions = {a.dest: a for a in parser._actions}
            for key, value in cfg.items():
                if key not in actions:
                    raise UsageError(f"config file '{path}': unknown key '{key}' (not a train.py argument; "
                                     f"keys are argument names with '_', e.g. batch_size, sam_m)")
                cfg[key] = config_value(key, value, actions[key], path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        # a YAML null (timm's args.yaml writes one for every option left unset) means the flag's default
        parser.set_defaults(**{k: v for k, v in cfg.items() if v is not None})
    try:
        args = parser.parse_args(remaining)
    except SystemExit as e:  # argparse already printed its one-line usage error (or --help)
        raise SystemExit(2 if e.code else 0)
    args.config = args_config.config
    return args


def given_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The script's arguments as given (flags over YAML over defaults), before computed values (lr from
    lr-base, input_size, ...) are filled in: what args.yaml holds, so that ``-c args.yaml`` repeats the run.
    Where to resume from is not part of the run: a resumed run's args.yaml would otherwise resume again."""
    dests = set(OPTIONS) - {'resume', 'no_resume_opt', 'resume_partial', 'start_epoch'}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in dests}

