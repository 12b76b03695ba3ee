"""Sparse-perturbation baselines: sam-rand, ssam-f, ssam-d (the paper's Section 5.1 / Appendix B.3)."""
import io
import math
import os
import sys
import tempfile

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import sam_on_timm
import train
from sam_on_timm.sparse import SparseMask, fisher_diagonal, live_count
from timm.optim import create_optimizer_v2


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def grads_of(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g, dtype=next(model.parameters()).dtype), torch.randint(0, 3, (8,), generator=g)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_sam_rand_perturbs_exactly_the_masked_elements_at_the_asked_sparsity(fused):
    model = mlp(torch.float64)
    opt = create_optimizer_v2(model, opt='sam-rand', lr=0.1, rho=0.3, sparsity=0.6)
    n = sum(p.numel() for p in model.parameters())
    masks = [m.bool() for m in opt.mask.masks]
    assert 0.6 * n % 1 > 0.5   # 97.8 of 163 left out: 98 (rounded), not 97 (truncated)
    assert sum(int(m.sum()) for m in masks) == n - round(0.6 * n)
    g = grads_of(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert (opt._flat is not None) is fused   # both code paths: per tensor, and the flat buffer CUDA takes
    g_norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
    for p, w, m, gi in zip(model.parameters(), before, masks, g):
        eps = p.detach() - w
        assert torch.equal(eps != 0, m & (gi != 0))   # exactly the masked elements moved
        # eps = rho * mask * g / ||g|| (the norm over the whole set, then masked: Mi et al.'s formula)
        torch.testing.assert_close(eps, torch.where(m, 0.3 * gi / g_norm, torch.zeros_like(gi)), rtol=1e-9, atol=1e-15)
    opt.second_step()
    for p, w in zip(model.parameters(), before):   # restored, then the base step took the descent gradient
        assert not torch.equal(p.detach(), w)


def test_sam_rand_default_sparsity_is_sam_ons():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=2)
    opt = create_optimizer_v2(model, opt='sam-rand', lr=0.1)
    n = sum(p.numel() for p in model.parameters())
    n_norm = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert opt.mask.sparsity == pytest.approx(1 - n_norm / n, abs=1e-12)
    assert sum(int(m.sum()) for m in opt.mask.masks) == n - round(n * (1 - n_norm / n)) == n_norm
    assert opt.name == 'sam-rand' and opt.state_dict()['sam_mask']['mask'].dtype == torch.bool


def test_masks_are_seeded_and_restored_with_the_optimizer_state():
    model = mlp()
    a = create_optimizer_v2(model, opt='sam-rand', lr=0.1, sparsity=0.5, mask_seed=3)
    b = create_optimizer_v2(model, opt='sam-rand', lr=0.1, sparsity=0.5, mask_seed=3)
    c = create_optimizer_v2(model, opt='sam-rand', lr=0.1, sparsity=0.5, mask_seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.mask.masks, b.mask.masks))
    assert not all(torch.equal(x, y) for x, y in zip(a.mask.masks, c.mask.masks))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(x, y) for x, y in zip(a.mask.masks, c.mask.masks))
    d = create_optimizer_v2(model, opt='ssam-d', lr=0.1)
    with pytest.raises(ValueError, match='does not fit'):
        d.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match='no perturbation mask'):
        d.load_state_dict(create_optimizer_v2(model, opt='sam', lr=0.1).state_dict())


def test_bad_sparse_input():
    model = mlp()
    for kwargs, words in ((dict(sparsity=1.0), r'sparsity must be a finite number in \[0, 1\), got 1.0'),
                          (dict(sparsity=float('nan')), 'sparsity must be a finite number'),
                          (dict(mask_update_epochs=0), 'update interval'), (dict(drop_rate=2.0), 'drop_rate')):
        with pytest.raises(ValueError, match=words):
            create_optimizer_v2(model, opt='ssam-d', lr=0.1, **kwargs)
    with pytest.raises(ValueError, match='sparsity is an option of the sparse baselines'):
        create_optimizer_v2(model, opt='sam', lr=0.1, sparsity=0.5)
    with pytest.raises(ValueError, match='SAM-ON'):   # bare parameters: no model to take SAM-ON's sparsity from
        sam_on_timm.SAM(model.parameters(), mask=SparseMask('rand'))
    with pytest.raises(ValueError, match="unknown sparse mask 'random'; valid: rand, fisher, dynamic"):
        SparseMask('random')
    with pytest.raises(ValueError, match="'sam-on': mask_seed is an option of the sparse baselines"):
        create_optimizer_v2(model, opt='sam-on', lr=0.1, mask_seed=3)


