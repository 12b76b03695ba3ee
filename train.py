#!/usr/bin/env python3
"""ImageNet-style training with timm, plus SAM and SAM-ON.

Same command line and YAML ``-c`` keys as timm's train.py (differences: docs/differences.md), plus
the SAM flags. ``--opt`` takes any timm optimizer name, so SGD baselines run from here too:

    python train.py -c hparams/demo/sam-on.yaml
    torchrun --nproc_per_node=8 train.py -c hparams/resnet50/sam-on-layerl2.yaml --data-dir /data/imagenet

The SAM algorithm itself lives in ``sam_on_timm`` (``sam_on_timm.train_step``); this script wires
data, model, schedule, EMA, AMP, checkpoints and logging around it.
"""
import argparse
import json
import logging
import math
import os
import pickle
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from datetime import datetime
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import yaml

_logger = logging.getLogger('train')


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


class TrainingDiverged(Exception):
    """The training loss or a validation metric is not finite: the run stops (one line, exit code 1)
    before the epoch is saved, so no checkpoint holds non-finite weights and nothing NaN ranks as best."""


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML config file; its keys are this script\'s argument names')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='timm training with SAM / SAM-ON', parents=[config_parser])
    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', const=None,
                   help='path to dataset (positional is *deprecated*, use --data-dir)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    g.add_argument('--dataset', metavar='NAME', default='',
                   help='dataset type + name ("<type>/<name>"), default: ImageFolder/ImageTar')
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation')
    g.add_argument('--dataset-download', action='store_true', default=False)
    g.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    g.add_argument('--max-image-pixels', default=None, type=int, metavar='N',
                   help="PIL's decompression-bomb limit: it warns above N pixels, refuses above 2 N (0: no limit)")
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='samples in the train split (iterable datasets)')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='samples in the validation split (iterable datasets)')
    g.add_argument('--input-img-mode', default=None, type=str,
                   help="image conversion mode (default: 'RGB', 'L' for 1 channel)")
    g.add_argument('--input-key', default=None, type=str, help='dataset key of the input images')
    g.add_argument('--target-key', default=None, type=str, help='dataset key of the target labels')
    g.add_argument('--dataset-trust-remote-code', action='store_true', default=False,
                   help="let a huggingface dataset run the code of its repo")
    g.add_argument('--demo-data', default='', type=str, metavar='NAME',
                   help="write a bundled demo data set ('mnist5k') into --data-dir (or the cache) if missing")

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='resnet50', type=str, metavar='MODEL')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=False,
                   help='start from timm\'s pretrained weights (--no-pretrained overrides a recipe)')
    g.add_argument('--pretrained-path', default=None, type=str,
                   help='load this file as the pretrained weights (head adapted as for hub weights)')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='load this checkpoint into the model (strict)')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='resume model, optimizer, scaler, EMA, epoch and RNG from a checkpoint')
    g.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='resume weights and epoch with a fresh optimizer (and loss scaler)')
    g.add_argument('--resume-partial', action='store_true', default=False,
                   help='resume a checkpoint that lacks the loss scaler, EMA or RNG state this run needs: '
                        'those start afresh (no longer an exact continuation)')
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
                   help='torch.compile the model with this backend (default inductor); '
                        'the SAM ascent keeps its lean graph')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode (default: None)')
    g.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help="activation checkpointing (timm's non-reentrant checkpoints)")
    g.add_argument('--fuser', default='', type=str, help="jit fuser for --torchscript ('', 'te', 'old', 'nvfuser')")
    g.add_argument('--fast-norm', default=False, action='store_true', help="timm's experimental fast norm kernels")
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra create_model keyword arguments')
    g.add_argument('--head-init-scale', default=None, type=float, help='scale the classifier weight and bias at init')
    g.add_argument('--head-init-bias', default=None, type=float, help='set the classifier bias at init')
    g.add_argument('--torchscript', action='store_true', default=False,
                   help='torch.jit.script the model (plain optimizers only)')
    g.add_argument('--device', default='cuda', type=str)
    g.add_argument('--amp', action='store_true', default=False)
    g.add_argument('--amp-dtype', default='float16', type=str, help='float16 (GradScaler) or bfloat16 (no scaler)')
    g.add_argument('--model-dtype', default=None, type=str, help='model dtype without AMP (float32, bfloat16, float16)')
    g.add_argument('--no-ddp-bb', action='store_true', default=False, help='DDP without buffer broadcast')
    g.add_argument('--synchronize-step', action='store_true', default=False,
                   help='synchronize the device after each update')
    g.add_argument('--device-modules', default=None, type=str, nargs='+', help='modules to import for a device backend')
    g.add_argument('--sync-bn', action='store_true', default=False)
    g.add_argument('--dist-bn', type=str, default='reduce',
                   help='BN stats across ranks at epoch end ("broadcast", "reduce", "")')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER',
                   help='timm optimizer name, or a SAM name (sam-on-layerl2, ...)')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', help='"norm", "value" or "agc"')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--layer-decay-min-scale', type=float, default=0)
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None)
    g.add_argument('--opt-foreach', action='store_true', default=None, help='force foreach optimizer kernels')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                   help='extra optimizer keyword arguments (for a SAM --opt: of its --sam-base)')

    g = p.add_argument_group('SAM')
    g.add_argument('--rho', type=float, default=0.05, help='SAM neighbourhood size (> 0)')
    g.add_argument('--sam-eta', type=float, default=None, help='variant eta (default: the variant\'s, paper Table 10)')
    g.add_argument('--sam-base', type=str, default='sgd', help='base optimizer of the descent step (timm name)')
    g.add_argument('--sam-m', type=int, default=None, help='m-sharpness chunk size (default: the whole per-GPU batch)')
    g.add_argument('--sam-bn-update', type=str, default='both', choices=('both', 'ascent'),
                   help='which passes update BatchNorm running statistics')
    g.add_argument('--sam-ascent-frac', type=float, default=1.0,
                   help='ascent on this fraction of each chunk (cost lever, deviates from the paper if < 1)')
    g.add_argument('--sam-sparsity', type=float, default=None, metavar='S',
                   help='sam-rand / ssam-f / ssam-d: fraction of the parameters left unperturbed (default: sam-rand '
                        'SAM-ON\'s sparsity on the model, ssam-* 0.5)')
    g.add_argument('--sam-mask-update', type=int, default=5, metavar='EPOCHS',
                   help='ssam-f / ssam-d: recompute the mask every this many epochs (Mi et al.: 5)')
    g.add_argument('--ssam-fisher-samples', type=int, default=1024, metavar='N',
                   help='ssam-f: single-sample gradients in the empirical Fisher (per rank)')
    g.add_argument('--ssam-drop-rate', type=float, default=0.5, help='ssam-d: fraction of the mask redrawn at the '
                   'first update (decays with a cosine over the run)')
    g.add_argument('--sam-interval', type=int, default=1, metavar='K',
                   help='the SAM update every K updates, the base optimizer\'s plain step between (interval SAM)')
    g.add_argument('--gsam-alpha', type=float, default=None, help='gsam*: weight of the orthogonal part of g (>= 0; '
                   'default 0)')
    g.add_argument('--rho-min', type=float, default=None, help='gsam*: rho at --min-lr, rho following the lr '
                   '(default: --rho, constant)')
    g.add_argument('--looksam-alpha', type=float, default=None, help='looksam*: weight of the kept g_v on the '
                   'updates between the SAM ones (>= 0; default 0.7; k is --sam-interval)')
    g.add_argument('--esam-beta', type=float, default=None, help='esam*: fraction of the perturbed tensors drawn each '
                   'update (in (0, 1]; default 0.6)')
    g.add_argument('--esam-gamma', type=float, default=None, help='esam*: fraction of each chunk in the descent, '
                   'those whose loss rose most (in (0, 1]; default 0.5)')
    g.add_argument('--sam-epochs', type=str, default=None, metavar='START:END',
                   help='SAM step only in epochs [START, END) (either may be empty), the base optimizer\'s plain step '
                        'elsewhere, on the same state (paper Figure 5)')

    g = p.add_argument_group('Normalization-layer ablations')
    g.add_argument('--fix-norm', action='store_true', default=False,
                   help='norm layers\' gamma = 1, beta = 0, frozen (paper Appendix B.4)')
    g.add_argument('--train-only-norm', action='store_true', default=False,
                   help='freeze every parameter outside the norm layers (paper Appendix B.5, Table 13)')
    g.add_argument('--sam-chunks', type=str, default='auto', choices=('auto', 'batched', 'sequential'),
                   help='--sam-m chunks of a batch: all in one ascent and one descent pass (batched, ghost '
                        'normalization), one pass pair each (sequential), or batched where possible (auto)')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    g.add_argument('--sched-on-updates', action='store_true', default=False)
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (default: lr-base scaled by global batch)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help='"linear" or "sqrt" (default by optimizer)')
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
    g.add_argument('--epoch-repeats', type=float, default=0., help='repeat the dataset this many times per epoch')
    g.add_argument('--start-epoch', default=None, type=int)
    g.add_argument('--stop-epoch', default=None, type=int,
                   help='stop after this many epochs (the schedule still spans --epochs)')
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
    g.add_argument('--train-crop-mode', type=str, default=None, help="training crop ('rrc', 'rkrc', 'rkrr')")
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='P',
                   help='apply the color jitter with this probability (default: always)')
    g.add_argument('--grayscale-prob', type=float, default=0., metavar='P', help='random grayscale probability')
    g.add_argument('--gaussian-blur-prob', type=float, default=0., metavar='P', help='random gaussian blur probability')
    g.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='auto augment policy, e.g. rand-m9-mstd0.5-inc1')
    g.add_argument('--cifar-aug', type=str, default='', metavar='NAME',
                   help="the paper's CIFAR training transform instead of timm's: 'basic' (4 px padded random crop + "
                        "flip) or 'basic+aa' (+ AutoAugment, CIFAR-10 policy); "
                        "--scale/--ratio/--hflip/--color-jitter unused")
    g.add_argument('--aug-repeats', type=float, default=0, help="repeated augmentation: each image this many times "
                   "per epoch (timm's RepeatAugSampler)")
    g.add_argument('--aug-splits', type=int, default=0, help='AugMix splits (0 or >= 2); a SAM chunk keeps its splits')
    g.add_argument('--jsd-loss', action='store_true', default=False,
                   help='Jensen-Shannon + CE loss (with --aug-splits)')
    g.add_argument('--bce-loss', action='store_true', default=False, help='binary cross-entropy loss')
    g.add_argument('--bce-sum', action='store_true', default=False, help='BCE summed over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='binarize soft BCE targets at this threshold')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive weight')
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--resplit', action='store_true', default=False, help='no random erasing on the first (clean) split')
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
    g.add_argument('--drop-connect', type=float, default=None, help='deprecated in timm: use --drop-path')
    g.add_argument('--drop-path', type=float, default=None)
    g.add_argument('--drop-block', type=float, default=None)

    g = p.add_argument_group('Batch norm')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override')
    g.add_argument('--split-bn', action='store_true', default=False, help='one BatchNorm per augmentation split')

    g = p.add_argument_group('Model EMA')
    g.add_argument('--model-ema', action='store_true', default=False)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g.add_argument('--model-ema-force-cpu', action='store_true', default=False,
                   help='keep the EMA on the CPU (not validated)')

    g = p.add_argument_group('Knowledge distillation')
    g.add_argument('--kd-model-name', default=None, type=str, help='teacher model (timm name, pretrained weights)')
    g.add_argument('--kd-pretrained-path', default=None, type=str,
                   help="teacher weights from this file instead of timm's hub (not in timm's script)")
    g.add_argument('--kd-distill-type', default='logit', type=str, choices=['logit', 'feature', 'token'])
    g.add_argument('--kd-loss-type', default='kl', type=str)
    g.add_argument('--distill-loss-weight', default=None, type=float)
    g.add_argument('--task-loss-weight', default=None, type=float)
    g.add_argument('--kd-temperature', default=4.0, type=float)
    g.add_argument('--kd-student-feature-dim', default=None, type=int)
    g.add_argument('--kd-teacher-feature-dim', default=None, type=int)
    g.add_argument('--kd-token-distill-type', default='soft', type=str, choices=['soft', 'hard'])

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--worker-seeding', type=str, default='all', help="worker seed mode ('all', 'part')")
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='validate and checkpoint every N epochs')
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='write a recovery checkpoint every N updates (--resume takes it)')
    g.add_argument('--checkpoint-hist', type=int, default=10)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--save-images', action='store_true', default=False, help='save the input batch at each log line')
    g.add_argument('--pin-mem', action='store_true', default=False)
    g.add_argument('--no-prefetcher', action='store_true', default=False)
    g.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='run folder name (default: date-model-size)')
    g.add_argument('--eval-metric', default='top1', type=str)
    g.add_argument('--tta', type=int, default=0, metavar='N', help='test-time augmentation factor of validation')
    g.add_argument('--use-multi-epochs-loader', action='store_true', default=False)
    g.add_argument('--log-wandb', action='store_true', default=False, help="log to wandb (pip install '.[wandb]')")
    g.add_argument('--wandb-project', default=None, type=str)
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+')
    g.add_argument('--wandb-resume-id', default='', type=str, metavar='ID')
    g.add_argument('--local_rank', '--local-rank', default=0, type=int)

    g = p.add_argument_group('Scheduled resolution')
    g.add_argument('--train-img-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-batch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--train-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--train-size-schedule', type=str, default='constant', choices=('constant', 'progressive'))
    g.add_argument('--train-size-schedule-spread', type=float, default=0.65)
    g.add_argument('--train-size-random-mix', type=float, default=0.1)
    g.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None)
    g.add_argument('--variable-batch-loss-scale', default='none', type=str, choices=('none', 'sqrt', 'linear'))

    g = p.add_argument_group('NaFlex loader')
    g.add_argument('--naflex-loader', action='store_true', default=False)
    g.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024])
    g.add_argument('--naflex-max-seq-len', type=int, default=576)
    g.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None)
    g.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None)
    g.add_argument('--naflex-loss-scale', default='linear', type=str, choices=('none', 'sqrt', 'linear'))
    g.add_argument('--naflex-patchify-channels-first', action='store_true', default=False)
    return p


