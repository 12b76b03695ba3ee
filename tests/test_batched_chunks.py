"""The batched chunk path (all m-sharpness chunks of a pass in one forward and backward, ghost
normalization) against the sequential one: float64 equality after 3 updates, every registered SAM name
through every chunk path it accepts, the automatic choice, the lean ascent, bf16 / fp16 autocast, and
2 gloo ranks."""
import copy
import datetime
import os
import sys
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import sam_on_timm  # registers the names
import timm
from sam_on_timm.batched import ghost_norms
from sam_on_timm.train_step import choose_chunk_path, find_sam, split_chunks, train_step
from timm.layers import BatchNormAct2d, GroupNorm1, LayerNorm2d
from timm.optim import create_optimizer_v2

RTOL = 1e-12
# MixedNet (8 channels, 4 samples per BatchNorm chunk) is ill-conditioned: reversing the sample order
# within each chunk, a rounding-only change, moves the sequential path's state by 7e-12 relative
# after 3 updates. The timm models agree to 1e-12.
RTOL_MIXED = 1e-10
NUM_CLASSES = 3


class MixedNet(nn.Module):
    """Every norm type the batched path handles: BatchNorm2d (cumulative-average momentum in one
    layer), timm's BatchNormAct2d, GroupNorm, GroupNorm1, LayerNorm2d, LayerNorm, RMSNorm, and a
    BatchNorm1d on (N, C)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.GELU(), GroupNorm1(8),
            nn.Conv2d(8, 8, 3, padding=1), LayerNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                  nn.Linear(8, 8), nn.RMSNorm(8, eps=0.05), nn.Linear(8, NUM_CLASSES))

    def forward(self, x):
        return self.head(self.features(x))


class EdgeNormNet(nn.Module):
    """The norm settings a model may carry besides the defaults: non-default eps everywhere (an eps the batched
    forward dropped would fall back to 1e-5), a BatchNorm without affine, one without running statistics,
    and a LayerNorm without bias (only its weight in P). Three BatchNorms are left in eval mode inside the
    training model: with running statistics and affine, with running statistics and no affine, without
    running statistics (batch statistics then, as torch computes them)."""

    def __init__(self):
        super().__init__()
        conv = lambda: nn.Conv2d(8, 8, 3, padding=1)   # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=0.1), nn.ReLU(),
            conv(), nn.BatchNorm2d(8, affine=False, eps=0.2), nn.ReLU(),
            conv(), nn.BatchNorm2d(8, track_running_stats=False, eps=0.3), nn.ReLU(),
            conv(), nn.GroupNorm(2, 8, eps=0.1), nn.ReLU(),
            conv(), nn.BatchNorm2d(8, eps=0.4),                                           # [13]: eval mode
            conv(), nn.BatchNorm2d(8, affine=False, eps=0.5),                             # [15]: eval mode
            conv(), nn.BatchNorm2d(8, track_running_stats=False, eps=0.6),                # [17]: eval mode
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.LayerNorm(8, bias=False, eps=0.05), nn.Linear(8, NUM_CLASSES))
        with torch.no_grad():   # running statistics away from (0, 1), so that using them or not shows
            self.features[13].running_mean.uniform_(-0.5, 0.5)
            self.features[13].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.features(x))


def test_batched_equals_sequential_with_edge_norm_settings():
    torch.manual_seed(0)
    model = EdgeNormNet().double().train()
    for i in (13, 15, 17):
        model.features[i].eval()
    seq, bat = compare(model, 'sam-on', batches(), RTOL_MIXED)
    assert float(bat[2][-1][3]) == 0   # every update perturbed
    ln = bat[0].head[0]
    assert ln.bias is None and not torch.equal(ln.weight, model.head[0].weight)   # the weight alone is in P, moved
    frozen = bat[0].features[13]
    assert torch.equal(frozen.running_mean, model.features[13].running_mean)      # eval mode: statistics kept


def make_model(name):
    torch.manual_seed(0)
    if name == 'resnet':      # BatchNorm ResNet
        model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    elif name == 'vit':       # LayerNorm ViT
        model = timm.create_model('test_vit', num_classes=NUM_CLASSES, img_size=16, patch_size=8, depth=1)
    elif name == 'convnext':  # LayerNorm2d (stem, downsampling) and LayerNorm (blocks)
        model = timm.create_model('convnext_atto', num_classes=NUM_CLASSES, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
    else:
        model = MixedNet()
    return model.double().train()


def batches(n_updates=3, n=16, m=4, img=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [split_chunks(torch.randn(n, 3, img, img, generator=g, dtype=dtype),
                         torch.randint(0, NUM_CLASSES, (n,), generator=g), m) for _ in range(n_updates)]


def run(model, opt_name, path, updates, lr=0.1, rho=0.5, **kwargs):
    """3 updates of train_step on a copy of ``model``: (model, optimizer, logged metrics per update)."""
    model = copy.deepcopy(model)
    opt = create_optimizer_v2(model, opt_name, lr=lr, momentum=0.9, weight_decay=1e-2,
                              **({'rho': rho} if 'sam' in opt_name else {}))
    logged = []
    for chunks in updates:
        s = train_step(model, opt, chunks, F.cross_entropy, chunk_path=path, **kwargs)
        logged.append(torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in
                                   (s.loss, s.ascent_loss, s.eps_norm, s.skipped) if v is not None]))
    return model, opt, logged


def state_of(model, opt, logged):
    """Everything the two paths must agree on, by name."""
    out = {f'model.{k}': v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()['state'].items():
        out.update({f'opt.{i}.{k}': v for k, v in st.items() if torch.is_tensor(v)})
    out.update({f'logged.{i}': v for i, v in enumerate(logged)})
    sam = find_sam(opt)
    if sam is not None:
        out['sam.skipped_count'] = sam.skipped_count
        out['sam.last_eps_norm'] = sam.last_eps_norm
    return out


def assert_same(a, b, rtol=RTOL):
    """Each tensor of ``a`` equals its twin in ``b`` to ``rtol`` relative: ||a - b|| <= rtol ||b||, with
    ||b|| taken as at least 1e-2 (a conv bias before a norm layer has a gradient that is 0 in exact
    arithmetic, so its momentum buffer holds rounding noise that no relative test can compare; other
    near-zero gradients, of norm 1e-3, lose digits to cancellation alike).
    For scale: reversing the sample order inside each chunk, a rounding-only change, moves the
    sequential path of the test_resnet cases by 1e-11 to 2.5e-11 (largest entry, relative)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].double(), b[k].double()
        scale = max(y.norm().item(), 1e-2)
        assert (x - y).norm().item() <= rtol * scale, (k, (x - y).norm().item() / scale)


