"""Smoke tests of the benchmark scripts: seconds-long runs on a tiny timm model."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'step_cost.py')
REQUIRED = {'opt', 'ms_median', 'ms_min', 'ms_max', 'peak_mem_mb', 'ratio_sgd'}


def _run(tmp_path, *extra):
    out = tmp_path / 'rows.json'
    cmd = [sys.executable, SCRIPT, '--device', 'cpu', '--model', 'test_resnet', '--img-size', '32',
           '--batch-size', '4', '--opts', 'sgd,sam-on', '--steps', '2', '--warmup', '1', '--threads', '1',
           '--json', str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    assert [row['opt'] for row in rows] == ['sgd', 'sam-on']
    for row in rows:
        assert REQUIRED <= set(row), row
        for key in ('ms_median', 'ms_min', 'ms_max'):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row['ms_min'] <= row['ms_median'] <= row['ms_max']
        assert isinstance(row['ratio_sgd'], float) and math.isfinite(row['ratio_sgd']) and row['ratio_sgd'] > 0
    assert rows[0]['ratio_sgd'] == 1.0
    assert 'sam-on' in r.stdout and 'x SGD' in r.stdout   # the table
    return rows


def test_step_cost_smoke(tmp_path):
    rows = _run(tmp_path)
    for row in rows:   # CPU default: peak RSS increase measured in a fresh subprocess
        assert isinstance(row['peak_mem_mb'], float) and row['peak_mem_mb'] >= 0


def test_step_cost_smoke_options(tmp_path):
    # later flags win in argparse: batch 8 in chunks of 4, ascent on 2 samples per chunk
    rows = _run(tmp_path, '--cpu-mem', 'none', '--schedule', 'block', '--rounds', '2', '--batch-size', '8',
                '--sam-m', '4', '--sam-ascent-frac', '0.5', '--amp-dtype', 'bfloat16', '--channels-last')
    for row in rows:
        assert row['peak_mem_mb'] is None
        assert row['n_samples'] == 4


def test_perturb_cost_smoke():
    """benchmarks/perturb_cost.py runs both code paths and reports the flat one's fixed op count."""
    script = os.path.join(ROOT, 'benchmarks', 'perturb_cost.py')
    r = subprocess.run([sys.executable, script, '--model', 'test_resnet', '--opts', 'sam-on,sam-on-layerl2',
                        '--iters', '2', '--repeats', '1'], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split('|')[1:-1] for line in r.stdout.splitlines() if line.startswith('| sam')]
    assert [(c[0].strip(), c[1].strip()) for c in rows] == [
        ('sam-on', 'per-tensor'), ('sam-on', 'flat'), ('sam-on-layerl2', 'per-tensor'), ('sam-on-layerl2', 'flat')]
    for c in rows:
        assert int(c[2]) == 30 and int(c[3]) > 0 and float(c[4]) > 0
    assert all(int(flat[3]) < int(per[3]) for per, flat in (rows[0:2], rows[2:4]))