class ParseKwargs(argparse.Action):
    """timm's ``KEY=VALUE ...`` option (values read as Python literals, else kept as strings), bounded in size
    and nesting (sam_on_timm.config.parse_kwargs)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from sam_on_timm.config import parse_kwargs
        try:
            setattr(namespace, self.dest, parse_kwargs(values, option_string))
        except ValueError as e:
            raise UsageError(str(e)) from None


def parse_args(argv=None):
    parser = build_parser()
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        # the file and each value checked against its flag as the command line checks it (sam_on_timm.config)
        from sam_on_timm.config import config_value, drop_config_key, load_config
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
    except SystemExit as e:  # argparse already printed its one-line usage error
        raise SystemExit(2 if e.code else 0)
    args.config = args_config.config
    return args


# ---------------------------------------------------------------------------------------------
# checks that run before anything is created or written
# ---------------------------------------------------------------------------------------------
EVAL_METRICS = ('top1', 'top5', 'loss')   # what validate() returns
DIST_BN = ('reduce', 'broadcast', '')   # BatchNorm statistics across ranks at the end of an epoch ('': none)
LR_BASE_SCALES = ('linear', 'sqrt', '')   # how --lr follows the global batch ('': by optimizer)

# train.py's options whose rule is the library's (sam_on_timm.checks.RANGES): option -> the library's name
LIBRARY_RANGES = {'rho': 'rho', 'sam_eta': 'eta', 'sam_ascent_frac': 'ascent_frac', 'lr': 'lr', 'momentum': 'momentum',
                  'weight_decay': 'weight_decay', 'opt_eps': 'eps', 'opt_betas': 'betas', 'clip_grad': 'clip_grad'}
SAM_ONLY = ('rho', 'sam_eta', 'sam_ascent_frac')   # ignored (with a warning) by other optimizers
FAMILY_FLAGS = {'interval': '--sam-interval', 'gsam_alpha': '--gsam-alpha', 'rho_min': '--rho-min',
                'looksam_alpha': '--looksam-alpha', 'esam_beta': '--esam-beta', 'esam_gamma': '--esam-gamma'}
_PROB = (0, 1, False, False)
# the ranges of train.py's own numeric options: option -> (low, high, low excluded, high excluded).
# Every float option is also checked to be finite, whether it is listed here or not.
OPTION_RANGES = {
    'drop': (0, 1, False, True), 'drop_path': (0, 1, False, True), 'smoothing': (0, 1, False, True),
    'mixup': (0, None, False, False), 'cutmix': (0, None, False, False), 'cutmix_minmax': (0, 1, False, False),
    'model_ema_decay': _PROB, 'lr_base': (0, None, True, False), 'warmup_lr': (0, None, False, False),
    'min_lr': (0, None, False, False), 'lr_noise': (0, None, False, False), 'lr_noise_pct': _PROB,
    'lr_noise_std': (0, None, False, False), 'lr_cycle_mul': (0, None, True, False),
    'lr_cycle_decay': (0, None, True, False), 'lr_k_decay': (0, None, True, False), 'decay_rate': (0, 1, True, False),
    'decay_epochs': (0, None, True, False), 'lr_stable_timescale': (0, None, True, False),
    'layer_decay': (0, None, True, False), 'layer_decay_min_scale': (0, None, False, False),
    'layer_decay_no_opt_scale': (0, None, False, False), 'crop_pct': (0, None, True, False),
    'std': (0, None, True, False), 'scale': (0, 1, True, False), 'ratio': (0, None, True, False),
    'color_jitter': (0, None, False, False),
    'hflip': _PROB, 'vflip': _PROB, 'reprob': _PROB, 'mixup_prob': _PROB, 'mixup_switch_prob': _PROB,
    'color_jitter_prob': _PROB, 'grayscale_prob': _PROB, 'gaussian_blur_prob': _PROB,
    'warmup_epochs': (0, None, False, False), 'cooldown_epochs': (0, None, False, False),
    'patience_epochs': (0, None, False, False), 'lr_cycle_limit': (0, None, False, False),
    'lr_base_size': (0, None, True, False), 'recount': (0, None, False, False),
    'mixup_off_epoch': (0, None, False, False), 'sam_sparsity': (0, 1, False, True), 'ssam_drop_rate': _PROB,
    'num_classes': (1, None, False, False), 'in_chans': (1, None, False, False),
    'validation_batch_size': (1, None, False, False), 'decay_milestones': (0, None, False, False),
    'naflex_train_seq_lens': (1, None, False, False), 'naflex_max_seq_len': (1, None, False, False),
    'naflex_patch_sizes': (1, None, False, False), 'naflex_patch_size_probs': (0, None, False, False),
}


def flag_name(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def check_numbers(args) -> None:
    """Every float option is finite, and every option with a range is in it (ValueError naming the flag)."""
    from sam_on_timm.checks import check_arg, check_number
    for action in build_parser()._actions:
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        dest = action.dest
        if dest in LIBRARY_RANGES and (args.is_sam or dest not in SAM_ONLY):
            check_arg(LIBRARY_RANGES[dest], [v for v in values if v is not None], flag_name(dest))
        elif dest in OPTION_RANGES:
            for v in values:
                if v is not None:
                    check_number(v, flag_name(dest), *OPTION_RANGES[dest])
        elif action.type is float:
            for v in values:
                if v is not None:
                    check_number(v, flag_name(dest))
    for dest in ('scale', 'ratio', 'cutmix_minmax'):   # (min, max) pairs
        v = getattr(args, dest)
        if v is not None and len(v) == 2 and v[0] > v[1]:
            raise ValueError(f'{flag_name(dest)} is a (min, max) pair: got {v[0]} > {v[1]}')


def validate_args(args) -> None:
    import sam_on_timm  # noqa: F401  (registers the SAM optimizer names with timm)
    from sam_on_timm.checks import check_base_opt, check_eta_used, check_sam_m
    from sam_on_timm.family import check_family_args
    from sam_on_timm.registry import parse_sam_name, sam_family, split_opt_name
    from timm.optim import list_optimizers
    try:
        opt_name = split_opt_name(args.opt)[1]
    except ValueError:
        opt_name = None
    if opt_name not in list_optimizers():
        raise UsageError(f"unknown --opt '{args.opt}'; SAM names: {', '.join(sam_on_timm.SAM_OPTIMIZERS)}; "
                         f"or any timm optimizer (timm.optim.list_optimizers(), e.g. sgd, adamw)")
    args.is_sam = sam_on_timm.is_sam_name(args.opt)
    if args.batch_size <= 0 or args.grad_accum_steps <= 0:
        raise UsageError('-b/--batch-size and --grad-accum-steps must be positive')
    try:   # the rules are the library's: its one-line ValueError is this script's error
        if args.is_sam:
            check_base_opt(args.sam_base, '--sam-base')
        if args.sam_m is not None:   # NaFlex: the loader sizes each batch, the last chunk may be smaller
            check_sam_m(args.sam_m, None if args.naflex_loader else args.batch_size, '--sam-m',
                        'the per-GPU batch size -b')
        check_numbers(args)
        if args.is_sam:   # an eta that the variant has no use for (plain SAM: T = 1)
            check_eta_used(parse_sam_name(args.opt)[1], args.sam_eta, '--sam-eta', f'--opt {args.opt}')
        check_family_args(sam_family(args.opt) if args.is_sam else 'sam', args.sam_interval, args.gsam_alpha,
                          args.rho_min, args.rho, FAMILY_FLAGS, f'--opt {args.opt}', args.looksam_alpha,
                          args.esam_beta, args.esam_gamma)
        if args.is_sam and sam_family(args.opt) == 'esam' and (args.sam_ascent_frac != 1 or args.naflex_loader):
            raise ValueError(f'--opt {args.opt} selects samples by their loss at w and w + eps: it needs the whole '
                             f'chunk in the ascent (--sam-ascent-frac 1) and no --naflex-loader')
        if not args.is_sam and args.sam_interval != 1:
            raise ValueError(f'--sam-interval {args.sam_interval} needs a SAM --opt (e.g. sam, sam-on), got {args.opt}')
    except ValueError as e:
        raise UsageError(str(e)) from None
    args.sparse = args.is_sam and split_opt_name(args.opt)[1] in sam_on_timm.SPARSE_OPTIMIZERS
    if args.sam_sparsity is not None and not args.sparse:
        raise UsageError(f"--sam-sparsity is an option of --opt {', '.join(sam_on_timm.SPARSE_OPTIMIZERS)}, "
                         f"got --opt {args.opt}")
    if args.sparse and (args.sam_mask_update < 1 or args.ssam_fisher_samples < 1):
        raise UsageError(f'--sam-mask-update and --ssam-fisher-samples must be positive, got {args.sam_mask_update} '
                         f'and {args.ssam_fisher_samples}')
    args.sam_window = None
    if args.sam_epochs is not None:
        if not args.is_sam:
            raise UsageError(f'--sam-epochs {args.sam_epochs} needs a SAM --opt (e.g. sam, sam-on), got {args.opt}')
        from sam_on_timm.ablations import parse_epoch_window
        try:
            args.sam_window = parse_epoch_window(args.sam_epochs)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.cifar_aug:
        from sam_on_timm.cifar_data import CIFAR_AUGS
        if args.cifar_aug not in CIFAR_AUGS:
            raise UsageError(f"unknown --cifar-aug '{args.cifar_aug}'; valid: {', '.join(CIFAR_AUGS)}")
        clash = [f for f, on in (('--aa', args.aa), ('--no-aug', args.no_aug), ('--reprob', args.reprob),
                                 ('--aug-splits', args.aug_splits)) if on]
        if clash:
            raise UsageError(f"--cifar-aug {args.cifar_aug} replaces timm's training transform: "
                             f"drop {', '.join(clash)}")
    if args.fix_norm and args.train_only_norm:
        raise UsageError('--fix-norm and --train-only-norm together leave nothing to train: choose one')
    if args.amp and args.amp_dtype not in ('float16', 'bfloat16'):
        raise UsageError(f"--amp-dtype must be float16 or bfloat16, got '{args.amp_dtype}'")
    if args.clip_mode not in ('norm', 'value', 'agc'):
        raise UsageError(f"--clip-mode must be norm, value or agc, got '{args.clip_mode}'")
    if args.dist_bn not in DIST_BN:   # timm's script skips any other value without a word
        raise UsageError(f"--dist-bn must be reduce, broadcast or '' (keep each rank's BatchNorm statistics), "
                         f"got '{args.dist_bn}'")
    if args.lr_base_scale not in LR_BASE_SCALES:   # timm's script scales linearly for any value but sqrt
        raise UsageError(f"--lr-base-scale must be linear, sqrt or '' (sqrt for Ada* / Lamb optimizers, else "
                         f"linear), got '{args.lr_base_scale}'")
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
            raise UsageError(f"--data-dir '{args.data_dir}' is a file: pass a folder or an image .tar "
                             f"(timm's ImageTar)")
        if not os.path.exists(args.data_dir):
            raise UsageError(f"data directory '{args.data_dir}' does not exist")
    for dest in ('resume', 'initial_checkpoint', 'pretrained_path'):
        path = getattr(args, dest)
        if path and os.path.isdir(path):
            last = os.path.join(path, 'last.pth.tar')
            raise UsageError(f"{flag_name(dest)} '{path}' is a folder: pass a checkpoint file"
                             + (f" (e.g. {last})" if os.path.isfile(last) else ''))
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag_name(dest)} checkpoint '{path}' does not exist")
    if args.stop_epoch is not None and args.stop_epoch <= 0:
        raise UsageError(f'--stop-epoch must be positive, got {args.stop_epoch}')
    if args.epochs <= 0:
        raise UsageError(f'--epochs must be positive, got {args.epochs}')
    if (args.img_size is not None and args.img_size <= 0) or (args.input_size and min(args.input_size) <= 0):
        raise UsageError(f'--img-size / --input-size must be positive, got {args.img_size} / {args.input_size}')
    if args.checkpoint_hist < 1:
        raise UsageError(f'--checkpoint-hist must be at least 1, got {args.checkpoint_hist}')
    in_chans = args.input_size[0] if args.input_size else (args.in_chans or 3)   # as timm's resolve_data_config
    per_channel = (1, in_chans) if in_chans != 1 else (1,)   # one value, or one per input channel
    for flag, values, sizes in (('--scale', args.scale, (2,)), ('--ratio', args.ratio, (2,)),
                                ('--cutmix-minmax', args.cutmix_minmax, (2,)), ('--mean', args.mean, per_channel),
                                ('--std', args.std, per_channel)):
        if values is not None and len(values) not in sizes:
            why = f' (one, or one per channel of the {in_chans}-channel input)' if sizes is per_channel else ''
            raise UsageError(f"{flag} takes {' or '.join(map(str, sizes))} value{'s' if sizes != (1,) else ''}, "
                             f"got {len(values)}{why}")
    if args.log_interval <= 0:
        raise UsageError(f'--log-interval must be positive, got {args.log_interval}')
    if args.start_epoch is not None and args.start_epoch < 0:
        raise UsageError(f'--start-epoch must be >= 0, got {args.start_epoch}')
    if args.eval_metric not in EVAL_METRICS:
        raise UsageError(f"--eval-metric must be one of {', '.join(EVAL_METRICS)}, got '{args.eval_metric}'")
    validate_timm_options(args)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device '{args.device}' is not a torch device (e.g. cuda, cuda:0, cpu)") from None
    from sam_on_timm.outputs import check_experiment_name
    try:
        check_experiment_name(args.experiment)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_output_writable(args)


def check_output_writable(args) -> None:
    """The output folder can be written (rank 0, the one writer): checked before the model and the data are
    built. The nearest existing folder on the way gets a temporary file, removed at once."""
    if int(os.environ.get('RANK', '0')) != 0:
        return
    import tempfile
    target = os.path.abspath(os.path.join(args.output or './output/train', args.experiment or ''))
    existing = target
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UsageError(f"--output / --experiment: '{existing}' is a file, so '{target}' cannot be a folder")
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"the output folder '{target}' cannot be written ('{existing}': {e.strerror or e}): "
                         f"pass a writable --output") from None


def check_splits(args) -> None:
    """An ImageFolder's --train-split / --val-split names a subfolder of --data-dir (or one of timm's
    synonyms for it: train / training, val / valid / validation / eval / evaluation).

    timm falls back to the data root itself when none exists, so a typo would train (and validate) on
    every image under it, the validation images included. Here that is an error listing the folders
    found: a deliberate difference from timm. An empty --train-split reads the root itself."""
    if '/' in args.dataset and args.dataset.split('/')[0] not in ('', 'folder', 'imagefolder'):
        return   # torch/, hfds/, wds/ ...: the dataset's own split names, checked by its reader
    if not args.data_dir or not os.path.isdir(args.data_dir):
        return   # an image .tar: no split folders
    synonyms = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
    found = sorted(d for d in os.listdir(args.data_dir) if os.path.isdir(os.path.join(args.data_dir, d)))
    for dest in ('train_split', 'val_split'):
        split = getattr(args, dest)
        if not split:
            continue   # train: the root itself; validation: none
        name = split.split('[')[0]
        candidates = next((s for s in synonyms if name in s), (name,))
        if not any(os.path.isdir(os.path.join(args.data_dir, c)) for c in (name,) + candidates):
            raise UsageError(f"{flag_name(dest)} '{split}': no such folder in '{args.data_dir}' (folders found: "
                             f"{', '.join(found[:10]) or 'none'}{' ...' if len(found) > 10 else ''})")


MODEL_DTYPES = ('float32', 'bfloat16', 'float16')


def validate_timm_options(args) -> None:
    """Checks of the options timm's train.py has beyond the core ones (losses, splits, KD, loaders)."""
    # (every float option is finite, and in its range where it has one: check_numbers)
    if args.drop_connect is not None:
        raise UsageError('--drop-connect is deprecated in timm (its train.py ignores it): use --drop-path')
    if args.aug_splits == 1 or args.aug_splits < 0:
        raise UsageError(f'--aug-splits must be 0 (off) or at least 2 (clean + augmented splits), '
                         f'got {args.aug_splits}')
    if args.jsd_loss and args.aug_splits < 2:
        raise UsageError('--jsd-loss compares the AugMix splits of each image: it needs --aug-splits 2 or more')
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        raise UsageError('--split-bn needs --aug-splits 2 or more, or --resplit (one BatchNorm per split)')
    if args.split_bn and args.sync_bn:
        raise UsageError('--split-bn and --sync-bn cannot be combined (timm converts one or the other)')
    if args.aug_splits and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        raise UsageError('--aug-splits with --mixup / --cutmix: mixing would cross the AugMix splits '
                         '(timm\'s collate refuses it)')
    # the rows of a batch come in equal consecutive splits (AugMix; --split-bn's halves): a chunk keeps them all
    args.batch_splits = args.aug_splits or (2 if args.split_bn else 1)
    rows = (args.sam_m or args.batch_size) * (args.aug_splits or 1)   # rows of one chunk
    if rows % args.batch_splits:
        raise UsageError(f'--split-bn --resplit splits each chunk in 2 halves: --sam-m / -b must be even, got {rows}')
    if args.batch_splits > 1 and args.is_sam and args.sam_ascent_frac < 1:
        raise UsageError('--sam-ascent-frac < 1 with --aug-splits / --split-bn: the ascent on part of a chunk '
                         'would break its splits')
    if args.aug_repeats < 0 or args.epoch_repeats < 0:
        raise UsageError('--aug-repeats and --epoch-repeats must be >= 0')
    if args.train_crop_mode not in (None, 'rrc', 'rkrc', 'rkrr'):
        raise UsageError(f"--train-crop-mode must be rrc, rkrc or rkrr, got '{args.train_crop_mode}'")
    if args.worker_seeding not in ('all', 'part'):
        raise UsageError(f"--worker-seeding must be 'all' or 'part', got '{args.worker_seeding}'")
    if args.model_dtype is not None and args.model_dtype not in MODEL_DTYPES:
        raise UsageError(f"--model-dtype must be one of {', '.join(MODEL_DTYPES)}, got '{args.model_dtype}'")
    if args.amp and args.model_dtype not in (None, 'float32'):
        raise UsageError(f'--amp needs a float32 model (timm\'s rule), got --model-dtype {args.model_dtype}')
    if args.torchscript and args.torchcompile:
        raise UsageError('--torchscript and --torchcompile are alternatives: pass one')
    if args.torchscript and args.is_sam:
        raise UsageError(f'--torchscript with --opt {args.opt}: a scripted model hides its norm layers and BatchNorm '
                         f'statistics from SAM; use --torchcompile')
    if args.torchscript and args.sync_bn:
        raise UsageError('--torchscript cannot script SyncBatchNorm (--sync-bn)')
    for flag, low in (('val_interval', 1), ('recovery_interval', 0), ('tta', 0), ('max_image_pixels', 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")
    if args.kd_model_name is not None:
        if args.kd_distill_type == 'token' and args.torchscript:   # a scripted DeiT never returns its two heads
            raise UsageError('--kd-distill-type token with --torchscript: a scripted student returns the average of '
                             'its two heads, never the distillation token\'s logits; drop --torchscript')
        if args.torchscript:   # (was blamed on the teacher: "cannot create the teacher ...: no attribute ...")
            raise UsageError("--kd-model-name with --torchscript: timm's distillation task reads the student's "
                             "pretrained_cfg (feature distillation also its forward_features / forward_head), which "
                             "a scripted student does not have; drop --torchscript")
        if args.kd_loss_type != 'kl':
            raise UsageError(f"--kd-loss-type must be 'kl' (timm's only one), got '{args.kd_loss_type}'")
        if args.kd_pretrained_path and not os.path.isfile(args.kd_pretrained_path):
            raise UsageError(f"--kd-pretrained-path '{args.kd_pretrained_path}' does not exist")
        for flag in ('kd_student_feature_dim', 'kd_teacher_feature_dim'):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise UsageError(f'{flag_name(flag)} must be a positive number of channels, got {getattr(args, flag)}')
    validate_naflex_options(args)
    if args.train_img_sizes is not None:   # timm's scheduled resolution: batch sizes vary per update
        sizes = args.train_batch_sizes or [args.batch_size] * len(args.train_img_sizes)
        if len(sizes) != len(args.train_img_sizes) or min(sizes) <= 0 or min(args.train_img_sizes) <= 0:
            raise UsageError('--train-batch-sizes takes one positive batch size per --train-img-sizes entry')
        if args.aug_splits:
            raise UsageError('--train-img-sizes cannot be combined with --aug-splits (timm\'s loader refuses it)')
        if args.grad_accum_steps > 1:
            raise UsageError('--train-img-sizes with --grad-accum-steps > 1: an update would mix batches of '
                             'different sizes; use --grad-accum-steps 1')
        if args.sam_m is not None and any(b % args.sam_m for b in sizes):
            raise UsageError(f'--sam-m {args.sam_m} must divide every scheduled batch size ({sizes}): the chunk size '
                             f'stays m while the batch size varies')
    elif args.train_batch_sizes is not None:
        raise UsageError('--train-batch-sizes needs --train-img-sizes (scheduled resolution)')
    if args.log_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UsageError("--log-wandb needs the wandb package: pip install -e '.[wandb]'") from None
    if args.wandb_resume_id and not args.resume:
        raise UsageError('--wandb-resume-id continues a run: pass its --resume checkpoint too')
    if args.device_modules:
        import importlib
        for module in args.device_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UsageError(f"--device-modules: cannot import '{module}': {_first_line(e)}") from None


NAFLEX_OPTIONS = ('naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
                  'naflex_loss_scale', 'naflex_patchify_channels_first')


def validate_naflex_options(args) -> None:
    """--naflex-loader (timm's create_naflex_loader: patch-sequence batches sized by a token budget) and its options:
    timm's own refusals as one line, plus the combinations that would fail mid-run or be silently ignored."""
    if not args.naflex_loader:
        defaults = build_parser()
        given = [flag_name(k) for k in NAFLEX_OPTIONS if getattr(args, k) != defaults.get_default(k)]
        if given:
            raise UsageError(f"{', '.join(given)}: option(s) of the NaFlex loader; add --naflex-loader")
        return
    clash = [flag for flag, on in (
        ('--train-img-sizes', args.train_img_sizes is not None),    # timm: alternative loader modes
        ('--use-multi-epochs-loader', args.use_multi_epochs_loader),   # timm refuses it too
        ('--aug-splits', args.aug_splits), ('--split-bn', args.split_bn),   # timm asserts: no splits in NaFlex batches
        ('--aug-repeats', args.aug_repeats),       # timm's NaFlex loader asserts none
        ('--cifar-aug', args.cifar_aug),           # the NaFlex loader builds its own sequence transforms
        ('--cutmix-minmax', args.cutmix_minmax is not None),   # NaFlexMixup has none (timm drops it silently)
        ('--mixup-mode', args.mixup_mode != 'batch'),          # nor modes: it pairs images by aspect ratio
        ('--kd-model-name', args.kd_model_name),   # timm's teacher normalizes image tensors, not patch dicts
        ('--channels-last', args.channels_last),   # a memory format of image tensors
        ('--save-images', args.save_images)) if on]
    if clash:
        raise UsageError(f"--naflex-loader cannot be combined with {', '.join(clash)}")
    if args.naflex_patch_size_probs is not None:
        if args.naflex_patch_sizes is None:
            raise UsageError('--naflex-patch-size-probs weighs the --naflex-patch-sizes choices: pass those too')
        if len(args.naflex_patch_size_probs) != len(args.naflex_patch_sizes):
            raise UsageError(f'--naflex-patch-size-probs must have same length as --naflex-patch-sizes '
                             f'({len(args.naflex_patch_size_probs)} vs {len(args.naflex_patch_sizes)})')
        if sum(args.naflex_patch_size_probs) <= 0:   # relative weights, normalized by timm
            raise UsageError('--naflex-patch-size-probs are relative weights: at least one must be positive')


def given_args(args) -> Dict[str, Any]:
    """The script's arguments as given (flags over YAML over defaults), before computed values (lr from
    lr-base, input_size, ...) are filled in: what args.yaml holds, so that ``-c args.yaml`` repeats the run.
    Where to resume from is not part of the run: a resumed run's args.yaml would otherwise resume again."""
    dests = {a.dest for a in build_parser()._actions} - {'help', 'config', 'resume', 'no_resume_opt', 'resume_partial',
                                                  'start_epoch'}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in dests}


def output_dir_for(args) -> str:
    from timm.models import safe_model_name   # as timm's train.py: no hub prefix, '.' and '/' as '_'
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(args.input_size[-1])])
    return os.path.join(args.output or './output/train', exp_name)


