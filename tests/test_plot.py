"""python -m sam_on_timm.plot: the numbers behind each figure (sam_on_timm.plot). Skipped without matplotlib."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip('matplotlib')

from sam_on_timm.plot import main, plot_curves, plot_norms, plot_sharpness  # noqa: E402

PNG = b'\x89PNG\r\n\x1a\n'


def _is_png(path):
    with open(path, 'rb') as f:
        return f.read(8) == PNG


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    import timm
    root = tmp_path_factory.mktemp('ckpts')
    paths = []
    for i, name in enumerate(('run-a', 'run-b')):
        torch.manual_seed(i)
        model = timm.create_model('test_resnet', num_classes=3)
        with torch.no_grad():   # distinct, non-trivial gamma / beta per run
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.2 + i, 1.5 + i)
                    m.bias.normal_(0.0, 0.1)
        (root / name).mkdir()
        path = root / name / 'last.pth.tar'
        torch.save({'arch': 'test_resnet', 'state_dict': model.state_dict(),
                    'args': {'model': 'test_resnet', 'num_classes': 3}}, path)
        paths.append(str(path))
    return paths


def _affine_from_file(path):
    """gamma / beta straight from the checkpoint's tensors: a BatchNorm is a prefix with a running_mean."""
    sd = torch.load(path, weights_only=True)['state_dict']
    prefixes = [k[:-len('.running_mean')] for k in sd if k.endswith('.running_mean')]
    gamma = np.concatenate([sd[p + '.weight'].double().numpy().ravel() for p in prefixes])
    beta = np.concatenate([sd[p + '.bias'].double().numpy().ravel() for p in prefixes])
    return gamma, beta


def test_norm_histograms_match_checkpoint_tensors(checkpoints, tmp_path):
    out = tmp_path / 'norms.png'
    res = plot_norms(checkpoints, str(out), bins=17)
    assert _is_png(out) and _is_png(tmp_path / 'norms-layers.png')
    values = dict(zip(('run-a', 'run-b'), (_affine_from_file(p) for p in checkpoints)))
    for k, key in enumerate(('gamma', 'beta')):
        edges = res['affine'][key]['edges']
        every = np.concatenate([v[k] for v in values.values()])
        assert len(edges) == 18 and edges[0] == every.min() and edges[-1] == every.max()
        for name, v in values.items():
            counts = res['affine'][key]['counts'][name]
            assert np.array_equal(counts, np.histogram(v[k], bins=edges)[0])
            assert counts.sum() == v[k].size
    s = res['gamma_summary']['run-b']
    g = values['run-b'][0]
    assert s['count'] == g.size and s['mean'] == pytest.approx(g.mean()) and s['median'] == pytest.approx(np.median(g))
    assert res['gamma_summary']['run-b']['mean'] > res['gamma_summary']['run-a']['mean'] + 0.5
    # per layer type: |w| of the BatchNorm weights, the same tensors
    bn = res['layers']['BatchNorm2d.weight']
    assert np.array_equal(bn['counts']['run-a'], np.histogram(np.abs(values['run-a'][0]), bins=bn['edges'])[0])
    assert 'Conv2d.weight' in res['layers']


