"""Figures of SAM / SAM-ON runs (PNG; needs matplotlib: pip install 'sam-on-timm[plot]').

    python -m sam_on_timm.plot curves RUN_DIR...        # summary.csv of each run, side by side per epoch
    python -m sam_on_timm.plot norms CHECKPOINT...      # gamma / beta of the norm layers; |w| per layer type
    python -m sam_on_timm.plot sharpness JSON...        # results of python -m sam_on_timm.sharpness, and top-1

Legends name each run by its folder (a checkpoint's or a JSON's). docs/analysis.md shows examples.
"""
import csv
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .norms import is_norm_module
from .options import ArgumentParser
from .outputs import check_output_file

__all__ = ['read_summary', 'load_checkpoint_model', 'norm_affine', 'layer_type_values', 'shared_histograms',
           'gamma_summary', 'plot_curves', 'plot_norms', 'plot_sharpness', 'main']

# for SAM runs train_loss (the logged `loss`) is the descent loss L(w + eps); the panel shows L(w) for every run:
# train_ascent_loss for SAM runs, train_loss for the others (the same quantity), and its title says so
CURVES = (('eval_top1', 'eval top-1 (%)'),
          ('train_loss', 'train loss L(w), unperturbed\n(SAM runs: train_ascent_loss, not the logged L(w+eps))'),
          ('train_sharpness', '1-step train sharpness L(w+eps) - L(w)'), ('train_eps_norm', '||eps||_2'))


class UsageError(Exception):
    """Bad command-line input: one line for the user, no traceback."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install 'sam-on-timm[plot]'") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, output: str, caption: str = '') -> None:
    """Write the figure; ``caption`` (say, the date, machine and command that made it) goes under it, so a
    figure copied elsewhere still says where it came from."""
    if caption:
        fig.text(0.005, 0.005, caption, fontsize=6.5, color='0.35', ha='left', va='bottom', wrap=True)
        fig.tight_layout(rect=(0, 0.045 * (1 + caption.count('\n')), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)


def _run_name(path: str) -> str:
    """The folder a run's files live in (the train.py run folder)."""
    full = os.path.abspath(path)
    return os.path.basename(full if os.path.isdir(full) else os.path.dirname(full))