def check_output_dir(args, output_dir: str, probe_lock: bool = True) -> None:
    """Never overwrite another run's checkpoints: an existing run folder is only reused to resume it, and
    never while another live run writes it (its lock, sam_on_timm.outputs.RunLock; ``probe_lock`` False:
    this process holds it)."""
    from sam_on_timm.outputs import lock_holder
    if not os.path.isdir(output_dir):
        return
    holder = lock_holder(output_dir) if probe_lock else None
    if holder is not None:
        raise UsageError(f"output folder '{output_dir}' is in use by another run ({holder}): wait for it to end, "
                         f"or choose another --experiment / --output")
    # tmp.pth.tar (and a *.part copy) is a write that never completed: not a checkpoint to resume from
    ckpts = [f for f in os.listdir(output_dir) if f.endswith('.pth.tar') and f != 'tmp.pth.tar']
    resuming_here = args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(output_dir)
    if ckpts and not resuming_here:
        newest = 'last.pth.tar' if 'last.pth.tar' in ckpts else max(
            ckpts, key=lambda f: os.path.getmtime(os.path.join(output_dir, f)))
        raise UsageError(f"output folder '{output_dir}' already holds checkpoints of another run: choose another "
                         f"--experiment, or --resume {os.path.join(output_dir, newest)}")
    summary = os.path.join(output_dir, 'summary.csv')
    partial = os.path.isfile(os.path.join(output_dir, 'tmp.pth.tar'))
    if (os.path.isfile(summary) or partial) and not resuming_here:   # and no complete checkpoint
        raise UsageError(f"output folder '{output_dir}' already holds another run's summary.csv or tmp.pth.tar "
                         f"but no complete checkpoint (it stopped before its first save completed; nothing to "
                         f"resume): remove the folder, or choose another --experiment")
    if os.path.isfile(summary):
        with open(summary) as f:
            header = f.readline().strip().split(',')
        ema = bool(args.model_ema and not args.model_ema_force_cpu and args.val_split)
        for what, flag, column in (('SAM', args.is_sam, 'train_eps_norm'), ('EMA', ema, 'eval_ema_top1')):
            if (column in header) != flag:
                had = 'with' if column in header else 'without'
                raise UsageError(f"--resume into '{output_dir}': its summary.csv was written {had} "
                                 f"{what} columns and this run has {'none' if not flag else 'them'}: "
                                 f"resume with the run's "
                                 f"--opt / --model-ema, or pass another --experiment")


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the rows of epochs >= ``start_epoch`` from a resumed run's summary.csv (rewritten whole, then
    renamed): an epoch whose checkpoint was never written (a full disk, a kill) is trained again, and
    its row is written again, once."""
    import csv
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_epoch]
    if len(kept) == len(rows):
        return
    with open(path + '.tmp', 'w', newline='') as f:
        csv.writer(f).writerows(kept)
    os.replace(path + '.tmp', path)


# ---------------------------------------------------------------------------------------------
# training and validation
# ---------------------------------------------------------------------------------------------
def train_one_epoch(epoch, model, loader, optimizer, loss_fn, args, device, lr_scheduler, amp_autocast,
                    loss_scaler, model_ema, mixup_fn, num_updates, clip_parameters=None, saver=None, output_dir=None,
                    batch_erasing=None):
    from sam_on_timm.ablations import in_window
    from sam_on_timm.train_step import batch_rows, split_chunks, train_step
    accum = args.grad_accum_steps
    last_idx = len(loader) - 1
    model.train()
    sam_step = args.sam_window is None or in_window(epoch, args.sam_window)   # --sam-epochs
    sums = None  # device tensors: loss, ascent loss, ||eps||, skipped, updates
    first_bad = torch.full((), -1, device=device)
    chunks, micro, t0, n_img = [], [], time.time(), 0   # micro: the chunk sizes of each micro-batch of the update
    teacher_targets = getattr(loss_fn, 'targets', None)   # distillation: the teacher's output, once per chunk
    ema_source = None
    if model_ema is not None and teacher_targets is not None:
        from sam_on_timm.distill import student_of
        ema_source = student_of(model)
    m = None if args.sam_m is None else args.sam_m * (args.aug_splits or 1)   # rows of a chunk
    for batch_idx, (x, y) in enumerate(loader):
        x, y = device_batch(x, y, args, device, mixup_fn, batch_erasing)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        new_chunks = split_chunks(x, y, m, args.batch_splits)   # NaFlex dict: the last chunk may be smaller
        micro.append([batch_rows(cx) for cx, _ in new_chunks])
        if teacher_targets is not None:
            with amp_autocast():
                new_chunks = [(cx, teacher_targets(cx, cy)) for cx, cy in new_chunks]
        chunks.extend(new_chunks)
        n_img += batch_rows(x) // (args.aug_splits or 1)
        if (batch_idx + 1) % accum and batch_idx != last_idx:
            continue
        weights = None   # the descent weights of the chunks (train_step's default: the mean over the images)
        if args.naflex_loader:
            weights = naflex_chunk_weights(micro, args, device)
        elif args.train_img_sizes is not None and args.variable_batch_loss_scale != 'none':
            weights = variable_batch_weights(micro, args)
        stats = train_step(model, optimizer, chunks, loss_fn, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
                           clip_grad=args.clip_grad, clip_mode=args.clip_mode, clip_parameters=clip_parameters,
                           bn_update=args.sam_bn_update, ascent_frac=args.sam_ascent_frac,
                           chunk_path='auto' if args.sam_chunks_path == 'batched' else 'sequential',
                           chunks_per_pass=chunks_per_pass(micro), sam_step=sam_step, chunk_weights=weights)
        chunks, micro = [], []
        num_updates += 1
        if model_ema is not None:   # the student's weights (feature distillation trains student + projection)
            model_ema.update(model if ema_source is None else ema_source, step=num_updates)
        if args.synchronize_step:
            synchronize_step(device)
        zero = torch.zeros((), device=stats.loss.device)
        row = torch.stack([stats.loss.float(), *(zero if v is None else v.float() for v in
                                                 (stats.ascent_loss, stats.eps_norm, stats.skipped)), zero + 1,
                           zero + (stats.ascent_loss is not None)])   # updates with an ascent (interval SAM, msam)
        sums = row if sums is None else sums + row
        # the first update of the epoch whose figures are not finite, kept on the device (no host sync)
        first_bad = torch.where(torch.isfinite(row).all() | (first_bad >= 0), first_bad, batch_idx + 1)
        if batch_idx == last_idx or (num_updates % args.log_interval == 0):
            shown = sums
            if args.distributed:   # every rank: the line shows all ranks' running averages, as upstream's does
                shown = sums.clone()
                torch.distributed.all_reduce(shown)
            stop_if_diverged(shown, first_bad, epoch, batch_idx, len(loader))
            if args.rank == 0:
                s = (shown / shown[4]).tolist()
                lr = optimizer.param_groups[0]['lr']
                done = 100. * (batch_idx + 1) / len(loader)
                msg = (f'Train: {epoch} [{batch_idx + 1:>4d}/{len(loader)} ({done:>3.0f}%)]  '
                       f'loss {s[0]:.4f}  lr {lr:.3e}  {n_img * args.world_size / (time.time() - t0):.1f} img/s')
                if args.is_sam and sam_step:
                    ascent = f'{shown[1].item() / shown[5].item():.4f}' if shown[5].item() else '-'
                    msg += f'  ascent-loss {ascent}  |eps| {s[2]:.4g}  skipped {int(round(shown[3].item()))}'
                _logger.info(msg)
                if args.save_images and output_dir:
                    import torchvision.utils
                    torchvision.utils.save_image(x, os.path.join(output_dir, f'train-batch-{batch_idx}.jpg'),
                                                 padding=0, normalize=True)
        if saver is not None and args.recovery_interval and num_updates % args.recovery_interval == 0:
            saver.rng_states = None   # this rank's streams now (all ranks' are gathered at epoch ends only)
            saver.save_recovery(epoch, batch_idx=batch_idx // accum)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
    if args.distributed:
        torch.distributed.all_reduce(sums)
    sums = sums.tolist()
    n = sums[4]
    metrics = OrderedDict(loss=sums[0] / n)
    if args.is_sam:   # an epoch outside --sam-epochs has no ascent: no ascent loss, no sharpness (empty cells)
        n_asc = sums[5]   # the updates with an ascent pass: none for msam, one in K for --sam-interval K
        metrics.update(ascent_loss=sums[1] / n_asc if sam_step and n_asc else None, descent_loss=sums[0] / n,
                       sharpness=(sums[0] - sums[1]) / n if sam_step and n_asc == n else None,
                       eps_norm=sums[2] / n, skipped_perturbations=int(round(sums[3])))
    return metrics, num_updates


def chunks_per_pass(micro: List[List[int]]) -> int:
    """How many consecutive chunks of an update share a batched pass (``train_step``'s ``chunks_per_pass``): the
    greatest common divisor of the micro-batches' chunk counts, so that no pass spans two micro-batches. Those
    of a NaFlex update differ in sequence length, patch size and chunk count, and a pass stacks its chunks;
    gradient accumulation also keeps its memory saving (a pass never holds more than one micro-batch). 1: the
    chunks run sequentially ('auto')."""
    return math.gcd(*(len(chunks) for chunks in micro))


def device_batch(x, y, args, device, mixup_fn, batch_erasing):
    """A loader's batch as the model takes it. The prefetcher (CUDA) has done it all; without it: AugMix splits
    one after the other, on the device in the model's dtype, then mixup, then --resplit's erasing (after mixing
    and normalizing, as timm's prefetcher erases). The training loop and ssam-f's Fisher both take it."""
    if isinstance(x, (list, tuple)):   # AugMix splits without the prefetcher
        x, y = torch.cat(x), y.repeat(len(x))
    if not args.prefetcher:
        x, y = to_device(x, device, args.model_dtype), y.to(device)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if batch_erasing is not None:
            x = batch_erasing(x)
    return x, y


def to_device(x, device, model_dtype: Optional[str]):
    """A batch on the device (the loader without the prefetcher): images in the model's dtype; a NaFlex dict's
    ``patches`` in it, its coordinates and masks as they are."""
    dtype = model_dtype and getattr(torch, model_dtype)
    if isinstance(x, dict):
        return {k: v.to(device=device, dtype=dtype if k == 'patches' else None) if isinstance(v, torch.Tensor) else v
                for k, v in x.items()}
    return x.to(device=device, dtype=dtype)


def synchronize_step(device: torch.device) -> None:
    """--synchronize-step, as timm's script: wait for the work queued on a CUDA or NPU device after each update (so
    that the host's timing of an update includes it). On the CPU every op has finished when it returns: nothing."""
    if device.type in ('cuda', 'npu'):
        getattr(torch, device.type).synchronize()


def variable_batch_weights(micro: List[List[int]], args) -> List[float]:
    """--variable-batch-loss-scale (scheduled resolution): timm scales the update's loss by (batch / average
    batch)^p, p = 1 (linear) or 1/2 (sqrt). Here that scale multiplies the chunks' descent weights (each chunk
    its share of the batch), never the ascent loss: eps comes from the true loss gradient (Fisher-SAM's eps is
    not scale invariant), and the logged losses stay means."""
    sizes = [n for chunks in micro for n in chunks]
    power = 0.5 if args.variable_batch_loss_scale == 'sqrt' else 1.
    scale = (sum(sizes) / batch_size_reference(args)) ** power
    return [scale * n / sum(sizes) for n in sizes]


def naflex_chunk_weights(micro: List[List[int]], args, device) -> list:
    """The descent weight of each chunk of an update under --naflex-loader (``train_step``'s ``chunk_weights``),
    so that the update's gradient is timm's: micro-batch b of the B in the update, n_b images, contributes
    ``s_b / B`` times its mean loss, s_b = (n_b / -b)^p for --naflex-loss-scale linear (p = 1) or sqrt (p = 1/2),
    1 for none. Under DDP (each rank its own batch size, DDP averages the ranks' gradients) also times
    ``world_size * n_b / sum over ranks of n_b``, as timm's script (one all-reduce per update here, of the B sizes).
    Inside micro-batch b, chunk c (n_bc images, its own eps) gets the share n_bc / n_b.

    Python floats on one process; 0-dim device tensors under DDP (the all-reduced sizes stay on the device)."""
    sizes = [sum(chunks) for chunks in micro]
    power = {'none': 0.0, 'sqrt': 0.5, 'linear': 1.0}[args.naflex_loss_scale]
    factors = [(n / batch_size_reference(args)) ** power / len(micro) for n in sizes]
    if args.distributed:
        total = torch.tensor(sizes, dtype=torch.float32, device=device)
        torch.distributed.all_reduce(total)
        factors = torch.tensor(factors, dtype=torch.float32, device=device) * (
            args.world_size * torch.tensor(sizes, dtype=torch.float32, device=device) / total)
    return [factors[b] * n_c / n_b for b, (n_b, chunks) in enumerate(zip(sizes, micro)) for n_c in chunks]


def stop_if_diverged(sums, first_bad, epoch: int, batch_idx: int, n_batches: int) -> None:
    """Raise TrainingDiverged when the running sums (loss, ascent loss, ...; all ranks' under DDP, so that
    every rank stops together) are not finite, naming the first non-finite step this rank saw."""
    if bool(torch.isfinite(sums).all()):
        return
    step = int(first_bad.item())
    where = f'step {step}' if step > 0 else f'a step up to {batch_idx + 1} (on another rank)'
    raise TrainingDiverged(f'the training loss is not finite in epoch {epoch}, {where} of {n_batches}: the run '
                           f'diverged (try a lower --lr, --clip-grad, or --amp-dtype bfloat16); the checkpoints are '
                           f'those of the epochs before')


@torch.no_grad()
def validate(model, loader, loss_fn, args, device, amp_autocast):
    from timm.utils import accuracy
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top1 hits, top5 hits, count
    for x, y in loader:
        if not args.prefetcher:
            x, y = to_device(x, device, args.model_dtype), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if args.tta > 1:   # as timm's train.py: each run of tta consecutive outputs averaged, one target kept
            out = out.unfold(0, args.tta, args.tta).mean(dim=2)
            y = y[0:y.size(0):args.tta]
        loss = loss_fn(out.float(), y)
        top1, top5 = accuracy(out, y, topk=(1, min(5, out.shape[-1])))
        n = out.shape[0]
        totals += torch.stack([loss.double() * n, top1.double() * n / 100, top5.double() * n / 100,
                               torch.tensor(n, dtype=torch.float64, device=device)])
    if args.distributed:
        torch.distributed.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return OrderedDict(loss=loss / n, top1=100. * top1 / n, top5=100. * top5 / n)


def sparse_epoch_start(sam, epoch, num_epochs, model, loader, loss_fn, mixup_fn, args, device,
                       batch_erasing=None) -> None:
    """sam-rand / ssam-f / ssam-d: a mask update due at this epoch (ssam-f: its Fisher from the training batches)."""
    from sam_on_timm.sparse import fisher_diagonal
    from timm.utils import unwrap_model

    teacher_targets = getattr(loss_fn, 'targets', None)   # distillation: the teacher's output with the labels

    def batches():
        for x, y in loader:
            x, y = device_batch(x, y, args, device, mixup_fn, batch_erasing)
            yield x, (y if teacher_targets is None else teacher_targets(x, y))

    def fisher():   # the bare module: DDP would wait for a gradient all-reduce that autograd.grad never starts
        return fisher_diagonal(unwrap_model(model), sam.perturbed, batches(), loss_fn, args.ssam_fisher_samples)

    try:
        updated = sam.mask.epoch_start(epoch, num_epochs, fisher)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if updated and args.rank == 0:
        _logger.info(f'{sam.name}: mask drop-and-regrow at the first SAM update of epoch {epoch}' if sam.mask.kind ==
                     'dynamic' else f'{sam.name}: Fisher mask of epoch {epoch}, {100 * sam.mask.density():.4f}% of the '
                                    f'parameters perturbed')


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv=None) -> int:
    from timm.utils import setup_default_logging
    from sam_on_timm.data_checks import DataError
    if not logging.getLogger().handlers:  # once per process (main() may run several times in tests)
        setup_default_logging()
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 2
    except DataError as e:   # a file the loaders met while training (in a worker or not): its one line
        print(f'train.py: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # before or after the epoch loop (which handles its own): no traceback
        print('train.py: interrupted', file=sys.stderr)
        return 130
    except OSError as e:   # a full disk, a folder that became read-only: the file and the reason, no traceback
        print(f'train.py: error: {e}', file=sys.stderr)
        return 1
    except RuntimeError as e:   # under torchrun, a rank died: the survivors name it in one line
        from sam_on_timm.peers import peer_failure
        line = peer_failure(e)
        if line is None:
            raise
        print(f'train.py: error: {line}', file=sys.stderr)
        return 1


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
    # distillation: the task's trainable module (feature: student + projection) is what the optimizer trains
    task = create_distillation(args, model, device, data_config) if args.kd_model_name else None
    student, trained = model, (model if task is None else task.get_trainable_module())
    optimizer = create_optimizer(args, trained)
    amp_autocast, loss_scaler = setup_amp(args, device)
    resumed = resume(args, model, optimizer, loss_scaler, task)
    model_ema = create_ema(args, model, device, resumed)
    model, clip_parameters = wrap_model(args, trained, device, task)
    data = create_data(args, data_config, device)
    if task is not None:   # the teacher's part once per SAM chunk (sam_on_timm.distill)
        from sam_on_timm.distill import distillation_loss
        data = data._replace(train_loss_fn=distillation_loss(task, data.train_loss_fn))
    schedule = create_schedule(args, optimizer, data, resumed)
    if args.sam_window is not None:   # against the schedule's length (cooldown and cycles included)
        from sam_on_timm.ablations import check_window_in_run
        try:
            check_window_in_run(args.sam_window, schedule.num_epochs, args.sam_epochs)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if schedule.end_epoch <= schedule.start_epoch:   # nothing left: write nothing (args.yaml, checkpoints stay)
        if args.rank == 0:
            _logger.info(f'nothing to train: the run starts at epoch {schedule.start_epoch} and ends before epoch '
                         f'{schedule.end_epoch} (--epochs {args.epochs}, --stop-epoch {args.stop_epoch})')
        if args.distributed:
            torch.distributed.destroy_process_group()
        return 0
    saver = create_saver(args, as_given, output_dir, student, optimizer, model_ema, loss_scaler, schedule, resumed,
                         task)
    rc = 1
    try:
        resume_random_state(args, resumed, schedule.start_epoch)
        rc = train_loop(args, model, model_ema, optimizer, loss_scaler, amp_autocast, clip_parameters, data, schedule,
                        saver, output_dir, device)
    finally:
        if args.log_wandb and saver is not None:   # rank 0's run, closed and flushed (main() may run again)
            import wandb
            wandb.finish(exit_code=rc)
        if saver is not None:
            saver.run_lock.release()
    return rc


def setup_device(args) -> torch.device:
    """The device (and process group under torchrun), demo data, seeds; warnings about flags that do not act."""
    from timm.utils import init_distributed_device, random_seed
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():   # this machine, not the recipe
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    device = init_distributed_device(args)
    if args.distributed:
        from sam_on_timm.peers import note_ranks
        note_ranks()   # each rank's pid: a survivor names the rank that died (main())
        _logger.info(f'Distributed training: rank {args.rank} of {args.world_size}, device {device}')
    if args.demo_data:
        from sam_on_timm.demo_data import prepare_demo_data
        if args.local_rank == 0:  # one writer per node; the others wait for it
            prepare_demo_data(args.demo_data, args.data_dir)
        if args.distributed:
            torch.distributed.barrier()
    check_splits(args)   # (after the demo data is written)
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
    from sam_on_timm import data_checks
    from sam_on_timm.train_step import ascent_samples
    from timm.data import resolve_data_config
    in_chans = 3 if args.in_chans is None else args.in_chans
    if args.input_size is not None:
        in_chans = args.input_size[0]
    overlay = dict(file=args.pretrained_path) if args.pretrained_path else None
    if args.fast_norm:
        timm.layers.set_fast_norm()
    try:
        if args.fuser:
            timm.utils.set_jit_fuser(args.fuser)
    except (AssertionError, ValueError, RuntimeError, AttributeError) as e:
        raise UsageError(f"--fuser '{args.fuser}': {_first_line(e)} (valid: '', te, old, nvfuser)") from None
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), in_chans=in_chans,
            num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
            scriptable=args.torchscript or None, pretrained_cfg_overlay=overlay,
            checkpoint_path=args.initial_checkpoint or None, **args.model_kwargs)
    except Exception as e:  # unknown name, weights that do not fit or cannot be fetched: user input
        raise UsageError(f"cannot create model '{args.model}': {_first_line(e)}") from None
    if args.head_init_scale is not None or args.head_init_bias is not None:   # as timm's train.py
        head = model.get_classifier()
        if not isinstance(getattr(head, 'weight', None), torch.Tensor) or getattr(head, 'bias', None) is None:
            raise UsageError(f"--head-init-scale / --head-init-bias: the classifier of '{args.model}' has no "
                             f"weight and bias")
        with torch.no_grad():
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                head.bias.fill_(args.head_init_bias)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.naflex_loader:
        check_naflex_model(args, model)
    if args.grad_checkpointing:
        try:
            model.set_grad_checkpointing(enable=True)
        except (AssertionError, AttributeError, NotImplementedError):
            raise UsageError(f"--grad-checkpointing: model '{args.model}' does not support "
                             f"activation checkpointing") from None
    if args.fix_norm or args.train_only_norm:   # before the optimizer: frozen parameters stay out of its groups
        from sam_on_timm.ablations import fix_norm, train_only_norm
        try:
            n = fix_norm(model) if args.fix_norm else train_only_norm(model)
        except ValueError as e:
            raise UsageError(f"model '{args.model}': {e}") from None
        if args.rank == 0:
            _logger.info(f'--fix-norm: {n:,} norm parameters set to gamma 1 / beta 0 and frozen' if args.fix_norm else
                         f'--train-only-norm: {n:,} of {sum(p.numel() for p in model.parameters()):,} parameters '
                         f'trainable (the norm layers\')')
    data_config = resolve_data_config(vars(args), model=model, verbose=args.rank == 0)
    args.input_size = data_config['input_size']
    channels = data_config['input_size'][0]
    other = [k for k in ('mean', 'std') if len(data_config[k]) not in (1, channels)]
    if other:   # the model's pretrained mean / std are RGB ones: the loader's normalization would fail
        raise UsageError(f"'{args.model}' takes {channels}-channel images, its {' and '.join(other)} "
                         f"{'have' if len(other) > 1 else 'has'} {len(data_config[other[0]])} values: pass --mean and "
                         f"--std with {'one value each' if channels == 1 else f'1 or {channels} values'}")
    if args.cifar_aug and tuple(args.input_size[1:]) != (32, 32):   # a crop of the padded 32x32 image
        raise UsageError(f"--cifar-aug {args.cifar_aug} crops 32x32 CIFAR images: the input size must be 32x32, got "
                         f"{args.input_size[1]}x{args.input_size[2]} (--img-size 32, or a cifar_* model)")
    try:
        data_checks.check_input_size(model, args.model, data_config['input_size'])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.gaussian_blur_prob and min(args.input_size[1:]) < 12:   # it would fail in the first batch
        raise UsageError(f"--gaussian-blur-prob needs images of at least 12 px (timm's blur kernel is 23 px), "
                         f"got {args.input_size[1]}x{args.input_size[2]}")

    if args.split_bn:   # one BatchNorm per split of the batch (AugMix splits, or the halves of --resplit)
        model = timm.layers.convert_splitbn_model(model, args.batch_splits)

    # chunks of one sample cannot be normalised by BatchNorm in training mode (it fails mid-epoch)
    smallest_batch = min(args.train_batch_sizes or [args.batch_size])
    m = (args.sam_m or smallest_batch) * (args.aug_splits or 1) // (args.batch_splits if args.split_bn else 1)
    n_ascent = ascent_samples(m, args.sam_ascent_frac) if args.is_sam else m
    if min(m, n_ascent) < 2 and any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in model.modules()):
        which = f'the ascent chunk has {n_ascent}' if n_ascent < m else f'a chunk has {m}'
        raise UsageError(f"'{args.model}' has BatchNorm, which needs at least 2 samples per pass: {which} "
                         f"(--sam-m / -b {m}{f', --sam-ascent-frac {args.sam_ascent_frac}' if n_ascent < m else ''})")
    return model, data_config