# --- ssam-f ---------------------------------------------------------------------------------------------
def gn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).double()


def test_ssam_f_mask_is_the_top_k_of_an_independent_empirical_fisher(one_thread):
    model = gn_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    # reference: per-sample gradients with torch.func, summed squares, float64
    from torch.func import functional_call, grad, vmap
    params = dict(model.named_parameters())

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x[:7], y[:7])   # num_samples = 7
    ref = torch.cat([(per_sample[k] ** 2).sum(0).reshape(-1) for k in params])

    opt = create_optimizer_v2(model, opt='ssam-f', lr=0.1, sparsity=0.6, mask_update_epochs=2, fisher_samples=7)
    assert opt.mask.density() == 0.0   # empty until the first Fisher computation
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    model.eval()   # as after a validation pass: the Fisher passes run in training mode, the mode is put back
    fisher, n = fisher_diagonal(model, opt.perturbed, batches, nn.functional.cross_entropy, 7)
    assert n == 7 and not model.training
    torch.testing.assert_close(torch.cat([f.reshape(-1) for f in fisher]), ref, rtol=1e-10, atol=1e-14)
    calls = []

    def fisher_fn():
        calls.append(1)
        return fisher_diagonal(model, opt.perturbed, batches, nn.functional.cross_entropy, 7)

    assert [opt.mask.epoch_start(e, 10, fisher_fn) for e in range(5)] == [True, False, True, False, True]
    assert len(calls) == 3
    mask = torch.cat([m.reshape(-1) for m in opt.mask.masks]).bool()
    k = live_count(ref.numel(), 0.6)
    assert int(mask.sum()) == k == ref.numel() - round(0.6 * ref.numel())
    assert ref[mask].min() >= ref[~mask].max()   # the k largest Fisher values (ties broken either way)


# --- ssam-d ---------------------------------------------------------------------------------------------
def test_ssam_d_resumed_between_the_request_and_the_update_makes_the_same_update():
    """An epoch's drop-and-regrow is requested at its start and made at its first update; a checkpoint
    written in between (train.py saves at the end of an epoch, a user's loop anywhere) must carry the
    request: the resumed optimizer makes the same update, to the same mask, from the same generator."""
    model = mlp()
    kwargs = dict(opt='ssam-d', lr=0.1, sparsity=0.5, mask_update_epochs=1, drop_rate=0.5, rho=0.1)
    a = create_optimizer_v2(model, mask_seed=1, **kwargs)
    assert a.mask.epoch_start(0, 4)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = create_optimizer_v2(model, mask_seed=2, **kwargs)
    b.load_state_dict(torch.load(buf, weights_only=True))
    before = [m.clone() for m in a.mask.masks]
    grads_of(model, seed=3)
    for opt in (a, b):
        opt.first_step()
        opt.restore()
    assert not all(torch.equal(x, y) for x, y in zip(before, a.mask.masks))   # the update did happen
    assert all(torch.equal(x, y) for x, y in zip(a.mask.masks, b.mask.masks))


