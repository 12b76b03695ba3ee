#!/usr/bin/env python3
"""Cost of one training update per optimizer: the project's own step, on synthetic data.

Times ``sam_on_timm.train_step.train_step`` (the function ``train.py`` calls for every update)
with optimizers built by timm's ``create_optimizer_v2`` after ``import sam_on_timm``, and reports
for each optimizer the median / min / max wall time per update, the peak memory, and the ratio of
its median to SGD's median (``ratio_sgd``; null when ``sgd`` is not in the list).

GPU table (one GPU, bf16, channels_last, eager): ResNet-50 and ViT-S/16 at
batch 256, ResNet-50 at batch 64, five optimizers, then SGD vs SAM-ON at ``--sam-ascent-frac 0.25``::

    bash benchmarks/gpu_table.sh OUTDIR      # ~3 min on one H100; ROUNDS=1 halves it
    # STEP_COST_ARGS=--compile for the torch.compile column (the first steps compile: raise --warmup).
    # train_step always takes the lean ascent (eager and compiled), so a "SAM-ON, all grads in
    # ascent" column is not measured here.

Chunked rows (m-sharpness): an entry ``NAME@mM[:PATH]`` of ``--opts`` cuts the batch into chunks of M
samples for that row only, run on PATH (``auto``, ``batched``: all chunks in one ascent and one
descent pass with ghost normalization, or ``sequential``: one pass pair per chunk; default
``--chunk-path``); ``x 1 chunk`` is the row's median over the plain ``NAME`` row's. The batched path's
table (resnet18, 32 px, batch 128, one thread; targets <= 1.15x one chunk)::

    python benchmarks/step_cost.py --device cpu --batch-size 128 --threads 1 --rounds 3 --steps 10 \
        --opts sgd,sgd@m16:sequential,sgd@m16:batched,sam-on,sam-on@m16:sequential,sam-on@m16:batched

SAM family rows (``docs/design.md``, section 8): an entry ``NAME/kK`` runs with ``interval=K`` (interval SAM,
LookSAM's k); one sample is then the mean update time over a whole period of K updates. The family's table
(targets: interval SAM-ON with K = 5 <= 1.15x SGD, LookSAM-ON K = 5 <= 1.2x, Momentum-SAM-ON <= 1.05x,
ESAM <= 0.8x SAM)::

    python benchmarks/step_cost.py --device cpu --batch-size 128 --threads 1 --rounds 3 --steps 10 \
        --opts sgd,sam,sam-on,sam-on/k5,looksam-on/k5,msam-on,gsam-on,esam,esam-on

CPU table (this project's targets: resnet18, 32 px, batch 32, fp32; SAM-ON <= 0.80x SAM-all,
SAM-all <= 2.20x SGD)::

    python benchmarks/step_cost.py --device cpu --opts sgd,sam,sam-on,sam-on-layerl2,sam-layerl2 --rounds 3
    python benchmarks/step_cost.py --device cpu --opts sgd,sam,sam-on --sam-ascent-frac 0.25 --rounds 3

Method
------
* Every optimizer gets a freshly created model (same seed, hence the same initial weights) and
  the same synthetic batch (``--num-classes`` random labels, Gaussian images), fed at every step
  (the dense kernels' cost does not depend on the values; the last loss is kept as
  ``loss_last`` to show nothing diverged). Loss ``nn.CrossEntropyLoss``; ``--lr`` (0.05),
  ``--weight-decay`` (1e-4), momentum 0.9 (timm ``sgd`` = Nesterov SGD, also the SAM base
  optimizer), ``--rho`` (0.05). The batch is cut into ``--sam-m`` chunks with ``split_chunks`` for
  every optimizer, as ``train.py`` does (for SGD this is gradient accumulation).
* One timed sample = one ``train_step`` call (zero_grad, ascent, perturbation, descent, restore,
  base step): ``torch.cuda.synchronize()`` before and after on CUDA; plain ``perf_counter`` on CPU.
* Noise control (the CPU targets are tight): ``--schedule interleave`` (default) builds all the
  optimizers' models at once and steps them in turn, one update each, rotating the order every
  step, so slow drifts of the machine's load hit every optimizer alike. ``--schedule block`` runs
  each optimizer's ``--steps`` updates back to back instead (one model alive at a time).
  ``--rounds R`` repeats the whole thing R times with fresh models (each round does its own
  ``--warmup`` untimed updates per optimizer) and pools the R x steps samples per optimizer.
  Medians are the figure to compare; ``ratio_sgd_min`` (ratio of the minima) is reported as well
  because on a shared machine the minimum is the least disturbed sample.
* Peak memory is measured in a separate pass per optimizer, never during the timing:
  - CUDA: ``torch.cuda.reset_peak_memory_stats()`` with nothing else alive, then model + optimizer
    + ``--warmup`` + 1 updates, ``torch.cuda.max_memory_allocated()``: weights, gradients,
    optimizer state, SAM backup and the activations of the step (the caching allocator's reserve
    is not counted).
  - CPU: PyTorch's CPU allocator is not tracked by ``tracemalloc`` and one process's peak RSS is a
    high-water mark that cannot be reset, so each optimizer runs in a fresh subprocess of this
    script: ``ru_maxrss`` after model + optimizer + ``--warmup`` + 1 updates minus ``ru_maxrss``
    just before the model was built (same contents as the CUDA figure). It counts whole pages and
    whatever glibc malloc keeps cached, so read it as an upper bound; on the dev machine the same
    optimizer varied by about +-15 MB from run to run. ``--cpu-mem none`` skips the subprocesses
    and reports null.
* Shared CPUs: with several threads, an OpenMP step stalls whenever another process deschedules
  one of its threads (a 90 ms step then takes seconds). The script measures how many cores other
  processes kept busy just before and just after the timing (``cpu_busy_others``, from /proc) and
  warns above 0.2; on a busy machine ``--threads 1`` gives stable (slower) numbers.

Output: a table on stdout and, with ``--json PATH``, a JSON list with one row per optimizer:
``{"opt", "ms_median", "ms_min", "ms_max", "peak_mem_mb", "ratio_sgd"}`` plus metadata keys
(device, model, batch size, ..., ``ratio_sgd_min``, ``ratio_sam`` = median / SAM-all's median,
``n_samples``, ``loss_last``, ``cpu_busy_others``).
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial

# the repository root (this file lives in benchmarks/), so the script runs from a plain checkout
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

REQUIRED_KEYS = ('opt', 'ms_median', 'ms_min', 'ms_max', 'peak_mem_mb', 'ratio_sgd')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--model', default='resnet18', help='timm model name')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--opts', default='sgd,sam,sam-on', help='comma-separated timm optimizer names')
    p.add_argument('--steps', type=int, default=20, help='timed updates per optimizer per round')
    p.add_argument('--warmup', type=int, default=3, help='untimed updates per optimizer per round')
    p.add_argument('--rounds', type=int, default=1, help='repeat with fresh models, pool the samples')
    p.add_argument('--schedule', choices=('interleave', 'block'), default='interleave')
    p.add_argument('--sam-m', type=int, default=None, help='m-sharpness chunk size (default: whole batch)')
    p.add_argument('--sam-ascent-frac', type=float, default=1.0, help='ascent on the first F of each chunk')
    p.add_argument('--sam-bn-update', choices=('both', 'ascent'), default='both')
    p.add_argument('--chunk-path', choices=('auto', 'batched', 'sequential'), default='auto',
                   help='how the chunks of one update run (train_step chunk_path); NAME@mM:PATH overrides')
    p.add_argument('--rho', type=float, default=0.05)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--amp-dtype', choices=('float32', 'bfloat16', 'float16'), default='float32',
                   help='float16 uses torch.amp.GradScaler')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (after the optimizer)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    p.add_argument('--cpu-mem', choices=('rss', 'none'), default='rss',
                   help='CPU peak memory: peak RSS increase in a fresh subprocess per optimizer, or none')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, metavar='PATH', help='write the rows here')
    p.add_argument('--_mem-probe', dest='mem_probe', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.opt_list = [o.strip() for o in args.opts.split(',') if o.strip()]
    if not args.opt_list:
        p.error('--opts is empty')
    if len(set(args.opt_list)) != len(args.opt_list):
        p.error('--opts lists an optimizer twice')
    for o in args.opt_list:
        try:
            parse_entry(o, args)
        except ValueError as e:
            p.error(str(e))
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error('--steps and --rounds must be >= 1, --warmup >= 0')
    from sam_on_timm.checks import check_arg
    try:
        check_arg('ascent_frac', args.sam_ascent_frac, '--sam-ascent-frac')
    except ValueError as e:
        p.error(str(e))
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: CUDA is not available')
    return args


def parse_entry(entry, args):
    """``NAME[@mM][/kK][:PATH]`` -> (optimizer name, chunk size or None, chunk path, interval K)."""
    name, _, path = entry.partition(':')
    name, _, k = name.partition('/')
    name, _, m = name.partition('@')
    if k and not (k.startswith('k') and k[1:].isdigit() and int(k[1:]) > 0):
        raise ValueError(f"--opts entry '{entry}': '/{k}' must be /kK with K a positive interval")
    k = int(k[1:]) if k else 1
    path = path or args.chunk_path
    if path not in ('auto', 'batched', 'sequential'):
        raise ValueError(f"--opts entry '{entry}': the chunk path must be auto, batched or sequential")
    if m:
        if not (m.startswith('m') and m[1:].isdigit() and int(m[1:]) > 0 and args.batch_size % int(m[1:]) == 0):
            raise ValueError(f"--opts entry '{entry}': '@{m}' must be @mM with M a divisor of --batch-size")
        return name, int(m[1:]), path, k
    return name, args.sam_m, path, k


class Runner:
    """One optimizer's model, optimizer, scaler and data; ``step()`` times one ``train_step``."""

    def __init__(self, args, opt_name, device):
        import sam_on_timm  # noqa: F401  (registers the SAM names in timm's optimizer factory)
        from timm.optim import create_optimizer_v2
        from sam_on_timm import is_sam_name
        from sam_on_timm.train_step import find_sam, split_chunks
        self.args, self.name, self.device = args, opt_name, device
        opt_name, sam_m, self.chunk_path, self.interval = parse_entry(opt_name, args)
        self.cuda = device.type == 'cuda'

        torch.manual_seed(args.seed)
        model = create_model(args)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        kwargs = dict(lr=args.lr, weight_decay=args.weight_decay, momentum=0.9)
        if is_sam_name(opt_name):
            kwargs['rho'] = args.rho
            if self.interval > 1:   # interval SAM / LookSAM's k
                kwargs['interval'] = self.interval
        self.optimizer = create_optimizer_v2(model, opt=opt_name, **kwargs)
        self.sam = find_sam(self.optimizer)
        self.model = torch.compile(model) if args.compile else model

        x, y = synthetic_batch(args, device)
        self.chunks = split_chunks(x, y, sam_m)
        self.loss_fn = torch.nn.CrossEntropyLoss().to(device)
        self.amp_autocast, self.scaler = contextlib.nullcontext, None
        if args.amp_dtype != 'float32':
            dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
            self.amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)
            if dtype == torch.float16:
                self.scaler = torch.amp.GradScaler(device.type)
        self.last_loss = None

    def step(self):
        from sam_on_timm.train_step import train_step
        a = self.args
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(self.interval):   # /kK rows: one sample is one whole period of K updates
            stats = train_step(self.model, self.optimizer, self.chunks, self.loss_fn, amp_autocast=self.amp_autocast,
                               loss_scaler=self.scaler, bn_update=a.sam_bn_update, ascent_frac=a.sam_ascent_frac,
                               chunk_path=self.chunk_path)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1e3 / self.interval
        self.last_loss = stats.loss
        return ms


