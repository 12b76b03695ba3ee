"""A YAML config is checked as the command line is, and options that would do nothing are refused.

- each YAML value against its flag's type, nargs, choices and kind (sam_on_timm.config.config_value): the
  wrong type, a duplicate key, a nested ``config:``, a file that is not UTF-8 / not YAML / not a mapping;
  the recipes, train.py's own args.yaml and the command-line overrides still work;
- bounds: an alias bomb, deep nesting (YAML and ``--model-kwargs``), a huge value or file, refused before
  anything large is built;
- options that silently did nothing: ``--sam-eta`` with plain SAM, ``--dist-bn`` / ``--lr-base-scale``
  outside their values, a ``--sam-epochs`` window past the run.

Most cases call train.py's parse / validate functions in process; one subprocess shows the line on
stderr, the exit code 2 and that nothing is written.
"""
import glob
import os
import subprocess
import sys

import pytest
import timm
import yaml

import train
from sam_on_timm import SAM, config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ['--model', 'test_resnet', '--num-classes', '2', '--img-size', '32', '-b', '4', '--device', 'cpu',
        '--workers', '0', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.05', '--log-interval', '2']


def parse(tmp_path, text, *argv):
    cfg = tmp_path / 'c.yaml'
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    return train.parse_args(['-c', str(cfg), *argv])


def refused(tmp_path, text, *argv) -> str:
    """The one line train.py reports for this config (its UsageError)."""
    with pytest.raises(train.UsageError) as e:
        parse(tmp_path, text, *argv)
    line = str(e.value)
    assert '\n' not in line and line.startswith(f"config file '{tmp_path / 'c.yaml'}'"), line
    return line[len(f"config file '{tmp_path / 'c.yaml'}'"):]


# ---------------------------------------------------------------------------------------------
# values of the wrong type
# ---------------------------------------------------------------------------------------------
WRONG = [
    # switches take booleans: a quoted 'false' is a non-empty string, which used to switch the EMA on
    ("model_ema: 'false'\n", ": key 'model_ema' takes true or false (unquoted), got the string 'false'"),
    ('model_ema: 1\n', ": key 'model_ema' takes true or false (unquoted), got the number 1"),
    ("pretrained: 'no'\n", ": key 'pretrained' takes true or false (unquoted), got the string 'no'"),
    # integers: not a boolean (true was one epoch), not a fraction (int(3.5) was 3)
    ('epochs: true\n', ": key 'epochs' takes an integer, got the boolean true"),
    ('epochs: 3.5\n', ": key 'epochs' takes an integer, got the number 3.5"),
    ("epochs: 'three'\n", ": key 'epochs' takes an integer, got the string 'three'"),
    ('lr: false\n', ": key 'lr' takes a number, got the boolean false"),
    # strings: no list (a folder named "['run1']"), no mapping, no number YAML made of the text
    ('experiment: [run1]\n', ": key 'experiment' takes a string, got a list"),
    ('opt: {name: sam-on}\n', ": key 'opt' takes a string, got a mapping"),
    ('sam_epochs: 10:20\n', ": key 'sam_epochs' takes a string, got the number 620 (YAML reads an unquoted 10:20 "
                            "as the number 620, 0123 as 83: quote it)"),
    ('aa: off\n', ": key 'aa' takes a string, got the boolean false (YAML reads an unquoted yes / no / on / off / "
                  "true / false as a boolean: quote it)"),
    ('experiment: 2024-01-01\n', ": key 'experiment' takes a string, got a date (datetime.date(2024, 1, 1))"),
    ('torchcompile: true\n', ": key 'torchcompile' takes a string, got the boolean true (YAML reads an unquoted "
                             "yes / no / on / off / true / false as a boolean: quote it)"),
    # nargs options take lists of their type and length
    ('mean: 0.5\n', ": key 'mean' takes a list of values (a number each), e.g. [0.5], got the number 0.5"),
    ('mean: [0.5, [1]]\n', ": key 'mean' takes a list of values (a number each), got a list as element 1"),
    ('input_size: [3, 32]\n', ": key 'input_size' takes a list of 3 values (an integer each), got 2 values"),
    ('decay_milestones: []\n', ": key 'decay_milestones' takes a list of values (an integer each), got an empty "
                               "list"),
    ('decay_milestones: [30, true]\n', ": key 'decay_milestones' takes a list of values (an integer each), got "
                                       "the boolean true as element 1"),
    # choices, as argparse checks them on the command line
    ('sam_chunks: bogus\n', ": key 'sam_chunks': 'bogus' is not a valid choice (choose from auto, batched, "
                            "sequential)"),
    # mappings (--model-kwargs / --opt-kwargs)
    ('model_kwargs: [1, 2]\n', ": key 'model_kwargs' takes a mapping of keyword arguments (e.g. {drop_rate: 0.1}), "
                               "got a list"),
    ('opt_kwargs: {1: 2}\n', ": key 'opt_kwargs' takes a mapping whose keys are argument names, got the key 1"),
    ('help: true\n', ": key 'help' is not an option a config can set"),
    # the file: a key twice, a nested config, not a mapping, not YAML
    ('epochs: 3\nlr: 0.1\nepochs: 5\n', ": key 'epochs' is given twice (lines 1 and 3): PyYAML would keep the last "
                                        "one silently; keep one"),
    ('model_kwargs:\n  drop_rate: 0.1\n  drop_rate: 0.2\n', ": key 'drop_rate' is given twice (lines 2 and 3): "
                                                           "PyYAML would keep the last one silently; keep one"),
    ('config: base.yaml\nepochs: 3\n', ": key 'config' ('base.yaml'): a config file cannot include another "
                                       "(train.py reads one -c file): merge that file's keys into this one, or drop "
                                       "the key"),
    ('- epochs\n- 3\n', ': holds a list: it must be a mapping of argument names to values (e.g. epochs: 10)'),
    ('epochs\n', ": holds the single value 'epochs': it must be a mapping of argument names to values (e.g. "
                 "epochs: 10)"),
    (b'epochs: 3\nexperiment: caf\xe9\n', ' is not UTF-8 text: byte 0xe9 on line 2; save it as UTF-8'),
    ('epochs: [3\n', ' is not valid YAML: while parsing a flow sequence'),
    ('epochs: 3\x00\n', ' is not valid YAML: unacceptable character #x0000'),
    ('epochs: 3\n---\nlr: 0.1\n', ' is not valid YAML: expected a single document in the stream'),
]


@pytest.mark.parametrize('text,message', WRONG, ids=[str(t[:24]) for t, _ in WRONG])
def test_a_yaml_value_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, text, message):
    got = refused(tmp_path, text)
    assert got.startswith(message), got