def test_ssam_d_keeps_the_live_count_of_a_group_added_later_through_its_updates():
    """A parameter group added later joins the mask at the mask's sparsity; the next drop-and-regrow
    keeps the live count of the whole, grown mask (each part's own live count, summed)."""
    model = mlp()
    first, rest = list(model[0].parameters()), list(model[2].parameters())
    opt = create_optimizer_v2(first, opt='ssam-d', lr=0.1, sparsity=0.5, mask_update_epochs=1, rho=0.1)
    opt.add_param_group({'params': rest})
    count = lambda: sum(int(m.sum()) for m in opt.mask.masks)   # noqa: E731
    sizes = [sum(p.numel() for p in part) for part in (first, rest)]
    want = sum(n - round(0.5 * n) for n in sizes)
    assert count() == want
    for epoch in range(2):
        assert opt.mask.epoch_start(epoch, 4)
        grads_of(model, seed=5 + epoch)
        opt.first_step()
        opt.restore()
        assert opt.mask.pending_drop is None and count() == want


def test_ssam_d_keeps_its_sparsity_and_drops_the_smallest_gradients():
    model = mlp()
    opt = create_optimizer_v2(model, opt='ssam-d', lr=0.1, sparsity=0.7, mask_update_epochs=1, drop_rate=0.5, rho=0.1)
    n = sum(p.numel() for p in model.parameters())
    live = n - round(0.7 * n)
    flat = lambda: torch.cat([m.reshape(-1) for m in opt.mask.masks]).bool()   # noqa: E731
    assert int(flat().sum()) == live
    epochs = 4
    for epoch in range(epochs):
        before = flat()
        assert opt.mask.epoch_start(epoch, epochs)
        g = grads_of(model, seed=10 + epoch)
        score = torch.cat([x.abs().reshape(-1) for x in g])
        opt.first_step()   # the update happens here, scored by this gradient
        opt.second_step(zero_grad=True)
        after = flat()
        assert int(after.sum()) == live   # sparsity kept exactly
        n_drop = int(live * 0.5 * (1 + math.cos(math.pi * epoch / epochs)) / 2)
        dropped, grown = before & ~after, after & ~before
        assert int(dropped.sum()) == int(grown.sum()) == n_drop
        if n_drop:
            assert score[dropped].max() <= score[before & after].min()   # the smallest |g| of the live ones go
    assert opt.mask.pending_drop is None


# --- distributed: the same mask on every rank ------------------------------------------------------------
def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        model = mlp()
        rand = create_optimizer_v2(model, opt='sam-rand', lr=0.1, sparsity=0.9, mask_seed=7)
        dyn = create_optimizer_v2(model, opt='ssam-d', lr=0.1, sparsity=0.5, mask_seed=7, mask_update_epochs=1)
        fish = create_optimizer_v2(model, opt='ssam-f', lr=0.1, sparsity=0.5)
        g = grads_of(model, seed=100 + rank)   # each rank its own gradient
        dyn.mask.epoch_start(0, 10)
        dyn.first_step()
        dyn.restore()
        fish.mask.set_fisher_mask([x * x for x in g])
        torch.save({'rand': rand.mask.state_dict()['mask'], 'dyn': dyn.mask.state_dict()['mask'],
                    'fish': fish.mask.state_dict()['mask'], 'g': g}, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available() or sys.platform == 'win32',
                    reason='needs torch.distributed gloo')
def test_masks_are_identical_on_two_gloo_ranks(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_rank_main, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    assert not all(torch.equal(a, b) for a, b in zip(r0['g'], r1['g']))   # the ranks saw different gradients
    for key in ('rand', 'dyn', 'fish'):
        assert torch.equal(r0[key], r1[key]), key
    # ssam-f: the top half of the Fisher summed over both ranks
    f = torch.cat([(a * a + b * b).reshape(-1) for a, b in zip(r0['g'], r1['g'])])
    assert f[r0['fish']].min() >= f[~r0['fish']].max() and int(r0['fish'].sum()) == f.numel() - round(0.5 * f.numel())


# --- train.py ---------------------------------------------------------------------------------------------
BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '8', '--device', 'cpu', '--workers',
        '0', '--epochs', '2', '--warmup-epochs', '0', '--lr', '0.05', '--val-split', '', '--log-interval', '1']


