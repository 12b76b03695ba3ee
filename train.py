#!/usr/bin/env python3
"""ImageNet-style training with timm, plus SAM and SAM-ON.

Same command line and YAML ``-c`` keys as timm's train.py (differences: docs/differences.md), plus
the SAM flags. ``--opt`` takes any timm optimizer name, so SGD baselines run from here too:

    python train.py -c hparams/demo/sam-on.yaml
    torchrun --nproc_per_node=8 train.py -c hparams/resnet50/sam-on-layerl2.yaml --data-dir /data/imagenet

The SAM algorithm itself lives in ``sam_on_timm`` (``sam_on_timm.train_step``); this script wires
data, model, schedule, EMA, AMP, checkpoints and logging around it.
"""
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, List, NamedTuple, Optional

import torch
import yaml

# the argument layer (options, YAML, checks) and the data side live in the package; build_parser and create_losses
# are re-exported for the tests that reach them as train.<name>
from sam_on_timm.option_checks import check_output_dir, check_splits, output_dir_for, validate_args
from sam_on_timm.options import (UsageError, build_parser, first_line, flag_name, given_args,  # noqa: F401
                                 option_default, parse_args)
from sam_on_timm.outputs import trim_summary
from sam_on_timm.run_data import Data, create_data, create_losses  # noqa: F401

_logger = logging.getLogger('train')


class TrainingDiverged(Exception):
    """The training loss or a validation metric is not finite: the run stops (one line, exit code 1)
    before the epoch is saved, so no checkpoint holds non-finite weights and nothing NaN ranks as best."""


# ---------------------------------------------------------------------------------------------
# 1. parse the command line, run, report bad input in one line
# ---------------------------------------------------------------------------------------------
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
# 2. the run, step by step: set up, build, schedule, loop (train, validate, save)
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


# ---------------------------------------------------------------------------------------------
# 3. set up and build: device, model, optimizer, AMP, resume, EMA, wrapping (the data: sam_on_timm.run_data)
# ---------------------------------------------------------------------------------------------
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
        ignored = [f'--{k.replace("_", "-")} {getattr(args, k)}'
                   for k in ('rho', 'sam_eta', 'sam_base', 'sam_bn_update', 'sam_ascent_frac')
                   if getattr(args, k) != option_default(k)]
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
        raise UsageError(f"--fuser '{args.fuser}': {first_line(e)} (valid: '', te, old, nvfuser)") from None
    try:
        model = timm.create_model(
            args.model, pretrained=args.pretrained or bool(args.pretrained_path), in_chans=in_chans,
            num_classes=args.num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
            drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
            scriptable=args.torchscript or None, pretrained_cfg_overlay=overlay,
            checkpoint_path=args.initial_checkpoint or None, **args.model_kwargs)
    except Exception as e:  # unknown name, weights that do not fit or cannot be fetched: user input
        raise UsageError(f"cannot create model '{args.model}': {first_line(e)}") from None
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
                         f"(--kd-distill-type {kind}): {first_line(e)}") from None
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
                             f"'{args.kd_model_name}': {first_line(e)}{hint}") from None
    return task


def create_optimizer(args, model):
    """timm's optimizer factory (SAM names included); the lr from --lr-base and the global batch if not given;
    the --sam-m chunk path (--sam-chunks), logged once."""
    from sam_on_timm.names import sam_family
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
        family = sam_family(args.opt)
        if family == 'gsam':   # rho_t from --rho to --rho-min as the lr goes from --lr to --min-lr
            opt_kwargs.update(gsam_alpha=args.gsam_alpha, rho_min=args.rho_min, lr_max=args.lr, lr_min=args.min_lr)
        if family == 'looksam':
            opt_kwargs.update(looksam_alpha=args.looksam_alpha)
        if family == 'esam':   # the tensor draws from the run's seed: the same on every rank
            opt_kwargs.update(esam_beta=args.esam_beta, esam_gamma=args.esam_gamma, esam_seed=args.seed)
    if args.sparse:   # the mask is drawn from the run's seed: the same on every rank
        opt_kwargs.update(sparsity=args.sam_sparsity, mask_seed=args.seed, mask_update_epochs=args.sam_mask_update,
                          fisher_samples=args.ssam_fisher_samples, drop_rate=args.ssam_drop_rate)
    try:
        optimizer = create_optimizer_v2(model, **opt_kwargs, **args.opt_kwargs)
    except (ValueError, TypeError, IndexError, KeyError) as e:  # e.g. --opt-betas of the wrong length
        raise UsageError(f"cannot create optimizer '{args.opt}': {first_line(e)}") from None
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
        raise UsageError(f'--train-img-sizes / --train-batch-sizes / --train-size-*: {first_line(e)}') from None


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
        raise UsageError(f"--resume '{args.resume}' cannot be loaded into this run: {first_line(e)}") from None
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
                             f'{first_line(e)}') from None
    elif args.torchcompile_mode:
        _logger.warning(f'--torchcompile-mode {args.torchcompile_mode} has no effect without --torchcompile')
    return model, clip_parameters


# ---------------------------------------------------------------------------------------------
# 4. the schedule and the run folder
# ---------------------------------------------------------------------------------------------
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
        raise UsageError(f"--sched '{args.sched}': {first_line(e)}") from None
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
        raise UsageError(f"--log-wandb: wandb.init failed: {first_line(e)} (WANDB_MODE=offline logs locally; "
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


# ---------------------------------------------------------------------------------------------
# 5. the loop: an epoch of SAM updates, validation, checkpoints
# ---------------------------------------------------------------------------------------------
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
        # every rank done with its collectives before any tears gloo down: a rank that destroys its group while a
        # peer's last messages are in flight can abort the peer ('terminate called without an active exception')
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if diverged:
        print(f'train.py: error: {diverged}', file=sys.stderr)
        return 1
    return 130 if interrupted else 0


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
                           zero + (stats.ascent_loss is not None),   # updates with an ascent (interval SAM, msam)
                           zero + (stats.eps_norm is not None)])     # updates with an eps (not interval SAM's plain)
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
                    eps = f'{shown[2].item() / shown[6].item():.4g}' if shown[6].item() else '-'
                    msg += f'  ascent-loss {ascent}  |eps| {eps}  skipped {int(round(shown[3].item()))}'
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
        n_eps = sums[6]   # the updates that perturbed: all but interval SAM's plain ones (msam's included)
        metrics.update(ascent_loss=sums[1] / n_asc if sam_step and n_asc else None, descent_loss=sums[0] / n,
                       sharpness=(sums[0] - sums[1]) / n if sam_step and n_asc == n else None,
                       eps_norm=sums[2] / n_eps if n_eps else None, skipped_perturbations=int(round(sums[3])))
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


if __name__ == '__main__':
    sys.exit(main())