def check_naflex_model(args, model) -> None:
    """--naflex-loader: the model takes NaFlex patch dicts (it has timm's ``get_patch_size()``, whose answer is the
    loaders' patch size, read before the model is wrapped as timm's script does) and reads patches in the layout
    the loader writes them (--naflex-patchify-channels-first); --naflex-patch-sizes other than its own need its
    patch-size interpolator (timm's NaFlexVit without it fails at the first such batch)."""
    get_patch_size = getattr(model, 'get_patch_size', None)
    if get_patch_size is None:   # timm falls back to 16 px patches, and the model fails on the first batch
        raise UsageError(f"--naflex-loader needs a NaFlex model (one that takes patch dicts and has get_patch_size(), "
                         f"e.g. naflexvit_base_patch16_gap); '{args.model}' is not one")
    args.naflex_patch_size = tuple(get_patch_size())
    embeds = getattr(model, 'embeds', None)
    other = [p for p in args.naflex_patch_sizes or () if (p, p) != args.naflex_patch_size]
    if other and getattr(embeds, 'supports_patch_interpolation', True) is False:
        own = 'x'.join(map(str, args.naflex_patch_size))
        raise UsageError(f"--naflex-patch-sizes {' '.join(map(str, args.naflex_patch_sizes))}: '{args.model}' embeds "
                         f"{own} px patches only; add --model-kwargs enable_patch_interpolator=True (timm's variable "
                         f"patch size mode; not with an input norm), or drop --naflex-patch-sizes")
    channels_last = getattr(embeds, 'channels_last', None)
    if channels_last is not None and channels_last == args.naflex_patchify_channels_first:
        # the flat patch length is the same in both layouts: a mismatch would train on scrambled pixels
        if channels_last:
            raise UsageError(f"'{args.model}' reads channels-last (P-P-C) patches and --naflex-patchify-channels-first "
                             f"writes C-P-P: drop it, or add --model-kwargs patchify_channels_last=False")
        raise UsageError(f"'{args.model}' reads channels-first (C-P-P) patches and the NaFlex loader writes P-P-C: "
                         f"add --naflex-patchify-channels-first")


