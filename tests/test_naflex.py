"""NaFlex batches (timm's create_naflex_loader: dicts of patches, patch_coord, patch_valid; the batch size set
by a token budget) in the SAM step and in train.py --naflex-loader.

Pinned down: a dict batch is cut into chunks of m images, the last one smaller, each image's patches,
coordinates and validity mask kept together (against chunks stacked here image by image); the SAM update of
a dict batch on both chunk paths equals a float64 two-pass reference, with the descent of chunk c weighted
by n_c / N (or the weights given); train.py's updates see NaFlex dicts cut that way and the weights of
timm's --naflex-loss-scale, whose effect on the update is measured (linear: the update scaled by n / b);
ssam-f's Fisher over dict batches; with --grad-accum-steps no batched pass spans two micro-batches (their
sequence lengths differ); bad NaFlex input as one line.
"""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import sam_on_timm  # noqa: F401  (registers the SAM names)
import train
from sam_on_timm.sparse import fisher_diagonal
from sam_on_timm.train_step import find_sam, split_chunks, train_step
from tests.helpers import make_image_folder
from timm.optim import create_optimizer_v2

LR, MOM, RHO = 0.1, 0.9, 0.05
PATCH, GRID = 4, 4                       # 4 px patches, a 4 x 4 learned position table (img_size 16)
# (h, w) patch grid of each image of the test batch: different sizes, so different coordinates and masks
GRIDS = [(4, 4), (2, 3), (3, 2), (1, 4), (4, 1), (2, 2)]
MODEL_KWARGS = dict(embed_dim=16, depth=1, num_heads=2, patch_size=PATCH, img_size=PATCH * GRID)


def tiny_naflexvit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('naflexvit_base_patch16_gap', pretrained=False, num_classes=3, **MODEL_KWARGS, **kwargs)


def image(i, n=GRID * GRID, dtype=torch.float64):
    """Image i alone, as timm's collator pads it: its h * w patches (row-major coordinates), then zero padding
    (coordinates 0, not valid)."""
    h, w = GRIDS[i]
    g = torch.Generator().manual_seed(100 + i)
    patches = torch.zeros(n, PATCH * PATCH * 3, dtype=dtype)
    patches[:h * w] = torch.randn(h * w, PATCH * PATCH * 3, generator=g, dtype=dtype)
    coord = torch.zeros(n, 2, dtype=torch.long)
    coord[:h * w] = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij'), -1).reshape(-1, 2)
    valid = torch.zeros(n, dtype=torch.bool)
    valid[:h * w] = True
    return {'patches': patches, 'patch_coord': coord, 'patch_valid': valid}


def stacked(indices, **kwargs):
    """The images ``indices`` as one NaFlex batch, built here image by image (independent of take_rows)."""
    imgs = [image(i, **kwargs) for i in indices]
    batch = {k: torch.stack([im[k] for im in imgs]) for k in imgs[0]}
    batch['seq_len'] = GRID * GRID   # the collator's int entry
    return batch


TARGETS = torch.tensor([0, 2, 1, 1, 0, 2])


def test_split_chunks_cuts_a_dict_batch_into_whole_images():
    """Chunks of m images in order, the last one smaller; every chunk holds exactly its images' patches,
    coordinates and masks (compared with the images stacked here), the int seq_len kept; targets alike."""
    batch = stacked(range(6))
    for m, groups in ((4, [[0, 1, 2, 3], [4, 5]]), (2, [[0, 1], [2, 3], [4, 5]]), (5, [[0, 1, 2, 3, 4], [5]]),
                      (6, [list(range(6))]), (8, [list(range(6))])):
        chunks = split_chunks(batch, TARGETS, m)
        assert len(chunks) == len(groups), m
        for (x, y), idx in zip(chunks, groups):
            want = stacked(idx)
            assert set(x) == set(want) and x['seq_len'] == GRID * GRID
            for key in ('patches', 'patch_coord', 'patch_valid'):
                assert torch.equal(x[key], want[key]), (m, idx, key)
            assert torch.equal(y, TARGETS[idx])
    with pytest.raises(ValueError, match='positive divisor'):   # a tensor batch: m must divide it, as before
        split_chunks(torch.zeros(6, 3), TARGETS, 4)
    with pytest.raises(ValueError, match='positive divisor'):   # ragged=False asks the same of a dict
        split_chunks(batch, TARGETS, 4, ragged=False)
    bad = dict(batch, patch_valid=batch['patch_valid'][:5])
    with pytest.raises(ValueError, match="'patch_valid' has 5 rows"):
        split_chunks(bad, TARGETS, 2)


