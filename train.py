#!/usr/bin/env python3
"""ImageNet-style training with timm, plus SAM and SAM-ON.

Same command line and YAML ``-c`` keys as timm's train.py (the subset listed in the README), plus
the SAM flags. ``--opt`` takes any timm optimizer name, so SGD baselines run from here too:

    python train.py -c hparams/demo/sam-on.yaml
    torchrun --nproc_per_node=8 train.py -c hparams/resnet50/sam-on-layerl2.yaml --data-dir /data/imagenet

The SAM algorithm itself lives in ``sam_on_timm`` (``sam_on_timm.train_step``); this script wires
data, model, schedule, EMA, AMP, checkpoints and logging around it.
"""
import argparse
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, NamedTuple

import torch
import yaml

_logger = logging.getLogger('train')


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file; its keys are this script\'s argument names')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='timm training with SAM / SAM-ON', parents=[config_parser])
    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (positional is *deprecated*, use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    g.add_argument('--dataset', metavar='NAME', default='', help='dataset type + name ("<type>/<name>"), default: ImageFolder/ImageTar')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation')
    g.add_argument('--dataset-download', action='store_true', default=False)
    g.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    g.add_argument('--demo-data', default='', type=str, metavar='NAME',
                   help="write a bundled demo data set ('mnist5k') into --data-dir (or the cache) if missing")

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help='start from timm\'s pretrained weights (--no-pretrained overrides a recipe)')
    g.add_argument('--pretrained-path', default=None, type=str, help='load this file as the pretrained weights (head adapted as for hub weights)')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH', help='load this checkpoint into the model (strict)')
    g.add_argument('--resume', default='', type=str, metavar='PATH', help='resume model, optimizer, scaler, EMA, epoch and RNG from a checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', default=False)
    g.add_argument('--num-classes', type=int, default=None, metavar='N')
    g.add_argument('--gp', default=None, type=str, metavar='POOL')
    g.add_argument('--img-size', type=int, default=None, metavar='N')
    g.add_argument('--in-chans', type=int, default=None, metavar='N')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='per-GPU batch size')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend (default inductor); the SAM ascent keeps its lean graph')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help="activation checkpointing (timm's non-reentrant checkpoints)")
    g.add_argument('--device', default='cuda', type=str)
    g.add_argument('--amp', action='store_true', default=False)
    g.add_argument('--amp-dtype', default='float16', type=str, help='float16 (GradScaler) or bfloat16 (no scaler)')
    g.add_argument('--sync-bn', action='store_true', default=False)
    g.add_argument('--dist-bn', type=str, default='reduce', help='BN stats across ranks at epoch end ("broadcast", "reduce", "")')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='timm optimizer name, or a SAM name (sam-on-layerl2, ...)')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', help='"norm", "value" or "agc"')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--layer-decay-min-scale', type=float, default=None)
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None)
    g.add_argument('--opt-foreach', action='store_true', default=None, help='force foreach optimizer kernels')

    g = p.add_argument_group('SAM')
    g.add_argument('--rho', type=float, default=0.05, help='SAM neighbourhood size (> 0)')
    g.add_argument('--sam-eta', type=float, default=None, help='variant eta (default: the variant\'s, paper Table 10)')
    g.add_argument('--sam-base', type=str, default='sgd', help='base optimizer of the descent step (timm name)')
    g.add_argument('--sam-m', type=int, default=None, help='m-sharpness chunk size (default: the whole per-GPU batch)')
    g.add_argument('--sam-bn-update', type=str, default='both', choices=('both', 'ascent'),
                   help='which passes update BatchNorm running statistics')
    g.add_argument('--sam-ascent-frac', type=float, default=1.0,
                   help='ascent on this fraction of each chunk (cost lever, deviates from the paper if < 1)')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (default: lr-base scaled by global batch)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='"linear" or "sqrt" (default by optimizer)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--lr-cycle-mul', type=float, default=1.0)
    g.add_argument('--lr-cycle-decay', type=float, default=0.5)
    g.add_argument('--lr-cycle-limit', type=int, default=1)
    g.add_argument('--lr-k-decay', type=float, default=1.0)
    g.add_argument('--lr-decay-fn', type=str, default=None, help="decay phase of wsd / rsqrt (e.g. '1-sqrt', 'linear')")
    g.add_argument('--lr-stable-timescale', type=float, default=None, help='rsqrt timescale in epochs')
    g.add_argument('--warmup-lr', type=float, default=1e-5)
    g.add_argument('--min-lr', type=float, default=0)
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--start-epoch', default=None, type=int)
    g.add_argument('--stop-epoch', default=None, type=int, help='stop after this many epochs (the schedule still spans --epochs)')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+')
    g.add_argument('--decay-epochs', type=float, default=None, help='step interval; wsd / rsqrt: decay length '
                   '(a fraction < 1 of the schedule; default: step 90, wsd / rsqrt 0.2)')
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-prefix', action='store_true', default=False)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--patience-epochs', type=int, default=10)
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1)

    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action='store_true', default=False)
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='P',
                   help='apply the color jitter with this probability (default: always)')
    g.add_argument('--grayscale-prob', type=float, default=0., metavar='P', help='random grayscale probability')
    g.add_argument('--gaussian-blur-prob', type=float, default=0., metavar='P', help='random gaussian blur probability')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.0)
    g.add_argument('--cutmix', type=float, default=0.0)
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch')
    g.add_argument('--mixup-off-epoch', default=0, type=int)
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--train-interpolation', type=str, default='random')
    g.add_argument('--drop', type=float, default=0.0)
    g.add_argument('--drop-path', type=float, default=None)

    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False)
    g.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='run folder name (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', type=str)
    g.add_argument('--local_rank', '--local-rank', default=0, type=int)
    return p