def compare(model, opt_name, updates, rtol=RTOL, **kwargs):
    seq = run(model, opt_name, 'sequential', updates, **kwargs)
    bat = run(model, opt_name, 'batched', updates, **kwargs)
    assert_same(state_of(*bat), state_of(*seq), rtol)
    return seq, bat


# ---------------------------------------------------------------------------------------------
# equality with the sequential path, float64, 3 updates
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name,img,rtol', [('resnet', 16, RTOL), ('vit', 16, RTOL), ('convnext', 32, RTOL),
                                           ('mixed', 8, RTOL_MIXED)])
def test_batched_equals_sequential_in_float64(name, img, rtol):
    model = make_model(name)
    seq, bat = compare(model, 'sam-on', batches(img=img), rtol)
    before = model.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in bat[0].state_dict().items() if 'running' in k) or \
        name in ('vit', 'convnext')   # it did update the running statistics where there are some
    assert float(bat[2][-1][3]) == 0   # no perturbation skipped: the comparison covers eps


@pytest.mark.parametrize('opt_name', ['sam-on-layerl2', 'sam-on-fisher', 'sam-on-eleml2orig', 'sam-on-elemlinf', 'sgd'])
def test_batched_equals_sequential_for_every_variant_and_sgd_chunks(opt_name):
    compare(make_model('mixed'), opt_name, batches(), RTOL_MIXED)


