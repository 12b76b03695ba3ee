"""The data a real run meets (docs/robustness.md, "Data" and "Augmentations"): timm's augmentation
strings on Pillow 13 (posterize at 0 bits), splits whose class sets differ, unreadable images, a
decompression bomb, a fixed-size model at another size, --tta against the validation batches, a
refused --class-map pickle. Each bad case is one line, also when a DataLoader worker meets it."""
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment, create_dataset, create_transform
from timm.data.auto_augment import rand_augment_transform

import train
from sam_on_timm import augment, data_checks
from tests.helpers import make_image_folder

BASE = ['--model', 'test_resnet', '--img-size', '32', '-b', '4', '--device', 'cpu', '--epochs', '1',
        '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2', '--seed', '3']


def run(data, out, *extra, workers=0, classes=2):
    return train.main(['--data-dir', str(data), '--output', str(out), '--num-classes', str(classes), '--workers',
                       str(workers), *BASE, *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert 'Traceback' not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith('train.py: error: ')]
    assert len(lines) == 1, err[-3000:]
    return lines[0][len('train.py: error: '):]


def image(size=16, seed=0, mode='RGB'):
    rng = np.random.RandomState(seed)
    arr = rng.randint(0, 256, size=(size, size, 3) if mode == 'RGB' else (size, size)).astype(np.uint8)
    return Image.fromarray(arr, mode)


# ---------------------------------------------------------------------------------------------
# augmentations: timm's posterize at 0 bits
# ---------------------------------------------------------------------------------------------
def test_timms_magnitudes_reach_zero_bits_which_pillow_refuses():
    """The cases the fix is for: PosterizeIncreasing keeps 4 - int(0.4 m) bits (0 at m = 10, -2 at
    m = 15 with mmax 15), Posterize int(0.4 m) (0 below m = 2.5). timm's own op refuses 0 bits on the
    installed Pillow (13); on an older Pillow it gives the black image that the fix gives."""
    assert auto_augment.LEVEL_TO_ARG['PosterizeIncreasing'](10., {}) == (0,)
    assert auto_augment.LEVEL_TO_ARG['PosterizeIncreasing'](15., {}) == (-2,)
    assert auto_augment.LEVEL_TO_ARG['Posterize'](2., {}) == (0,)
    try:
        out = auto_augment.posterize(image(), 0)
    except ValueError as e:
        assert 'bits' in str(e)
        assert augment._timm_refuses_zero_bits()
    else:
        assert not np.asarray(out).any()


@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_posterize_is_black_at_zero_bits_and_timms_op_otherwise(mode):
    img = image(mode=mode)
    for bits in (0, -1, -2):
        out = augment.posterize(img, bits)
        assert (out.mode, out.size) == (img.mode, img.size)
        assert not np.asarray(out).any(), bits
    for bits in range(1, 11):   # 8 and more: timm returns the image itself
        assert augment.posterize(img, bits).tobytes() == auto_augment.posterize(img, bits).tobytes(), bits
    assert np.asarray(augment.posterize(img, 1)).any()


def test_only_timms_posterize_entries_are_replaced():
    assert augment.install_posterize_fix() == augment._timm_refuses_zero_bits()
    assert augment.install_posterize_fix() == augment._timm_refuses_zero_bits()   # idempotent
    for name, op in auto_augment.NAME_TO_OP.items():
        timms = getattr(auto_augment, auto_augment.posterize.__name__ if name in augment.POSTERIZE_OPS
                        else op.__name__)
        if name in augment.POSTERIZE_OPS and augment._timm_refuses_zero_bits():
            assert op is augment.posterize, name
        else:
            assert op is timms, name   # the module's own function, untouched
    # a transform built afterwards uses it (an AugmentOp keeps the function it found when built)
    ra = rand_augment_transform('rand-m10-n1-inc1', {})
    ops = {op.name: op.aug_fn for op in ra.ops}
    assert ops['PosterizeIncreasing'] is auto_augment.NAME_TO_OP['PosterizeIncreasing']
    assert all(fn is auto_augment.NAME_TO_OP[name] for name, fn in ops.items())


def _two_transforms(monkeypatch, build):
    """(timm's transform, the fixed one, zero-bit calls): both built by ``build()``, timm's with timm's
    posterize in the table, the fixed one with augment.posterize behind a spy that counts bits <= 0."""
    zero = []

    def spy(img, bits, **kw):
        if bits <= 0:
            zero.append(bits)
        return augment.posterize(img, bits, **kw)

    for name in augment.POSTERIZE_OPS:
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, auto_augment.posterize)
    timms = build()
    for name in augment.POSTERIZE_OPS:
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, spy)
    return timms, build(), zero


