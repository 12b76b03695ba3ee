"""Reading a train.py YAML config (``-c FILE``) and the ``KEY=VALUE`` options, checked as the command line is.

A YAML value reaches argparse as a default, so argparse never checks it: this module does, against the
option's own argparse action (its type, nargs, choices and kind), so that a config file and the command
line accept the same values. Every rule raises ``ValueError`` with one line that names the file, the key,
the value and what is valid; train.py reports that line as its own error.

The rules, where YAML and the command line could differ:

- a switch (``store_true``, ``--x / --no-x``) takes a YAML boolean. A string (``'false'``) is refused, not
  read: the command line has no ``--model-ema false`` either, and a non-empty string is true in Python.
- an integer option takes an integer, or a float with no fraction (``3.0``); never a boolean (``true`` is
  1 to Python), never ``3.5``. A string is read as the command line reads it (``'3'``).
- a float option takes a number, not a boolean. A string is read as the command line reads it: YAML 1.1
  reads an unquoted ``1e-3`` (no dot) as a string, and it must still mean 0.001.
- a string option takes a string. A number or a boolean is refused: YAML reads an unquoted ``10:20`` as the
  number 620, ``0123`` as 83 and ``off`` as false, so that converting them back would not give what was
  written. Quoting the value is the way out.
- an option with nargs takes a list of such values (of the right length); an empty list only where it is the
  option's default (train.py's args.yaml writes ``wandb_tags: []``).
- an option whose default is a mapping (``--model-kwargs``) takes a mapping with string keys.
- choices are enforced; ``null`` means the option's default (timm's args.yaml writes it for every unset option).

The file itself: UTF-8, at most ``MAX_CONFIG_BYTES``, one YAML mapping, no key twice in one mapping (PyYAML
keeps the last silently). Aliases (``*name``) share one object, so a few lines can stand for a structure of
billions of values ("billion laughs"): the expanded size and depth are bounded on the parsed node graph,
before any Python object is built, and no value is ever printed in full.
"""
import argparse
import ast
import io
import math
import os
import reprlib
from typing import Any, Dict, Iterable

import yaml

__all__ = ['MAX_CONFIG_BYTES', 'MAX_DEPTH', 'MAX_VALUES', 'MAX_KWARG_CHARS', 'load_config', 'config_value',
           'drop_config_key', 'parse_kwargs', 'short_repr']