def _config_value(path, action, value):
    """A YAML value checked and converted as argparse would convert it on the command line."""
    if value is None or action.type is None or isinstance(value, bool):
        return value
    try:
        if action.nargs in ('+', '*') or isinstance(action.nargs, int):
            if not isinstance(value, (list, tuple)):
                raise ValueError('expected a list')
            return [action.type(v) for v in value]
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError('expected an integer')   # int(1.5) would silently give 1
        value = action.type(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config file '{path}': bad value {value!r} for '{action.dest}' ({e})") from None
    if action.choices is not None and value not in action.choices:   # as argparse checks the command line
        raise UsageError(f"config file '{path}': bad value {value!r} for '{action.dest}' "
                         f"(choose from {', '.join(map(str, action.choices))})")
    return value


# Options of timm's own train.py that this script does not implement, with their default where it is not
# falsy. In a YAML config (e.g. an args.yaml of a timm run) such a key is ignored while it is off (its default,
# or None / false / 0 / '' / []) and an error when it is on; any other unknown key is an error (typos).
TIMM_ONLY_OPTIONS = dict.fromkeys((
    'train_num_samples', 'val_num_samples', 'input_img_mode', 'input_key', 'target_key', 'dataset_trust_remote_code',
    'model_kwargs', 'head_init_scale', 'head_init_bias', 'torchscript', 'fuser', 'fast_norm', 'model_dtype',
    'device_modules', 'synchronize_step', 'no_ddp_bb', 'opt_kwargs', 'epoch_repeats', 'aug_repeats', 'aug_splits',
    'jsd_loss', 'bce_loss', 'bce_sum', 'bce_target_thresh', 'bce_pos_weight', 'resplit', 'train_crop_mode',
    'drop_connect', 'drop_block', 'bn_momentum', 'bn_eps', 'split_bn', 'model_ema_force_cpu', 'recovery_interval',
    'save_images', 'use_multi_epochs_loader', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id', 'tta'))
TIMM_ONLY_OPTIONS.update(
    worker_seeding='all', amp_impl='native',
    # NaFlex loader (variable sequence lengths for NaFlexViT models)
    naflex_loader=False, naflex_train_seq_lens=[128, 256, 576, 784, 1024], naflex_max_seq_len=576,
    naflex_patch_sizes=None, naflex_patch_size_probs=None, naflex_loss_scale='linear',
    naflex_patchify_channels_first=False,
    # knowledge distillation
    kd_model_name=None, kd_distill_type='logit', kd_loss_type='kl', distill_loss_weight=None, task_loss_weight=None,
    kd_temperature=4.0, kd_student_feature_dim=None, kd_teacher_feature_dim=None, kd_token_distill_type='soft')


def parse_args(argv=None):
    parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        if not os.path.isfile(args_config.config):
            raise UsageError(f"config file '{args_config.config}' does not exist")
        with open(args_config.config) as f:
            try:
                cfg = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise UsageError(f"config file '{args_config.config}' is not valid YAML: "
                                 f"{' '.join(str(e).split())}") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"config file '{args_config.config}' must be a mapping of argument names to values")
        actions = {a.dest: a for a in parser._actions}
        off = [k for k, v in cfg.items() if k not in actions and k in TIMM_ONLY_OPTIONS
               and (not v or v == TIMM_ONLY_OPTIONS[k])]
        if off:
            _logger.warning(f"config file '{args_config.config}': ignoring options of timm's train.py that are off "
                            f"and not implemented here: {', '.join(off)}")
        for key, value in [(k, v) for k, v in cfg.items() if k not in off]:
            if key in TIMM_ONLY_OPTIONS and key not in actions:
                raise UsageError(f"config file '{args_config.config}': '{key}: {value}' is an option of timm's "
                                 f"train.py that this script does not implement (remove it, or set it off)")
            if key not in actions:
                raise UsageError(f"config file '{args_config.config}': unknown key '{key}' (not a train.py argument; "
                                 f"keys are argument names with '_', e.g. batch_size, sam_m)")
            cfg[key] = _config_value(args_config.config, actions[key], value)
        parser.set_defaults(**{k: v for k, v in cfg.items() if k not in off})
    try:
        args = parser.parse_args(remaining)
    except SystemExit as e:  # argparse already printed its one-line usage error
        raise SystemExit(2 if e.code else 0)
    args.config = args_config.config
    return args


# ---------------------------------------------------------------------------------------------
# checks that run before anything is created or written
# ---------------------------------------------------------------------------------------------
EVAL_METRICS = ('top1', 'top5', 'loss')   # what validate() returns


def validate_args(args) -> None:
    import sam_on_timm  # noqa: F401  (registers the SAM optimizer names with timm)
    from timm.optim import list_optimizers
    opt_name = args.opt.lower().split('_')[-1]
    if opt_name not in list_optimizers():
        raise UsageError(f"unknown --opt '{args.opt}'; SAM names: {', '.join(sam_on_timm.SAM_OPTIMIZERS)}; "
                         f"or any timm optimizer (timm.optim.list_optimizers(), e.g. sgd, adamw)")
    args.is_sam = sam_on_timm.is_sam_name(args.opt)
    if args.is_sam:
        if not args.rho > 0:
            raise UsageError(f'--rho must be > 0, got {args.rho}')
        if args.sam_eta is not None and not args.sam_eta >= 0:
            raise UsageError(f'--sam-eta must be >= 0, got {args.sam_eta}')
        if not 0 < args.sam_ascent_frac <= 1:
            raise UsageError(f'--sam-ascent-frac must be in (0, 1], got {args.sam_ascent_frac}')
        base = args.sam_base.lower()
        if base.split('_')[-1] not in list_optimizers() or sam_on_timm.is_sam_name(base):   # lookahead_ prefix too
            raise UsageError(f"unknown --sam-base '{args.sam_base}': a timm optimizer name that is not a SAM name "
                             f"(e.g. sgd, momentum, adamw)")
    if args.sam_m is not None and (args.sam_m <= 0 or args.batch_size % args.sam_m):
        raise UsageError(f'--sam-m {args.sam_m} must be a positive divisor of the per-GPU batch size -b {args.batch_size}')
    if args.batch_size <= 0 or args.grad_accum_steps <= 0:
        raise UsageError('-b/--batch-size and --grad-accum-steps must be positive')
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise UsageError(f"--amp-dtype must be float16 or bfloat16, got '{args.amp_dtype}'")
    if args.clip_mode not in ('norm', 'value', 'agc'):
        raise UsageError(f"--clip-mode must be norm, value or agc, got '{args.clip_mode}'")
    if args.data and not args.data_dir:
        args.data_dir = args.data
    if args.demo_data:
        from sam_on_timm.demo_data import DEMO_DATASETS, default_demo_dir
        if args.demo_data not in DEMO_DATASETS:
            raise UsageError(f"unknown --demo-data '{args.demo_data}'; valid: {', '.join(DEMO_DATASETS)}")
        args.data_dir = args.data_dir or default_demo_dir(args.demo_data)
        from sam_on_timm.demo_data import check_demo_dir
        try:
            check_demo_dir(args.data_dir)   # on every rank, before anything is written
        except ValueError as e:
            raise UsageError(f'--demo-data {args.demo_data} --data-dir {e}') from None
    elif '/' not in args.dataset or args.dataset.split('/')[0] in ('', 'folder', 'imagefolder'):
        if not args.data_dir:
            raise UsageError('no data: pass --data-dir DIR (an ImageFolder with train/ and validation/ folders)')
        if os.path.isfile(args.data_dir) and not args.data_dir.endswith('.tar'):
            raise UsageError(f"--data-dir '{args.data_dir}' is a file: pass a folder or an image .tar (timm's ImageTar)")
        if not os.path.exists(args.data_dir):
            raise UsageError(f"data directory '{args.data_dir}' does not exist")
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint '{args.resume}' does not exist")
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise UsageError(f"--initial-checkpoint '{args.initial_checkpoint}' does not exist")
    if args.pretrained_path and not os.path.isfile(args.pretrained_path):
        raise UsageError(f"--pretrained-path '{args.pretrained_path}' does not exist")
    if args.stop_epoch is not None and args.stop_epoch <= 0:
        raise UsageError(f'--stop-epoch must be positive, got {args.stop_epoch}')
    if args.epochs <= 0:
        raise UsageError(f'--epochs must be positive, got {args.epochs}')
    if (args.img_size is not None and args.img_size <= 0) or (args.input_size and min(args.input_size) <= 0):
        raise UsageError(f'--img-size / --input-size must be positive, got {args.img_size} / {args.input_size}')
    if args.checkpoint_hist < 1:
        raise UsageError(f'--checkpoint-hist must be at least 1, got {args.checkpoint_hist}')
    for flag, values, sizes in (('--scale', args.scale, (2,)), ('--ratio', args.ratio, (2,)),
                                ('--cutmix-minmax', args.cutmix_minmax, (2,)), ('--mean', args.mean, (1, 3)),
                                ('--std', args.std, (1, 3))):
        if values is not None and len(values) not in sizes:
            raise UsageError(f"{flag} takes {' or '.join(map(str, sizes))} values, got {len(values)}")
    if args.log_interval <= 0:
        raise UsageError(f'--log-interval must be positive, got {args.log_interval}')
    if args.start_epoch is not None and args.start_epoch < 0:
        raise UsageError(f'--start-epoch must be >= 0, got {args.start_epoch}')
    if args.model_ema and not 0 <= args.model_ema_decay <= 1:
        raise UsageError(f'--model-ema-decay must be in [0, 1] (e.g. 0.9998), got {args.model_ema_decay}')
    for flag in ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'color_jitter_prob', 'grayscale_prob',
                 'gaussian_blur_prob'):
        p = getattr(args, flag)
        if p is not None and not 0 <= p <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} is a probability: it must be in [0, 1], got {p}")
    if args.eval_metric not in EVAL_METRICS:
        raise UsageError(f"--eval-metric must be one of {', '.join(EVAL_METRICS)}, got '{args.eval_metric}'")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device '{args.device}' is not a torch device (e.g. cuda, cuda:0, cpu)") from None