def _seed(i):
    random.seed(i)       # the magnitude noise, the op probabilities, crops
    np.random.seed(i)    # RandAugment's choice of ops
    torch.manual_seed(i)


def _compare(timms, fixed, zero, images, n):
    """Each image through both transforms from the same random state: where timm's raises, the fixed one
    kept 0 bits (and gave black); elsewhere the two outputs are equal."""
    refused = 0
    for i in range(n):
        img = images[i % len(images)]
        _seed(i)
        try:
            want = timms(img)
        except ValueError as e:
            assert 'bits' in str(e)
            want = None
        before = len(zero)
        _seed(i)
        got = fixed(img)
        if want is None:
            refused += 1
            assert len(zero) > before, i
        elif len(zero) == before:
            a, b = (np.asarray(x) if isinstance(x, Image.Image) else x.numpy() for x in (want, got))
            assert np.array_equal(a, b), i
    return refused


@pytest.mark.parametrize('aa', ['rand-m10-n1-inc1', 'rand-m9-mstd0.5-inc1', 'rand-m2-n1', 'v0'])
def test_timms_pipelines_train_through_zero_bits(monkeypatch, aa):
    """A whole training transform (timm's create_transform: crop, flip, the augmentation string, to tensor,
    normalise) on many images: no error, 0 bits reached (the magnitude really gets there), and every
    image that does not reach 0 bits comes out exactly as timm's own transform makes it. The noisy
    rand-m9-mstd0.5 reaches m >= 10 on about 2 % of its draws: RandAugment alone on 8 px images there,
    1200 draws (4 of them at 0 bits with these seeds)."""
    if not augment._timm_refuses_zero_bits():
        pytest.skip('this Pillow posterizes to 0 bits itself')
    if 'mstd' in aa:
        images, n = [image(8, s) for s in range(10)], 1200

        def build():
            return rand_augment_transform(aa, {})
    else:
        images, n = [image(16, s) for s in range(20)], 400

        def build():
            return create_transform(16, is_training=True, auto_augment=aa)
    timms, fixed, zero = _two_transforms(monkeypatch, build)
    refused = _compare(timms, fixed, zero, images, n)
    assert refused > 0 and len(zero) >= refused, (refused, len(zero))


def test_train_py_runs_an_inc1_randaugment_through_zero_bits(tmp_path, monkeypatch, capsys, one_thread):
    """train.py --aa rand-m10-n4-inc1: the epoch passes images at 0 bits (counted) and ends, exit 0."""
    zero, real = [], augment.posterize

    def spy(img, bits, **kw):
        if bits <= 0:
            zero.append(bits)
        return real(img, bits, **kw)

    for name in augment.POSTERIZE_OPS:   # as timm ships it, so that train.py's setup installs (the spy of) the fix
        monkeypatch.setitem(auto_augment.NAME_TO_OP, name, auto_augment.posterize)
    monkeypatch.setattr(augment, 'posterize', spy)
    data = make_image_folder(tmp_path / 'data', n_train=32, n_val=4, size=32)
    assert run(data, tmp_path / 'out', '--aa', 'rand-m10-n4-inc1', '--experiment', 'a') == 0, capsys.readouterr().err
    assert zero, 'no image reached 0 bits: the test does not test the fix'


