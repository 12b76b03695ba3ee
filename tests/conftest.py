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


@pytest.fixture(scope='session')
def device():
    """Where the device-generic tests run: ``cpu`` (CI), or ``SAM_ON_TIMM_TEST_DEVICE=cuda`` on a GPU
    machine, so the same assertions check the CUDA kernels (foreach ops, GradScaler's unscale)."""
    name = os.environ.get('SAM_ON_TIMM_TEST_DEVICE', 'cpu')
    if name not in ('cpu', 'cuda'):
        pytest.exit(f'SAM_ON_TIMM_TEST_DEVICE={name!r}: valid choices are cpu, cuda', returncode=4)
    if name == 'cuda' and not torch.cuda.is_available():
        pytest.exit('SAM_ON_TIMM_TEST_DEVICE=cuda but CUDA is not available', returncode=4)
    return torch.device(name)


@pytest.fixture(params=[False, True], ids=['per-tensor', 'fused'])
def fused(request, monkeypatch):
    """Both code paths of the perturbation: per-tensor (CPU) and the flat-buffer one CUDA takes,
    forced here on whatever device the test runs on."""
    from sam_on_timm import flat
    types = {'cpu', 'cuda'} if request.param else set()
    monkeypatch.setattr(flat, 'FUSED_DEVICE_TYPES', types)
    monkeypatch.setattr(flat, 'FLAT_MAX_NUMEL', 1 << 40)  # the flat buffers for every model
    return request.param
