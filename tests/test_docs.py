"""The README and docs as written: every fenced ```python block runs, clean, in a fresh interpreter;
the README's example outputs are what the commands print.

A block that is not meant to run is written as an indented block or fenced with another language.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
FENCE = re.compile(r'^```python\n(.*?)^```$', re.S | re.M)


def python_blocks():
    out = []
    for path in DOCS:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        for i, m in enumerate(FENCE.finditer(text)):
            line = text[:m.start()].count('\n') + 1
            out.append(pytest.param(m.group(1), id=f'{os.path.relpath(path, ROOT)}:{line}'))
    return out


def test_the_docs_have_python_blocks():
    # the README's API block at least; a renamed fence would otherwise make the test below run nothing
    assert any('README.md' in p.id for p in python_blocks())


@pytest.mark.parametrize('code', python_blocks())
def test_python_block_runs_clean(code, tmp_path):
    r = subprocess.run([sys.executable, '-W', 'default', '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    # a block that warns as written (autocast for a device that is not there, a deprecated call) is stale
    assert 'Warning' not in r.stderr, r.stderr[-3000:]


def test_norm_params_tool_prints_the_readme_line(tmp_path):
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    m = re.search(r'^\s+python -m sam_on_timm\.norm_params (\S+)\n\s+# \.\.\. (.+)$', readme, re.M)
    assert m, 'the README no longer shows the norm_params example'
    r = subprocess.run([sys.executable, '-W', 'default', '-m', 'sam_on_timm.norm_params', m.group(1)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'PYTHONPATH': ROOT})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == m.group(2).strip()
    assert r.stderr == '', r.stderr   # runpy's "found in sys.modules" RuntimeWarning among them


def _block(text, name):
    m = re.search(rf'<!-- demo:{name} -->\n(.*?)<!-- demo:{name} end -->', text, re.S)
    assert m, f'the generated block demo:{name} is missing'
    return m.group(1)


def test_demo_numbers_have_one_source():
    """The README's demo line and docs/analysis.md's table are the blocks docs/make_figures.py writes from
    the same runs: the same top-1 per run, the same date and machine."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = _block(f.read(), 'readme')
    with open(os.path.join(ROOT, 'docs', 'analysis.md'), encoding='utf-8') as f:
        analysis = f.read()
    table = _block(analysis, 'table')
    assert _block(analysis, 'gamma').count('\n') == 5   # header, rule, three runs
    by_epoch = re.search(r'^\| held-out top-1 \(%\), by epoch \| (.+) \|$', table, re.M).group(1).split(' | ')
    final = [float(cell.split(' / ')[-1]) for cell in by_epoch]
    quoted = [float(v) for v in re.findall(r'`(?:sgd|sam|sam-on)` ([0-9.]+)% held-out top-1', readme)]
    assert quoted == final and len(final) == 3
    made = re.search(r'Made by `python docs/make_figures.py` on (\S+), (.+)\.\n', table)
    assert made and f'{made.group(1)}, {made.group(2)}' in readme
    # the README quotes no other demo accuracy outside the generated block
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        outside = f.read().replace(readme, '')
    assert not re.search(r'\b9[0-9]\.[0-9]% held-out', outside)