def given_args(args) -> Dict[str, Any]:
    """The script's arguments as given (flags over YAML over defaults), before computed values (lr from
    lr-base, input_size, ...) are filled in: what args.yaml holds, so that ``-c args.yaml`` repeats the run.
    Where to resume from is not part of the run: a resumed run's args.yaml would otherwise resume again."""
    dests = {a.dest for a in build_parser()._actions} - {'help', 'config', 'resume', 'no_resume_opt', 'start_epoch'}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in dests}


def output_dir_for(args) -> str:
    from timm.models import safe_model_name   # as timm's train.py: no hub prefix, '.' and '/' as '_'
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(args.input_size[-1])])
    return os.path.join(args.output or './output/train', exp_name)


def check_output_dir(args, output_dir: str) -> None:
    """Never overwrite another run's checkpoints: an existing run folder is only reused to resume it."""
    if not os.path.isdir(output_dir):
        return
    has_ckpt = any(f.endswith('.pth.tar') for f in os.listdir(output_dir))
    resuming_here = args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir)
    if has_ckpt and not resuming_here:
        raise UsageError(f"output folder '{output_dir}' already holds checkpoints of another run: choose another "
                         f"--experiment, or --resume {os.path.join(output_dir, 'last.pth.tar')}")
    summary = os.path.join(output_dir, 'summary.csv')
    if os.path.isfile(summary):
        if not resuming_here:   # a run that stopped before its first checkpoint
            raise UsageError(f"output folder '{output_dir}' already holds another run's summary.csv: choose another "
                             f"--experiment, or remove the folder")
        with open(summary) as f:
            header = f.readline().strip().split(',')
        for what, flag, column in (('SAM', args.is_sam, 'train_eps_norm'), ('EMA', bool(args.model_ema and args.val_split), 'eval_ema_top1')):
            if (column in header) != flag:
                raise UsageError(f"--resume into '{output_dir}': its summary.csv was written {'with' if column in header else 'without'} "
                                 f"{what} columns and this run has {'none' if not flag else 'them'}: resume with the run's "
                                 f"--opt / --model-ema, or pass another --experiment")