def test_values_are_converted_as_the_command_line_converts_them(tmp_path):
    args = parse(tmp_path, "epochs: 3.0\nbatch_size: '8'\nlr: 1e-3\nrho: 1\nscale: [0.08, 1]\npretrained: yes\n"
                           "model_ema: false\nwandb_tags: []\nconfig: ''\nexperiment: '2024'\nsam_epochs: '10:20'\n"
                           "input_size: [3, 32, 32]\nmodel_kwargs: {<<: {drop_rate: 0.1, a: 1}, a: 2}\n")
    assert args.epochs == 3 and type(args.epochs) is int   # an integral float is the integer
    assert args.batch_size == 8   # a quoted number: read as the command line reads '8'
    assert args.lr == 0.001 and type(args.lr) is float     # YAML 1.1 left the unquoted 1e-3 a string
    assert args.rho == 1.0 and type(args.rho) is float
    assert args.scale == [0.08, 1.0] and all(type(v) is float for v in args.scale)
    assert args.pretrained is True and args.model_ema is False and args.wandb_tags == []
    assert args.experiment == '2024' and args.sam_epochs == '10:20' and args.input_size == [3, 32, 32]
    assert args.model_kwargs == {'drop_rate': 0.1, 'a': 2}   # a merge key's value may be overridden: no duplicate
    assert args.config == str(tmp_path / 'c.yaml')