def test_bn_update_ascent_keeps_its_meaning():
    model = make_model('resnet')
    seq, bat = compare(model, 'sam-on', batches(img=16), bn_update='ascent')
    bn = next(m for m in bat[0].modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 * 4   # the ascents only ('both': 3 * 4 * 2)


def test_ascent_fraction_and_chunks_per_pass():
    """The ascent on the first half of each chunk; 4 chunks in 2 batched passes (gradient accumulation)."""
    model = make_model('mixed')
    compare(model, 'sam-on', batches(m=8), RTOL_MIXED, ascent_frac=0.5)
    compare(model, 'sam-on', batches(), RTOL_MIXED, chunks_per_pass=2)


def test_chunk_weights_over_several_passes():
    """GSAM-ON (its kept g is the chunks' weighted mean) with chunk weights over 2 passes of 2 chunks: batched =
    sequential, logged means included."""
    model = make_model('mixed')
    for chunks, weights in ((batches(n_updates=1)[0], [0.1, 0.2, 0.3, 0.4]),):
        out = []
        for path in ('sequential', 'batched'):
            m = copy.deepcopy(model)
            opt = create_optimizer_v2(m, 'gsam-on', lr=0.1, momentum=0.9, rho=0.5, gsam_alpha=0.5)
            s = train_step(m, opt, chunks, F.cross_entropy, chunk_path=path, chunks_per_pass=2, chunk_weights=weights)
            out.append(state_of(m, opt, [torch.stack([s.loss, s.ascent_loss, s.eps_norm, s.skipped]).double()]))
        assert_same(out[1], out[0], RTOL_MIXED)


def test_bf16_autocast_stays_within_tolerance():
    """bf16 autocast (LayerNorm ViT, float32 weights): both paths round differently (the batched one
    applies the per-chunk affine in float32 after the norm). Stated tolerance: after 3 updates the
    two differ by at most 2% of the weight change (measured: 0.4%), and the batched update is no
    further from the float32 update than the sequential one (both 0.8%)."""
    model = make_model('vit').float()
    updates = batches(img=16, dtype=torch.float32)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    autocast = partial(torch.autocast, device_type='cpu', dtype=torch.bfloat16)
    f32 = run(model, 'sam-on', 'sequential', updates, lr=0.01, rho=0.05)[0].state_dict()
    seq, bat = (run(model, 'sam-on', path, updates, lr=0.01, rho=0.05, amp_autocast=autocast)[0].state_dict()
                for path in ('sequential', 'batched'))
    keys = [k for k, v in start.items() if v.dtype.is_floating_point]

    def dist(a, b):
        return torch.stack([(a[k] - b[k]).double().norm() for k in keys]).norm().item()
    change = dist(f32, start)
    assert change > 0
    assert dist(bat, seq) <= 0.02 * change
    assert dist(bat, f32) <= 1.5 * dist(seq, f32)


@pytest.mark.parametrize('opt_name', ['sam-on', 'sam-on-fisher'])   # Fisher's T is not scale invariant
def test_fp16_grad_scaler_matches(opt_name):
    model = make_model('mixed')
    autocast = partial(torch.autocast, device_type='cpu', dtype=torch.float16)
    scalers = [torch.amp.GradScaler('cpu', init_scale=2.0 ** 10) for _ in range(2)]
    updates = batches()
    out = [run(model, opt_name, path, updates, loss_scaler=s, amp_autocast=autocast)
           for path, s in zip(('sequential', 'batched'), scalers)]
    assert_same(state_of(*out[1]), state_of(*out[0]), RTOL_MIXED)   # float64 model: the scaler only scales
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 10


# ---------------------------------------------------------------------------------------------
# the automatic choice, errors, restores
# ---------------------------------------------------------------------------------------------
def test_choice_and_fallback():
    model = make_model('mixed')
    on = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.5)
    assert choose_chunk_path(model, on, [4] * 4)[0] == 'batched'
    assert choose_chunk_path(model, on, [4] * 4, 'sequential')[0] == 'sequential'
    assert choose_chunk_path(model, on, [16]) == ('sequential', 'one chunk per pass')
    assert choose_chunk_path(model, on, [4, 4, 8])[1] == 'the chunks differ in size'
    assert choose_chunk_path(model, create_optimizer_v2(model, 'sgd', lr=0.1), [4] * 4)[0] == 'batched'
    sam_all = create_optimizer_v2(model, 'sam', lr=0.1)
    path, why = choose_chunk_path(model, sam_all, [4] * 4)
    assert path == 'sequential' and 'not affine parameters of a normalization layer' in why
    norm_ids = {id(p) for p in sam_on_timm.norm_parameters(model)}
    frozen = [p for p in model.parameters() if id(p) not in norm_ids]
    for p in frozen:   # the rest frozen after the optimizer was built: SAM-all now perturbs norm layers only
        p.requires_grad_(False)
    assert choose_chunk_path(model, sam_all, [4] * 4)[0] == 'batched'
    for p in frozen:
        p.requires_grad_(True)
    assert choose_chunk_path(model, sam_all, [4] * 4)[0] == 'sequential'   # and back
    esam = create_optimizer_v2(model, 'esam-on', lr=0.1)
    assert choose_chunk_path(model, esam, [4] * 4) == ('sequential', "esam selects each chunk's own samples for its "
                                                                      "descent")
    evo = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.EvoNorm2dB0(4), nn.Flatten(), nn.LazyLinear(3))
    path, why = choose_chunk_path(evo, create_optimizer_v2(evo, 'sgd', lr=0.1), [4] * 4)
    assert path == 'sequential' and why == 'EvoNorm2dB0 layers cannot be batched'
    x, y = batches(1)[0][0]
    with pytest.raises(ValueError, match='cannot share one pass: EvoNorm2dB0'):
        train_step(evo, create_optimizer_v2(evo, 'sgd', lr=0.1), [(x.float(), y)] * 2, F.cross_entropy,
                   chunk_path='batched')
    with pytest.raises(ValueError, match='chunk_path must be one of auto, batched, sequential'):
        choose_chunk_path(model, on, [4] * 4, 'fast')