def reference_update(model, groups, weights, variant='layerl2'):
    """Float64 two-pass SAM-ON (layerl2 with eta 0, or fisher with eta 1) written out by hand over the chunks
    ``groups`` (image indices), each chunk stacked here, eps from the chunk's unweighted mean loss; descent
    gradient sum_c weights[c] * grad L_c(w + eps_c); then timm's Nesterov SGD first step (no weight decay).
    Returns sum_c n_c L_c(w + eps_c) / N, the logged loss."""
    params = list(model.parameters())
    P = [p for mod in model.modules() if isinstance(mod, nn.LayerNorm) for p in (mod.weight, mod.bias)]
    acc = [torch.zeros_like(p) for p in params]
    logged = 0.0
    for idx, w in zip(groups, weights):
        x, y = stacked(idx), TARGETS[idx]
        g = torch.autograd.grad(F.cross_entropy(model(x), y), P)
        t = [p.detach().norm() for p in P] if variant == 'layerl2' else [(1 + gi ** 2) ** -0.5 for gi in g]
        denom = math.sqrt(sum(((ti * gi) ** 2).sum().item() for ti, gi in zip(t, g)))
        saved = [p.detach().clone() for p in P]
        with torch.no_grad():
            for p, ti, gi in zip(P, t, g):
                p.add_(RHO * ti * ti * gi / denom)
        loss = F.cross_entropy(model(x), y)
        logged += loss.item() * len(idx) / len(TARGETS)
        # grad of w * L, not w * grad L: NaFlexVit's float32 position-table interpolation (below) rounds the two apart
        acc = [a + gi for a, gi in zip(acc, torch.autograd.grad(w * loss, params))]
        with torch.no_grad():
            for p, s in zip(P, saved):
                p.copy_(s)
    with torch.no_grad():
        for p, g in zip(params, acc):
            p.sub_(LR * (g + MOM * g))
    return logged


@pytest.mark.parametrize('m, path, weights, variant', [
    (4, 'auto', None, 'layerl2'),                    # chunks 4 + 2: sequential (auto), weights 4/6 and 2/6
    (5, 'sequential', None, 'layerl2'),              # 5 + 1
    (2, 'sequential', None, 'layerl2'),              # 3 equal chunks, 1/3 each
    (2, 'batched', None, 'layerl2'),                 # the same in one ascent and one descent pass
    (2, 'batched', [0.5, 0.2, 0.3], 'layerl2'),      # weights given (train.py's loss scale)
    (4, 'sequential', [0.25, 1.5], 'fisher'),        # fisher's eps depends on the gradient's scale: never weighted
])
def test_dict_batch_step_matches_float64_two_pass_reference(m, path, weights, variant, one_thread):
    model = tiny_naflexvit().double()
    ref = copy.deepcopy(model)
    opt = create_optimizer_v2(model, f'sam-on-{variant}', lr=LR, momentum=MOM, weight_decay=0.0, rho=RHO,
                              eta=0.0 if variant == 'layerl2' else 1.0)
    sam = find_sam(opt)
    assert {id(p) for p in sam.perturbed} == {id(p) for mod in model.modules() if isinstance(mod, nn.LayerNorm)
                                              for p in (mod.weight, mod.bias)}
    seen = []
    def loss_fn(out, target):
        seen.append(out.shape[0])
        return F.cross_entropy(out, target)
    chunks = split_chunks(stacked(range(6)), TARGETS, m)
    stats = train_step(model, opt, chunks, loss_fn, chunk_path=path, chunk_weights=weights)
    groups = [list(range(i, min(i + m, 6))) for i in range(0, 6, m)]
    sizes = [len(g) for g in groups]
    logged = reference_update(ref, groups, weights or [n / 6 for n in sizes], variant)
    batched = path == 'batched'
    assert seen == ([m] * len(sizes) * 2 if batched else [n for n in sizes for _ in range(2)])  # per-chunk losses
    # NaFlexVit interpolates its position table in float32 even in a float64 model (timm's .float()), so a pass
    # over other images rounds pos_embed's gradient differently: batched vs reference up to 3.3e-11 (measured),
    # against 3.3e-2 for a plausible wrong update (equal 1/k weights for chunks 4 + 2). Sequential: 3e-17.
    tol = dict(rtol=1e-7, atol=1e-8) if batched else dict(rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=name)
    assert float(stats.loss) == pytest.approx(logged, rel=1e-10)   # mean over images, whatever the weights
    assert not sam.is_perturbed


