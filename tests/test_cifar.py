"""The CIFAR models, the CIFAR augmentations and the recipes under hparams/cifar/."""
import glob
import os

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

import sam_on_timm
import train
from sam_on_timm.cifar_data import cifar_train_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_HPARAMS = os.path.join(ROOT, 'hparams', 'cifar')


# --- models ---------------------------------------------------------------------------------------------
def conv(cin, cout, k, groups=1):
    return cin // groups * cout * k * k


def basic_resnet(c, widths, depth):   # 3x3 stem + BN, basic blocks, 1x1 conv + BN where the shape changes
    n, cin = conv(3, widths[0], 3) + 2 * widths[0], widths[0]
    for w in widths:
        for _ in range(depth):
            n += conv(cin, w, 3) + 2 * w + conv(w, w, 3) + 2 * w + (conv(cin, w, 1) + 2 * w if cin != w else 0)
            cin = w
    return n + cin * c + c


def wrn28_10(c):      # pre-activation blocks, bare 1x1 shortcut conv, BN + ReLU before the pool
    n, cin = conv(3, 16, 3), 16
    for i, w in enumerate((160, 320, 640)):
        for j in range(4):
            n += (2 * cin + conv(cin, w, 3) + 2 * w + conv(w, w, 3)
                  + (conv(cin, w, 1) if cin != w or (i and not j) else 0))
            cin = w
    return n + 2 * 640 + 640 * c + c


def resnext29_32x4d(c):   # bottlenecks of 32 groups, 4 channels each per 64 planes, expansion 4
    n, cin = conv(3, 64, 3) + 128, 64
    for i, planes in enumerate((64, 128, 256)):
        width, out = planes * 2, planes * 4
        for j in range(3):
            n += (conv(cin, width, 1) + 2 * width + conv(width, width, 3, groups=32) + 2 * width
                  + conv(width, out, 1) + 2 * out + (conv(cin, out, 1) + 2 * out if j == 0 else 0))
            cin = out
    return n + 1024 * c + c


def vit(d, c, depth=12, tokens=65):   # 4x4 patches of 32x32: 64 tokens + the class token
    block = 2 * d + 3 * d * d + 3 * d + d * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d
    return 3 * 16 * d + d + d + tokens * d + depth * block + 2 * d + d * c + c


EXPECTED = {   # name -> (parameter count for c classes, published size in millions for CIFAR-10, tolerance)
    # He et al.'s 0.85M: option-A shortcut
    'cifar_resnet56': (lambda c: basic_resnet(c, (16, 32, 64), 9), 0.86, 0.005),
    'cifar_resnet18': (lambda c: basic_resnet(c, (64, 128, 256, 512), 2), 11.17, 0.005),
    'cifar_resnext29_32x4d': (resnext29_32x4d, 4.78, 0.005),
    'cifar_wrn28_10': (wrn28_10, 36.5, 0.05),             # Zagoruyko & Komodakis 2016, Table 1
    'cifar_vit_tiny_patch4': (lambda c: vit(192, c), 5.36, 0.005),
    'cifar_vit_small_patch4': (lambda c: vit(384, c), 21.34, 0.005),
}


def test_cifar_models_are_registered_with_32px_configs():
    assert sorted(timm.list_models('cifar_*')) == sorted(EXPECTED)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model('cifar_resnet56'))
    assert cfg['input_size'] == (3, 32, 32) and cfg['crop_pct'] == 1.0


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_parameter_counts_and_output_shapes(name):
    count, published, tol = EXPECTED[name]
    for c in (10, 100):
        with torch.device('meta'):   # no memory, no init cost: shapes only
            model = timm.create_model(name, num_classes=c)
            out = model(torch.empty(2, 3, 32, 32))
        n = sum(p.numel() for p in model.parameters())
        assert n == count(c), (name, c, n, count(c))
        assert out.shape == (2, c)
        if c == 10:
            assert abs(n / 1e6 - published) < tol, (name, n)


