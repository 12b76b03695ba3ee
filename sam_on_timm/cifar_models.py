"""The paper's CIFAR models as timm models (32x32 input, CIFAR stems), registered on ``import sam_on_timm``.

    timm.create_model('cifar_wrn28_10', num_classes=100)

name: architecture; parameters (10 / 100 classes)

- ``cifar_resnet18``: ResNet-18, CIFAR variant (paper Figure 3): 4 stages x 2 basic blocks, 64-512 channels;
  11.17M / 11.22M
- ``cifar_resnet56``: ResNet-56 (He et al. 2016, Section 4.2): 3 stages x 9 basic blocks, 16/32/64 channels;
  0.856M / 0.862M
- ``cifar_resnext29_32x4d``: ResNeXt-29 (Xie et al. 2017), cardinality 32, 4 channels per group in the first stage;
  4.78M / 4.87M
- ``cifar_wrn28_10``: WideResNet-28-10 (Zagoruyko & Komodakis 2016), pre-activation blocks; 36.48M / 36.54M
- ``cifar_vit_tiny_patch4``: ViT-T, 192 wide, 12 blocks, 3 heads, 4x4 patches of a 32x32 image; 5.36M / 5.38M
- ``cifar_vit_small_patch4``: ViT-S, 384 wide, 12 blocks, 6 heads, 4x4 patches of a 32x32 image; 21.34M / 21.38M

The ResNets follow the layouts the paper's CIFAR experiments used: a 3x3 stem convolution at full
resolution (no stride, no max-pool); a shortcut that changes width or resolution is a strided 1x1
convolution, followed by BatchNorm in the post-activation blocks (ResNet-56, ResNeXt) and bare in the
pre-activation ones (WRN, whose last BatchNorm + ReLU sits before the pooling). Convolutions are
Kaiming-normal (fan-out) initialised, norm layers at gamma = 1, beta = 0. The ViTs are timm's
``VisionTransformer`` at 32 px with 4 px patches (64 tokens + the class token).
"""
from typing import List, Optional, Type

import torch
from torch import nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .cifar_data import CIFAR_MEAN_STD

__all__ = ['CifarResNet', 'CIFAR_MODELS']


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, groups: int = 1, base_width: int = 0) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and cin == planes else nn.Sequential(
            _conv1x1(cin, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation (WRN): conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x), shortcut a bare 1x1 conv."""
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, groups: int = 1, base_width: int = 0) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, planes, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), _conv3x3(planes, planes)
        self.act = nn.ReLU(inplace=False)   # bn1's input is also the shortcut's
        self.shortcut = nn.Identity() if stride == 1 and cin == planes else _conv1x1(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(self.bn1(x)))
        return self.conv2(self.act(self.bn2(out))) + self.shortcut(x)


class Bottleneck(nn.Module):
    """ResNeXt: 1x1 -> grouped 3x3 (``groups`` x ``base_width * planes / 64`` channels) -> 1x1 (x4)."""
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = planes * base_width // 64 * groups
        cout = planes * self.expansion
        self.conv1, self.bn1 = _conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride, groups), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv1x1(width, cout), nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            _conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        return self.act(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem at 32 px, one stage per entry of ``widths`` (stride 1, then 2) of ``depth`` blocks each, global
    average pool, linear head.

    ``preact``: the stem has no BatchNorm; a BatchNorm + ReLU over the last stage's output precedes the pool.
    """

    def __init__(self, block: Type[nn.Module], depth: int, widths: List[int], stem_width: int, num_classes: int = 10,
                 in_chans: int = 3, preact: bool = False, groups: int = 1, base_width: int = 64,
                 drop_rate: float = 0.0, global_pool: str = 'avg', drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if global_pool != 'avg':
            raise ValueError(f"the CIFAR ResNets pool with 'avg' only, got global_pool '{global_pool}'")
        if drop_path_rate:
            raise ValueError(f'the CIFAR ResNets have no stochastic depth (drop_path_rate), got {drop_path_rate}')
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.conv1 = _conv3x3(in_chans, stem_width)
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(stem_width)
        self.act = nn.Identity() if preact else nn.ReLU(inplace=True)
        cin, stages = stem_width, []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, groups, base_width))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages[:3]
        self.layer4 = stages[3] if len(stages) > 3 else nn.Identity()   # ResNet-18's fourth stage
        self.final_norm = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.final_act = nn.ReLU(inplace=True) if preact else nn.Identity()
        self.num_features = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(first_conv: str = 'conv1', classifier: str = 'fc', **kwargs) -> dict:
    return dict(url='', num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                interpolation='bilinear', mean=CIFAR_MEAN_STD['cifar10'][0], std=CIFAR_MEAN_STD['cifar10'][1],
                first_conv=first_conv, classifier=classifier, **kwargs)


default_cfgs = generate_default_cfgs({
    'cifar_resnet56': _cfg(),
    'cifar_resnet18': _cfg(),
    'cifar_resnext29_32x4d': _cfg(),
    'cifar_wrn28_10': _cfg(),
    'cifar_vit_tiny_patch4': _cfg(first_conv='patch_embed.proj', classifier='head'),
    'cifar_vit_small_patch4': _cfg(first_conv='patch_embed.proj', classifier='head'),
})


def _resnet(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


def _vit(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, img_size=32, patch_size=4, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 6n+2 layers with n = 9, 16/32/64 channels."""
    return _resnet('cifar_resnet56', pretrained, block=BasicBlock, depth=9, widths=[16, 32, 64], stem_width=16,
                   **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 for CIFAR (the widely used CIFAR variant of He et al.'s ImageNet ResNet-18: 3x3 stem, no
    max-pool): 4 stages x 2 basic blocks, 64/128/256/512 channels."""
    return _resnet('cifar_resnet18', pretrained, block=BasicBlock, depth=2, widths=[64, 128, 256, 512], stem_width=64,
                   **kwargs)


@register_model
def cifar_resnext29_32x4d(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNeXt-29 32x4d for CIFAR (Xie et al. 2017): 9n+2 layers with n = 3, 64-wide stem, 32 groups."""
    return _resnet('cifar_resnext29_32x4d', pretrained, block=Bottleneck, depth=3, widths=[64, 128, 256],
                   stem_width=64, groups=32, base_width=4, **kwargs)


@register_model
def cifar_wrn28_10(pretrained: bool = False, **kwargs) -> CifarResNet:
    """WideResNet-28-10 (Zagoruyko & Komodakis 2016): 6n+4 layers with n = 4, 160/320/640 channels."""
    return _resnet('cifar_wrn28_10', pretrained, block=PreActBlock, depth=4, widths=[160, 320, 640], stem_width=16,
                   preact=True, **kwargs)


@register_model
def cifar_vit_tiny_patch4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-T at 32 px with 4x4 patches."""
    return _vit('cifar_vit_tiny_patch4', pretrained, embed_dim=192, depth=12, num_heads=3, **kwargs)


@register_model
def cifar_vit_small_patch4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S at 32 px with 4x4 patches."""
    return _vit('cifar_vit_small_patch4', pretrained, embed_dim=384, depth=12, num_heads=6, **kwargs)


CIFAR_MODELS = ('cifar_resnet18', 'cifar_resnet56', 'cifar_resnext29_32x4d', 'cifar_wrn28_10', 'cifar_vit_tiny_patch4',
                'cifar_vit_small_patch4')