# ---------------------------------------------------------------------------------------------
# training and validation
# ---------------------------------------------------------------------------------------------
def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, amp_autocast,
                    loss_scaler, model_ema, mixup_fn, num_updates, clip_parameters=None):
    from sam_on_timm.train_step import split_chunks, train_step
    accum = args.grad_accum_steps
    last_idx = len(loader) - 1
    model.train()
    sums = None  # device tensors: loss, ascent loss, ||eps||, skipped, updates
    chunks, t0, n_img = [], time.time(), 0
    for batch_idx, (x, y) in enumerate(loader):
        if not args.prefetcher:
            x, y = x.to(device), y.to(device)
            if mixup_fn is not None:
                x, y = mixup_fn(x, y)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        chunks.extend(split_chunks(x, y, args.sam_m))
        n_img += x.shape[0]
        if (batch_idx + 1) % accum and batch_idx != last_idx:
            continue
        stats = train_step(model, optimizer, chunks, loss_fn, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                           clip_grad=args.clip_grad, clip_mode=args.clip_mode, clip_parameters=clip_parameters,
                           bn_update=args.sam_bn_update, ascent_frac=args.sam_ascent_frac)
        chunks = []
        num_updates += 1
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        zero = torch.zeros((), device=stats.loss.device)
        row = torch.stack([stats.loss.float(), *(zero if v is None else v.float() for v in
                                                 (stats.ascent_loss, stats.eps_norm, stats.skipped)), zero + 1])
        sums = row if sums is None else sums + row
        if batch_idx == last_idx or (num_updates % args.log_interval == 0):
            shown = sums
            if args.distributed:   # every rank: the line shows all ranks' running averages, as upstream's does
                shown = sums.clone()
                torch.distributed.all_reduce(shown)
            if args.rank == 0:
                s = (shown / shown[4]).tolist()
                lr = optimizer.param_groups[0]['lr']
                msg = (f'Train: {epoch} [{batch_idx + 1:>4d}/{len(loader)} ({100. * (batch_idx + 1) / len(loader):>3.0f}%)]  '
                       f'loss {s[0]:.4f}  lr {lr:.3e}  {n_img * args.world_size / (time.time() - t0):.1f} img/s')
                if args.is_sam:
                    msg += f'  ascent-loss {s[1]:.4f}  |eps| {s[2]:.4g}  skipped {int(round(shown[3].item()))}'
                _logger.info(msg)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
    if args.distributed:
        torch.distributed.all_reduce(sums)
    sums = sums.tolist()
    n = sums[4]
    metrics = OrderedDict(loss=sums[0] / n)
    if args.is_sam:
        metrics.update(ascent_loss=sums[1] / n, descent_loss=sums[0] / n, sharpness=(sums[0] - sums[1]) / n,
                       eps_norm=sums[2] / n, skipped_perturbations=int(round(sums[3])))
    return metrics, num_updates