# ---------------------------------------------------------------------------------------------
# class sets of the two splits
# ---------------------------------------------------------------------------------------------
def _folder(tmp_path, train=('a', 'b', 'c'), validation=('a', 'b', 'c'), per_class=4, size=16, name='data'):
    root = tmp_path / name
    rng = np.random.RandomState(0)
    for split, classes in (('train', train), ('validation', validation)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                arr = rng.randint(0, 256, size=(size, size, 3)).astype(np.uint8)
                Image.fromarray(arr).save(root / split / c / f'{i}.png')
    return root


def _empty(root, split, c):
    shutil.rmtree(root / split / c)
    os.makedirs(root / split / c)


def _only_other_files(root, split, c):
    _empty(root, split, c)
    (root / split / c / 'README.txt').write_text('not an image')
    Image.new('RGB', (8, 8)).save(root / split / c / 'x.bmp')   # an image, but not a type timm's reader reads


CLASS_CASES = {
    'empty folder': (lambda r: _empty(r, 'validation', 'b'),
                     "the validation folder 'b' holds no .jpeg/.jpg/.png image"),
    'only non-images': (lambda r: _only_other_files(r, 'train', 'a'),
                        "the training folder 'a' holds no .jpeg/.jpg/.png image"),
    'class in validation only': (lambda r: _add(r, 'validation', 'aa'), "'aa' is missing from the training split"),
    'class in training only': (lambda r: _add(r, 'train', 'bb'), "'bb' is missing from the validation split"),
}


def _add(root, split, c):
    os.makedirs(root / split / c)
    Image.new('RGB', (16, 16)).save(root / split / c / '0.png')


@pytest.mark.parametrize('case', CLASS_CASES)
def test_splits_with_different_classes_are_refused_before_training(tmp_path, capsys, case):
    make, names = CLASS_CASES[case]
    root = _folder(tmp_path)
    make(root)
    train_ds, val_ds = (create_dataset('', root=str(root), split=s) for s in ('train', 'validation'))
    assert train_ds.reader.class_to_idx != val_ds.reader.class_to_idx   # what timm does: numbered apart
    assert run(root, tmp_path / 'out', '--experiment', 'c', classes=4) == 2
    line = one_line(capsys)
    assert line.startswith('the training and validation splits number their classes differently (') and names in line
    assert line.endswith('pass --class-map FILE (one class name per line) to number both alike')
    assert not (tmp_path / 'out').exists()


def test_splits_that_agree_or_share_a_class_map_train(tmp_path, capsys):
    """The same classes: no error (every other train.py test runs such folders), nor where validation
    lacks the last classes (a subset with the same labels). Different ones with a --class-map: one
    numbering, the run trains, and validation reads the map's labels."""
    root = _folder(tmp_path, per_class=2)

    def check():
        data_checks.check_class_sets(*(create_dataset('', root=str(root), split=s) for s in ('train', 'validation')))
    check()
    _add(root, 'train', 'd')   # training only, numbered after every validation class
    check()
    _empty(root, 'validation', 'c')
    check()
    root = _folder(tmp_path, per_class=2, name='data2')
    _empty(root, 'validation', 'b')
    with pytest.raises(ValueError, match="1 of the 2 validation classes would be scored against another label"):
        check()
    cmap = tmp_path / 'classes.txt'
    cmap.write_text('a\nb\nc\n')
    assert run(root, tmp_path / 'out', '--experiment', 'map', '--class-map', str(cmap), classes=3) == 0
    val = create_dataset('', root=str(root), split='validation', class_map=str(cmap))
    assert sorted({t for _, t in val.reader.samples}) == [0, 2]   # 'c' keeps the index it has in training
    data_checks.check_class_sets(create_dataset('', root=str(root), split='train'), val, str(cmap))


def test_the_class_set_check_uses_the_readers_types(tmp_path):
    """--input-key .bmp: the reader reads .bmp files, so a folder of .bmp images is a class."""
    root = _folder(tmp_path, per_class=1)
    _only_other_files(root, 'train', 'a')
    train_ds, val_ds = (create_dataset('', root=str(root), split=s) for s in ('train', 'validation'))
    with pytest.raises(ValueError, match="'a' holds no .jpeg/.jpg/.png image"):
        data_checks.check_class_sets(train_ds, val_ds)
    train_ds, val_ds = (create_dataset('', root=str(root), split=s, input_key='.png;.bmp') for s in ('train',
                                                                                                  'validation'))
    data_checks.check_class_sets(train_ds, val_ds, input_key='.png;.bmp')


# ---------------------------------------------------------------------------------------------
# unreadable images, decompression bombs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('workers', [0, 1])
def test_a_validation_split_of_unreadable_images_is_one_line(tmp_path, capsys, workers):
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=16)
    for c in os.listdir(os.path.join(data, 'validation')):
        for f in os.listdir(os.path.join(data, 'validation', c)):
            with open(os.path.join(data, 'validation', c, f), 'wb') as fh:
                fh.write(b'not a png')
    assert run(data, tmp_path / 'out', '--experiment', 'u', workers=workers) == 2
    line = one_line(capsys)
    assert line.startswith("all 4 validation images are unreadable (first: '") and 'cannot identify image file' in line
    assert "timm's loader gives up after 10 in a row" in line
    assert not (tmp_path / 'out').exists()