MAX_CONFIG_BYTES = 1 << 20    # a train.py config (a timm args.yaml included) is a few KB
MAX_DEPTH = 32                # nesting levels of a value (a list in a list in a mapping ...)
MAX_VALUES = 100_000          # scalars, lists and mappings of the whole file, aliases expanded
MAX_KWARG_CHARS = 4096        # one VALUE of --model-kwargs / --opt-kwargs KEY=VALUE on the command line

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 4, 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a few dozen characters, whatever the size of ``value`` (an alias bomb's repr would
    take gigabytes)."""
    return _repr.repr(value)


class _Refused(Exception):
    """A rule of this module broken while PyYAML parses (kept apart from PyYAML's own errors)."""


class _Named(io.StringIO):
    """The decoded text under the file's name (PyYAML's messages name the stream)."""

    def __init__(self, text: str, name: str):
        super().__init__(text)
        self.name = name


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with the nesting bounded while composing (the composer recurses once per level, so
    10,000 nested brackets would end in a RecursionError) and duplicate keys refused."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:   # + 1: the document's top-level mapping
                line = self.peek_event().start_mark.line + 1
                raise _Refused(f'values nested more than {MAX_DEPTH} levels deep (line {line})')
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        first_line: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == 'tag:yaml.org,2002:merge':
                continue   # '<<' merges: its keys may be overridden here, as YAML means
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _Refused(f"key {short_repr(key)} is given twice (lines {first_line[key]} and {line}): "
                               f"PyYAML would keep the last one silently; keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expanded(root: yaml.Node) -> None:
    """The node graph, aliases expanded, holds at most MAX_VALUES values and MAX_DEPTH levels. Each node is
    measured once (its expanded size and height are memoized), so a bomb is measured in the time of its few
    lines, and the recursion here never goes deeper than the bound."""
    measured: Dict[int, tuple] = {}   # id(node) -> (values, levels) of the node, aliases expanded
    open_nodes = set()

    def too_deep(node):
        return _Refused(f'values nested more than {MAX_DEPTH} levels deep once aliases are expanded '
                        f'(line {node.start_mark.line + 1})')

    def visit(node, depth):
        key = id(node)
        if key in measured:
            if depth + measured[key][1] - 1 > MAX_DEPTH + 1:   # + 1: the document's top-level mapping
                raise too_deep(node)
            return measured[key]
        if depth > MAX_DEPTH + 1:
            raise too_deep(node)
        if key in open_nodes:
            raise _Refused(f'an alias refers to a value that holds it (line {node.start_mark.line + 1}): '
                           f'a recursive value is no option value')
        open_nodes.add(key)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        values, levels = 1, 1
        for child in children:
            v, h = visit(child, depth + 1)
            values, levels = values + v, max(levels, h + 1)
            if values > MAX_VALUES:
                raise _Refused(f'more than {MAX_VALUES} values once aliases (*name) are expanded: '
                               f'an alias repeats the whole value of its anchor (&name)')
        open_nodes.discard(key)
        measured[key] = values, levels
        return values, levels

    visit(root, 1)


def load_config(path: str) -> Dict[Any, Any]:
    """The mapping a YAML config file holds ({} for an empty file); ValueError with one line naming the file
    and what is wrong: not a file, too large, not UTF-8, not YAML, a key twice, not a mapping, too large or too
    deep a value (aliases expanded)."""
    where = f"config file '{path}'"
    if os.path.isdir(path):
        raise ValueError(f'{where} is a folder: pass a YAML file')
    if not os.path.isfile(path):
        raise ValueError(f'{where} does not exist')
    with open(path, 'rb') as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f'{where} has {os.path.getsize(path)} bytes, more than the {MAX_CONFIG_BYTES} a config '
                         f'may have (a train.py config holds option names and values: a few KB)')
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b'\n') + 1
        raise ValueError(f'{where} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line}; '
                         f'save it as UTF-8') from None
    loader = None
    try:
        loader = _ConfigLoader(_Named(text, path))   # (its reader refuses control characters here)
        node = loader.get_single_node()
        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            kind = 'a list' if isinstance(node, yaml.SequenceNode) else f'the single value {short_repr(node.value)}'
            raise _Refused(f'holds {kind}: it must be a mapping of argument names to values (e.g. epochs: 10)')
        _check_expanded(node)
        cfg = loader.construct_document(node)
    except _Refused as e:
        raise ValueError(f'{where}: {e}') from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return cfg


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                               argparse.BooleanOptionalAction))


def _takes(action: argparse.Action) -> str:
    """What one value of ``action`` is, in words."""
    if _is_switch(action):
        return 'true or false (unquoted)'
    return {int: 'an integer', float: 'a number'}.get(action.type, 'a string')


def _got(value: Any) -> str:
    """``value`` in words, as YAML wrote it where possible; bounded whatever its size."""
    if isinstance(value, bool):
        return f'the boolean {str(value).lower()}'
    if isinstance(value, str):
        return f'the string {short_repr(value)}'
    if isinstance(value, (int, float)):
        return f'the number {short_repr(value)}'
    if isinstance(value, list):
        return 'a list'
    if isinstance(value, dict):
        return 'a mapping'
    return f'a {type(value).__name__} ({short_repr(value)})'


def _scalar(action: argparse.Action, value: Any) -> Any:
    """One value of ``action`` (an element, for an option with nargs), converted as argparse converts the
    command line's text; ValueError(a hint, or '') where it is not one."""
    kind = action.type
    if kind is None or kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise ValueError('YAML reads an unquoted yes / no / on / off / true / false as a boolean: quote it')
        if isinstance(value, (int, float)):
            raise ValueError('YAML reads an unquoted 10:20 as the number 620, 0123 as 83: quote it')
        raise ValueError('')
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError('')
    if isinstance(value, str):   # read as the command line reads it (YAML 1.1 leaves an unquoted 1e-3 a string)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError('') from None
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ValueError('')
        return int(value)
    if kind is float:
        return float(value)
    raise ValueError('a string, as on the command line')   # another type= callable: it reads text


