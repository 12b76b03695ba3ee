"""Checks of the data against the run, made before training, and one-line errors for the files that
fail while the loaders read them (docs/robustness.md, "Data").

Before training (each a ``ValueError`` with one line, which train.py reports as its own error):

- :func:`check_input_size`: a model with a fixed input size (timm's ``PatchEmbed`` with
  ``strict_img_size``, the ViT family) against the input size of the data;
- :func:`check_class_sets`: the validation folders get the labels the training folders have;
- :func:`check_readable`: timm's loader can read the first image of a split (timm skips an
  unreadable image and gives up after ``TIMM_DATASET_MAX_RETRIES`` in a row);
- :func:`check_tta`: ``--tta T`` averages runs of T consecutive outputs, so every validation batch
  must hold a multiple of T images;
- :func:`class_map_error`: a ``--class-map`` that timm's reader refuses, named with the way out.

While training, :func:`guard_dataset` makes a dataset name the file behind a decompression-bomb
refusal or a run of unreadable images, as a :class:`DataError` that survives the trip out of a
DataLoader worker with its one line intact.
"""
import os
import pickle
import re
from typing import Any, Optional, Sequence, Tuple

from PIL import Image
from timm.data.dataset import ImageDataset

__all__ = ['DataError', 'GuardedImageDataset', 'check_class_sets', 'check_input_size', 'check_readable',
           'check_tta', 'class_map_error', 'guard_dataset']


class DataError(Exception):
    """A data file that cannot be used, found while the data is read (possibly in a DataLoader worker).

    torch re-raises a worker's exception in the main process as its type, built from one string:
    ``Caught DataError in DataLoader worker process 0.`` followed by the worker's traceback, whose last
    line is ``...DataError: <message>``. The constructor keeps that message alone, so the error reads
    the same with ``--workers 0`` and with workers."""

    def __init__(self, message: str = '') -> None:
        if 'Original Traceback' in message:
            lines = [line for line in message.strip().splitlines() if 'DataError: ' in line]
            if lines:
                message = lines[-1].split('DataError: ', 1)[1]
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# the model's input size
# ---------------------------------------------------------------------------------------------
def check_input_size(model: Any, model_name: str, input_size: Sequence[int]) -> None:
    """A model whose patch embedding takes one image size only (timm's ``PatchEmbed`` with
    ``strict_img_size`` and a set ``img_size``: ViT, DeiT, BEiT, EVA, Swin, Mixer, ...) is built for
    that size; images of another ``--img-size`` would fail the assertion in its first forward. Raises
    ``ValueError`` naming the model's size and how to build it for the images' size instead."""
    from timm.layers import PatchEmbed
    channels, height, width = input_size
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)
                  and getattr(getattr(m, 'proj', None), 'in_channels', channels) == channels), None)
    if embed is None or not embed.strict_img_size or embed.img_size is None:
        return
    if tuple(embed.img_size) == (height, width):
        return
    size = f'{height}' if height == width else f'"({height}, {width})"'
    raise ValueError(f"'{model_name}' is built for {embed.img_size[0]}x{embed.img_size[1]} images only (its patch "
                     f"embedding has a fixed size), the data is {height}x{width}: pass --img-size "
                     f"{embed.img_size[0]}, or build the model for {height}x{width} with --model-kwargs "
                     f"img_size={size} (or dynamic_img_size=True)")


# ---------------------------------------------------------------------------------------------
# class sets
# ---------------------------------------------------------------------------------------------
def _classes(ds: Any) -> Optional[dict]:
    return getattr(getattr(ds, 'reader', None), 'class_to_idx', None)


def _extensions(input_key: Optional[str]) -> str:
    from timm.data.readers.img_extensions import get_img_extensions
    return '/'.join(sorted(input_key.split(';') if input_key else get_img_extensions()))


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(f"'{n}'" for n in names[:limit])
    return shown + (f' (+{len(names) - limit} more)' if len(names) > limit else '')