def create_model(args):
    """timm model; models that fix their input size (ViTs) are built for ``--img-size``."""
    import timm
    try:
        return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
    except TypeError:   # the constructor takes no img_size (CNNs): any input size works
        return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)


def synthetic_batch(args, device):
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    x, y = x.to(device), y.to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _allow_recompiles(args):
    """Every optimizer (and round) compiles its own model instance: keep dynamo from falling back to
    eager after its default recompile limit (8)."""
    if args.compile:
        import torch._dynamo
        cfg = torch._dynamo.config
        n = 4 * len(args.opt_list) * (args.rounds + 1)
        for name in ('recompile_limit', 'cache_size_limit'):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), n))


def _free(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -- peak memory --------------------------------------------------------------------------------
def _rss_peak_mb():
    # Linux reports ru_maxrss in KiB, macOS in bytes
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == 'darwin' else r / 2 ** 10


def _memory_run(args, opt_name, device):
    runner = Runner(args, opt_name, device)
    for _ in range(args.warmup + 1):
        runner.step()
    del runner


def cuda_peak_mb(args, opt_name, device):
    _free(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _memory_run(args, opt_name, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    _free(device)
    return peak / 2 ** 20


def cpu_peak_mb(args, opt_name):
    """Peak RSS increase of a fresh process of this script that runs ``opt_name`` alone."""
    cmd = [sys.executable, os.path.abspath(__file__), '--_mem-probe', opt_name] + _probe_argv(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f'memory probe for {opt_name} failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.strip().splitlines()[-1])['peak_mem_mb']


def _probe_argv(args):
    """This run's own arguments (argparse: the last of a repeated flag wins), for one optimizer's probe."""
    return args.argv + ['--opts', 'probe']


def mem_probe_main(args):
    device = torch.device(args.device)
    import timm  # noqa: F401
    import sam_on_timm  # noqa: F401
    from sam_on_timm import train_step as _ts  # noqa: F401  (imports done before the baseline)
    gc.collect()
    base = _rss_peak_mb()
    _memory_run(args, args.mem_probe, device)
    print(json.dumps({'opt': args.mem_probe, 'peak_mem_mb': _rss_peak_mb() - base}))


# -- timing -------------------------------------------------------------------------------------
def time_all(args, device):
    opts = args.opt_list
    samples = {o: [] for o in opts}
    losses = {}
    for r in range(args.rounds):
        if args.schedule == 'interleave':
            runners = {o: Runner(args, o, device) for o in opts}
            for w in range(args.warmup):
                for o in _rotate(opts, w):
                    runners[o].step()
            for s in range(args.steps):
                for o in _rotate(opts, r * args.steps + s):
                    samples[o].append(runners[o].step())
            losses.update({o: float(rn.last_loss) for o, rn in runners.items()})
            del runners
            _free(device)
        else:
            for o in _rotate(opts, r):
                runner = Runner(args, o, device)
                for _ in range(args.warmup):
                    runner.step()
                samples[o].extend(runner.step() for _ in range(args.steps))
                losses[o] = float(runner.last_loss)
                del runner
                _free(device)
        print(f'round {r + 1}/{args.rounds}: ' + ', '.join(
            f'{o} {statistics.median(samples[o][-args.steps:]):.1f}' for o in opts) + ' ms (median)',
            file=sys.stderr, flush=True)
    return samples, losses


def _rotate(seq, k):
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def make_rows(args, samples, losses, peaks, busy=None):
    meta = dict(device=args.device, device_name=_device_name(args.device), model=args.model,
                img_size=args.img_size, batch_size=args.batch_size, num_classes=args.num_classes,
                amp_dtype=args.amp_dtype, channels_last=args.channels_last, compile=args.compile,
                sam_m=args.sam_m, sam_ascent_frac=args.sam_ascent_frac, sam_bn_update=args.sam_bn_update,
                schedule=args.schedule, rounds=args.rounds, warmup=args.warmup,
                threads=torch.get_num_threads() if args.device == 'cpu' else None,
                cpu_busy_others=busy,
                peak_mem_method=('cuda.max_memory_allocated' if args.device == 'cuda' else
                                 'ru_maxrss delta, fresh subprocess' if args.cpu_mem == 'rss' else None),
                torch=torch.__version__, timm=__import__('timm').__version__)
    rows = []
    for o in args.opt_list:
        s = samples[o]
        _, sam_m, path, _ = parse_entry(o, args)
        rows.append(dict(opt=o, ms_median=statistics.median(s), ms_min=min(s), ms_max=max(s),
                         peak_mem_mb=peaks.get(o), ratio_sgd=None, ratio_sgd_min=None, ratio_sam=None,
                         ratio_one_chunk=None, n_samples=len(s),
                         loss_last=losses.get(o), **dict(meta, sam_m=sam_m, chunk_path=path)))
    sgd = next((r for r in rows if r['opt'] == 'sgd'), None)
    if sgd is not None:
        for r in rows:
            r['ratio_sgd'] = r['ms_median'] / sgd['ms_median']
            r['ratio_sgd_min'] = r['ms_min'] / sgd['ms_min']
    for r in rows:
        plain = next((q for q in rows if q['opt'] == r['opt'].split('@')[0]), None)
        if plain is not None and '@' in r['opt']:
            r['ratio_one_chunk'] = r['ms_median'] / plain['ms_median']
    sam = next((r for r in rows if r['opt'] == 'sam'), None)
    if sam is not None:
        for r in rows:
            r['ratio_sam'] = r['ms_median'] / sam['ms_median']
    return rows


def other_cpu_busy(window=1.0):
    """CPU cores kept busy by *other* processes over ``window`` seconds while this one sleeps
    (Linux /proc; None elsewhere). The 1-min load average would count this script's own probes."""
    def sample():
        with open('/proc/stat') as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open('/proc/self/stat') as f:
            own = f.read().rsplit(')', 1)[1].split()
        # user nice system idle iowait irq softirq steal; own utime + stime (fields 14, 15)
        return sum(v[:8]) - v[3] - v[4], sum(v[:8]), int(own[11]) + int(own[12])
    try:
        b0, t0, o0 = sample()
        time.sleep(window)
        b1, t1, o1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    return round(max(0.0, (b1 - b0) - (o1 - o0)) / (t1 - t0) * (os.cpu_count() or 1), 2)


def _device_name(device):
    if device == 'cuda':
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            name = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), name)
    return f'{name} ({os.cpu_count()} logical CPUs)'


def format_table(args, rows):
    def f(v, fmt):
        return '-' if v is None else format(v, fmt)
    threads = f", {rows[0]['threads']} threads" if args.device == 'cpu' else ''
    b = rows[0]['cpu_busy_others']
    busy = '' if not b or None in b else f'; other processes busy: {b[0]:.2f} / {b[1]:.2f} cores before / after'
    head = (f"{args.model}, {args.img_size} px, batch {args.batch_size}, {args.amp_dtype}"
            f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}"
            f"{f', m={args.sam_m}' if args.sam_m else ''}"
            f"{f', ascent frac {args.sam_ascent_frac:g}' if args.sam_ascent_frac != 1.0 else ''}"
            f" on {rows[0]['device_name']}"
            f"{threads}"
            f" ({rows[0]['n_samples']} samples/opt: {args.rounds} x {args.steps}, {args.schedule})"
            f"{busy}")
    lines = [head,
             f"| {'opt':<25} | {'ms median':>9} | {'ms min':>8} | {'ms max':>8} | {'peak MB':>8} | "
             f"{'x SGD':>6} | {'x SGD (min)':>11} | {'x SAM':>6} | {'x 1 chunk':>9} |",
             f"|{'-' * 27}|{'-' * 10}:|{'-' * 9}:|{'-' * 9}:|{'-' * 9}:|{'-' * 7}:|{'-' * 12}:|{'-' * 7}:|{'-' * 10}:|"]
    for r in rows:
        lines.append(f"| {r['opt']:<25} | {r['ms_median']:>9.1f} | {r['ms_min']:>8.1f} | {r['ms_max']:>8.1f} | "
                     f"{f(r['peak_mem_mb'], '8.1f'):>8} | {f(r['ratio_sgd'], '6.2f'):>6} | "
                     f"{f(r['ratio_sgd_min'], '11.2f'):>11} | {f(r['ratio_sam'], '6.2f'):>6} | "
                     f"{f(r['ratio_one_chunk'], '9.2f'):>9} |")
    return '\n'.join(lines)


def _warn_busy(busy, when):
    if busy is not None and busy > 0.2:
        n = torch.get_num_threads()
        print(f'warning: other processes kept {busy:.2f} of {os.cpu_count()} CPU cores busy {when} the timing'
              + (f'; with {n} threads an OpenMP step stalls whenever one of its threads is descheduled '
                 f'(try --threads 1, or an idle machine)' if n > 1 else ''), file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.mem_probe is not None:
        _allow_recompiles(args)
        return mem_probe_main(args)
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    _allow_recompiles(args)

    peaks = {}
    if device.type == 'cuda':
        # also the global warm-up (cuDNN autotuning, compilation) before any timing
        peaks = {o: cuda_peak_mb(args, o, device) for o in args.opt_list}
    elif args.cpu_mem == 'rss':
        peaks = {o: cpu_peak_mb(args, o) for o in args.opt_list}

    busy = None
    if device.type == 'cpu':
        busy = [other_cpu_busy()]
        _warn_busy(busy[0], 'before')
    samples, losses = time_all(args, device)
    if device.type == 'cpu':
        busy.append(other_cpu_busy())
        _warn_busy(busy[1], 'after')
    rows = make_rows(args, samples, losses, peaks, busy)
    for r in rows:
        if r['loss_last'] is not None and not math.isfinite(r['loss_last']):
            print(f"warning: {r['opt']}: the loss is not finite ({r['loss_last']}); lower --lr / --rho",
                  file=sys.stderr)
    print(format_table(args, rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as fh:
            json.dump(rows, fh, indent=1)
            fh.write("\n")
    return rows


if __name__ == '__main__':
    main()