def test_the_command_line_overrides_the_yaml(tmp_path):
    args = parse(tmp_path, 'epochs: 5\nlr: 0.1\npretrained: true\nexperiment: a\nmean: [0.5]\nsam_chunks: batched\n',
                 '--epochs', '2', '--no-pretrained', '--experiment', 'b', '--sam-chunks', 'sequential')
    assert (args.epochs, args.pretrained, args.experiment, args.sam_chunks) == (2, False, 'b', 'sequential')
    assert args.lr == 0.1 and args.mean == [0.5]   # what the command line leaves alone stays the YAML's


def test_every_recipe_and_train_pys_own_args_yaml_parse(tmp_path):
    """Every hparams/ recipe parses (their values as test_recipes.py pins them), and the args.yaml train.py
    writes (every option at its default, plus a timm-style ``config: ''``) reads back to the same arguments:
    no default value is refused by its own flag's check."""
    recipes = sorted(glob.glob(os.path.join(REPO, 'hparams', '**', '*.yaml'), recursive=True))
    assert len(recipes) >= 20
    for path in recipes:
        train.parse_args(['-c', path])
    given = train.parse_args(['--data-dir', str(tmp_path), '--opt', 'sam-on', '--model-kwargs', 'drop_rate=0.1',
                              '--sam-epochs', '1:', '--input-size', '3', '16', '16'])
    written = dict(train.given_args(given), config='')
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(written))
    again = train.parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert train.given_args(again) == train.given_args(given)


# ---------------------------------------------------------------------------------------------
# bounds: alias bombs, nesting, size
# ---------------------------------------------------------------------------------------------
def _bomb(levels: int, indent: str = '') -> str:
    """Billion laughs: level k is a list of 9 aliases of level k - 1, so the last one expands to 9**levels."""
    lines = [f'{indent}l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    lines += [f'{indent}l{k}: &l{k} [' + ', '.join([f'*l{k - 1}'] * 9) + ']' for k in range(1, levels)]
    return '\n'.join(lines) + '\n'


@pytest.fixture
def never_built(monkeypatch):
    """The bound is checked on PyYAML's node graph: no Python value of the file is built."""
    monkeypatch.setattr(config._ConfigLoader, 'construct_document',
                        lambda self, node: pytest.fail('the values were built before the bound was checked'))


@pytest.mark.parametrize('text', [_bomb(9), 'model_kwargs:\n' + _bomb(9, '  ')], ids=['top', 'model_kwargs'])
def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path, never_built, text):
    """9 levels: 387 million strings once expanded (its repr alone would take gigabytes); PyYAML shares the
    aliases, so it loads, and then any walk over it, str() for a string option or a message's repr expands it."""
    assert refused(tmp_path, text) == (f': more than {config.MAX_VALUES} values once aliases (*name) are '
                                       f'expanded: an alias repeats the whole value of its anchor (&name)')


def test_a_recursive_alias_and_deep_nesting_are_refused(tmp_path, never_built):
    assert refused(tmp_path, 'model_kwargs: {a: &a [*a]}\n') == (
        ': an alias refers to a value that holds it (line 1): a recursive value is no option value')
    # 5000 levels: PyYAML's composer recurses per level (a RecursionError); refused at level 33
    assert refused(tmp_path, 'model_kwargs: {a: ' + '[' * 5000 + ']' * 5000 + '}\n') == (
        f': values nested more than {config.MAX_DEPTH} levels deep (line 1)')
    # 20 levels each, stacked by aliases: within the bound as written, beyond it once expanded
    text = 'model_kwargs:\n  a: &a ' + '[' * 20 + ']' * 20 + '\n  b: ' + '[' * 20 + '*a' + ']' * 20 + '\n'
    assert refused(tmp_path, text).startswith(
        f': values nested more than {config.MAX_DEPTH} levels deep once aliases are expanded')