def test_ssam_f_fisher_over_dict_batches(one_thread):
    """ssam-f's empirical Fisher over NaFlex batches: each image alone through the model (its own patches,
    coordinates and mask), compared with the images built one by one here."""
    model = tiny_naflexvit().double()
    params = [p for p in model.parameters() if p.ndim == 1][:4]
    batches = [(stacked([0, 1, 2]), TARGETS[:3]), (stacked([3, 4, 5]), TARGETS[3:])]
    fisher, n = fisher_diagonal(model, params, batches, F.cross_entropy, 5)
    want = [torch.zeros_like(p) for p in params]
    for i in range(5):
        g = torch.autograd.grad(F.cross_entropy(model(stacked([i])), TARGETS[i:i + 1]), params)
        want = [w + gi * gi for w, gi in zip(want, g)]
    assert n == 5
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f, w, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------------------
# train.py --naflex-loader
# ------------------------------------------------------------------------------------------------------
NAFLEX = ['--model', 'naflexvit_base_patch16_gap', '--model-kwargs', 'embed_dim=16', 'depth=1', 'num_heads=2',
          f'patch_size={PATCH}', 'img_size=32', '--num-classes', '3', '--device', 'cpu', '--workers', '0',
          '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.05', '--weight-decay', '0', '--seed', '3',
          '--naflex-loader', '--naflex-max-seq-len', '64']


@pytest.fixture(scope='module')
def naflex_data(tmp_path_factory):
    """24 training images of 32 px (64 patches of 4 px at most), 6 for validation, 3 classes."""
    return make_image_folder(tmp_path_factory.mktemp('naflex') / 'data', n_train=24, n_val=6, classes=3)