def test_a_few_unreadable_images_first_are_skipped_as_timm_does(tmp_path):
    """timm's loader skips unreadable images: 3 of them before a readable one pass the check."""
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=16)
    ds = create_dataset('', root=data, split='validation')
    for f in [name for name, _ in ds.reader.samples][:3]:
        with open(f, 'wb') as fh:
            fh.write(b'junk')
    data_checks.check_readable(ds, 'validation')
    with open(ds.reader.samples[3][0], 'wb') as fh:
        fh.write(b'junk')
    with pytest.raises(ValueError, match='all 4 validation images are unreadable'):
        data_checks.check_readable(ds, 'validation')


@pytest.mark.parametrize('workers', [0, 1])
def test_a_run_of_unreadable_images_mid_epoch_names_the_first(tmp_path, capsys, monkeypatch, workers):
    """timm skips an unreadable image and gives up after TIMM_DATASET_MAX_RETRIES in a row (2 here): the
    first images read, the ones after them do not; the epoch stops with one line naming a file, exit 1."""
    import timm.data.dataset
    monkeypatch.setattr(timm.data.dataset, '_ERROR_RETRY', 2)
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=16)
    broken = sorted(os.path.join(data, 'train', 'class1', f) for f in os.listdir(os.path.join(data, 'train',
                                                                                                  'class1')))
    for f in broken:
        with open(f, 'wb') as fh:
            fh.write(b'junk')
    assert run(data, tmp_path / 'out', '--experiment', 'u', '--no-aug', workers=workers) == 1
    line = one_line(capsys)
    assert line.startswith('2 training images in a row are unreadable, from ') and 'cannot identify image file' in line
    assert any(f"'{f}'" in line for f in broken), line


@pytest.mark.parametrize('workers', [0, 1])
def test_a_decompression_bomb_names_its_file_and_the_way_out(tmp_path, capsys, monkeypatch, workers):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)   # restored after the test
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=2, size=16)
    bomb = os.path.join(data, 'train', 'class1', 'zz_big.png')
    Image.new('RGB', (40, 40)).save(bomb)   # 1600 pixels: over 2 x 300; the others (256) under 300
    assert run(data, tmp_path / 'out', '--experiment', 'b', '--max-image-pixels', '300', '--img-size', '16',
               workers=workers) == 1
    line = one_line(capsys)
    assert line.startswith(f"image '{bomb}': Image size (1600 pixels) exceeds limit of 600 pixels")
    assert line.endswith("If the image is meant, raise PIL's limit with --max-image-pixels N "
                         "(PIL.Image.MAX_IMAGE_PIXELS: PIL warns above N pixels and refuses above 2 N; 0: no limit)")
    if workers == 0:   # meant: a higher limit, or none
        assert run(data, tmp_path / 'out', '--experiment', 'b2', '--max-image-pixels', '0', '--img-size', '16') == 0


def test_a_bomb_first_in_a_split_is_found_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=16)
    bomb = os.path.join(data, 'validation', 'class0', '000.png')
    Image.new('RGB', (80, 80)).save(bomb)
    assert run(data, tmp_path / 'out', '--experiment', 'b', '--max-image-pixels', '1000') == 2
    assert one_line(capsys).startswith(f"image '{bomb}': Image size (6400 pixels) exceeds limit of 2000 pixels")
    assert not (tmp_path / 'out').exists()
    assert run(data, tmp_path / 'out', '--experiment', 'b', '--max-image-pixels', '-1') == 2
    assert one_line(capsys) == '--max-image-pixels must be >= 0, got -1'


def test_a_data_error_keeps_its_line_through_a_worker():
    """torch re-raises a worker's exception as its type built from 'Caught ... Original Traceback ...'."""
    from torch._utils import ExceptionWrapper as Wrapper   # what DataLoader's workers send back
    try:
        raise data_checks.DataError("image '/x.png': too big")
    except data_checks.DataError:
        wrapped = Wrapper(where='in DataLoader worker process 0')
    with pytest.raises(data_checks.DataError) as e:
        wrapped.reraise()
    assert str(e.value) == "image '/x.png': too big"