def test_auto_takes_the_batched_path():
    model = make_model('mixed')
    calls = []
    loss_fn = lambda out, y: calls.append(out.shape[0]) or F.cross_entropy(out, y)   # noqa: E731
    train_step(model, create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.5), batches(1)[0], loss_fn)
    # chunk losses of one ascent, then of one descent pass: no module forward left swapped
    assert calls == [4] * 8 and not any('forward' in m.__dict__ for m in model.modules())


@pytest.mark.parametrize('norm,shape,train', [
    (nn.BatchNorm2d(4), (6, 4, 3, 3), True), (nn.BatchNorm2d(4), (6, 4, 3, 3), False),
    (nn.LayerNorm(4), (6, 5, 4), True), (nn.GroupNorm(2, 4), (6, 4, 3, 3), True), (LayerNorm2d(4), (6, 4, 3, 3), True)]
    + ([(nn.RMSNorm(4, eps=0.5), (6, 5, 4), True)] if hasattr(nn, 'RMSNorm') else []))
@pytest.mark.filterwarnings('ignore:Mismatch dtype between input and weight')   # torch's rms_norm, not ours
def test_ghost_forward_keeps_the_modules_dtype_under_bf16_autocast(norm, shape, train):
    """The batched forward of a norm layer (one chunk, a zero addend on its affine parameters, so that the
    per-chunk affine is in play) returns what the module's own forward returns under bfloat16 autocast:
    the same dtype (a float32 gamma must not promote a bfloat16 output: the batched and the sequential
    path would then round differently, and the activation would take twice the memory) and the same values."""
    torch.manual_seed(0)
    norm = copy.deepcopy(norm).train(train)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(torch.randn_like(p))
        for name in ('running_mean', 'running_var'):
            if getattr(norm, name, None) is not None:
                getattr(norm, name).uniform_(0.5, 1.5)
    x = torch.randn(shape).bfloat16()
    frozen = copy.deepcopy(norm)   # running statistics as they were: a train-mode pass updates them
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want = frozen(x)
        addends = {p: torch.zeros((1,) + p.shape) for p in norm.parameters()}
        with ghost_norms(norm, 1, shape[0], addends):
            got = norm(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_forwards_put_back_when_the_pass_raises():
    model = make_model('mixed')
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.5)
    start = copy.deepcopy(model.state_dict())

    def failing(out, y):
        raise RuntimeError('boom')
    with pytest.raises(RuntimeError, match='boom'):
        train_step(model, opt, batches(1)[0], failing, chunk_path='batched')
    assert not any('forward' in m.__dict__ or '_sam_ghost' in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())   # nothing written
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {n: True for n, _ in model.named_parameters()}
    with ghost_norms(model, 2, 4, {}):
        assert 'forward' in model.head[0].__dict__
    assert 'forward' not in model.head[0].__dict__


def test_lean_ascent_computes_no_weight_gradient():
    """Each parameter's gradient is computed once per update (the descent); in the ascent only P
    requires grad, and its gradient is taken w.r.t. the per-chunk addends, not P itself."""
    model = make_model('mixed')
    opt = create_optimizer_v2(model, 'sam-on', lr=0.1, rho=0.5)
    sam = find_sam(opt)
    calls = {}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    seen = []

    def loss_fn(out, y):
        seen.append(sum(p.requires_grad for p in model.parameters()))
        return F.cross_entropy(out, y)
    train_step(model, opt, batches(1)[0], loss_fn)
    assert calls == {n: 1 for n, _ in model.named_parameters()}
    assert seen == [len(sam.perturbed)] * 4 + [len(list(model.parameters()))] * 4