def _spy(monkeypatch):
    """Record each train_step call of train.py: the chunks (copied), chunk_weights, parameters before and after."""
    import sam_on_timm.train_step as ts
    calls, real = [], ts.train_step

    def spy(model, optimizer, chunks, loss_fn, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = real(model, optimizer, chunks, loss_fn, **kwargs)
        calls.append(dict(chunks=[({k: v.clone() if torch.is_tensor(v) else v for k, v in x.items()}, y.clone())
                                  for x, y in chunks],
                          weights=[float(w) for w in kwargs['chunk_weights']], before=before,
                          after={n: p.detach().clone() for n, p in model.named_parameters()},
                          eps_norm=None if stats.eps_norm is None else float(stats.eps_norm)))
        return stats
    monkeypatch.setattr(ts, 'train_step', spy)
    return calls


@pytest.mark.parametrize('accum', [1, 2])
def test_train_py_sam_on_with_naflex_batches(naflex_data, tmp_path, monkeypatch, one_thread, accum):
    """--naflex-loader --opt sam-on-layerl2 --sam-m 3: every update gets NaFlex dicts cut in chunks of 3 images
    (the last smaller), the batch sizes of timm's token budget (-b 8 x 64 tokens: up to 8 images at 64, 16 at 32),
    the linear loss scale's weights (n_b / b) (n_c / n_b) / B = n_c / (b B) for B micro-batches of n_b images,
    and SAM perturbs."""
    calls = _spy(monkeypatch)
    assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', 'e', *NAFLEX,
                       '-b', '8', '--naflex-train-seq-lens', '32', '64', '--opt', 'sam-on-layerl2',
                       '--sam-m', '3', '--grad-accum-steps', str(accum)]) == 0
    sizes = []
    assert len(calls) == 2 // accum   # seed 3: 16 images at 32 patches, then 8 (checked below)
    for call in calls:
        n_chunks = [x['patches'].shape[0] for x, _ in call['chunks']]
        n = sum(n_chunks)
        sizes.append(n)
        if accum == 1:
            assert n_chunks == [3] * (n // 3) + ([n % 3] if n % 3 else []), n_chunks
        else:   # the two micro-batches' chunks, each cut on its own
            assert n_chunks == [3, 3, 3, 3, 3, 1, 3, 3, 2], n_chunks
        seqs = [x['patches'].shape[1] for x, _ in call['chunks']]
        assert set(seqs) <= {32, 64}
        if accum == 1:   # one batch: one sequence length, as many images as the token budget -b 8 x 64 allows
            assert len(set(seqs)) == 1 and n <= 8 * 64 // seqs[0], (n, seqs)
        for x, y in call['chunks']:
            assert x['patch_coord'].shape[:2] == x['patch_valid'].shape == x['patches'].shape[:2]
            assert y.shape[0] == x['patches'].shape[0] and x['patch_valid'].any(1).all()
        assert call['weights'] == pytest.approx([c / 8 / accum for c in n_chunks], rel=1e-12)
        assert call['eps_norm'] > 0
    assert sum(sizes) == 24 and sizes == ([16, 8] if accum == 1 else [24])
    rows = (tmp_path / 'e' / 'summary.csv').read_text().splitlines()
    assert 'train_eps_norm' in rows[0] and len(rows) == 2


@pytest.mark.parametrize('opt', ['sgd', 'sam-on-layerl2'])
def test_naflex_loss_scale_scales_the_update(naflex_data, tmp_path, monkeypatch, one_thread, opt):
    """-b 12 and one sequence length: timm's loader makes batches of 8 (the budget's 12 rounded down to its
    divisor 8), so --naflex-loss-scale linear multiplies the update by 8 / 12, sqrt by its root, none by 1:
    the first update's weight change compared between runs (Nesterov SGD's first step, no decay: linear in the
    gradient; SAM's eps does not depend on the scale)."""
    deltas, calls = {}, _spy(monkeypatch)
    for mode in ('none', 'sqrt', 'linear'):
        calls.clear()
        assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', mode, *NAFLEX,
                           '-b', '12', '--naflex-train-seq-lens', '64', '--opt', opt, '--sam-m', '4',
                           '--naflex-loss-scale', mode]) == 0
        first = calls[0]
        assert [x['patches'].shape[0] for x, _ in first['chunks']] == [4, 4]
        deltas[mode] = torch.cat([(first['after'][k] - first['before'][k]).flatten() for k in first['before']])
    assert deltas['none'].abs().max() > 1e-4
    for mode, s in (('linear', 8 / 12), ('sqrt', (8 / 12) ** 0.5)):
        # float32: measured error ~1e-9; a scale left out is off by 1 - 8/12 = 0.33 of the update
        torch.testing.assert_close(deltas[mode], s * deltas['none'], rtol=1e-4, atol=1e-7, msg=mode)


def test_naflex_order_follows_seed_and_epoch(naflex_data, tmp_path, monkeypatch, one_thread):
    """The NaFlex loader's shuffle (its batch schedule and images) takes --seed and a new order each epoch
    (train.py sets the wrapper's epoch): the labels in the order the updates saw them."""
    calls = _spy(monkeypatch)
    orders = []
    for seed, epochs in (('3', '2'), ('4', '1')):
        calls.clear()
        assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', f's{seed}', *NAFLEX,
                           '-b', '8', '--naflex-train-seq-lens', '32', '64', '--opt', 'sgd', '--seed', seed,
                           '--epochs', epochs, '--no-aug']) == 0
        labels = [torch.cat([y for _, y in call['chunks']]).tolist() for call in calls]
        per_epoch = len(calls) // int(epochs)
        orders += [sum(labels[i:i + per_epoch], []) for i in range(0, len(calls), per_epoch)]
    assert all(sorted(o) == sorted(orders[0]) and len(o) == 24 for o in orders)
    assert orders[0] != orders[1] and orders[0] != orders[2]   # epoch 1, seed 4: other orders


