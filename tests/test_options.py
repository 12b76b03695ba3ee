"""train.py's argument layer (sam_on_timm.options, sam_on_timm.option_checks): one table, one parser per run.

- an argparse usage error (unknown flag, bad choice, a missing value) is one line naming the way to the
  option list, exit code 2, for train.py and the tools (sharpness, plot, norm_params);
- parsing, recording args.yaml and checking the options build the parser once;
- each number rule of the option table (``range=``) is the one the checks apply: a value just outside it
  is refused, naming the flag.
"""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import train
from sam_on_timm import options

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('argv, message', [
    (['--bogus'], 'unrecognized arguments: --bogus'),
    (['--sam-bn-update', 'neither'], "argument --sam-bn-update: invalid choice: 'neither'"),
    (['--epochs', 'many'], "argument --epochs: invalid int value: 'many'"),
    (['--rho'], 'argument --rho: expected one argument'),
])
def test_usage_error_is_one_line(argv, message, capsys):
    """Not argparse's ~110-line usage before the message: the message and where the options are listed."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f'train.py: error: {message}')
    assert err[0].endswith('(train.py --help lists the options)')


@pytest.mark.parametrize('module', ['sam_on_timm.sharpness', 'sam_on_timm.plot', 'sam_on_timm.norm_params'])
def test_tools_usage_error_is_one_line(module):
    r = subprocess.run([sys.executable, '-m', module, '--bogus-flag'], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f'python -m {module}: error: ')
    assert lines[0].endswith(f'(python -m {module} --help lists the options)')


def test_help_lists_the_sam_flags_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(['--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: train.py') and '\nSAM:\n' in out and '--sam-m' in out and '--naflex-loader' in out


def test_parser_built_once_per_run(tmp_path, monkeypatch):
    """parse_args, given_args (args.yaml) and validate_args (numbers, NaFlex options) together build one parser:
    the defaults they compare with are the option table's, not a parser rebuilt for each."""
    built, init = [], argparse.ArgumentParser.__init__

    def counting(self, *a, **k):
        built.append(k.get('description'))
        init(self, *a, **k)

    monkeypatch.setattr(argparse.ArgumentParser, '__init__', counting)
    args = train.parse_args(['--data-dir', str(tmp_path), '--output', str(tmp_path / 'out'), '--device', 'cpu',
                             '--opt', 'sam-on-layerl2', '--model', 'test_resnet'])
    train.given_args(args)
    train.validate_args(args)
    assert built == ['timm training with SAM / SAM-ON']


def _outside(option: options.Option):
    """A value just outside the option's interval (its type's), on the low side where it has one."""
    low, high, low_open, high_open = option.range
    if low is not None:
        value = low if low_open else low - 1
    else:
        value = high if high_open else high + 1
    if option.kwargs.get('type') is float:
        value = float(value)
    return [value, value] if option.kwargs.get('nargs') else value


RANGED = [dest for dest, o in options.OPTIONS.items() if o.range is not None]


def test_the_table_holds_the_ranges():
    assert len(RANGED) >= 50 and options.OPTIONS['drop'].range == (0, 1, False, True)
    assert options.OPTIONS['rho'].rule == 'rho' and options.OPTIONS['rho'].range is None


@pytest.mark.parametrize('dest', RANGED)
def test_every_range_of_the_table_is_checked(dest, tmp_path):
    args = train.parse_args(['--data-dir', str(tmp_path), '--output', str(tmp_path / 'out'), '--device', 'cpu'])
    setattr(args, dest, _outside(options.OPTIONS[dest]))
    with pytest.raises(train.UsageError, match=f'^{options.flag_name(dest)} must be a finite number'):
        train.validate_args(args)
