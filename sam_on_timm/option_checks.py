"""train.py's option checks: everything that can be refused before a model, a loader or a file is made.

Each check raises ``UsageError`` (sam_on_timm.options) with one line naming the flag, what is valid and the way
out; train.py reports it as ``train.py: error: ...``, exit code 2. The number rules are the option table's
(``range`` / ``rule`` in sam_on_timm.options) and the library's (sam_on_timm.checks); the rules of SAM names,
bases and m are the library's, reported under the flag's name.
"""
import importlib
import os
from datetime import datetime

import torch
from timm.models import safe_model_name
from timm.optim import list_optimizers

from .ablations import parse_epoch_window
from .checks import check_arg, check_number, check_sam_m
from .cifar_data import CIFAR_AUGS
from .demo_data import DEMO_DATASETS, check_demo_dir, default_demo_dir
from .options import OPTIONS, SAM_ONLY, UsageError, first_line, flag_name, option_default
from .outputs import check_experiment_name, lock_holder, probe_folder
from .family import check_family_args
from .names import SAM_OPTIMIZERS, SPARSE_OPTIMIZERS, check_base_opt, is_sam_name, parse_sam_name, sam_family, \
    split_opt_name
from .perturbations import check_eta_used

__all__ = ['EVAL_METRICS', 'DIST_BN', 'LR_BASE_SCALES', 'MODEL_DTYPES', 'NAFLEX_OPTIONS', 'check_numbers',
           'validate_args', 'validate_timm_options', 'validate_naflex_options', 'check_output_writable',
           'check_splits', 'output_dir_for', 'check_output_dir']

EVAL_METRICS = ('top1', 'top5', 'loss')   # what validate() returns
# the SAM family's arguments (sam_on_timm.family) -> their flags, for its one-line messages
FAMILY_FLAGS = {'interval': '--sam-interval', 'gsam_alpha': '--gsam-alpha', 'rho_min': '--rho-min',
                'looksam_alpha': '--looksam-alpha', 'esam_beta': '--esam-beta', 'esam_gamma': '--esam-gamma'}
DIST_BN = ('reduce', 'broadcast', '')   # BatchNorm statistics across ranks at the end of an epoch ('': none)
LR_BASE_SCALES = ('linear', 'sqrt', '')   # how --lr follows the global batch ('': by optimizer)
def check_numbers(args) -> None:
    """Every float option is finite, and every option with a number rule in the table (sam_on_timm.options: its
    ``range``, or the library's ``rule``) is in it (ValueError naming the flag)."""
    for dest, option in OPTIONS.items():
        value = getattr(args, dest, None)
        values = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None]
        if option.rule is not None and (args.is_sam or dest not in SAM_ONLY):
            check_arg(option.rule, values, flag_name(dest))
        elif option.range is not None:
            for v in values:
                check_number(v, flag_name(dest), *option.range)
        elif option.kwargs.get('type') is float:
            for v in values:
                check_number(v, flag_name(dest))
    for dest in ('scale', 'ratio', 'cutmix_minmax'):   # (min, max) pairs
        v = getattr(args, dest)
        if v is not None and len(v) == 2 and v[0] > v[1]:
            raise ValueError(f'{flag_name(dest)} is a (min, max) pair: got {v[0]} > {v[1]}')


def validate_args(args) -> None:
    """Every option check of train.py that needs no model and no data, in order; the values it derives
    (is_sam, sparse, sam_window, batch_splits, data_dir) are set on ``args``."""
    try:
        opt_name = split_opt_name(args.opt)[1]
    except ValueError:
        opt_name = None
    if opt_name not in list_optimizers():
        raise UsageError(f"unknown --opt '{args.opt}'; SAM names: {', '.join(SAM_OPTIMIZERS)}; "
                         f"or any timm optimizer (timm.optim.list_optimizers(), e.g. sgd, adamw)")
    args.is_sam = is_sam_name(args.opt)
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
    args.sparse = args.is_sam and split_opt_name(args.opt)[1] in SPARSE_OPTIMIZERS
    if args.sam_sparsity is not None and not args.sparse:
        raise UsageError(f"--sam-sparsity is an option of --opt {', '.join(SPARSE_OPTIMIZERS)}, "
                         f"got --opt {args.opt}")
    if args.sparse and (args.sam_mask_update < 1 or args.ssam_fisher_samples < 1):
        raise UsageError(f'--sam-mask-update and --ssam-fisher-samples must be positive, got {args.sam_mask_update} '
                         f'and {args.ssam_fisher_samples}')
    args.sam_window = None
    if args.sam_epochs is not None:
        if not args.is_sam:
            raise UsageError(f'--sam-epochs {args.sam_epochs} needs a SAM --opt (e.g. sam, sam-on), got {args.opt}')
        try:
            args.sam_window = parse_epoch_window(args.sam_epochs)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.cifar_aug:
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
        if args.demo_data not in DEMO_DATASETS:
            raise UsageError(f"unknown --demo-data '{args.demo_data}'; valid: {', '.join(DEMO_DATASETS)}")
        args.data_dir = args.data_dir or default_demo_dir(args.demo_data)
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
    target = os.path.abspath(os.path.join(args.output or './output/train', args.experiment or ''))
    try:
        probe_folder(target)
    except NotADirectoryError as e:
        raise UsageError(f"--output / --experiment: '{e.filename}' is a file, so '{target}' cannot be a folder") \
            from None
    except OSError as e:
        raise UsageError(f"the output folder '{target}' cannot be written ('{e.filename}': {e.strerror}): "
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
        for module in args.device_modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UsageError(f"--device-modules: cannot import '{module}': {first_line(e)}") from None


NAFLEX_OPTIONS = ('naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes', 'naflex_patch_size_probs',
                  'naflex_loss_scale', 'naflex_patchify_channels_first')


def validate_naflex_options(args) -> None:
    """--naflex-loader (timm's create_naflex_loader: patch-sequence batches sized by a token budget) and its options:
    timm's own refusals as one line, plus the combinations that would fail mid-run or be silently ignored."""
    if not args.naflex_loader:
        given = [flag_name(k) for k in NAFLEX_OPTIONS if getattr(args, k) != option_default(k)]
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


def output_dir_for(args) -> str:
    """The run folder: --output / --experiment, or timm's default name (date-model-size)."""
    exp_name = args.experiment or '-'.join([
        datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), str(args.input_size[-1])])
    return os.path.join(args.output or './output/train', exp_name)


def check_output_dir(args, output_dir: str, probe_lock: bool = True) -> None:
    """Never overwrite another run's checkpoints: an existing run folder is only reused to resume it, and
    never while another live run writes it (its lock, sam_on_timm.outputs.RunLock; ``probe_lock`` False:
    this process holds it)."""
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
