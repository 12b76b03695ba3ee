#!/usr/bin/env python3
"""Regenerate every demo number, table and figure of the docs, in one command:

    python docs/make_figures.py            # about 10 min on an idle 2-core CPU; needs '.[demo,plot]'

It trains the three demos (`hparams/demo/{sgd,sam,sam-on}.yaml`) into `output/figures/{sgd,sam,sam-on}`,
measures their sharpness (l-inf adaptive, rho 0.005, 512 training examples, `--params all` and `on`),
draws `docs/figures/*.png` (each with a caption naming the date, machine and this command), and rewrites
the generated blocks of `README.md` and `docs/analysis.md` (between `<!-- demo:... -->` markers) with
the numbers of these runs. Nothing in those blocks is typed by hand, so the README, the analysis page and
the figures always show the same runs.

`--reuse` keeps runs and sharpness results already in `--out` (to redraw after a change of the plots).
"""
import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # this checkout's sam_on_timm, as train.py (run from ROOT) uses, not another install
RUNS = ('sgd', 'sam', 'sam-on')
LABEL = {'sgd': 'SGD', 'sam': 'SAM', 'sam-on': 'SAM-ON (`sam-on-layerl2`)'}
SHARPNESS = ['--n-examples', '512', '--metrics', 'worst,one-step', '--quiet']   # rho 0.005, l-inf adaptive
COMMAND = 'python docs/make_figures.py'


def machine() -> str:
    """CPU model, cores, torch / timm versions: a figure's provenance (each run's load is in its timing)."""
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    import timm
    import torch
    return f'{os.cpu_count()}-core {model}, torch {torch.__version__.split("+")[0]}, timm {timm.__version__}'