@torch.no_grad()
def validate(model, loader, loss_fn, args, device, amp_autocast):
    from timm.utils import accuracy
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    for x, y in loader:
        if not args.prefetcher:
            x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            out = model(x)
        loss = loss_fn(out.float(), y)
        top1, top5 = accuracy(out, y, topk=(1, min(5, out.shape[-1])))
        n = x.shape[0]
        totals += torch.stack([loss.double() * n, top1.double() * n / 100, top5.double() * n / 100,
                               torch.tensor(n, dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return OrderedDict(loss=loss / n, top1=100. * top1 / n, top5=100. * top5 / n)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None) -> int:
    from timm.utils import setup_default_logging
    if not logging.getLogger().handlers:  # once per process (main() may run several times in tests)
        setup_default_logging()
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # before or after the epoch loop (which handles its own): no traceback
        print('train.py: interrupted', file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# the run, step by step: device, model, optimizer, resume, data, schedule, loop
# ---------------------------------------------------------------------------------------------
def run(args) -> int:
    import sam_on_timm  # noqa: F401  (registers the SAM optimizer names with timm)
    as_given = given_args(args)   # before validate_args fills in computed values
    validate_args(args)
    device = setup_device(args)
    model, data_config = create_model(args)
    # every rank checks (so that all of them stop on a bad folder); only rank 0 writes
    output_dir = output_dir_for(args)
    check_output_dir(args, output_dir)
    model = place_model(args, model, device)
    optimizer = create_optimizer(args, model)
    amp_autocast, loss_scaler = setup_amp(args, device)
    resumed = resume(args, model, optimizer, loss_scaler)
    model_ema = create_ema(args, model, device, resumed)
    model, clip_parameters = wrap_model(args, model, device)
    data = create_data(args, data_config, device)
    schedule = create_schedule(args, optimizer, data, resumed)
    if schedule.end_epoch <= schedule.start_epoch:   # nothing left: write nothing (args.yaml, checkpoints stay)
        if args.rank == 0:
            _logger.info(f'nothing to train: the run starts at epoch {schedule.start_epoch} and ends before epoch '
                         f'{schedule.end_epoch} (--epochs {args.epochs}, --stop-epoch {args.stop_epoch})')
        if args.distributed:
            torch.distributed.destroy_process_group()
        return 0
    saver = create_saver(args, as_given, output_dir, model, optimizer, model_ema, loss_scaler, schedule, resumed)
    resume_random_state(args, resumed, schedule.start_epoch)
    return train_loop(args, model, model_ema, optimizer, loss_scaler, amp_autocast, clip_parameters, data, schedule,
                      saver, output_dir, device)


def setup_device(args) -> torch.device:
    """The device (and process group under torchrun), demo data, seeds; warnings about flags that do not act."""
    from timm.utils import init_distributed_device, random_seed
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():   # this machine, not the recipe
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    device = init_distributed_device(args)
    if args.distributed:
        _logger.info(f'Distributed training: rank {args.rank} of {args.world_size}, device {device}')
    if args.demo_data:
        from sam_on_timm.demo_data import prepare_demo_data
        if args.local_rank == 0:  # one writer per node; the others wait for it
            prepare_demo_data(args.demo_data, args.data_dir)
        if args.distributed:
            torch.distributed.barrier()
    args.prefetcher = not args.no_prefetcher and device.type == 'cuda'
    if device.type == 'cuda':   # as timm's train.py: TF32 matmuls, autotuned convs (fixed input shapes)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    random_seed(args.seed, args.rank)

    if not args.is_sam and args.rank == 0:
        defaults = build_parser()   # the parser's own defaults (a YAML config changes only the live parser's)
        ignored = [f'--{k.replace("_", "-")} {getattr(args, k)}'
                   for k in ('rho', 'sam_eta', 'sam_base', 'sam_bn_update', 'sam_ascent_frac')
                   if getattr(args, k) != defaults.get_default(k)]
        if ignored:
            _logger.warning(f"{', '.join(ignored)}: no effect with --opt {args.opt} (not a SAM optimizer)")
    if args.is_sam and args.sync_bn:
        _logger.warning('--sync-bn shares BatchNorm statistics across ranks: the per-GPU m-sharpness of the paper '
                        'keeps them per rank (and per --sam-m chunk); drop --sync-bn to reproduce it')
    return device


def create_model(args):
    """timm's model and its data config (input size, interpolation, mean / std, crop)."""
    import timm
    from sam_on_timm.train_step import ascent_samples
    from timm.data import resolve_data_config
    in_chans = 3 if args.in_chans is None else args.in_chans
    if args.input_size is not None:
        in_chans = args.input_size[0]
    overlay = dict(file=args.pretrained_path) if args.pretrained_path else None
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), in_chans=in_chans,
            num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
            pretrained_cfg_overlay=overlay, checkpoint_path=args.initial_checkpoint or None)
    except Exception as e:  # unknown name, weights that do not fit or cannot be fetched: user input
        raise UsageError(f"cannot create model '{args.model}': {_first_line(e)}") from None
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(enable=True)
        except (AssertionError, AttributeError, NotImplementedError):
            raise UsageError(f"--grad-checkpointing: model '{args.model}' does not support activation checkpointing") from None
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    args.input_size = data_config['input_size']
    if args.gaussian_blur_prob and min(args.input_size[1:]) < 12:   # it would fail in the first batch
        raise UsageError(f"--gaussian-blur-prob needs images of at least 12 px (timm's blur kernel is 23 px), "
                         f"got {args.input_size[1]}x{args.input_size[2]}")

    # chunks of one sample cannot be normalised by BatchNorm in training mode (it fails mid-epoch)
    m = args.sam_m or args.batch_size
    n_ascent = ascent_samples(m, args.sam_ascent_frac) if args.is_sam else m
    if min(m, n_ascent) < 2 and any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        which = f'the ascent chunk has {n_ascent}' if n_ascent < m else f'a chunk has {m}'
        raise UsageError(f"'{args.model}' has BatchNorm, which needs at least 2 samples per pass: {which} "
                         f"(--sam-m / -b {m}{f', --sam-ascent-frac {args.sam_ascent_frac}' if n_ascent < m else ''})")
    return model, data_config


def place_model(args, model, device):
    """The model on its device and memory format; SyncBatchNorm across ranks when asked."""
    import timm
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = timm.layers.convert_sync_batchnorm(model)
    return model


def create_optimizer(args, model):
    """timm's optimizer factory (SAM names included); the lr from --lr-base and the global batch if not given."""
    from sam_on_timm.train_step import find_sam
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    global_batch = args.batch_size * args.world_size * args.grad_accum_steps
    if args.lr is None:
        scale = args.lr_base_scale or ('sqrt' if any(o in name.lower() for o in ('ada', 'lamb')
                                                     for name in (args.opt, args.sam_base if args.is_sam else '')) else 'linear')
        args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
        if args.rank == 0:
            _logger.info(f'lr {args.lr:.4g} from lr-base {args.lr_base} and global batch {global_batch} ({scale})')

    opt_kwargs = optimizer_kwargs(cfg=args)
    if args.is_sam:
        opt_kwargs.update(rho=args.rho, eta=args.sam_eta, base_opt=args.sam_base)
    try:
        optimizer = create_optimizer_v2(model, **opt_kwargs)
    except (ValueError, TypeError, IndexError, KeyError) as e:  # e.g. --opt-betas of the wrong length
        raise UsageError(f"cannot create optimizer '{args.opt}': {_first_line(e)}") from None
    sam = find_sam(optimizer)
    if sam is not None and args.rank == 0:
        _logger.info(repr(sam).split(', base=')[0] + ')')
    return optimizer


def setup_amp(args, device):
    """Autocast context and, for float16, timm's loss scaler."""
    from timm.utils import NativeScaler
    amp_autocast, loss_scaler = nullcontext, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
    return amp_autocast, loss_scaler


def resume(args, model, optimizer, loss_scaler):
    """--resume: weights, optimizer (unless --no-resume-opt), scaler and epoch (see sam_on_timm.checkpoint)."""
    from sam_on_timm.checkpoint import Resumed, load_resume
    if not args.resume:
        return Resumed()
    try:   # also checkpoints of timm's own train.py: args as a Namespace, DDP's module. prefix, bare weights
        resumed = load_resume(args.resume, model, None if args.no_resume_opt else optimizer, loss_scaler,
                              opt_name=args.opt)
    except Exception as e:  # not a checkpoint, or one of another model / optimizer
        raise UsageError(f"--resume '{args.resume}' cannot be loaded into this run: {_first_line(e)}") from None
    if resumed.checkpoint is None:
        _logger.info(f"--resume '{args.resume}' holds weights only: training starts at epoch 0")
    return resumed


def create_ema(args, model, device, resumed):
    """timm's ModelEmaV3 of the bare model (its weights from the checkpoint when resuming)."""
    from timm.utils import ModelEmaV3
    if not args.model_ema:
        return None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)
    if resumed.checkpoint is not None and 'state_dict_ema' in resumed.checkpoint:
        model_ema.module.load_state_dict(resumed.checkpoint['state_dict_ema'])
    return model_ema


