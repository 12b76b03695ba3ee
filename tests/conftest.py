import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def image_folder(tmp_path):
    """A tiny generated ImageFolder: train/ 16 images, validation/ 8 images, 2 classes, 32 px."""
    from tests.helpers import make_image_folder
    return make_image_folder(tmp_path / 'data')