# ---------------------------------------------------------------------------------------------
# 2 gloo ranks
# ---------------------------------------------------------------------------------------------
def _rank_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel as DDP
        result = {}
        for path in ('sequential', 'batched'):
            model = make_model('resnet')
            opt = create_optimizer_v2(model, 'sam-on', lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.5)
            ddp = DDP(model, device_ids=None, bucket_cap_mb=100)   # one bucket: one hook call per all-reduce
            calls = []
            ddp.register_comm_hook(calls, lambda state, bucket: state.append(1) or allreduce_hook(None, bucket))
            logged = []
            for chunks in batches(img=16, seed=10 + rank):   # every rank its own data
                s = train_step(ddp, opt, chunks, F.cross_entropy, chunk_path=path)
                logged.append(torch.stack([s.loss, s.ascent_loss, s.eps_norm, s.skipped]).double())
            result[path] = state_of(model, opt, logged)
            result[path]['allreduce'] = torch.tensor(len(calls))
        torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform == 'win32',
                    reason='needs torch.distributed gloo')
def test_two_gloo_ranks(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / 'rendezvous'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for r in ranks:   # every rank: batched equals sequential (BN running statistics: each rank's own)
        assert_same(r['batched'], r['sequential'])
        assert int(r['batched']['allreduce']) == 3   # one gradient all-reduce per update
    for k in ranks[0]['batched']:   # one all-reduce per update: the replicas stay identical
        if k.startswith('model.') and 'running' not in k and 'num_batches' not in k:
            assert torch.equal(ranks[0]['batched'][k], ranks[1]['batched'][k]), k


# ---------------------------------------------------------------------------------------------
# train.py: --sam-chunks
# ---------------------------------------------------------------------------------------------
def test_train_script_flag_logs_the_choice_and_both_paths_train_alike(image_folder, tmp_path, caplog, capsys):
    import logging
    import train
    base = ['--data-dir', image_folder, '--output', str(tmp_path), '--model', 'test_resnet', '--num-classes', '2',
            '--img-size', '16', '-b', '8', '--sam-m', '4', '--device', 'cpu', '--workers', '0', '--epochs', '1',
            '--warmup-epochs', '0', '--lr', '0.05', '--seed', '3', '--opt', 'sam-on', '--rho', '0.05']
    caplog.set_level(logging.INFO)
    for path in ('batched', 'sequential'):
        assert train.main([*base, '--experiment', path, '--sam-chunks', path]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('--sam-m chunks')]
    assert lines == ['--sam-m chunks: batched (2 chunks of 4 per pass (ghost normalization))',
                     '--sam-m chunks: sequential (forced)']
    wa, wb = (torch.load(tmp_path / e / 'last.pth.tar', weights_only=True)['state_dict']
              for e in ('batched', 'sequential'))
    assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) < 1e-5
    capsys.readouterr()
    assert train.main([*base, '--experiment', 'bad', '--opt', 'sam', '--sam-chunks', 'batched']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'Traceback' not in '\n'.join(err)
    assert err[-1].endswith('--sam-chunks batched: the chunks cannot share one pass: 17 perturbed tensors are not '
                            'affine parameters of a normalization layer (SAM-ON perturbs only those); use '
                            '--sam-chunks auto')


# ---------------------------------------------------------------------------------------------
# every registered SAM name through every chunk path it accepts
# ---------------------------------------------------------------------------------------------
def _registered_sam_names():
    from timm.optim import get_optimizer_info, list_optimizers
    from sam_on_timm.sam import SAM
    return [n for n in list_optimizers(with_description=False) if get_optimizer_info(n).opt_class is SAM]


def _tiny_net(norm_only):
    """BatchNorm, GroupNorm and LayerNorm with conv / linear weights and biases around them, float64;
    ``norm_only``: everything but the norm layers frozen (train.py's --train-only-norm)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, NUM_CLASSES)).double().train()
    if norm_only:
        for mod in model:
            if not isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                mod.requires_grad_(False)
    return model


# the family's own arguments, so that what they change is compared too (GSAM's decomposition, LookSAM's reuse step)
FAMILY_ARGS = {'gsam': dict(gsam_alpha=0.3, rho_min=0.1, lr_min=0.01), 'looksam': dict(interval=2, looksam_alpha=0.5)}


def _sam_run(name, norm_only, path, updates):
    """2 updates of ``name`` on a fresh tiny net through ``path``; the masks that change during training
    (ssam-f's Fisher mask, ssam-d's drop and regrow) set up as train.py's epoch start would, the same
    way for every path."""
    model = _tiny_net(norm_only)
    opt = create_optimizer_v2(model, name, lr=0.1, momentum=0.9, weight_decay=1e-2, rho=0.5,
                              **({'sparsity': 0.5} if name in sam_on_timm.SPARSE_OPTIMIZERS else {}),
                              **FAMILY_ARGS.get(name.split('-')[0], {}))
    sam = find_sam(opt)
    if sam.mask is not None and sam.mask.kind == 'fisher':
        g = torch.Generator().manual_seed(1)
        sam.mask.set_fisher_mask([torch.rand(p.shape, generator=g, dtype=p.dtype) for p in sam.perturbed])
    elif sam.mask is not None and sam.mask.kind == 'dynamic':
        sam.mask.epoch_start(0, 10)   # a drop-and-regrow scored by the first ascent gradient
    logged = []
    for chunks in updates:
        s = train_step(model, opt, chunks, F.cross_entropy, chunk_path=path)
        # msam has no ascent pass, an update between LookSAM's SAM updates no perturbation: zeros
        logged.append(torch.stack([torch.zeros_like(s.loss) if v is None else v
                                   for v in (s.loss, s.ascent_loss, s.eps_norm, s.skipped)]).double())
    out = state_of(model, opt, logged)
    if sam.mask is not None:
        out['sam.mask'] = torch.cat([m.reshape(-1) for m in sam.mask.masks])
    return out


@pytest.mark.parametrize('norm_only', [False, True], ids=['all-trainable', 'norm-only'])
def test_every_registered_name_on_every_chunk_path_equals_sequential(norm_only, fused):
    """Every SAM name in timm's registry, through each chunk path train_step accepts for it, gives the
    sequential update (float64, 1e-12): the perturbation of every path is made in one place
    (SAM.perturbation: formula, sparse mask, counters). With only the norm layers trainable the batched
    path must accept every name (sam-rand there was the silent unmasked update: ||eps|| = rho)."""
    names = _registered_sam_names()
    assert len(names) == (len(sam_on_timm.SAM_OPTIMIZERS) + len(sam_on_timm.SPARSE_OPTIMIZERS)
                          + len(sam_on_timm.FAMILY_OPTIMIZERS))
    updates = batches(n_updates=2, n=8, m=4, img=6)
    compared = {}
    for name in names:
        try:
            seq = _sam_run(name, norm_only, 'sequential', updates)
        except ValueError as e:   # sam-nonorm-* with only norm layers trainable: nothing to perturb
            assert norm_only and 'nonorm' in name and 'no parameter that requires grad' in str(e), (name, e)
            continue
        # a perturbation took place (ssam-f: its mask is set; msam: from its second update, with momentum)
        assert float(seq['logged.1' if name.startswith('msam') else 'logged.0'][2]) > 0, name
        accepted = ['auto']
        try:
            bat = _sam_run(name, norm_only, 'batched', updates)
        except ValueError as e:
            assert 'cannot share one pass' in str(e), (name, e)
        else:
            accepted.append('batched')
            assert_same(bat, seq)
        assert_same(_sam_run(name, norm_only, 'auto', updates), seq)
        compared[name] = accepted
    if norm_only:   # everything batchable (but ESAM's per-chunk sample selection): batched compared for every name
        assert all(v == ['auto', 'batched'] for n, v in compared.items() if not n.startswith('esam')), compared
        assert all(v == ['auto'] for n, v in compared.items() if n.startswith('esam')), compared
        assert len(compared) == len(names) - sum('nonorm' in n for n in names)
    else:           # P only the norm layers' affine parameters: the -on names; msam's one eps per update any P
        assert sorted(n for n, v in compared.items() if 'batched' in v) == sorted(
            n for n in names if ('-on' in n or n.startswith('msam')) and not n.startswith('esam'))