def test_sam_rand_resume_keeps_the_mask(image_folder, tmp_path, one_thread):
    """A resumed sam-rand run continues with the checkpoint's mask (the resumed run is given another
    seed, which would draw another mask) and ends where the uninterrupted run ends."""
    def run(*extra):
        return train.main(['--data-dir', image_folder, '--output', str(tmp_path), *BASE, '--opt', 'sam-rand',
                           '--sam-sparsity', '0.5', *extra])
    assert run('--experiment', 'full', '--seed', '3') == 0
    assert run('--experiment', 'part', '--seed', '3', '--stop-epoch', '1') == 0
    assert run('--experiment', 'part', '--seed', '4', '--resume', str(tmp_path / 'part' / 'last.pth.tar')) == 0
    full, part = (torch.load(tmp_path / e / 'last.pth.tar', weights_only=True) for e in ('full', 'part'))
    assert torch.equal(full['optimizer']['sam_mask']['mask'], part['optimizer']['sam_mask']['mask'])
    assert all(torch.equal(full['state_dict'][k], part['state_dict'][k]) for k in full['state_dict'])


def test_train_script_sparse_flags(image_folder, tmp_path, capsys):
    base = ['--data-dir', image_folder, '--output', str(tmp_path), *BASE, '--experiment', 'x']
    for extra in (['--opt', 'sam', '--sam-sparsity', '0.5'], ['--opt', 'ssam-f', '--sam-sparsity', '1'],
                  ['--opt', 'ssam-d', '--sam-mask-update', '0']):
        assert train.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ('--sam-sparsity' in err[0] or '--sam-mask-update' in err[0]), err
    # ssam-f on a model whose last BatchNorm sees a 1x1 map: one sample cannot pass it, one clear line
    assert train.main(base + ['--opt', 'ssam-f', '--ssam-fisher-samples', '2']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ssam-f: one sample cannot pass' in err[0]


def test_ssam_f_fisher_takes_the_batches_the_updates_take(image_folder, tmp_path, monkeypatch, one_thread):
    """ssam-f's Fisher pass reads the training loader as the updates do: in the model's dtype (--model-dtype;
    float32 images into a bfloat16 model were a traceback) and with --resplit's batch erasing, which leaves the
    clean first half of each batch unerased."""
    import sam_on_timm.sparse as sparse
    seen, fisher = [], sparse.fisher_diagonal

    def spy(model, params, batches, loss_fn, num_samples):
        def recorded():
            for x, y in batches:
                seen.append(x.detach().clone())
                yield x, y
        return fisher(model, params, recorded(), loss_fn, num_samples)
    monkeypatch.setattr(sparse, 'fisher_diagonal', spy)
    args = ['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'f', '--model', 'test_resnet',
            '--img-size', '64', '-b', '8', '--device', 'cpu', '--workers', '0', '--epochs', '1', '--warmup-epochs',
            '0', '--lr', '0.05', '--opt', 'ssam-f', '--ssam-fisher-samples', '8', '--model-dtype', 'bfloat16',
            '--resplit', '--reprob', '1', '--remode', 'const', '--mean', '0.5', '0.5', '0.5', '--std', '1', '1', '1']
    assert train.main(args) == 0
    assert seen and all(x.dtype == torch.bfloat16 for x in seen)
    x = seen[0]
    zeros = (x == 0).all(dim=1).flatten(1).sum(1)   # erased pixels (const mode: 0 in every channel) per image
    assert (zeros[:4] == 0).all() and (zeros[4:] > 0).all(), zeros


# --- the mask's own rules -----------------------------------------------------------------------------
def test_mask_settings_out_of_range_are_refused_and_the_edges_taken():
    """One line naming the setting, for a sparse name's own arguments; the edge values themselves pass."""
    model = mlp()
    for kwargs, words in ((dict(fisher_samples=0), 'fisher_samples must be a positive integer, got 0'),
                          (dict(fisher_samples=2.0), 'fisher_samples must be a positive integer, got 2.0'),
                          (dict(drop_rate=-0.1), r'^drop_rate must be a finite number in \[0, 1\], got -0.1')):
        with pytest.raises(ValueError, match=words):
            create_optimizer_v2(model, opt='ssam-f', lr=0.1, **kwargs)
    for kwargs in (dict(fisher_samples=1), dict(drop_rate=0.0), dict(drop_rate=1.0), dict(sparsity=0.0)):
        assert create_optimizer_v2(model, opt='ssam-f', lr=0.1, **kwargs).mask is not None


def test_live_count_keeps_at_least_one_element_and_no_more():
    """N - round(N s), but never an empty mask; a sparsity that leaves one element leaves one."""
    assert [live_count(10, s) for s in (0.0, 0.5, 0.94, 0.96, 0.99)] == [10, 5, 1, 1, 1]
    opt = create_optimizer_v2(nn.Linear(3, 3), opt='sam-rand', lr=0.1, sparsity=0.95)   # 12 elements
    assert sum(int(m.sum()) for m in opt.mask.masks) == 1 and opt.mask.density() == pytest.approx(1 / 12)


def test_sam_rand_mask_never_changes_at_the_epoch_starts():
    """sam-rand's mask is drawn once: no epoch start asks for a drop-and-regrow, and the perturbations of
    the following updates leave it as it was."""
    model = mlp()
    opt = create_optimizer_v2(model, opt='sam-rand', lr=0.1, sparsity=0.5, mask_update_epochs=1, rho=0.1)
    before = [m.clone() for m in opt.mask.masks]
    assert opt.mask.density() == pytest.approx(0.5, abs=1 / opt.mask.numel)
    for epoch in range(3):
        assert opt.mask.epoch_start(epoch, 3) is False and opt.mask.pending_drop is None
        grads_of(model, seed=epoch)
        opt.first_step()
        opt.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, opt.mask.masks))