def place_model(args, model, device):
    """The model on its device and memory format; SyncBatchNorm across ranks when asked."""
    import timm
    model.to(device)
    if args.model_dtype:
        model.to(dtype=getattr(torch, args.model_dtype))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.distributed and args.sync_bn:
        model = timm.layers.convert_sync_batchnorm(model)
    if args.torchscript:   # plain optimizers only (validate_args)
        model = torch.jit.script(model)
    return model


def create_optimizer(args, model):
    """timm's optimizer factory (SAM names included); the lr from --lr-base and the global batch if not given;
    the --sam-m chunk path (--sam-chunks), logged once."""
    from sam_on_timm.registry import sam_family
    from sam_on_timm.train_step import choose_chunk_path, find_sam
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    global_batch = batch_size_reference(args) * args.world_size * args.grad_accum_steps
    if args.lr is None:
        names = (args.opt, args.sam_base if args.is_sam else '')
        adaptive = any(o in name.lower() for o in ('ada', 'lamb') for name in names)
        scale = args.lr_base_scale or ('sqrt' if adaptive else 'linear')
        args.lr = args.lr_base * (global_batch / args.lr_base_size) ** (0.5 if scale == 'sqrt' else 1.0)
        if args.rank == 0:
            _logger.info(f'lr {args.lr:.4g} from lr-base {args.lr_base} and global batch {global_batch} ({scale})')

    opt_kwargs = optimizer_kwargs(cfg=args)
    if args.is_sam:
        opt_kwargs.update(rho=args.rho, eta=args.sam_eta, base_opt=args.sam_base, interval=args.sam_interval)
        if sam_family(args.opt) == 'gsam':   # rho_t from --rho to --rho-min as the lr goes from --lr to --min-lr
            opt_kwargs.update(gsam_alpha=args.gsam_alpha, rho_min=args.rho_min, lr_max=args.lr, lr_min=args.min_lr)
        if sam_family(args.opt) == 'looksam':
            opt_kwargs.update(looksam_alpha=args.looksam_alpha)
        if sam_family(args.opt) == 'esam':   # the tensor draws from the run's seed: the same on every rank
            opt_kwargs.update(esam_beta=args.esam_beta, esam_gamma=args.esam_gamma, esam_seed=args.seed)
    if args.sparse:   # the mask is drawn from the run's seed: the same on every rank
        opt_kwargs.update(sparsity=args.sam_sparsity, mask_seed=args.seed, mask_update_epochs=args.sam_mask_update,
                          fisher_samples=args.ssam_fisher_samples, drop_rate=args.ssam_drop_rate)
    try:
        optimizer = create_optimizer_v2(model, **opt_kwargs, **args.opt_kwargs)
    except (ValueError, TypeError, IndexError, KeyError) as e:  # e.g. --opt-betas of the wrong length
        raise UsageError(f"cannot create optimizer '{args.opt}': {_first_line(e)}") from None
    sam = find_sam(optimizer)
    if sam is not None and args.rank == 0:
        _logger.info(repr(sam).split(', base=')[0] + ')')
    m = args.sam_m or args.batch_size
    # NaFlex: the batch size varies per update; the model and the optimizer decide here, the chunks per update
    sizes = [m, m] if args.naflex_loader and args.sam_m else [m] * (args.batch_size // m)
    args.sam_chunks_path, why = choose_chunk_path(model, optimizer, sizes, args.sam_chunks)
    if args.sam_chunks == 'batched' and args.sam_chunks_path != 'batched':
        raise UsageError(f'--sam-chunks batched: the chunks cannot share one pass: {why}; use --sam-chunks auto')
    if args.rank == 0 and len(sizes) > 1:
        _logger.info(f'--sam-m chunks: {args.sam_chunks_path} ({why})' + (
            '; a NaFlex batch that is not a multiple of m (a smaller last chunk) runs sequentially, as does an '
            "update whose micro-batches' chunk counts share no divisor above 1 (--grad-accum-steps)"
            if args.naflex_loader and args.sam_chunks_path == 'batched' else ''))
    return optimizer


def batch_size_reference(args) -> float:
    """The per-rank batch size the lr and the loss scale refer to: -b, or with --train-img-sizes the
    policy-average scheduled batch size (timm's ScheduledBatchSampler computes it)."""
    if args.train_img_sizes is None:
        return args.batch_size
    from timm.data.scheduled_sampler import ScheduledBatchSampler
    sizes = args.train_batch_sizes or [args.batch_size] * len(args.train_img_sizes)
    try:
        return ScheduledBatchSampler(
            range(1), batch_sizes=sizes, choice_weights=args.train_size_probs, num_batches=1,
            choice_schedule=args.train_size_schedule,
            schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
            schedule_spread=args.train_size_schedule_spread, schedule_random_mix=args.train_size_random_mix,
        ).average_batch_size
    except (ValueError, TypeError) as e:
        raise UsageError(f'--train-img-sizes / --train-batch-sizes / --train-size-*: {_first_line(e)}') from None


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


def resume(args, model, optimizer, loss_scaler, task=None):
    """--resume: weights, optimizer (unless --no-resume-opt), scaler and epoch (see sam_on_timm.checkpoint);
    a distillation task's own state (feature distillation's projection) from the checkpoint's task_state."""
    from sam_on_timm.checkpoint import Resumed, load_resume
    if not args.resume:
        return Resumed()
    try:   # also checkpoints of timm's own train.py: args as a Namespace, DDP's module. prefix, bare weights
        resumed = load_resume(args.resume, model, None if args.no_resume_opt else optimizer, loss_scaler,
                              opt_name=args.opt, ema=args.model_ema, partial=args.resume_partial)
        task_state = (resumed.checkpoint or {}).get('task_state')
        if task is not None and task.get_task_state():   # a task with state of its own: the file's, if it has it
            if task_state:
                task.load_task_state(task_state)
            elif args.rank == 0:
                _logger.warning(f"--resume '{args.resume}' holds no distillation task state (the feature "
                                f"projection): it starts afresh")
    except Exception as e:  # not a checkpoint, or one of another model / optimizer
        raise UsageError(f"--resume '{args.resume}' cannot be loaded into this run: {_first_line(e)}") from None
    if resumed.checkpoint is None:
        _logger.info(f"--resume '{args.resume}' holds weights only: training starts at epoch 0")
    elif resumed.afresh and args.rank == 0:
        _logger.warning(f"--resume-partial: '{args.resume}' lacks {' and '.join(resumed.afresh)}: started afresh "
                        f"(not an exact continuation)")
    return resumed


def create_ema(args, model, device, resumed):
    """timm's ModelEmaV3 of the bare model (its weights from the checkpoint when resuming)."""
    from timm.utils import ModelEmaV3
    if not args.model_ema:
        return None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                           device=torch.device('cpu') if args.model_ema_force_cpu else device)
    if resumed.checkpoint is not None and 'state_dict_ema' in resumed.checkpoint:
        model_ema.module.load_state_dict(resumed.checkpoint['state_dict_ema'])
    return model_ema