def test_sam_on_sparsity_of_wrn28_10_is_the_papers():
    """Paper Table 6: SAM-ON on WRN-28-10 perturbs all but 99.95% of the parameters."""
    with torch.device('meta'):
        model = timm.create_model('cifar_wrn28_10', num_classes=100)
    n_norm = sum(p.numel() for p in sam_on_timm.norm_parameters(model))
    n = sum(p.numel() for p in model.parameters())
    assert n_norm == 2 * (16 + 8 * 160 + 8 * 320 + 8 * 640)   # gamma and beta of two BatchNorms a block + the last
    assert round(100 * (1 - n_norm / n), 2) == 99.95


def test_resnet56_forward_backward_on_cpu(one_thread):
    torch.manual_seed(0)
    model = timm.create_model('cifar_resnet56', num_classes=10, drop_rate=0.1)
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match='drop_path_rate'):
        timm.create_model('cifar_resnet56', drop_path_rate=0.1)


# --- augmentations --------------------------------------------------------------------------------------
def test_basic_augmentation_is_a_padded_crop_and_flip():
    rng = np.random.RandomState(0)
    img = rng.randint(1, 256, (32, 32, 3), dtype=np.uint8)   # no zeros: padding is recognisable
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = img
    windows = {(i, j, f): (padded[i:i + 32, j:j + 32, :][:, ::-1] if f else padded[i:i + 32, j:j + 32, :])
               for i in range(9) for j in range(9) for f in (0, 1)}
    t = cifar_train_transform('basic', (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    seen = set()
    torch.manual_seed(0)
    for _ in range(60):
        x = t(Image.fromarray(img))
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        raw = np.round((x.numpy() * 0.25 + 0.5) * 255).astype(np.uint8).transpose(1, 2, 0)
        match = [k for k, w in windows.items() if np.array_equal(raw, w)]
        assert len(match) == 1
        seen.add(match[0])
    assert {f for _, _, f in seen} == {0, 1} and len({(i, j) for i, j, _ in seen}) > 10
    u = cifar_train_transform('basic', (0.5,) * 3, (0.25,) * 3, use_prefetcher=True)(Image.fromarray(img))
    assert u.dtype == torch.uint8 and u.shape == (3, 32, 32)   # the prefetcher normalises on the device


def test_autoaugment_variant_uses_the_cifar10_policy():
    from torchvision import transforms
    t = cifar_train_transform('basic+aa', (0.5,) * 3, (0.25,) * 3)
    aa = [s for s in t.transforms if isinstance(s, transforms.AutoAugment)]
    assert len(aa) == 1 and aa[0].policy == transforms.AutoAugmentPolicy.CIFAR10
    with pytest.raises(ValueError, match='basic, basic\\+aa'):
        cifar_train_transform('strong', (0.5,) * 3, (0.25,) * 3)


def test_cifar_aug_bad_input(image_folder, tmp_path, capsys):
    base = ['--data-dir', image_folder, '--output', str(tmp_path), '--model', 'test_resnet', '--device', 'cpu',
            '--experiment', 'x', '--num-classes', '2']
    for extra, words in ((['--cifar-aug', 'strong', '--img-size', '32'], 'basic, basic+aa'),
                         (['--cifar-aug', 'basic', '--aa', 'v0', '--img-size', '32'], 'drop --aa'),
                         (['--cifar-aug', 'basic'], 'input size must be 32x32')):
        assert train.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / 'x').exists()


# --- recipes --------------------------------------------------------------------------------------------
# Table 8 (bold values), written out independently of the YAML files: variant -> (rho all, rho ON)
RHO = {
    'c10': {'sam': (0.1, 0.5), 'eleml2': (2, 3), 'eleml2orig': (0.5, 0.5), 'elemlinf': (0.005, 0.025),
            'layerl2': (0.025, 0.25), 'fisher': (0.1, 0.5)},
    'c100': {'sam': (0.1, 1.0), 'eleml2': (1, 2.5), 'eleml2orig': (1, 1), 'elemlinf': (0.01, 0.05),
             'layerl2': (0.01, 0.2), 'fisher': (0.1, 0.5)},   # Fisher ON: no bold value for CIFAR-100, CIFAR-10's
    'vit': {'sam': (0.1, 10), 'eleml2': (2.5, 10), 'eleml2orig': (2.5, 10), 'elemlinf': (0.0025, 0.1),
            'layerl2': (0.005, 0.5), 'fisher': (0.1, 10)},
}
FOLDERS = {'c10-basic': ('c10', 'basic'), 'c10-aa': ('c10', 'basic+aa'), 'c100-basic': ('c100', 'basic'),
           'c100-aa': ('c100', 'basic+aa'), 'vit-c100': ('vit', 'basic+aa')}


def _expected():
    out = {}
    for folder, (table, aug) in FOLDERS.items():
        vit = table == 'vit'
        classes = 10 if table == 'c10' else 100
        common = dict(cifar_aug=aug, epochs=200, sched='cosine', warmup_epochs=0, cooldown_epochs=0, smoothing=0.1,
                      weight_decay=5e-4, num_classes=classes, dataset=f'torch/cifar{classes}', sam_m=None,
                      lr=1e-4 if vit else 0.1, batch_size=64 if vit else 128,
                      model='cifar_vit_small_patch4' if vit else 'cifar_wrn28_10')
        base = 'adamw' if vit else 'momentum'
        out[f'{folder}/{"adamw" if vit else "sgd"}.yaml'] = dict(common, opt=base, rho=None)
        for variant, (rho_all, rho_on) in RHO[table].items():
            suffix = '' if variant == 'sam' else f'-{variant}'
            out[f'{folder}/sam{suffix}.yaml'] = dict(common, opt=f'sam{suffix}', rho=rho_all, sam_base=base)
            out[f'{folder}/sam-on{suffix}.yaml'] = dict(common, opt=f'sam-on{suffix}', rho=rho_on, sam_base=base)
    return out


EXPECTED_RECIPES = _expected()


def test_cifar_recipe_set_is_complete():
    files = sorted(os.path.relpath(p, CIFAR_HPARAMS) for p in glob.glob(os.path.join(CIFAR_HPARAMS, '*', '*.yaml')))
    assert files == sorted(EXPECTED_RECIPES) and len(files) == 65


@pytest.mark.parametrize('recipe', sorted(EXPECTED_RECIPES))
def test_cifar_recipe_values_and_two_updates(recipe, image_folder, tmp_path, one_thread):
    """The recipe passes train.py's validation with the paper's values, then trains two updates on generated
    32x32 data (model and data overridden: test_resnet, an ImageFolder; optimizer, rho and augmentation kept)."""
    path = os.path.join(CIFAR_HPARAMS, recipe)
    raw = yaml.safe_load(open(path))
    assert 'data_dir' not in raw and 'experiment' not in raw
    args = train.parse_args(['-c', path, '--data-dir', str(tmp_path)])
    train.validate_args(args)
    want = EXPECTED_RECIPES[recipe]
    for key, value in want.items():
        if key == 'rho':
            assert ('rho' in raw) is (value is not None)
            if value is not None:
                assert args.rho == pytest.approx(value, rel=1e-12)
        else:
            assert getattr(args, key) == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert args.is_sam is (want['rho'] is not None)
    rc = train.main(['-c', path, '--dataset', '', '--data-dir', image_folder, '--model', 'test_resnet', '--img-size',
                     '32', '--num-classes', '2', '-b', '8', '--device', 'cpu', '--workers', '0', '--val-split', '',
                     '--stop-epoch', '1', '--output', str(tmp_path), '--experiment', 'r', '--log-interval', '1'])
    assert rc == 0
    ckpt = torch.load(tmp_path / 'r' / 'last.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['optimizer']['state']   # 16 images / 8: two updates were taken
    steps = {int(s['step']) for s in ckpt['optimizer']['state'].values() if 'step' in s}
    assert steps in (set(), {2})


def test_a_recipe_trains_the_real_resnet56(image_folder, tmp_path, one_thread):
    path = os.path.join(CIFAR_HPARAMS, 'c10-basic', 'sam-on-layerl2.yaml')
    rc = train.main(['-c', path, '--dataset', '', '--data-dir', image_folder, '--model', 'cifar_resnet56',
                     '--num-classes', '2', '-b', '8', '--device', 'cpu', '--workers', '0', '--val-split', '',
                     '--stop-epoch', '1', '--output', str(tmp_path), '--experiment', 'r'])
    assert rc == 0
    ckpt = torch.load(tmp_path / 'r' / 'last.pth.tar', weights_only=True)
    assert ckpt['arch'] == 'cifar_resnet56' and ckpt['state_dict']['fc.weight'].shape == (2, 64)