def check_class_sets(train: Any, validation: Any, class_map: Any = None, input_key: Optional[str] = None) -> None:
    """timm's folder and tar readers number the classes they find in each split on their own: the
    sorted names of the folders that hold at least one image of the types they read (.png, .jpg,
    .jpeg by default; an ImageFolder's ``--input-key``). An empty class folder, one holding only other
    files, or a class present in one split only can shift the numbering of one split, and top-1 is
    then computed against wrong labels. Raises ``ValueError`` naming the classes that differ where a
    validation class gets another label than in training (or has none there), unless a class map
    numbers both splits. A validation split that lacks classes numbered after all of its own (a
    subset with the same labels) is left alone."""
    a, b = _classes(train), _classes(validation)
    if class_map or a is None or b is None:
        return
    wrong = [name for name, label in b.items() if a.get(name) != label]
    if not wrong:
        return
    parts = []
    for split, ds, missing in (('training', train, sorted(set(b) - set(a))),
                               ('validation', validation, sorted(set(a) - set(b)))):
        root = getattr(ds.reader, 'root', '')
        empty = [n for n in missing if os.path.isdir(os.path.join(root, n))]
        absent = [n for n in missing if n not in empty]
        if empty:
            parts.append(f"the {split} folder{'s' if len(empty) > 1 else ''} {_names(empty)} "
                         f"hold{'' if len(empty) > 1 else 's'} no {_extensions(input_key)} image")
        if absent:
            parts.append(f"{_names(absent)} {'are' if len(absent) > 1 else 'is'} missing from the {split} split")
    raise ValueError(f"the training and validation splits number their classes differently ({len(wrong)} of the "
                     f"{len(b)} validation classes would be scored against another label): "
                     f"{'; '.join(parts) or 'numbered apart'}: fix the folders, or pass --class-map FILE (one "
                     f"class name per line) to number both alike")


# ---------------------------------------------------------------------------------------------
# readable images
# ---------------------------------------------------------------------------------------------
def _folder_reader(ds: Any) -> bool:
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    return isinstance(ds, ImageDataset) and isinstance(ds.reader, ReaderImageFolder)


def _retries(ds: Any) -> int:
    """How many unreadable images in a row timm's ImageDataset skips (TIMM_DATASET_MAX_RETRIES, 10)."""
    return int(getattr(ds, '_max_retries', 10))


def _load(ds: ImageDataset, index: int) -> None:
    """What timm's ``ImageDataset.__getitem__`` does to read one image, without the transform."""
    fp = ds.reader[index][0]
    try:
        with Image.open(fp) as img:
            if ds.input_img_mode:
                img.convert(ds.input_img_mode)
            else:
                img.load()
    finally:
        if hasattr(fp, 'close'):
            fp.close()


def _first_failure(ds: ImageDataset, start: int, count: int) -> Tuple[Optional[str], Optional[BaseException]]:
    """Read samples from ``start`` on as timm's retry does, at most ``count``: (file, exception) of the
    first unreadable one where none of them can be read, of a decompression bomb where one comes
    before a readable image; (None, None) where an image is read first."""
    first = (None, None)
    for i in range(start, start + count):
        index = i % len(ds)
        try:
            _load(ds, index)
            return None, None
        except Image.DecompressionBombError as e:
            return ds.filename(index, absolute=True), e
        except OSError as e:
            if first[0] is None:
                first = (ds.filename(index, absolute=True), e)
    return first


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    # PIL names the file object ("cannot identify image file <_io.BufferedReader name='...'>"): the file is named
    return re.sub(r" <_io\.\w+ name=.*>$", '', text[0]) if text else type(e).__name__


def _bomb_message(name: str, e: BaseException) -> str:
    return (f"image '{name}': {_reason(e)} If the image is meant, raise PIL's limit with --max-image-pixels N "
            f"(PIL.Image.MAX_IMAGE_PIXELS: PIL warns above N pixels and refuses above 2 N; 0: no limit)")


def check_readable(ds: Any, split: str) -> None:
    """timm's loader reads a sample by skipping unreadable images until one opens, and gives up after
    ``TIMM_DATASET_MAX_RETRIES`` (10) in a row: a split whose images are all unreadable stops the run at
    its first batch, in a DataLoader worker. Checked here on the first images (what the first batch
    reads first), without the transform, so no random number is drawn. Raises ``ValueError``."""
    if not _folder_reader(ds) or ds.load_bytes or len(ds) == 0:
        return   # (a tar reader caches its open tar file: opened here, forked workers would share its offset)
    count = min(len(ds), _retries(ds))
    name, e = _first_failure(ds, 0, count)
    if name is None:
        return
    if isinstance(e, Image.DecompressionBombError):
        raise ValueError(_bomb_message(name, e))
    which = (f'all {count} {split} images are' if count == len(ds) else
             f'the first {count} {split} images (of {len(ds)}) are')
    raise ValueError(f"{which} unreadable (first: '{name}': {_reason(e)}), and timm's loader gives up after "
                     f"{_retries(ds)} in a row (TIMM_DATASET_MAX_RETRIES): check the image files of the split")


class GuardedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` (same reading, same retries), whose failures name their file as one
    :class:`DataError`: a decompression-bomb refusal of PIL (an ``Exception`` that timm's retry does
    not catch, and whose message names no file), and timm's ``Failed to load N consecutive samples``.
    Made by :func:`guard_dataset`; it also applies ``--max-image-pixels`` in every worker process."""

    guard_split: str = 'data'
    guard_max_pixels: Any = False   # False: leave PIL's limit as it is; None: no limit; an int: the limit

    def __getitem__(self, index):
        if self.guard_max_pixels is not False:   # a spawned worker starts from PIL's default
            Image.MAX_IMAGE_PIXELS = self.guard_max_pixels
        try:
            return super().__getitem__(index)
        except Image.DecompressionBombError as e:
            name, found = _first_failure(self, index, _retries(self))   # timm may have moved past unreadable files
            raise DataError(_bomb_message(name if isinstance(found, Image.DecompressionBombError)
                                          else self.filename(index, absolute=True), e)) from None
        except RuntimeError as e:
            if not str(e).startswith('Failed to load'):
                raise
            name, found = _first_failure(self, index, _retries(self))
            name = name or self.filename(index, absolute=True)
            raise DataError(f"{_retries(self)} {self.guard_split} images in a row are unreadable, from '{name}' "
                            f"({_reason(found) if found else 'unknown'}), and timm's loader gives up after "
                            f"{_retries(self)} (TIMM_DATASET_MAX_RETRIES): check or remove those files") from None


def guard_dataset(ds: Any, split: str, max_image_pixels: Optional[int] = None) -> Any:
    """Make a timm ``ImageDataset`` of an image folder a :class:`GuardedImageDataset` in place (the
    same object, its class replaced by the subclass: timm's loader, AugMixDataset and train.py keep
    their references to it), and apply ``max_image_pixels`` (0: no limit; None: PIL's own) here and
    in every worker. Other datasets (tar, Hugging Face, torchvision ...) are returned as they are,
    with PIL's limit set here (forked workers inherit it)."""
    if max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_image_pixels or None
    if type(ds) is ImageDataset and _folder_reader(ds):
        ds.__class__ = GuardedImageDataset
    if isinstance(ds, GuardedImageDataset):
        ds.guard_split = split
        ds.guard_max_pixels = False if max_image_pixels is None else (max_image_pixels or None)
    return ds


# ---------------------------------------------------------------------------------------------
# test-time augmentation, class maps
# ---------------------------------------------------------------------------------------------
def check_tta(tta: int, loader: Any) -> None:
    """``--tta T`` (timm's validate) averages each run of T consecutive outputs of a batch and keeps
    every T-th target: a batch of B images gives floor(B / T) averages but ceil(B / T) targets, which
    fails unless T divides B, and a split of fewer than T images gives no average at all. Checked on
    the validation loader's batch size and its number of images (per process under DDP)."""
    if tta <= 1 or loader is None:
        return
    inner = getattr(loader, 'loader', loader)   # timm's PrefetchLoader wraps a DataLoader
    batch, n = inner.batch_size, len(inner.sampler)
    images = f"{n} validation image{'s' if n != 1 else ''}{' per process' if n != len(inner.dataset) else ''}"
    if n < tta:
        raise ValueError(f"--tta {tta} averages each run of {tta} consecutive validation outputs, but there are only "
                         f"{images}: pass --tta 0 (none), or validate on a multiple of {tta} images")
    bad = [b for b in (batch, n % batch) if b and b % tta]
    if bad:
        raise ValueError(f"--tta {tta} averages each run of {tta} consecutive validation outputs, so every validation "
                         f"batch must hold a multiple of {tta} images; one here holds {bad[0]} (-vb {batch}, {images})"
                         f": pass a -vb and a validation split that are multiples of {tta}, or --tta 0 (none)")


def class_map_error(class_map: Any, e: BaseException) -> Optional[str]:
    """The one line for a ``--class-map`` that timm's reader refused, or None when ``e`` is not about it.
    A ``.pkl`` map is read by timm's restricted unpickler, which refuses every object but plain
    built-ins (a crafted pickle would otherwise run code), and fails on a truncated or corrupt file."""
    if not class_map or not isinstance(class_map, str):
        return None
    if not isinstance(e, (pickle.UnpicklingError, EOFError)) and 'class map' not in str(e).lower():
        return None
    if os.path.splitext(class_map)[1].lower() == '.pkl':
        what = 'a .pkl class map may hold only a dict of class name to index, no other object'
    else:
        what = 'a class map is a .txt file (one class name per line) or a .pkl dict of class name to index'
    return (f"--class-map '{class_map}' is refused: {_reason(e) if str(e).strip() else 'the file ends early'} "
            f"({what}): pass a .txt file with one class name per line")