def wrap_model(args, model, device, task=None):
    """Parameters to clip (before wrapping), then DDP and torch.compile around the model (the distillation
    task's trainable module, when distilling)."""
    clip_parameters = None
    if args.clip_grad is not None:   # as timm's train.py: AGC leaves the classifier head (its last two tensors) out
        from timm.models import model_parameters
        exclude_head = 'agc' in args.clip_mode
        clip_parameters = list(model_parameters(model, exclude_head=exclude_head) if task is None else
                               task.get_clip_parameters(exclude_head=exclude_head))   # feature: + the projection
    if args.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [device] if device.type == 'cuda' else None
        if not args.no_ddp_bb:   # DDP's default syncs the buffers at init and before each forward, as timm's
            model = DDP(model, device_ids=device_ids)
        else:
            # --no-ddp-bb: no buffer sync at all, which torch >= 2.14 can only spell with its deprecated
            # broadcast_buffers=False (forward_sync_buffers=False still syncs at init): its FutureWarning,
            # once per rank, says nothing the user can act on
            import warnings
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='.*broadcast_buffers.* is deprecated', category=FutureWarning)
                model = DDP(model, device_ids=device_ids, broadcast_buffers=False)
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
    batch_erasing: Any = None  # --resplit without the prefetcher: timm's RandomErasing on the batch, else None


