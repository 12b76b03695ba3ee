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


def evaluate_folder(model, folder, img_size):
    """(loss, top1 %) of ``model`` on the ImageFolder ``folder``, computed here with torchvision's reader and
    timm's eval transform for the model: an independent check of train.py's validation numbers."""
    import torch
    import torch.nn.functional as F
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder
    ds = ImageFolder(folder, transform=create_transform(**resolve_data_config({'img_size': img_size}, model=model)))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), 100.0 * float((out.argmax(1) == y).double().mean())