def test_aliases_within_the_bound_load(tmp_path):
    args = parse(tmp_path, 'scale: &s [0.5, 1.0]\nratio: *s\nmodel_kwargs: {a: &a [1, 2], b: *a}\n')
    assert args.scale == args.ratio == [0.5, 1.0] and args.model_kwargs == {'a': [1, 2], 'b': [1, 2]}


def test_a_config_file_larger_than_the_bound_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(config, 'MAX_CONFIG_BYTES', 64)
    assert refused(tmp_path, 'epochs: 3\n' * 10) == (' has 100 bytes, more than the 64 a config may have (a '
                                                     'train.py config holds option names and values: a few KB)')


@pytest.mark.parametrize('value,message', [
    ('[' * 40 + ']' * 40, f'--model-kwargs x=...: the value is nested 40 brackets deep, at most {config.MAX_DEPTH}'),
    ('-' * 4000 + '1', '--model-kwargs x=...: the value is too deeply nested to read as a Python literal'),
    ('1' * 5000, f'--model-kwargs x=...: the value has 5000 characters, at most {config.MAX_KWARG_CHARS} are read '
                 f'(put a large setting into a YAML config)'),
], ids=['brackets', 'unary-minus', 'long'])
def test_a_huge_or_deeply_nested_model_kwargs_value_is_one_line(value, message):
    """literal_eval ends 4000 minus signs in a RecursionError and 40-deep brackets parse; past 200 brackets it
    gave up silently (the text was passed on as a string)."""
    with pytest.raises(train.UsageError) as e:
        train.parse_args(['--model-kwargs', f'x={value}'])
    assert str(e.value) == message


def test_model_kwargs_within_the_bounds_parse_as_timm_reads_them():
    args = train.parse_args(['--model-kwargs', 'a=[[1, 2], {"k": (3,)}]', 'b=resnet', 'c=1e-3', '--opt-kwargs',
                             'nesterov=False'])
    assert args.model_kwargs == {'a': [[1, 2], {'k': (3,)}], 'b': 'resnet', 'c': 0.001}
    assert args.opt_kwargs == {'nesterov': False}


# ---------------------------------------------------------------------------------------------
# options that would do nothing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('extra,message', [
    (['--opt', 'sam', '--sam-eta', '0.1'], "--sam-eta 0.1 has no effect with --opt sam (T = 1 has no eta): leave it "
                                           "unset, or choose a variant with an eta (eleml2, eleml2orig, elemlinf, "
                                           "layerl2, fisher)"),
    (['--opt', 'sam-on', '--sam-eta', '0'], '--sam-eta 0.0 has no effect with --opt sam-on (T = 1'),
    (['--opt', 'lookahead_sam-nonorm', '--sam-eta', '1'], '--sam-eta 1.0 has no effect with --opt '
                                                          'lookahead_sam-nonorm'),
    (['--opt', 'sam-rand', '--sam-eta', '1'], '--sam-eta 1.0 has no effect with --opt sam-rand'),
    (['--dist-bn', 'sum'], "--dist-bn must be reduce, broadcast or '' (keep each rank's BatchNorm statistics), got "
                           "'sum'"),
    (['--lr-base-scale', 'Sqrt'], "--lr-base-scale must be linear, sqrt or '' (sqrt for Ada* / Lamb optimizers, "
                                  "else linear), got 'Sqrt'"),
])
def test_an_option_that_would_do_nothing_is_one_line(tmp_path, extra, message):
    args = train.parse_args(['--data-dir', str(tmp_path), '--output', str(tmp_path / 'out'), *BASE, *extra])
    with pytest.raises(train.UsageError) as e:
        train.validate_args(args)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize('extra', [['--opt', 'sam-on-layerl2', '--sam-eta', '0.1'], ['--opt', 'sam-fisher', '--sam-eta',
                                   '0.5'], ['--opt', 'sam'], ['--dist-bn', ''], ['--dist-bn', 'broadcast'],
                                   ['--lr-base-scale', 'sqrt'], ['--lr-base-scale', 'linear']])
