"""Shared test helpers: generated data, independent reference computations."""
import os

import numpy as np


def make_image_folder(root, n_train=16, n_val=8, classes=2, size=32, seed=0):
    from PIL import Image
    rng = np.random.RandomState(seed)
    for split, n in (('train', n_train), ('validation', n_val)):
        for i in range(n):
            c = i % classes
            d = os.path.join(root, split, f'class{c}')
            os.makedirs(d, exist_ok=True)
            # class-dependent brightness so that a model can learn something
            img = rng.randint(0, 128, size=(size, size, 3)).astype(np.uint8) + np.uint8(100 * c)
            Image.fromarray(img).save(os.path.join(d, f'{i:03d}.png'))
    return str(root)