@pytest.mark.parametrize('name', ['sam-rand', 'ssam-d', 'ssam-f'])
def test_tensors_added_later_join_the_mask_seeded_and_counted(name):
    """A group added later: one-element tensors included, each joins the mask (sam-rand / ssam-d: drawn from the
    mask's own generator, so the same whatever the global RNG; ssam-f: none of them perturbed until its next
    Fisher mask, which then ranks all elements together). An empty group changes nothing."""
    masks = []
    for global_seed in (1, 2):
        model = mlp()
        extra = [nn.Parameter(torch.randn(1)), nn.Parameter(torch.randn(7))]
        opt = create_optimizer_v2(model, opt=name, lr=0.1, sparsity=0.5, mask_seed=4)
        live, numel = opt.mask.live, opt.mask.numel
        torch.manual_seed(global_seed)
        opt.add_param_group({'params': extra})
        opt.adopt_new_groups()
        assert len(opt.mask.masks) == len(opt.perturbed) == len(list(model.parameters())) + 2
        assert opt.mask.numel == numel + 8
        new = opt.mask.masks[-2:]
        if name == 'ssam-f':
            assert opt.mask.live == live_count(numel + 8, 0.5) and not any(m.any() for m in new)
        else:
            assert opt.mask.live == live + live_count(1, 0.5) + live_count(7, 0.5)
            assert [int(m.sum()) for m in new] == [1, live_count(7, 0.5)]
        before = opt.mask.live
        opt.add_param_group({'params': []})
        opt.adopt_new_groups()
        assert opt.mask.live == before and opt.mask.numel == numel + 8
        masks.append([m.clone() for m in opt.mask.masks])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_fisher_of_a_tensor_the_loss_does_not_reach_is_zero():
    """ssam-f over P with a tensor outside the graph (an unused head, say): its Fisher is 0, no error."""
    model = mlp(torch.float64)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = list(model.parameters()) + [unused]
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    fisher, n = fisher_diagonal(model, params, [(x, y)], nn.functional.cross_entropy, 3)
    assert n == 3 and torch.equal(fisher[-1], torch.zeros(3, dtype=torch.float64))
    want = [torch.zeros_like(p) for p in params[:-1]]
    for i in range(3):   # sum over the first three samples, each alone
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params[:-1])
        want = [w + gi * gi for w, gi in zip(want, g)]
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f, w, rtol=1e-12, atol=0)