def test_the_values_that_act_are_accepted(tmp_path, extra):
    train.validate_args(train.parse_args(['--data-dir', str(tmp_path), '--output', str(tmp_path / 'out'), *BASE,
                                          *extra]))


def test_the_python_api_refuses_an_eta_that_plain_sam_ignores():
    model = timm.create_model('test_resnet', num_classes=2)
    for kwargs in (dict(eta=0.1), dict(eta=0.0, mode='on'), dict(eta=0.5, sparse='rand')):
        with pytest.raises(ValueError, match=r"^eta .* has no effect with variant 'sam' \(T = 1 has no eta\)"):
            SAM(model.parameters(), model=model, **kwargs)
    with pytest.raises(ValueError, match='has no effect with variant'):
        timm.optim.create_optimizer_v2(model, 'sam-on', eta=0.1)
    assert SAM(model.parameters(), model=model, variant='layerl2', eta=0.1).eta == 0.1
    assert SAM(model.parameters(), model=model).eta == 0.0   # unset: plain SAM as before


def test_a_sam_epochs_window_past_the_run_is_one_line_before_anything_is_written(image_folder, tmp_path, capsys,
                                                                                 one_thread):
    """The window is checked against the schedule's length (here --epochs 2): epoch 2 is never trained."""
    from sam_on_timm.ablations import check_window_in_run
    out = tmp_path / 'out'
    code = train.main(['--data-dir', image_folder, '--output', str(out), *BASE, '--epochs', '2', '--opt', 'sam',
                       '--sam-epochs', '2:', '--experiment', 'w'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["train.py: error: --sam-epochs '2:' starts at epoch 2, but the run trains epochs 0 "
                                 "to 1 (--epochs and the schedule): SAM would never run; start the window before "
                                 "epoch 2"], err
    assert not out.exists()
    check_window_in_run((1, float('inf')), 2, '1:')   # the last epoch: SAM runs there
    check_window_in_run((0, 400), 300, '0:400')        # a window ending past the run ends with it


# ---------------------------------------------------------------------------------------------
# as a user sees it
# ---------------------------------------------------------------------------------------------
def test_train_py_prints_one_line_exits_2_and_writes_nothing(tmp_path):
    """A config file with a Latin-1 byte gave a UnicodeDecodeError traceback from the YAML reader."""
    (tmp_path / 'c.yaml').write_bytes(b'epochs: 3\nexperiment: caf\xe9\n')
    out = tmp_path / 'out'
    r = subprocess.run([sys.executable, os.path.join(REPO, 'train.py'), '-c', str(tmp_path / 'c.yaml'), '--data-dir',
                        str(tmp_path), '--output', str(out), '--device', 'cpu'], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"train.py: error: config file '{tmp_path / 'c.yaml'}' is not UTF-8 text: byte 0xe9 on line 2; save it as "
        f"UTF-8"], r.stderr
    assert sorted(os.listdir(tmp_path)) == ['c.yaml']


def test_a_model_kwargs_recursion_is_train_pys_one_line(tmp_path, capsys):
    """4000 minus signs: a RecursionError traceback from literal_eval inside argparse before."""
    out = tmp_path / 'out'
    assert train.main(['--model-kwargs', 'x=' + '-' * 4000 + '1', '--data-dir', str(tmp_path), '--output', str(out),
                       '--device', 'cpu']) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'train.py: error: --model-kwargs x=...: the value is too deeply nested to read as a Python literal']
    assert not out.exists()