# ---------------------------------------------------------------------------------------------
# fixed-size models, --tta, --class-map
# ---------------------------------------------------------------------------------------------
def test_a_fixed_size_model_at_another_size_is_refused_before_training(tmp_path, capsys):
    """test_vit3: a strict 160 px patch embedding (test_vit, with dynamic_img_size, takes any size)."""
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=32)
    assert run(data, tmp_path / 'out', '--experiment', 'v', '--model', 'test_vit3') == 2
    assert one_line(capsys) == ("'test_vit3' is built for 160x160 images only (its patch embedding has a fixed size), "
                                "the data is 32x32: pass --img-size 160, or build the model for 32x32 with "
                                "--model-kwargs img_size=32 (or dynamic_img_size=True)")
    assert not (tmp_path / 'out').exists()
    for extra in (['--model', 'test_vit3', '--model-kwargs', 'img_size=32'], ['--model', 'test_vit']):
        args = train.parse_args(['--data-dir', data, '--num-classes', '2', *BASE, *extra])
        train.validate_args(args)
        args.rank = 0
        model, data_config = train.create_model(args)   # built for 32 px, or of a dynamic size: no error
        assert data_config['input_size'] == (3, 32, 32)


@pytest.mark.parametrize('n_val,vb,message', [
    (2, 4, '--tta 3 averages each run of 3 consecutive validation outputs, but there are only 2 validation images: '
           'pass --tta 0 (none), or validate on a multiple of 3 images'),
    (6, 4, '--tta 3 averages each run of 3 consecutive validation outputs, so every validation batch must hold a '
           'multiple of 3 images; one here holds 4 (-vb 4, 6 validation images): pass a -vb and a validation split '
           'that are multiples of 3, or --tta 0 (none)'),
    (8, 6, '--tta 3 averages each run of 3 consecutive validation outputs, so every validation batch must hold a '
           'multiple of 3 images; one here holds 2 (-vb 6, 8 validation images): pass a -vb and a validation split '
           'that are multiples of 3, or --tta 0 (none)'),
])
def test_tta_against_the_validation_batches(tmp_path, capsys, n_val, vb, message):
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=n_val, size=16)
    assert run(data, tmp_path / 'out', '--experiment', 't', '--tta', '3', '-vb', str(vb)) == 2
    assert one_line(capsys) == message
    assert not (tmp_path / 'out').exists()


def test_tta_passes_batches_it_divides():
    """The check against timm's own loader: every batch a multiple of T passes (the last one too)."""
    from timm.data import create_loader
    ds = torch.utils.data.TensorDataset(torch.zeros(6, 3, 8, 8), torch.zeros(6))
    for tta, vb in ((3, 3), (3, 6), (2, 2), (2, 4), (1, 4), (0, 4)):
        data_checks.check_tta(tta, create_loader(ds, (3, 8, 8), vb, use_prefetcher=False, num_workers=0))
    ds = torch.utils.data.TensorDataset(torch.zeros(7, 3, 8, 8), torch.zeros(7))
    with pytest.raises(ValueError, match=r'one here holds 3 \(-vb 4, 7 validation images\)'):   # 7 = 4 + 3
        data_checks.check_tta(2, create_loader(ds, (3, 8, 8), 4, use_prefetcher=False, num_workers=0))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize('content,reason', [
    (pickle.dumps({'class0': 0, 'class1': _Evil()}),
     f'Global {os.getcwd.__module__}.getcwd is not permitted in a class map file.'),
    (pickle.dumps({'class0': 0, 'class1': 1})[:-4], 'pickle data was truncated'),
    (b'', 'Ran out of input'),
    (pickle.dumps(['class0', 'class1']), 'Invalid class map file, expected a dict'),
], ids=['a global', 'truncated', 'empty', 'a list'])
def test_a_refused_class_map_pickle_is_one_line(tmp_path, capsys, content, reason):
    data = make_image_folder(tmp_path / 'data', n_train=8, n_val=4, size=16)
    cmap = tmp_path / 'map.pkl'
    cmap.write_bytes(content)
    assert run(data, tmp_path / 'out', '--experiment', 'm', '--class-map', str(cmap)) == 2
    line = one_line(capsys)
    assert line.startswith(f"--class-map '{cmap}' is refused: {reason}")
    assert line.endswith('(a .pkl class map may hold only a dict of class name to index, no other object): '
                         'pass a .txt file with one class name per line')
    assert not (tmp_path / 'out').exists()
