"""The data side of a train.py run: timm's datasets and loaders (the NaFlex loader too), mixup / cutmix, the
training and validation losses, with the checks that need the built datasets (classes, readable images, input
mode). Bad input is a one-line ``UsageError`` (sam_on_timm.options), raised before the first epoch.
"""
import pickle
from typing import Any, NamedTuple, Tuple

import torch
from PIL import Image
import timm.data   # create_dataset / create_loader looked up at each call (the tests spy on them there)
from timm.data import AugMixDataset, FastCollateMixup, Mixup, NaFlexMixup, create_naflex_loader
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from . import data_checks
from .augment import install_posterize_fix
from .cifar_data import cifar_train_transform
from .options import UsageError, first_line

__all__ = ['Data', 'create_data', 'create_losses', 'create_naflex_loaders', 'check_input_img_mode', 'with_sampler']


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
    channels = data_config['input_size'][0]
    if args.input_img_mode is not None:
        check_input_img_mode(args, channels)
    elif channels not in (1, 3) and not args.dataset.lower().startswith('torch/'):   # timm's default mode: 'L'
        valid = [m for m in Image.MODES if Image.getmodebands(m) == channels]
        raise UsageError(f"the model takes {channels}-channel images and the images are read as 1-channel 'L' "
                         f"(timm's default for other than 3): pass --input-img-mode, a PIL mode with {channels} "
                         f"bands ({', '.join(valid) or 'none'})")
    dataset_kwargs = dict(class_map=args.class_map, download=args.dataset_download, batch_size=args.batch_size,
                          input_key=args.input_key, target_key=args.target_key,
                          trust_remote_code=args.dataset_trust_remote_code,
                          input_img_mode=args.input_img_mode or ('RGB' if channels == 3 else 'L'))
    try:
        dataset_train = timm.data.create_dataset(
            args.dataset, root=args.data_dir, split=args.train_split, is_training=True, seed=args.seed,
            repeats=args.epoch_repeats, num_samples=args.train_num_samples, **dataset_kwargs)
        dataset_eval = None   # --val-split '': no validation, as in timm's script
        if args.val_split:
            dataset_eval = timm.data.create_dataset(args.dataset, root=args.data_dir, split=args.val_split,
                                                    is_training=False, num_samples=args.val_num_samples,
                                                    **dataset_kwargs)
    # unknown dataset, class map, ...; TypeError: a reader that takes no such key (a folder's --target-key)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError, TypeError, pickle.UnpicklingError,
            EOFError) as e:
        refused = data_checks.class_map_error(args.class_map, e)
        if refused:
            raise UsageError(refused) from None
        raise UsageError(f"cannot read the data (--dataset '{args.dataset}', --data-dir, --train-split, --val-split, "
                         f"--class-map, --input-key, --target-key): {first_line(e)}") from None
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
                             f'{first_line(e)}') from None
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
            batch_erasing = RandomErasing(probability=args.reprob, mode=args.remode, max_count=args.recount,
                                          num_splits=args.aug_splits or 2, device=device)
        loader_train = timm.data.create_loader(
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
        loader_eval = None if dataset_eval is None else timm.data.create_loader(
            dataset_eval, input_size=data_config['input_size'],
            batch_size=args.validation_batch_size or args.batch_size,
            is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
            std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
            crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher,
            img_dtype=img_dtype, persistent_workers=False)
        if args.aug_repeats and not args.distributed:   # timm's sampler for one rank (timm's loader asserts DDP)
            loader_train = with_sampler(loader_train, RepeatAugSampler(dataset_train, num_replicas=1, rank=0,
                                                                       num_repeats=args.aug_repeats))
        if args.cifar_aug:   # the loader reads the dataset's transform in each epoch's (fresh) workers
            dataset_train.transform = cifar_train_transform(args.cifar_aug, data_config['mean'], data_config['std'],
                                                            args.prefetcher, data_config['input_size'][-1])
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise UsageError(f'cannot build the data pipeline (--aa, --reprob/--remode, --scale, --ratio, --color-jitter, '
                         f'--interpolation, --mean/--std, --mixup/--cutmix, --workers): {first_line(e)}') from None
    try:
        data_checks.check_tta(args.tta, loader_eval)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Data(dataset_train, loader_train, loader_eval, mixup_active, mixup_fn,
                *create_losses(args, mixup_active, device), batch_erasing)


def create_losses(args, mixup_active: bool, device) -> Tuple[Any, Any]:
    """The training loss (timm's choice from --jsd-loss / mixup / --smoothing / --bce-*) and the validation loss."""
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