def wrap_model(args, model, device):
    """Parameters to clip (before wrapping), then DDP and torch.compile around the model."""
    clip_parameters = None
    if args.clip_grad is not None:   # as timm's train.py: AGC leaves the classifier head (its last two tensors) out
        from timm.models import model_parameters
        clip_parameters = list(model_parameters(model, exclude_head='agc' in args.clip_mode))
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device] if device.type == 'cuda' else None)
    if args.torchcompile:
        try:
            model = torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)
        except Exception as e:  # unknown backend or mode
            raise UsageError(f'--torchcompile {args.torchcompile} --torchcompile-mode {args.torchcompile_mode}: '
                             f'{_first_line(e)}') from None
    elif args.torchcompile_mode:
        _logger.warning(f'--torchcompile-mode {args.torchcompile_mode} has no effect without --torchcompile')
    return model, clip_parameters


class Data(NamedTuple):
    """The data side of a run: datasets, loaders, mixup and the losses."""
    dataset_train: Any
    loader_train: Any
    loader_eval: Any           # None: --val-split '' (no validation)
    mixup_active: bool
    mixup_fn: Any              # mixup on the device batch (no prefetcher), else None
    train_loss_fn: Any
    validate_loss_fn: Any


def create_data(args, data_config, device) -> Data:
    """timm's datasets and loaders, mixup / cutmix and the training loss."""
    from timm.data import Mixup, FastCollateMixup, create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    try:
        dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                       class_map=args.class_map, download=args.dataset_download,
                                       batch_size=args.batch_size, seed=args.seed)
        dataset_eval = None   # --val-split '': no validation, as in timm's script
        if args.val_split:
            dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                          class_map=args.class_map, download=args.dataset_download,
                                          batch_size=args.batch_size)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:   # unknown dataset, class map, ...
        raise UsageError(f"cannot read the data (--dataset '{args.dataset}', --data-dir, --train-split, --val-split, "
                         f"--class-map): {_first_line(e)}") from None
    for split, ds in [('training', dataset_train)] + ([('validation', dataset_eval)] if dataset_eval is not None else []):
        # a label past the head is an index error mid-epoch (a device assert on CUDA). Folder and tar
        # readers know their classes; other datasets (torch/*, hfds/*, ...) are not checked here.
        labels = (getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or {}).values()
        n = max(labels, default=-1) + 1
        if n > args.num_classes:
            raise UsageError(f'the {split} data has {n} classes but the model head has {args.num_classes}: '
                             f'pass --num-classes {n}')
    if len(dataset_train) < args.batch_size * args.world_size:
        raise UsageError(f'the training split has {len(dataset_train)} images, fewer than one global batch '
                         f'({args.batch_size} x {args.world_size})')
    try:   # augmentation and loader settings are checked by timm as they are built
        collate_fn, mixup_fn = None, None
        mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
        if mixup_active:
            mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                              prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                              label_smoothing=args.smoothing, num_classes=args.num_classes)
            if args.prefetcher:
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                mixup_fn = Mixup(**mixup_args)
        loader_train = create_loader(
            dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
            no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, scale=args.scale,
            ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
            gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, mean=data_config['mean'],
            # as timm's train.py: the model's interpolation without augmentation or with none given
            interpolation=data_config['interpolation'] if args.no_aug or not args.train_interpolation
            else args.train_interpolation,
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed, collate_fn=collate_fn,
            pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
            persistent_workers=False)  # fresh workers each epoch: their seeds follow the restored RNG on resume
        loader_eval = None if dataset_eval is None else create_loader(
            dataset_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
            persistent_workers=False)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise UsageError(f'cannot build the data pipeline (--aa, --reprob/--remode, --scale, --ratio, --color-jitter, '
                         f'--interpolation, --mean/--std, --mixup/--cutmix, --workers): {_first_line(e)}') from None

    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = torch.nn.CrossEntropyLoss()
    train_loss_fn, validate_loss_fn = train_loss_fn.to(device), torch.nn.CrossEntropyLoss().to(device)
    return Data(dataset_train, loader_train, loader_eval, mixup_active, mixup_fn, train_loss_fn, validate_loss_fn)