def _write_summary(folder, rows):
    folder.mkdir()
    with open(folder / 'summary.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_curves_draw_the_summary_columns(tmp_path):
    sgd = [dict(epoch=e, train_loss=1.0 / (e + 1), eval_loss=0.5, eval_top1=80 + e, lr=0.1) for e in range(3)]
    sam = [dict(epoch=e, train_loss=1.2 / (e + 1), train_ascent_loss=1.1 / (e + 1), train_sharpness=0.1 * e,
                train_eps_norm=0.05, eval_loss=0.4,
                eval_top1=81 + e, lr=0.1) for e in range(3)]
    _write_summary(tmp_path / 'sgd', sgd)
    _write_summary(tmp_path / 'sam', sam)
    out = tmp_path / 'c.png'
    drawn = plot_curves([str(tmp_path / 'sgd'), str(tmp_path / 'sam')], str(out))
    assert _is_png(out)
    assert drawn['eval_top1'] == {'sgd': [80.0, 81.0, 82.0], 'sam': [81.0, 82.0, 83.0]}
    assert drawn['train_sharpness'] == {'sam': [0.0, 0.1, 0.2]}   # SGD logs no sharpness
    # the unperturbed loss L(w) of both: SGD's train_loss, SAM's train_ascent_loss (its train_loss is L(w + eps))
    assert drawn['train_loss'] == {'sgd': [1.0, 0.5, 1.0 / 3], 'sam': [1.1, 0.55, 1.1 / 3]}


def test_sharpness_plot_reads_results(tmp_path):
    files = []
    for name, params, worst, top1 in (('sgd', 'all', 0.2, 97.0), ('sam-on', 'all', 0.3, 98.0),
                                      ('sam-on', 'on', 0.05, 98.0)):
        r = dict(name=name, params=params, sharpness={'worst': worst, 'one-step': worst / 2}, checkpoint_metric=top1,
                 clean_top1=99.0, p='inf', adaptive=True, rho=0.005, m=128, normalize_logits=True)
        files.append(tmp_path / f'{name}-{params}.json')
        files[-1].write_text(json.dumps(r))
    out = tmp_path / 's.png'
    drawn = plot_sharpness([str(f) for f in files], str(out))
    assert _is_png(out)
    assert drawn['sharpness']['worst'] == {'all': {'sgd': 0.2, 'sam-on': 0.3}, 'on': {'sam-on': 0.05}}
    assert drawn['top1']['sam-on']['held-out'] == 98.0
    # results at another radius, or twice the same run and set, are refused
    other = json.loads(files[0].read_text())
    other['rho'] = 0.01
    (tmp_path / 'other.json').write_text(json.dumps(other))
    with pytest.raises(Exception, match='differ in rho'):
        plot_sharpness([str(files[1]), str(tmp_path / 'other.json')], str(out))
    with pytest.raises(Exception, match="two results for run 'sgd'"):
        plot_sharpness([str(files[0]), str(files[0])], str(out))


def test_cli_errors_one_line(tmp_path, capsys):
    assert main(['curves', str(tmp_path), '--output', str(tmp_path / 'x.png')]) == 2
    bad = tmp_path / 'bad.json'
    bad.write_text('{"x": 1}')
    assert main(['sharpness', str(bad), '--output', str(tmp_path / 'y.png')]) == 2
    assert main(['norms', str(tmp_path / 'missing.pth.tar'), '--output', str(tmp_path / 'z.png')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and 'no summary.csv' in err[0] and 'not a result' in err[1] and 'not a file' in err[2]


def test_default_output_beside_the_inputs(tmp_path, monkeypatch, checkpoints):
    # never the current folder: curves of two runs go to their common folder, norms beside the checkpoints
    sgd = [dict(epoch=e, train_loss=1.0, eval_top1=80 + e) for e in range(2)]
    _write_summary(tmp_path / 'a', sgd)
    _write_summary(tmp_path / 'b', sgd)
    cwd = tmp_path / 'elsewhere'
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(['curves', str(tmp_path / 'a'), str(tmp_path / 'b')]) == 0
    assert _is_png(tmp_path / 'curves.png')
    assert main(['curves', str(tmp_path / 'a')]) == 0
    assert _is_png(tmp_path / 'a' / 'curves.png')
    assert main(['norms', checkpoints[0]]) == 0
    folder = checkpoints[0].rsplit('/', 1)[0]
    assert _is_png(f'{folder}/norms.png') and _is_png(f'{folder}/norms-layers.png')
    assert list(cwd.iterdir()) == []


def test_sharpness_plot_has_no_panel_for_an_uncomputed_metric(tmp_path):
    files = []
    for name, sharp in (('sgd', {'worst': 8e-6, 'one-step': 4e-6, 'average': None}),
                        ('sam', {'worst': 9e-6, 'one-step': 5e-6})):
        r = dict(name=name, params='on', sharpness=sharp, checkpoint_metric=90.0, clean_top1=99.0, p='inf',
                 adaptive=True, rho=0.005, m=128, normalize_logits=True)
        files.append(tmp_path / f'{name}.json')
        files[-1].write_text(json.dumps(r))
    import matplotlib.axes
    labels = []
    real = matplotlib.axes.Axes.bar_label

    def spy(self, container, *a, **k):
        out = real(self, container, *a, **k)
        labels.extend(t.get_text() for t in out)
        return out
    matplotlib.axes.Axes.bar_label = spy
    try:
        drawn = plot_sharpness([str(f) for f in files], str(tmp_path / 's.png'))
    finally:
        matplotlib.axes.Axes.bar_label = real
    assert list(drawn['sharpness']) == ['worst', 'one-step']   # 'average' (null) gets no panel
    # small values keep their digits (8e-06, not 0.0000)
    assert '8e-06' in labels and '4e-06' in labels and not any(t.startswith('0.0000') for t in labels)