def config_value(key: str, value: Any, action: argparse.Action, path: str) -> Any:
    """``value`` of the YAML ``key`` checked against the option's argparse ``action`` and converted as argparse
    converts the command line (the rules: this module's docstring). ``None`` passes (the option's default).
    ValueError with one line: ``config file 'PATH': key 'KEY' takes ..., got ...``."""
    if value is None:
        return None
    where = f"config file '{path}': key '{key}'"
    if isinstance(action, argparse._HelpAction) or (action.nargs == 0 and not _is_switch(action)):
        raise ValueError(f'{where} is not an option a config can set')
    if isinstance(action.default, dict):   # --model-kwargs / --opt-kwargs: a KEY=VALUE mapping
        if not isinstance(value, dict):
            raise ValueError(f'{where} takes a mapping of keyword arguments (e.g. {{drop_rate: 0.1}}), '
                             f'got {_got(value)}')
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f'{where} takes a mapping whose keys are argument names, got the key {short_repr(bad[0])}')
        return value
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ValueError(f'{where} takes {_takes(action)}, got {_got(value)}')
        return value
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if many:
        count = f'{action.nargs} values' if isinstance(action.nargs, int) else 'values'
        takes = f'a list of {count} ({_takes(action)} each)'
        if not isinstance(value, list):
            example = f', e.g. [{short_repr(value)}]' if not isinstance(value, dict) else ''
            raise ValueError(f'{where} takes {takes}{example}, got {_got(value)}')
        if (isinstance(action.nargs, int) and len(value) != action.nargs) or (
                action.nargs == '+' and not value and value != action.default):
            raise ValueError(f'{where} takes {takes}, got {len(value) or "an empty list"}'
                             f'{" values" if value else ""}')
        out: Any = []
        for i, v in enumerate(value):
            try:
                out.append(_scalar(action, v))
            except ValueError as e:
                hint = f' ({e})' if str(e) else ''
                raise ValueError(f'{where} takes {takes}, got {_got(v)} as element {i}{hint}') from None
    else:
        try:
            out = _scalar(action, value)
        except ValueError as e:
            hint = f' ({e})' if str(e) else ''
            raise ValueError(f'{where} takes {_takes(action)}, got {_got(value)}{hint}') from None
    if action.choices is not None:
        for v in out if many else [out]:
            if v not in action.choices:
                raise ValueError(f"{where}: {short_repr(v)} is not a valid choice (choose from "
                                 f"{', '.join(map(str, action.choices))})")
    return out


def _nesting(text: str) -> int:
    """The deepest bracket nesting of ``text`` (brackets inside quotes count too: a bound, not a parser)."""
    depth = deepest = 0
    for c in text:
        if c in '([{':
            depth += 1
            deepest = max(deepest, depth)
        elif c in ')]}':
            depth -= 1
    return deepest


def parse_kwargs(values: Iterable[str], option: str = '--model-kwargs') -> Dict[str, Any]:
    """``KEY=VALUE`` pairs as timm's ``ParseKwargs`` reads them: VALUE as a Python literal, else as the string
    itself. Bounded first: a VALUE longer than MAX_KWARG_CHARS or nested deeper than MAX_DEPTH is refused
    (``ast.literal_eval`` ends such text in a RecursionError or MemoryError, or, past 200 brackets, silently
    in the string fallback). ValueError with one line naming the option and the KEY."""
    kwargs: Dict[str, Any] = {}
    for item in values:
        if not item:
            continue
        if '=' not in item:
            raise ValueError(f"{option} takes KEY=VALUE pairs, got {short_repr(item)}")
        key, text = item.split('=', 1)
        if len(text) > MAX_KWARG_CHARS:
            raise ValueError(f'{option} {key}=...: the value has {len(text)} characters, at most '
                             f'{MAX_KWARG_CHARS} are read (put a large setting into a YAML config)')
        if _nesting(text) > MAX_DEPTH:
            raise ValueError(f'{option} {key}=...: the value is nested {_nesting(text)} brackets deep, at most '
                             f'{MAX_DEPTH}')
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError):
            kwargs[key] = text   # timm's rule: not a literal, so the text itself (no quoting needed)
        except (RecursionError, MemoryError):   # e.g. thousands of unary minus signs
            raise ValueError(f'{option} {key}=...: the value is too deeply nested to read as a Python literal'
                             ) from None
    return kwargs


def drop_config_key(cfg: Dict[Any, Any], path: str) -> None:
    """A ``config`` key in a config file: ``null`` or ``''`` (no file) is dropped; a file name is refused, since
    train.py reads one config file and would otherwise drop the named file's keys without a word."""
    value = cfg.pop('config', None)
    if value not in (None, ''):
        raise ValueError(f"config file '{path}': key 'config' ({short_repr(value)}): a config file cannot include "
                         f"another (train.py reads one -c file): merge that file's keys into this one, or drop the "
                         f"key")