class Schedule(NamedTuple):
    """The lr schedule and the epochs this run covers."""
    lr_scheduler: Any
    num_epochs: int            # the schedule's length
    start_epoch: int
    end_epoch: int             # exclusive (--stop-epoch)
    updates_per_epoch: int
    decreasing: bool           # the ranking metric improves downwards (loss)


def create_schedule(args, optimizer, data: Data, resumed) -> Schedule:
    """timm's scheduler factory, stepped to the start epoch (a plateau schedule's state from the checkpoint)."""
    from sam_on_timm.checkpoint import resume_plateau
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    updates_per_epoch = (len(data.loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    decreasing = args.eval_metric == 'loss' or data.loader_eval is None   # no validation: the training loss ranks
    try:   # a plateau schedule follows the same metric in the same direction
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing),
                                                       updates_per_epoch=updates_per_epoch)
    except (ValueError, KeyError, AssertionError) as e:   # e.g. plateau with --sched-on-updates
        raise UsageError(f"--sched '{args.sched}': {_first_line(e)}") from None
    if lr_scheduler is None and args.sched not in ('', 'none'):  # older timm returns None for an unknown name
        raise UsageError(f"--sched '{args.sched}': unknown scheduler (e.g. cosine, step, multistep, plateau, poly)")
    start_epoch = 0
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    elif resumed.epoch is not None:
        start_epoch = resumed.epoch
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
        # a plateau schedule is not a function of the epoch: its lr and state come from the checkpoint
        # (the schedule's base lr when the optimizer was not resumed: --no-resume-opt, --start-epoch)
        resume_plateau(lr_scheduler, start_epoch, resumed.lrs, (resumed.checkpoint or {}).get('lr_scheduler'))
    end_epoch = num_epochs if args.stop_epoch is None else min(num_epochs, args.stop_epoch)
    return Schedule(lr_scheduler, num_epochs, start_epoch, end_epoch, updates_per_epoch, decreasing)