def create_data(args, data_config, device) -> Data:
    """timm's datasets and loaders, mixup / cutmix and the training loss."""
    from timm.data import AugMixDataset, Mixup, FastCollateMixup, create_dataset, create_loader
    from sam_on_timm import data_checks
    from sam_on_timm.augment import install_posterize_fix
    channels = data_config['input_size'][0]
    if args.input_img_mode is not None:
        check_input_img_mode(args, channels)
    elif channels not in (1, 3) and not args.dataset.lower().startswith('torch/'):   # timm's default mode: 'L'
        from PIL import Image
        valid = [m for m in Image.MODES if Image.getmodebands(m) == channels]
        raise UsageError(f"the model takes {channels}-channel images and the images are read as 1-channel 'L' "
                         f"(timm's default for other than 3): pass --input-img-mode, a PIL mode with {channels} "
                         f"bands ({', '.join(valid) or 'none'})")
    dataset_kwargs = dict(class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size,
                          input_key=args.input_key, target_key=args.target_key,
                          trust_remote_code=args.dataset_trust_remote_code,
                          input_img_mode=args.input_img_mode or ('RGB' if channels == 3 else 'L'))
    try:
        dataset_train = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                       seed=args.seed, repeats=args.epoch_repeats, num_samples=args.train_num_samples,
                                       **dataset_kwargs)
        dataset_eval = None   # --val-split '': no validation, as in timm's script
        if args.val_split:
            dataset_eval = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                          num_samples=args.val_num_samples, **dataset_kwargs)
    # unknown dataset, class map, ...; TypeError: a reader that takes no such key (a folder's --target-key)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, TypeError, pickle.UnpicklingError,
            EOFError) as e:
        refused = data_checks.class_map_error(args.class_map, e)
        if refused:
            raise UsageError(refused) from None
        raise UsageError(f"cannot read the data (--dataset '{args.dataset}', --data-dir, --train-split, --val-split, "
                         f"--class-map, --input-key, --target-key): {_first_line(e)}") from None
    splits = [('training', dataset_train)] + ([('validation', dataset_eval)] if dataset_eval is not None else [])
    try:   # the same classes in both splits, readable images (the loaders' failures then name their file)
        if dataset_eval is not None:
            data_checks.check_class_sets(dataset_train, dataset_eval, args.class_map, args.input_key)
        for split, ds in splits:
            data_checks.check_readable(data_checks.guard_dataset(ds, split, args.max_image_pixels), split)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for split, ds in splits:
        # a label past the head is an index error mid-epoch (a device assert on CUDA). Folder and tar
        # readers know their classes; other datasets (torch/*, hfds/*, ...) are not checked here.
        labels = (getattr(getattr(ds, 'reader', None), 'class_to_idx', None) or {}).values()
        n = max(labels, default=-1) + 1
        if n > args.num_classes:
            raise UsageError(f'the {split} data has {n} classes but the model head has {args.num_classes}: '
                             f'pass --num-classes {n}')
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    install_posterize_fix()   # before the transforms are built: timm's posterize at 0 bits on Pillow 13
    if args.naflex_loader:   # batches sized from a token budget, patch dicts (timm's create_naflex_loader)
        try:
            loader_train, loader_eval = create_naflex_loaders(args, data_config, device, dataset_train, dataset_eval,
                                                              mixup_active)
        except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise UsageError(f'cannot build the NaFlex data pipeline (--naflex-*, --aa, --reprob/--remode, --scale, '
                             f'--ratio, --color-jitter, --interpolation, --mean/--std, --mixup/--cutmix, --workers): '
                             f'{_first_line(e)}') from None
        return Data(dataset_train, loader_train, loader_eval, mixup_active, None, *create_losses(args, mixup_active,
                                                                                                  device))
    if len(dataset_train) < args.batch_size * args.world_size:
        raise UsageError(f'the training split has {len(dataset_train)} images, fewer than one global batch '
                         f'({args.batch_size} x {args.world_size})')
    try:   # augmentation and loader settings are checked by timm as they are built
        collate_fn, mixup_fn = None, None
        if mixup_active:
            mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                              prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                              label_smoothing=args.smoothing, num_classes=args.num_classes)
            if args.prefetcher:
                collate_fn = FastCollateMixup(**mixup_args)
            else:
                mixup_fn = Mixup(**mixup_args)
        if args.aug_splits > 1:
            dataset_train = AugMixDataset(dataset_train, num_splits=args.aug_splits)
        img_dtype = getattr(torch, args.model_dtype or 'float32')
        # --resplit spares the first (clean) split from random erasing. timm's per-image erasing in the transform
        # cannot tell the splits apart; its prefetcher erases the batch. Without the prefetcher (on the CPU,
        # --no-prefetcher) train_one_epoch erases the batch with timm's RandomErasing the same way.
        batch_erasing = None
        if args.resplit and args.reprob > 0 and not args.no_aug and not args.prefetcher:
            from timm.data.random_erasing import RandomErasing
            batch_erasing = RandomErasing(probability=args.reprob, mode=args.remode, max_count=args.recount,
                                          num_splits=args.aug_splits or 2, device=device)
        loader_train = create_loader(
            dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
            no_aug=args.no_aug, re_prob=0. if batch_erasing is not None else args.reprob, re_mode=args.remode,
            re_count=args.recount, re_split=args.resplit,
            train_crop_mode=args.train_crop_mode, num_aug_splits=args.aug_splits, worker_seeding=args.worker_seeding,
            num_aug_repeats=args.aug_repeats if args.distributed else 0, img_dtype=img_dtype,
            use_multi_epochs_loader=args.use_multi_epochs_loader, scale=args.scale,
            input_size_choices=args.train_img_sizes, batch_size_choices=args.train_batch_sizes,
            batch_choice_weights=args.train_size_probs, batch_choice_seed=args.seed,
            batch_choice_schedule=args.train_size_schedule,
            batch_schedule_epochs=args.epochs if args.train_size_schedule == 'progressive' else None,
            batch_schedule_spread=args.train_size_schedule_spread,
            batch_schedule_random_mix=args.train_size_random_mix, num_batches=args.train_batches_per_epoch,
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
            dataset_eval, input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
            img_dtype=img_dtype, persistent_workers=False)
        if args.aug_repeats and not args.distributed:   # timm's sampler for one rank (timm's loader asserts DDP)
            from timm.data.distributed_sampler import RepeatAugSampler
            loader_train = with_sampler(loader_train, RepeatAugSampler(dataset_train, num_replicas=1, rank=0,
                                                                       num_repeats=args.aug_repeats))
        if args.cifar_aug:   # the loader reads the dataset's transform in each epoch's (fresh) workers
            from sam_on_timm.cifar_data import cifar_train_transform
            dataset_train.transform = cifar_train_transform(args.cifar_aug, data_config['mean'], data_config['std'],
                                                            args.prefetcher, data_config['input_size'][-1])
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise UsageError(f'cannot build the data pipeline (--aa, --reprob/--remode, --scale, --ratio, --color-jitter, '
                         f'--interpolation, --mean/--std, --mixup/--cutmix, --workers): {_first_line(e)}') from None
    try:
        data_checks.check_tta(args.tta, loader_eval)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Data(dataset_train, loader_train, loader_eval, mixup_active, mixup_fn,
                *create_losses(args, mixup_active, device), batch_erasing)


def create_losses(args, mixup_active: bool, device) -> Tuple[Any, Any]:
    """The training loss (timm's choice from --jsd-loss / mixup / --smoothing / --bce-*) and the validation loss."""
    from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    bce_args = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if args.jsd_loss:   # as timm's train.py
        train_loss_fn = JsdCrossEntropy(num_splits=args.aug_splits, smoothing=args.smoothing)
    elif mixup_active:   # the smoothing is in the mixed targets
        train_loss_fn = BinaryCrossEntropy(**bce_args) if args.bce_loss else SoftTargetCrossEntropy()
    elif args.smoothing:
        train_loss_fn = (BinaryCrossEntropy(smoothing=args.smoothing, **bce_args) if args.bce_loss
                         else LabelSmoothingCrossEntropy(smoothing=args.smoothing))
    else:
        train_loss_fn = BinaryCrossEntropy(smoothing=0., **bce_args) if args.bce_loss else torch.nn.CrossEntropyLoss()
    return train_loss_fn.to(device), torch.nn.CrossEntropyLoss().to(device)