# ------------------------------------------------------------------------------------------------
# curves
# ------------------------------------------------------------------------------------------------
def read_summary(run_dir: str) -> Dict[str, List[float]]:
    """The columns of ``RUN_DIR/summary.csv`` as float lists (empty cells: nan)."""
    path = os.path.join(run_dir, 'summary.csv') if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise UsageError(f"'{run_dir}' holds no summary.csv (pass train.py run folders)")
    try:
        with open(path, newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:   # train.py writes UTF-8: another file, or a damaged one
        raise UsageError(f"'{path}' is not a UTF-8 text file (byte 0x{e.object[e.start]:02x}: {e.reason}): "
                         f"pass a summary.csv written by train.py") from None
    except csv.Error as e:
        raise UsageError(f"'{path}' is not a CSV file ({e})") from None
    if not rows:
        raise UsageError(f"'{path}' has no epochs")
    cols = {}
    for k in rows[0]:
        try:
            cols[k] = [float(r[k]) if r[k] not in ('', None) else float('nan') for r in rows]
        except ValueError:
            continue   # a text column
    return cols


def plot_curves(run_dirs: Sequence[str], output: str, caption: str = '') -> Dict[str, Dict[str, List[float]]]:
    """One figure, a panel per quantity of ``CURVES``, a line per run. Returns what was drawn."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    runs = OrderedDict((_run_name(d), read_summary(d)) for d in run_dirs)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    drawn = {}
    for ax, (col, label) in zip(axes, CURVES):
        drawn[col] = {}
        for i, (name, cols) in enumerate(runs.items()):   # a run keeps its colour in every panel
            src = 'train_ascent_loss' if col == 'train_loss' and 'train_ascent_loss' in cols else col
            if src in cols and 'epoch' in cols:
                ax.plot(cols['epoch'], cols[src], marker='o', label=name, color=f'C{i}')
                drawn[col][name] = cols[src]
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label, fontsize=10)
        if not drawn[col]:
            ax.text(0.5, 0.5, 'no SAM run', ha='center', va='center', transform=ax.transAxes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(plt, fig, output, caption)
    return drawn


# ------------------------------------------------------------------------------------------------
# norms
# ------------------------------------------------------------------------------------------------
def load_checkpoint_model(path: str, model_name: str = '', num_classes: Optional[int] = None) -> nn.Module:
    """A timm model with a checkpoint's weights (a train.py checkpoint names its model; else ``model_name``)."""
    import argparse as _argparse

    import timm
    from timm.models import clean_state_dict
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' is not a file")
    try:
        with torch.serialization.safe_globals([_argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint '{path}' cannot be read: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"checkpoint '{path}' holds no state dict")
    targs = ckpt.get('args') or {}
    targs = targs if isinstance(targs, dict) else vars(targs)
    name = model_name or targs.get('model') or ckpt.get('arch', '')
    if not name:
        raise UsageError(f"checkpoint '{path}' does not name its model: pass --model NAME")
    n_cls = num_classes if num_classes is not None else targs.get('num_classes')
    try:
        model = timm.create_model(name, in_chans=targs.get('in_chans') or 3,
                                  **({} if n_cls is None else dict(num_classes=n_cls)))
        state = ckpt['state_dict'] if 'state_dict' in ckpt else ckpt
        model.load_state_dict(clean_state_dict(state))
    except Exception as e:
        raise UsageError(f"checkpoint '{path}' does not fit model '{name}' (--model, --num-classes): "
                         f"{str(e).splitlines()[0]}") from None
    return model


def norm_affine(model: nn.Module) -> Dict[str, np.ndarray]:
    """All gamma (a norm layer's ``weight``) and all beta (its ``bias``) values, selected by module type
    as SAM-ON selects them, each concatenated in model order."""
    out = {'gamma': [], 'beta': []}
    for module in model.modules():
        if is_norm_module(module):
            for attr, key in (('weight', 'gamma'), ('bias', 'beta')):
                p = module._parameters.get(attr)
                if p is not None:
                    out[key].append(p.detach().flatten().double().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def layer_type_values(model: nn.Module) -> Dict[str, np.ndarray]:
    """|w| of every parameter, grouped as '<module type>.<parameter name>' (norm layers first)."""
    groups: Dict[str, list] = OrderedDict()
    mods = sorted(model.modules(), key=lambda m: not is_norm_module(m))   # stable: model order within each
    seen = set()
    for module in mods:
        for pname, p in module.named_parameters(recurse=False):
            if p in seen:
                continue
            seen.add(p)
            values = p.detach().abs().flatten().double().numpy()
            groups.setdefault(f'{type(module).__name__}.{pname}', []).append(values)
    return OrderedDict((k, np.concatenate(v)) for k, v in groups.items())


def shared_histograms(values: Dict[str, np.ndarray], bins: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Histograms of several runs' values on one set of bin edges (spanning all of them)."""
    nonempty = [v for v in values.values() if v.size]
    every = np.concatenate(nonempty) if nonempty else np.zeros(1)
    edges = np.histogram_bin_edges(every, bins=bins)
    return edges, {k: np.histogram(v, bins=edges)[0] for k, v in values.items()}


def gamma_summary(values: np.ndarray) -> Dict[str, float]:
    """count, mean, std, quartiles, min / max and the share above 1 of a set of gamma values."""
    if not values.size:
        return {'count': 0}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(count=int(values.size), mean=float(values.mean()), std=float(values.std()), min=float(q[0]),
                q25=float(q[1]), median=float(q[2]), q75=float(q[3]), max=float(q[4]),
                frac_above_1=float((values > 1).mean()))


def plot_norms(checkpoints: Sequence[str], output: str, bins: int = 40, model_name: str = '',
               num_classes: Optional[int] = None, caption: str = '') -> dict:
    """Two figures: ``output`` with the gamma and beta histograms of the checkpoints overlaid (paper
    Figure 4), and ``<output stem>-layers.png`` with |w| per layer type on a log y-axis (Figure 8).
    Returns the histograms (edges and counts) and the gamma summaries."""
    plt = _pyplot()
    names = [_run_name(c) for c in checkpoints]
    if len(set(names)) != len(names):
        names = [os.path.relpath(c) for c in checkpoints]
    models = OrderedDict((n, load_checkpoint_model(c, model_name, num_classes)) for n, c in zip(names, checkpoints))
    affine = {n: norm_affine(m) for n, m in models.items()}
    if not any(a['gamma'].size or a['beta'].size for a in affine.values()):
        raise UsageError('the checkpoints have no normalization layers with affine parameters')
    result = {'affine': {}, 'layers': {}, 'gamma_summary': {n: gamma_summary(a['gamma']) for n, a in affine.items()}}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in zip(axes, ('gamma', 'beta'), ('gamma (norm layer weight)', 'beta (norm layer bias)')):
        edges, counts = shared_histograms({n: a[key] for n, a in affine.items()}, bins)
        result['affine'][key] = {'edges': edges, 'counts': counts}
        for i, (n, c) in enumerate(counts.items()):
            ax.stairs(c, edges, label=n, linewidth=1.5, color=f'C{i}')
        ax.set_title(title, fontsize=10)
        ax.set_ylabel('count')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _save(plt, fig, output, caption)

    per_type = {n: layer_type_values(m) for n, m in models.items()}
    types = list(OrderedDict.fromkeys(t for v in per_type.values() for t in v))
    cols = min(3, len(types))
    rows = (len(types) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, t in zip(axes.flat, types):
        edges, counts = shared_histograms({n: v.get(t, np.zeros(0)) for n, v in per_type.items()}, bins)
        result['layers'][t] = {'edges': edges, 'counts': counts}
        for i, (n, c) in enumerate(counts.items()):
            ax.stairs(c, edges, label=n, linewidth=1.2, color=f'C{i}')
        ax.set_yscale('log')
        ax.set_title(f'|{t}|', fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=8)
    _save(plt, fig, _layers_output(output), caption)
    return result


def _layers_output(output: str) -> str:
    stem, ext = os.path.splitext(output)
    return f'{stem}-layers{ext or ".png"}'


# ------------------------------------------------------------------------------------------------
# sharpness
# ------------------------------------------------------------------------------------------------
def plot_sharpness(json_files: Sequence[str], output: str, caption: str = '') -> dict:
    """A panel per sharpness metric (a bar per run, grouped by --params) and one of the runs' top-1:
    held-out (the checkpoint's eval metric) and on the sharpness examples. Returns what was drawn."""
    plt = _pyplot()
    results = []
    for path in json_files:
        try:
            with open(path) as f:
                r = json.load(f)
            r['sharpness'], r['params']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"'{path}' is not a result of python -m sam_on_timm.sharpness: {e}") from None
        results.append(r)
    setting = ('p', 'adaptive', 'rho', 'm', 'normalize_logits', 'n_examples', 'split', 'bn_batch_stats')
    differ = [k for k in setting if len({json.dumps(r.get(k)) for r in results}) > 1]
    if differ:
        raise UsageError(f"the results differ in {', '.join(differ)}: sharpness is comparable only at equal "
                         f"settings; plot them separately")
    pairs = [(r.get('name', r.get('model', '?')), r['params']) for r in results]
    twice = sorted({p for p in pairs if pairs.count(p) > 1})
    if twice:
        raise UsageError(f"two results for run '{twice[0][0]}' with --params {twice[0][1]}: pass one of them")
    runs = list(OrderedDict.fromkeys(r.get('name', r.get('model', '?')) for r in results))
    sets = list(OrderedDict.fromkeys(r['params'] for r in results))
    # a metric the sharpness run did not compute is absent from its JSON, or null: no panel of its own
    metrics = list(OrderedDict.fromkeys(m for r in results for m, v in r['sharpness'].items() if v is not None))
    table = {m: {s: {} for s in sets} for m in metrics}
    top1 = OrderedDict()
    for r in results:
        name = r.get('name', r.get('model', '?'))
        for m, v in r['sharpness'].items():
            if v is not None:
                table[m][r['params']][name] = v
        held = r.get('checkpoint_metric')
        top1.setdefault(name, {})['held-out'] = held if held is not None else float('nan')
        top1[name]['sharpness examples'] = r.get('clean_top1', float('nan'))
    first = results[0]
    ball = (f"l{first.get('p')}{' adaptive' if first.get('adaptive') else ''}, rho {first.get('rho')}, "
            f"m {first.get('m')}{', normalized logits' if first.get('normalize_logits') else ''}")
    # a row per --params set: |P| differs by orders of magnitude between them, and so does the sharpness
    fig, axes = plt.subplots(len(sets), len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.3 * len(sets)),
                             squeeze=False)
    x = np.arange(len(runs))
    for row, s in zip(axes, sets):
        for ax, m in zip(row, metrics):
            bars = ax.bar(x, [table[m][s].get(n, np.nan) for n in runs], 0.6, color=[f'C{i}' for i in range(len(runs))])
            ax.bar_label(bars, fmt='%.3g', fontsize=7)   # 3 significant digits: 8e-06 is not 0.0000
            if not table[m][s]:
                ax.text(0.5, 0.5, f'not computed for --params {s}', ha='center', va='center',
                        transform=ax.transAxes, fontsize=8)
            ax.set_xticks(x, runs, fontsize=8)
            ax.set_title(f'{m} sharpness, --params {s}', fontsize=10)
            ax.grid(axis='y', alpha=0.3)
        row[-1].axis('off')
    ax = axes[0][-1]
    ax.axis('on')
    kinds = ('held-out', 'sharpness examples')
    labels = ('held-out (checkpoint)', f"the {first.get('n_examples')} {first.get('split')} examples")
    for i, (k, label) in enumerate(zip(kinds, labels)):
        ax.bar(x + (i - 0.5) * 0.4, [top1[n][k] for n in runs], 0.4, label=label, color=f'C{7 + i}')
    vals = [v for n in runs for v in top1[n].values() if np.isfinite(v)]
    if vals:
        ax.set_ylim(max(0.0, min(vals) - 5.0), min(100.0, max(vals) + 2.0))
    ax.set_xticks(x, runs, fontsize=8)
    ax.set_title('top-1 (%)', fontsize=10)
    ax.legend(fontsize=8, loc='lower right')
    ax.grid(axis='y', alpha=0.3)
    fig.suptitle(ball, fontsize=10)
    _save(plt, fig, output, caption)
    return {'sharpness': table, 'top1': top1}


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog='python -m sam_on_timm.plot', description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest='what', required=True)
    p = sub.add_parser('curves', help="runs' summary.csv side by side per epoch")
    p.add_argument('runs', nargs='+', metavar='RUN_DIR')
    p.add_argument('--output', default=None, help='default: curves.png beside the runs (their common folder)')
    p = sub.add_parser('norms', help='gamma / beta distributions of the norm layers; |w| per layer type')
    p.add_argument('checkpoints', nargs='+', metavar='CHECKPOINT')
    p.add_argument('--output', default=None, help='the gamma/beta figure; the per-type one gets -layers '
                   '(default: norms.png beside the checkpoints, in their common folder)')
    p.add_argument('--bins', type=int, default=40)
    p.add_argument('--model', default='', help="timm model name (default: the checkpoint's)")
    p.add_argument('--num-classes', type=int, default=None)
    p = sub.add_parser('sharpness', help='sharpness results next to top-1')
    p.add_argument('results', nargs='+', metavar='JSON')
    p.add_argument('--output', default=None, help='default: sharpness.png beside the results (their common folder)')
    for p in sub.choices.values():
        p.add_argument('--caption', default='', help='a line under the figure (e.g. the date, machine and command)')
    return ap


def _print_gamma(summary: Dict[str, Dict[str, float]]) -> None:
    print(f"{'gamma':24s} {'count':>6s} {'mean':>7s} {'std':>7s} {'q25':>7s} {'median':>7s} {'q75':>7s} "
          f"{'max':>7s} {'>1':>6s}")
    for n, s in summary.items():
        if s['count']:
            print(f"{n:24s} {s['count']:6d} {s['mean']:7.4f} {s['std']:7.4f} {s['q25']:7.4f} {s['median']:7.4f} "
                  f"{s['q75']:7.4f} {s['max']:7.4f} {100 * s['frac_above_1']:5.1f}%")


def default_output(inputs: Sequence[str], name: str) -> str:
    """``name`` in the folder the inputs have in common: a run folder's parent holds the figure of its runs
    (``output/demo/{sgd,sam}`` -> ``output/demo/curves.png``), a file's folder the figure of its files, so
    a figure lands beside what it shows and never in whatever the current folder happens to be."""
    dirs = [os.path.abspath(p) if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in inputs]
    return os.path.join(os.path.commonpath(dirs), name)   # one run folder: the figure goes into it


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.output is None:
        inputs = {'curves': getattr(args, 'runs', None), 'norms': getattr(args, 'checkpoints', None),
                  'sharpness': getattr(args, 'results', None)}[args.what]
        args.output = default_output(inputs, f'{args.what}.png')
    try:
        try:   # before any work (reading checkpoints, drawing), not when saving the figure
            check_output_file(args.output if os.path.splitext(args.output)[1] else args.output + '.png')
            if args.what == 'norms':
                check_output_file(_layers_output(args.output), '--output (its -layers figure)')
        except ValueError as e:
            raise UsageError(str(e)) from None
        out_dir = os.path.dirname(os.path.abspath(args.output))
        os.makedirs(out_dir, exist_ok=True)
        if args.what == 'curves':
            plot_curves(args.runs, args.output, args.caption)
            print(f'wrote {args.output}')
        elif args.what == 'norms':
            if args.bins < 1:
                raise UsageError(f'--bins must be >= 1, got {args.bins}')
            res = plot_norms(args.checkpoints, args.output, args.bins, args.model, args.num_classes, args.caption)
            _print_gamma(res['gamma_summary'])
            print(f'wrote {args.output} and {_layers_output(args.output)}')
        else:
            plot_sharpness(args.results, args.output, args.caption)
            print(f'wrote {args.output}')
    except UsageError as e:
        print(f'plot: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