def test_naflex_mixup_until_mixup_off_epoch(naflex_data, tmp_path, monkeypatch, one_thread):
    """--mixup with --naflex-loader: timm's NaFlexMixup in the loader (soft targets, mixed pairs in epoch 0),
    and --mixup-off-epoch 1 reaches it (one-hot targets in epoch 1)."""
    calls = _spy(monkeypatch)
    assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', 'mix', *NAFLEX, '-b', '8',
                       '--naflex-train-seq-lens', '64', '--opt', 'sam-on-layerl2', '--mixup', '1.0', '--smoothing',
                       '0', '--mixup-off-epoch', '1', '--epochs', '2']) == 0
    targets = [torch.cat([y for _, y in call['chunks']]) for call in calls]
    assert all(t.shape[1] == 3 and torch.allclose(t.sum(1), torch.ones(len(t))) for t in targets)
    half = len(targets) // 2
    assert (torch.cat(targets[:half]).max(1).values < 0.99).any()      # epoch 0: mixed
    assert (torch.cat(targets[half:]).max(1).values == 1).all()        # epoch 1: mixup off


def test_naflex_chunk_weights_under_ddp(monkeypatch):
    """Under DDP each rank has its own NaFlex batch size: micro-batch b weighs world * n_b / (sum over ranks of
    n_b), times the loss scale (n_b / b) and 1 / B of gradient accumulation, as timm's script (another rank's
    sizes added by a fake all-reduce)."""
    other = torch.tensor([16., 4.])
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda t: t.add_(other))
    args = train.parse_args(['--naflex-loader', '-b', '8', '--naflex-loss-scale', 'sqrt'])
    args.distributed, args.world_size = True, 2
    micro = [[3, 3, 2], [3, 3, 3, 3]]   # this rank: 8 then 12 images
    got = train.naflex_chunk_weights(micro, args, torch.device('cpu'))
    want = [(n_b / 8) ** 0.5 / 2 * 2 * n_b / (n_b + o) * c / n_b
            for n_b, o, chunks in ((8, 16, micro[0]), (12, 4, micro[1])) for c in chunks]
    assert [float(w) for w in got] == pytest.approx(want, rel=1e-6)
    args.distributed, args.world_size, args.naflex_loss_scale = False, 1, 'none'
    assert train.naflex_chunk_weights(micro, args, None) == pytest.approx([c / 8 / 2 for c in micro[0]] +
                                                                         [c / 12 / 2 for c in micro[1]], rel=1e-12)


@pytest.mark.parametrize('extra, message', [
    (['--naflex-patch-sizes', '4', '8', '--naflex-patch-size-probs', '1'], 'must have same length'),
    (['--naflex-patch-size-probs', '0.5'], 'weighs the --naflex-patch-sizes choices'),
    (['--naflex-patch-sizes', '4', '8', '--naflex-patch-size-probs', '0', '0'], 'at least one must be positive'),
    (['--naflex-patch-sizes', '4', '8', '--naflex-patch-size-probs', '-1', '2'],
     '--naflex-patch-size-probs must be a finite number >= 0'),
    (['--naflex-patch-sizes', '0'], '--naflex-patch-sizes must be a finite number >= 1'),
    (['--naflex-train-seq-lens', '0', '64'], '--naflex-train-seq-lens must be a finite number >= 1'),
    (['--train-img-sizes', '32'], 'cannot be combined with --train-img-sizes'),
    (['--aug-splits', '2'], 'cannot be combined with --aug-splits'),
    (['--mixup', '0.2', '--cutmix-minmax', '0.2', '0.8'], 'cannot be combined with --cutmix-minmax'),
    (['--sam-m', '0'], '--sam-m 0 must be a positive integer'),
    (['--naflex-patchify-channels-first'], "reads channels-last (P-P-C) patches"),
    # timm's NaFlexVit without its patch-size interpolator: a matmul traceback at the first 8 px batch
    (['--naflex-patch-sizes', '4', '8'], "'naflexvit_base_patch16_gap' embeds 4x4 px patches only; add --model-kwargs "
                                         "enable_patch_interpolator=True"),
])
def test_bad_naflex_input_is_one_line(naflex_data, tmp_path, capsys, extra, message):
    assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', 'bad', *NAFLEX,
                       '--opt', 'sam-on-layerl2', *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'bad').exists()