def create_naflex_loaders(args, data_config, device, dataset_train, dataset_eval, mixup_active: bool):
    """--naflex-loader: timm's ``create_naflex_loader`` for training (batches of patch sequences, their size from
    the token budget -b x max(--naflex-train-seq-lens); mixup by timm's NaFlexMixup in the loader) and validation
    (--naflex-max-seq-len), with the options as timm's train.py passes them. Differences: the shuffle follows
    --seed (timm's uses the loader's default seed), --mixup-off-epoch reaches NaFlexMixup, the prefetcher
    normalizes as many channels as the model takes, and workers are not persistent (as for the other loader)."""
    from timm.data import NaFlexMixup, create_naflex_loader
    naflex_mixup = None
    if mixup_active:
        naflex_mixup = NaFlexMixup(num_classes=args.num_classes, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                   switch_prob=args.mixup_switch_prob, prob=args.mixup_prob,
                                   label_smoothing=args.smoothing, mixup_off_epoch=args.mixup_off_epoch)
    if args.naflex_patch_sizes:   # timm's variable patch size mode
        patch = dict(patch_size_choices=args.naflex_patch_sizes, patch_size_choice_probs=args.naflex_patch_size_probs)
    else:
        patch = dict(patch_size=args.naflex_patch_size)
    common = dict(mean=data_config['mean'], std=data_config['std'], channels=data_config['input_size'][0],
                  pin_memory=args.pin_mem, img_dtype=getattr(torch, args.model_dtype or 'float32'), device=device,
                  distributed=args.distributed, use_prefetcher=args.prefetcher, num_workers=args.workers,
                  patchify_channels_last=not args.naflex_patchify_channels_first, persistent_workers=False)
    loader_train = create_naflex_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, train_seq_lens=args.naflex_train_seq_lens,
        mixup_fn=naflex_mixup, rank=args.rank, world_size=args.world_size, seed=args.seed, no_aug=args.no_aug,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, re_split=args.resplit,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
        color_jitter=args.color_jitter, color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
        gaussian_blur_prob=args.gaussian_blur_prob, auto_augment=args.aa, worker_seeding=args.worker_seeding,
        interpolation=data_config['interpolation'] if args.no_aug or not args.train_interpolation
        else args.train_interpolation, **patch, **common)
    loader_eval = None if dataset_eval is None else create_naflex_loader(
        dataset_eval, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        patch_size=args.naflex_patch_size, max_seq_len=args.naflex_max_seq_len,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
    return loader_train, loader_eval


def check_input_img_mode(args, channels: int) -> None:
    """--input-img-mode names a PIL mode with as many bands as the model has input channels: timm's readers convert
    every image to it, and a mode PIL does not know, or of another band count, would fail in the first batch.
    torch/* datasets do not take the option (timm passes it to its own readers only)."""
    if args.dataset.split('/')[0].lower() == 'torch' and '/' in args.dataset:
        return
    from PIL import Image
    valid = [m for m in Image.MODES if Image.getmodebands(m) == channels]
    if args.input_img_mode not in valid:
        raise UsageError(f"--input-img-mode '{args.input_img_mode}': the model takes {channels}-channel images "
                         f"(--in-chans / --input-size); PIL modes with {channels} band(s): {', '.join(valid)}")


def with_sampler(loader, sampler):
    """timm's training loader with another sampler (same dataset, transforms, collate, workers, prefetcher)."""
    inner = getattr(loader, 'loader', loader)   # timm's PrefetchLoader wraps the DataLoader
    rebuilt = type(inner)(inner.dataset, batch_size=inner.batch_size, sampler=sampler, num_workers=inner.num_workers,
                          collate_fn=inner.collate_fn, pin_memory=inner.pin_memory, drop_last=inner.drop_last,
                          worker_init_fn=inner.worker_init_fn, persistent_workers=inner.persistent_workers)
    if inner is loader:
        return rebuilt
    loader.loader = rebuilt
    return loader


def create_distillation(args, model, device, data_config):
    """timm's distillation task for --kd-distill-type (logit, feature, token): it builds the teacher (frozen
    here: never trained, never perturbed), the loss weights and the trainable module (feature: student +
    projection). Its loss, with the teacher's part computed once per SAM chunk, is sam_on_timm.distill's.
    The teacher renormalizes the images from the loader's mean / std (``data_config``: --mean / --std)."""
    from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask
    from sam_on_timm.distill import check_feature_dims, set_student_normalization
    kind = args.kd_distill_type
    if kind == 'token' and not hasattr(model, 'set_distilled_training'):
        raise UsageError(f"--kd-distill-type token needs a student with a distillation token (timm's "
                         f"deit_*_distilled_* models, e.g. deit_tiny_distilled_patch16_224): '{args.model}' has none; "
                         f"use --kd-distill-type logit or feature")
    common = dict(student_model=model, teacher_model=args.kd_model_name, criterion=torch.nn.CrossEntropyLoss(),
                  teacher_pretrained_path=args.kd_pretrained_path, distill_loss_weight=args.distill_loss_weight,
                  task_loss_weight=args.task_loss_weight, device=device,
                  dtype=getattr(torch, args.model_dtype) if args.model_dtype else None, verbose=args.rank == 0)
    try:   # (the criterion is the run's training loss, set once the data side has built it)
        if kind == 'feature':
            task = FeatureDistillationTask(**common, student_feature_dim=args.kd_student_feature_dim,
                                           teacher_feature_dim=args.kd_teacher_feature_dim)
        elif kind == 'token':
            task = TokenDistillationTask(**common, distill_type=args.kd_token_distill_type,
                                         temperature=args.kd_temperature)
        else:
            task = LogitDistillationTask(**common, loss_type=args.kd_loss_type, temperature=args.kd_temperature)
    except Exception as e:   # unknown teacher, weights that cannot be fetched or do not fit
        raise UsageError(f"cannot create the teacher --kd-model-name '{args.kd_model_name}' "
                         f"(--kd-distill-type {kind}): {_first_line(e)}") from None
    for p in task.teacher.parameters():   # never trained, never perturbed
        p.requires_grad_(False)
    set_student_normalization(task, data_config['mean'], data_config['std'], data_config['input_size'][0])
    if kind == 'feature':
        try:
            check_feature_dims(task, args.input_size)
        except Exception as e:   # a wrong --kd-*-feature-dim, or a model without forward_features / forward_head
            given = [f'{flag_name(k)} {getattr(args, k)}' for k in ('kd_student_feature_dim', 'kd_teacher_feature_dim')
                     if getattr(args, k) is not None]
            hint = f" ({', '.join(given)}: leave them out to detect the widths)" if given else ''
            raise UsageError(f"--kd-distill-type feature with student '{args.model}' and teacher "
                             f"'{args.kd_model_name}': {_first_line(e)}{hint}") from None
    return task


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
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing), updates_per_epoch=updates_per_epoch)
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


def create_saver(args, as_given, output_dir, model, optimizer, model_ema, loss_scaler, schedule: Schedule, resumed,
                 task=None):
    """Rank 0: the run folder, its args.yaml and timm's CheckpointSaver (writing RNG states too); else None.
    ``model`` is the student (its weights are the checkpoint's ``state_dict``); a distillation task's own
    trainable state (feature distillation's projection) goes into ``task_state``, as in timm's checkpoints."""
    from sam_on_timm.checkpoint import RngCheckpointSaver, resume_saver
    from sam_on_timm.outputs import RunLock
    if args.rank != 0:
        return None
    if args.log_wandb:   # before the run folder is written: a run that cannot log stops with nothing written
        start_wandb(args, output_dir)
    os.makedirs(output_dir, exist_ok=True)
    lock = RunLock(output_dir)   # held until run() ends (the OS drops it if the process dies)
    try:
        lock.acquire()
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:   # under the lock, again: another run may have written the folder since the first check
        check_output_dir(args, output_dir, probe_lock=False)
        with open(os.path.join(output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(as_given, f)
    except BaseException:
        lock.release()
        raise
    trim_summary(os.path.join(output_dir, 'summary.csv'), schedule.start_epoch)
    saver = RngCheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=model_ema,
                               amp_scaler=loss_scaler, checkpoint_dir=output_dir, recovery_dir=output_dir,
                               decreasing=schedule.decreasing, max_history=args.checkpoint_hist)
    saver.task_state = None if task is None else task.get_task_state
    saver.run_lock = lock
    resume_saver(saver, resumed.checkpoint, args.resume, output_dir)
    _logger.info(f'Scheduled epochs: {schedule.num_epochs}; running epochs {schedule.start_epoch}..'
                 f'{schedule.end_epoch - 1}; output {output_dir}')
    return saver


def start_wandb(args, output_dir: str) -> None:
    """The wandb run, as timm's train.py starts it. An init that fails (not logged in, no network, an unknown
    --wandb-resume-id) is a one-line UsageError naming the way out, not wandb's traceback."""
    from sam_on_timm.checkpoint import plain_args
    import wandb
    try:
        wandb.init(project=args.wandb_project, name=os.path.basename(output_dir), config=plain_args(args),
                   tags=args.wandb_tags, resume='must' if args.wandb_resume_id else None,
                   id=args.wandb_resume_id or None)
    except Exception as e:   # wandb's UsageError / CommError / AuthenticationError, ...
        raise UsageError(f"--log-wandb: wandb.init failed: {_first_line(e)} (WANDB_MODE=offline logs locally; "
                         f"or drop --log-wandb)") from None


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
    from sam_on_timm.train_step import find_sam
    from timm.utils import distribute_bn, update_summary
    sam = find_sam(optimizer)
    lr_scheduler, decreasing = schedule.lr_scheduler, schedule.decreasing
    loader_train, loader_eval, mixup_fn = data.loader_train, data.loader_eval, data.mixup_fn
    num_updates = schedule.start_epoch * schedule.updates_per_epoch
    best_metric, interrupted, diverged, epoch, results = None, False, None, schedule.start_epoch, []
    try:
        for epoch in range(schedule.start_epoch, schedule.end_epoch):
            if args.naflex_loader:   # the NaFlex wrapper shuffles its batch schedule and images per epoch
                loader_train.dataset.set_epoch(epoch)
            elif hasattr(data.dataset_train, 'set_epoch'):
                data.dataset_train.set_epoch(epoch)
            elif hasattr(getattr(loader_train, 'loader', loader_train).batch_sampler, 'set_epoch'):
                getattr(loader_train, 'loader', loader_train).batch_sampler.set_epoch(epoch)   # scheduled batches
            elif hasattr(loader_train.sampler, 'set_epoch'):   # DistributedSampler, RepeatAugSampler
                loader_train.sampler.set_epoch(epoch)
            if data.mixup_active and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                if mixup_fn is not None:
                    mixup_fn.mixup_enabled = False
                elif hasattr(loader_train, 'mixup_enabled'):
                    loader_train.mixup_enabled = False
            if sam is not None and sam.mask is not None:   # sam-rand / ssam-f / ssam-d
                sparse_epoch_start(sam, epoch, schedule.num_epochs, model, loader_train, data.train_loss_fn, mixup_fn,
                                   args, device, data.batch_erasing)
            train_metrics, num_updates = train_one_epoch(
                epoch, model, loader_train, optimizer, data.train_loss_fn, args, device, lr_scheduler, amp_autocast,
                loss_scaler, model_ema, mixup_fn, num_updates, clip_parameters, saver, output_dir, data.batch_erasing)
            ema_validated = model_ema is not None and not args.model_ema_force_cpu   # as timm: a CPU EMA is not
            if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
                distribute_bn(model, args.world_size, args.dist_bn == 'reduce')
                if ema_validated:  # the EMA averages each rank's own BN statistics: share them too
                    distribute_bn(model_ema, args.world_size, args.dist_bn == 'reduce')
            if (epoch + 1) % args.val_interval and epoch + 1 != schedule.end_epoch:   # as timm's --val-interval
                if lr_scheduler is not None:
                    lr_scheduler.step(epoch + 1, None)
                continue   # no validation, summary row or checkpoint this epoch
            eval_metrics, metric = {}, train_metrics['loss']   # no validation: ranked by the training loss
            if loader_eval is not None:
                eval_metrics = validate(model, loader_eval, data.validate_loss_fn, args, device, amp_autocast)
                if ema_validated:
                    ema_metrics = validate(model_ema, loader_eval, data.validate_loss_fn, args, device, amp_autocast)
                    eval_metrics.update((f'ema_{k}', v) for k, v in ema_metrics.items())
                # as timm's train.py: with an EMA, its metric picks the best checkpoint and drives a plateau schedule
                metric = eval_metrics[('ema_' if ema_validated else '') + args.eval_metric]
            bad = [k for k, v in eval_metrics.items() if not math.isfinite(v)]
            if bad:   # never saved, never ranked (NaN would win timm's comparisons)
                raise TrainingDiverged(f"validation after epoch {epoch}: {', '.join(bad)} not finite: the run "
                                       f"diverged; the checkpoints are those of the epochs before")
            if args.rank == 0 and eval_metrics:
                _logger.info(f'Eval: epoch {epoch}  loss {eval_metrics["loss"]:.4f}  top1 {eval_metrics["top1"]:.2f}  '
                             f'top5 {eval_metrics["top5"]:.2f}')
            if args.rank == 0:
                lrs = [g['lr'] for g in optimizer.param_groups]
                summary = os.path.join(output_dir, 'summary.csv')
                update_summary(epoch, train_metrics, eval_metrics, filename=summary, lr=sum(lrs) / len(lrs),
                               write_header=not os.path.isfile(summary) or os.path.getsize(summary) == 0)
                if args.log_wandb:   # the summary row, SAM columns included, as timm's update_summary logs it
                    import wandb
                    wandb.log({'epoch': epoch, 'lr': sum(lrs) / len(lrs),
                               **{f'train_{k}': v for k, v in train_metrics.items()},
                               **{f'eval_{k}': v for k, v in eval_metrics.items()}})
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
    except TrainingDiverged as e:   # the completed epochs are reported below, then the one line
        diverged = str(e)
    if best_metric is not None:
        _logger.info(f'*** Best metric: {best_metric} (epoch {best_epoch})')
    if results and args.rank == 0:   # as timm's script: the 10 best epochs, best last, for tools that parse stdout
        ranked = sorted(results, key=lambda r: r['metric'], reverse=decreasing)
        print(f'--result\n{json.dumps(ranked[-10:], indent=4, allow_nan=False)}')
    if args.distributed and not interrupted:
        torch.distributed.destroy_process_group()
    if diverged:
        print(f'train.py: error: {diverged}', file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