def run(cmd: List[str]) -> float:
    print('+', ' '.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - t0


def last_row(run_dir: str) -> Dict[str, float]:
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    return {'top1': [float(r['eval_top1']) for r in rows],
            'eps': float(rows[-1]['train_eps_norm']) if rows[-1].get('train_eps_norm') else None}


def block(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- demo:NAME -->`` and ``<!-- demo:NAME end -->`` replaced."""
    pattern = re.compile(rf'(<!-- demo:{name} -->\n).*?(<!-- demo:{name} end -->)', re.S)
    if not pattern.search(text):
        raise SystemExit(f'make_figures: no <!-- demo:{name} --> block to rewrite')
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def wall(run: dict) -> str:
    load = run.get('load')
    return f"{run['seconds']:.0f}" + (f' (load {load:.1f})' if load is not None else ' (load not recorded)')


def tables(runs: Dict[str, dict], when: str, where: str) -> Dict[str, str]:
    def cell(name, params, key, fmt):
        v = runs[name]['sharpness'][params]['sharpness'].get(key)
        return format(v, fmt) if v is not None else '-'
    head = '| | ' + ' | '.join(LABEL[n] for n in RUNS) + ' |\n|---|' + '---|' * len(RUNS) + '\n'
    rows = [('held-out top-1 (%), by epoch', [' / '.join(f'{t:.1f}' for t in runs[n]['top1']) for n in RUNS]),
            ('mean ‖eps‖ in the last epoch (rho 0.05)', [f"{runs[n]['eps']:.3f}" if runs[n]['eps'] is not None
                                                         else '-' for n in RUNS]),
            ('training wall time (s), the load average at its start', [wall(runs[n]) for n in RUNS])]
    for params in ('all', 'on'):
        count = runs['sgd']['sharpness'][params]['n_params']
        rows.append((f'worst-case sharpness, `--params {params}` ({count:,} parameters)',
                     [cell(n, params, 'worst', '.4g') for n in RUNS]))
        rows.append((f'1-step sharpness, `--params {params}`', [cell(n, params, 'one-step', '.4g') for n in RUNS]))
    rows.append(('clean loss (normalised logits) / top-1 on these examples',
                 [f"{runs[n]['sharpness']['all']['clean_loss']:.3f} / {runs[n]['sharpness']['all']['clean_top1']:.1f}"
                  for n in RUNS]))
    rows.append(('sharpness wall time, `all` / `on` (s)',
                 [f"{runs[n]['sharpness']['all']['seconds']:.0f} / {runs[n]['sharpness']['on']['seconds']:.0f}"
                  for n in RUNS]))
    demo = head + ''.join(f'| {k} | ' + ' | '.join(v) + ' |\n' for k, v in rows)
    gamma = ('| gamma | mean | std | q25 | median | q75 | max | share > 1 |\n|---|---|---|---|---|---|---|---|\n' +
             ''.join(f"| {LABEL[n]} | {g['mean']:.3f} | {g['std']:.3f} | {g['q25']:.3f} | {g['median']:.3f} | "
                     f"{g['q75']:.3f} | {g['max']:.3f} | {100 * g['frac_above_1']:.1f}% |\n"
                     for n, g in ((n, runs[n]['gamma']) for n in RUNS)))
    provenance = f'Made by `{COMMAND}` on {when}, {where}.\n'
    readme = (f'**Demo** (`hparams/demo/`, MNIST-5k on CPU, resnet18 at 32 px, 3 epochs, one seed each; {when}, '
              f'{where}): ' + ', '.join(f"`{n}` {runs[n]['top1'][-1]:.1f}% held-out top-1 in "
                                        f"{runs[n]['seconds']:.0f} s" for n in RUNS) +
              '. The `sam-on` demo runs `sam-on-layerl2` at rho 0.05. Wall times depend on what else the machine '
              'runs (`docs/analysis.md` gives the load each run started at). Differences of a few tenths are within '
              'seed noise; `docs/analysis.md` has the sharpness of the three models, and '
              f'`{COMMAND}` remakes these numbers.\n')
    return {'table': provenance + '\n' + demo, 'gamma': gamma, 'readme': readme}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=os.path.join(ROOT, 'output', 'figures'), help='where the runs go')
    ap.add_argument('--reuse', action='store_true', help='keep runs and results already in --out')
    args = ap.parse_args(argv)
    from sam_on_timm.plot import plot_curves, plot_norms, plot_sharpness
    when, where = datetime.date.today().isoformat(), machine()
    caption = f'{COMMAND}, {when}, {where}'
    runs = {}
    for name in RUNS:
        run_dir = os.path.join(args.out, name)
        ckpt = os.path.join(run_dir, 'last.pth.tar')
        timing = os.path.join(run_dir, 'make_figures.json')
        if not (args.reuse and os.path.isfile(ckpt) and os.path.isfile(timing)):
            if os.path.isdir(run_dir):
                raise SystemExit(f"make_figures: '{run_dir}' exists: remove it, or pass --reuse")
            load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
            seconds = run([sys.executable, 'train.py', '-c', f'hparams/demo/{name}.yaml', '--output', args.out,
                           '--experiment', name])
            with open(timing, 'w') as f:
                json.dump({'seconds': seconds, 'load': load, 'omp_threads': os.environ.get('OMP_NUM_THREADS')}, f)
        with open(timing) as f:
            runs[name] = {**last_row(run_dir), **json.load(f), 'sharpness': {}}
        for params in ('all', 'on'):
            out = os.path.join(run_dir, f'sharpness-{params}.json')
            if not (args.reuse and os.path.isfile(out)):
                run([sys.executable, '-m', 'sam_on_timm.sharpness', '--checkpoint', ckpt, '--params', params,
                     *SHARPNESS, '--output', out])
            with open(out) as f:
                runs[name]['sharpness'][params] = json.load(f)
    figures = os.path.join(ROOT, 'docs', 'figures')
    dirs = [os.path.join(args.out, n) for n in RUNS]
    plot_curves(dirs, os.path.join(figures, 'curves.png'), caption)
    norms = plot_norms([os.path.join(d, 'last.pth.tar') for d in dirs], os.path.join(figures, 'norms.png'),
                       caption=caption)
    for n in RUNS:
        runs[n]['gamma'] = norms['gamma_summary'][n]
    plot_sharpness([os.path.join(d, f'sharpness-{p}.json') for d in dirs for p in ('all', 'on')],
                   os.path.join(figures, 'sharpness.png'), caption)
    text = tables(runs, when, where)
    for path, names in (('docs/analysis.md', ('table', 'gamma')), ('README.md', ('readme',))):
        full = os.path.join(ROOT, path)
        with open(full, encoding='utf-8') as f:
            doc = f.read()
        for name in names:
            doc = block(doc, name, text[name])
        with open(full, 'w', encoding='utf-8') as f:
            f.write(doc)
        print(f'rewrote the demo blocks of {path}')
    print(f'wrote {figures}/curves.png, norms.png, norms-layers.png, sharpness.png')
    return 0


if __name__ == '__main__':
    sys.exit(main())