def create_saver(args, as_given, output_dir, model, optimizer, model_ema, loss_scaler, schedule: Schedule, resumed):
    """Rank 0: the run folder, its args.yaml and timm's CheckpointSaver (writing RNG states too); else None."""
    from sam_on_timm.checkpoint import RngCheckpointSaver, resume_saver
    if args.rank != 0:
        return None
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
        yaml.safe_dump(as_given, f)
    saver = RngCheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                               amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                               decreasing=schedule.decreasing, max_history=args.checkpoint_hist)
    resume_saver(saver, resumed.checkpoint, args.resume, output_dir)
    _logger.info(f'Scheduled epochs: {schedule.num_epochs}; running epochs {schedule.start_epoch}..'
                 f'{schedule.end_epoch - 1}; output {output_dir}')
    return saver


def resume_random_state(args, resumed, start_epoch: int) -> None:
    """Continue each rank's random streams exactly where the checkpoint left them (else reseed)."""
    from sam_on_timm.checkpoint import resume_rng
    from timm.utils import random_seed
    if resumed.checkpoint is None:
        return
    held = resume_rng(resumed.checkpoint, args.rank, args.world_size)
    if held is not None:
        _logger.warning(f'the checkpoint holds {held}, this run has {args.world_size} rank(s): reseeding with '
                        f'seed + epoch (the data order differs from an uninterrupted run)')
        random_seed(args.seed + start_epoch, args.rank)
    resumed.checkpoint = None   # its tensors are no longer needed


def train_loop(args, model, model_ema, optimizer, loss_scaler, amp_autocast, clip_parameters, data: Data,
               schedule: Schedule, saver, output_dir, device) -> int:
    """Train, validate, log and checkpoint each epoch; the exit code (130 when interrupted)."""
    from sam_on_timm.checkpoint import get_rng_state, plateau_state
    from timm.utils import distribute_bn, update_summary
    lr_scheduler, decreasing = schedule.lr_scheduler, schedule.decreasing
    loader_train, loader_eval, mixup_fn = data.loader_train, data.loader_eval, data.mixup_fn
    num_updates = schedule.start_epoch * schedule.updates_per_epoch
    best_metric, interrupted, epoch, results = None, False, schedule.start_epoch, []
    try:
        for epoch in range(schedule.start_epoch, schedule.end_epoch):
            if hasattr(data.dataset_train, 'set_epoch'):
                data.dataset_train.set_epoch(epoch)
            elif args.distributed and hasattr(loader_train.sampler, 'set_epoch'):
                loader_train.sampler.set_epoch(epoch)
            if data.mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                if mixup_fn is not None:
                    mixup_fn.mixup_enabled = False
                elif hasattr(loader_train, 'mixup_enabled'):
                    loader_train.mixup_enabled = False
            train_metrics, num_updates = train_one_epoch(
                epoch, model, loader_train, optimizer, data.train_loss_fn, args, device, lr_scheduler, amp_autocast,
                loss_scaler, model_ema, mixup_fn, num_updates, clip_parameters)
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
                if model_ema is not None:  # the EMA averages each rank's own BN statistics: share them too
                    distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
            eval_metrics, metric = {}, train_metrics['loss']   # no validation: ranked by the training loss
            if loader_eval is not None:
                eval_metrics = validate(model, loader_eval, data.validate_loss_fn, args, device, amp_autocast)
                if model_ema is not None:
                    ema_metrics = validate(model_ema, loader_eval, data.validate_loss_fn, args, device, amp_autocast)
                    eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
                # as timm's train.py: with an EMA, its metric picks the best checkpoint and drives a plateau schedule
                metric = eval_metrics[('ema_' if model_ema is not None else '') + args.eval_metric]
            if args.rank == 0 and eval_metrics:
                _logger.info(f'Eval: epoch {epoch}  loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:.2f}  '
                             f'top5 {eval_metrics["top5"]:.2f}')
            if args.rank == 0:
                lrs = [g['lr'] for g in optimizer.param_groups]
                summary = os.path.join(output_dir, 'summary.csv')
                update_summary(epoch, train_metrics, eval_metrics, filename=summary, lr=sum(lrs) / len(lrs),
                               write_header=not os.path.isfile(summary) or os.path.getsize(summary) == 0)
            results.append({'epoch': epoch, 'train': dict(train_metrics), 'validation': eval_metrics, 'metric': metric})
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, metric)
            rng_states = [get_rng_state()]
            if args.distributed:  # every rank's own streams, so that a resume continues each of them
                rng_states = [None] * args.world_size
                torch.distributed.all_gather_object(rng_states, get_rng_state())
            if saver is not None:
                saver.rng_states = rng_states
                saver.scheduler_state = plateau_state(lr_scheduler)
                best_metric, best_epoch = saver.save_checkpoint(epoch, metric=metric)
    except KeyboardInterrupt:   # as timm's train.py: no traceback (checkpoints are replaced atomically)
        interrupted = True
        _logger.warning(f'interrupted in epoch {epoch}: the checkpoints are those of the epochs completed before it')
    if best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    if results and args.rank == 0:   # as timm's script: the 10 best epochs, best last, for tools that parse stdout
        ranked = sorted(results, key=lambda r: r['metric'], reverse=decreasing)
        print(f'--result\n{json.dumps(ranked[-10:], indent=4)}')
    if args.distributed and not interrupted:
        torch.distributed.destroy_process_group()
    return 130 if interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