def test_naflex_options_need_the_naflex_loader(naflex_data, tmp_path, capsys):
    args = ['--data-dir', naflex_data, '--output', str(tmp_path), '--model', 'test_vit', '--device', 'cpu']
    assert train.main([*args, '--naflex-patch-sizes', '8', '--naflex-loss-scale', 'sqrt']) == 2
    assert capsys.readouterr().err.strip() == ('train.py: error: --naflex-patch-sizes, --naflex-loss-scale: option(s) '
                                               'of the NaFlex loader; add --naflex-loader')


class _FixedLoader:
    """A NaFlex training loader that yields the given (dict, targets) batches in order (train.py's loop needs its
    length and the wrapper's set_epoch, taken from timm's real loader)."""

    def __init__(self, batches, dataset):
        self.batches, self.dataset = batches, dataset

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def naflex_batch(n, seq, seed):
    """n images as timm's collator pads them to ``seq`` patches of 4 px (grids up to 8 x 8, img_size 32)."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.zeros(n, seq, PATCH * PATCH * 3)
    coord = torch.zeros(n, seq, 2, dtype=torch.long)
    valid = torch.zeros(n, seq, dtype=torch.bool)
    for i in range(n):
        h, w = int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 9, (), generator=g))
        while h * w > seq:
            h, w = max(1, h - 1), max(1, w - 1)
        patches[i, :h * w] = torch.randn(h * w, PATCH * PATCH * 3, generator=g)
        grid = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        coord[i, :h * w] = torch.stack(grid, -1).reshape(-1, 2)
        valid[i, :h * w] = True
    return {'patches': patches, 'patch_coord': coord, 'patch_valid': valid, 'seq_len': seq}, \
        torch.randint(0, 3, (n,), generator=g)


def test_batched_passes_stay_inside_micro_batches(naflex_data, tmp_path, monkeypatch, one_thread):
    """--grad-accum-steps with NaFlex: the micro-batches of an update differ in sequence length (and, with
    --naflex-patch-sizes, in patch size), so their chunks cannot share a batched pass. Micro-batches of 8, 8 and 16
    images (64, 32, 32 patches) and --sam-m 4 make 2, 2 and 4 chunks: passes of the last micro-batch's 4 chunks
    laid over the first two micro-batches stacked 64 with 32 patches (a traceback). Passes of 2 chunks (the
    greatest common divisor) stay inside; the update equals the sequential path's (float32: measured 4e-9 apart,
    against a weight change of 2e-2)."""
    import sam_on_timm.run_data as run_data
    import sam_on_timm.train_step as ts
    batches = [naflex_batch(8, 64, 0), naflex_batch(8, 32, 1), naflex_batch(16, 32, 2)]
    real_loaders = run_data.create_naflex_loaders

    def loaders(*a, **kw):
        loader_train, loader_eval = real_loaders(*a, **kw)
        return _FixedLoader(batches, loader_train.dataset), loader_eval
    monkeypatch.setattr(run_data, 'create_naflex_loaders', loaders)
    passes, real_interleave = [], ts.interleave

    def interleave(xs):
        passes.append(len(xs))
        return real_interleave(xs)
    monkeypatch.setattr(ts, 'interleave', interleave)
    calls, after = _spy(monkeypatch), {}
    for path in ('batched', 'sequential'):
        calls.clear()
        passes.clear()
        assert train.main(['--data-dir', naflex_data, '--output', str(tmp_path), '--experiment', path, *NAFLEX,
                           '-b', '8', '--opt', 'sam-on-layerl2', '--sam-m', '4', '--grad-accum-steps', '3',
                           '--sam-chunks', path, '--val-split', '']) == 0
        assert len(calls) == 1 and [x['patches'].shape[0] for x, _ in calls[0]['chunks']] == [4] * 8
        after[path] = calls[0]['after']
        assert passes == ([2, 2, 2, 2] if path == 'batched' else []), passes
    moved = max((p - calls[0]['before'][name]).abs().max().item() for name, p in after['sequential'].items())
    diff = max((after['batched'][name] - p).abs().max().item() for name, p in after['sequential'].items())
    assert moved > 1e-3 and diff < 1e-6, (moved, diff)
