"""
Errors a user can fix, and how every command-line tool reports them: one line, no traceback.

A :class:`UserError` says what is wrong with something the user gave (a file, a folder, a config
value, a name) and how to fix it; its message names the file or field. Command-line entry points
wrap their ``main`` with :func:`reports_user_errors`, which prints such an error as
``PROG: error: MESSAGE`` on stderr and returns exit status 2. Any other exception is a bug and
keeps its traceback.

Both layers import this module: the runtime core (``saferl_ros``, never torch) and the offline
workspace (``offline_training``, never rclpy). It needs the standard library and pyyaml only.
"""

import functools
import reprlib
import sys
from typing import Callable, Tuple, Type

import yaml

EXIT_USER_ERROR = 2
# Largest YAML file read_yaml_mapping (and the bundle loader, for manifest.yaml) reads: run
# configs, summaries and manifests are a few kB; checked before the file is read.
MAX_YAML_BYTES = 4 << 20
# Longest repr of a user's value quoted in an error message.
MAX_REPR_CHARS = 80

# Operating-system errors about a path the user gave: their message names the path.
PATH_ERRORS: Tuple[Type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(Exception):
    """A problem with the user's input: the message names the file or field and the fix."""

    def __str__(self) -> str:
        """Return the message itself (a KeyError subclass would otherwise quote it)."""
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(UserError, ValueError):
    """A bad value: in a config, a YAML or JSON file, a run folder or a command-line option."""


class UnknownNameError(UserError, KeyError):
    """An unknown or missing name: a task, an algorithm, a preset, a config field, a key."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed at (or one it must contain) does not exist."""


def error_lines(error: BaseException) -> list:
    """Return the lines of an error's message (a KeyError's message without its quotes)."""
    if isinstance(error, KeyError) and not isinstance(error, UserError) and len(error.args) == 1:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return [line for line in text.splitlines() if line.strip()] or [type(error).__name__]


def reports_user_errors(prog: str, expected: Tuple[Type[BaseException], ...] = ()):
    """
    Decorate a command-line ``main(argv=None) -> int`` to report user errors in one line.

    :class:`UserError`, :data:`PATH_ERRORS` and the ``expected`` exception types are printed as
    ``PROG: error: MESSAGE`` on stderr (one line per line of the message, normally one) and
    the function returns :data:`EXIT_USER_ERROR`; anything else propagates with its traceback.
    """
    caught = (UserError, *PATH_ERRORS, *expected)

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv=None) -> int:
            try:
                return main(argv)
            except caught as error:
                for line in error_lines(error):
                    print(f'{prog}: error: {line}', file=sys.stderr)
                return EXIT_USER_ERROR
        return run
    return wrap


def short_repr(value, limit: int = MAX_REPR_CHARS) -> str:
    """
    Return ``repr(value)`` cut to at most ``limit`` characters, at its end.

    Nested containers are elided by :mod:`reprlib` (so a huge structure is never walked whole);
    a string keeps its beginning, where a message says what is wrong.
    """
    if isinstance(value, str):
        text = repr(value[:limit])
    else:
        shortener = reprlib.Repr()
        shortener.maxstring = shortener.maxother = limit
        text = shortener.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


class StrictSafeLoader(yaml.SafeLoader):
    """
    ``yaml.SafeLoader`` without anchors and aliases: the loader of every YAML file we read.

    An alias (``*a``) repeats a whole structure without repeating its text, so a 1 kB file of
    nested aliases expands into billions of values (a "billion laughs" bomb) once anything walks
    it. No file of this project needs them, so an anchor (``&a``) or alias is a
    :class:`yaml.YAMLError` naming its line.
    """

    def compose_node(self, parent, index):
        """Compose the next node; refuse an alias or an anchored node."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, 'anchor', None) is not None:
            what = 'alias *' if isinstance(event, yaml.AliasEvent) else 'anchor &'
            raise yaml.composer.ComposerError(
                None, None, f'{what}{event.anchor[:40]} at line {event.start_mark.line + 1}: '
                'YAML anchors and aliases are not allowed, write the values out')
        return super().compose_node(parent, index)


def load_yaml(text, loader=None):
    """
    Parse one YAML document (str or bytes) with :class:`StrictSafeLoader` (or ``loader``).

    Every failure is a :class:`yaml.YAMLError`: a value Python refuses to build (an integer of
    more than 4300 digits raises ValueError) is turned into one, so callers catch one type.
    """
    try:
        return yaml.load(text, Loader=loader or StrictSafeLoader)
    except ValueError as error:
        raise yaml.MarkedYAMLError(
            problem=f'a value cannot be read: {short_repr(str(error))}') from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """Return a YAML error's problem and line as one short phrase: 'REASON at line N'."""
    where = getattr(error, 'problem_mark', None)
    line = f' at line {where.line + 1}' if where is not None else ''
    reason = getattr(error, 'problem', None) or type(error).__name__
    return f'{reason}{line}'


def read_yaml_mapping(path, fix: str, limit: int = MAX_YAML_BYTES) -> dict:
    """
    Return the mapping in YAML file ``path``; raise a one-line :class:`UserError` otherwise.

    A missing file raises :class:`MissingFileError`; anything but a regular file (a link to one
    is fine) of at most ``limit`` bytes, unparsable YAML, YAML with anchors or aliases, an empty
    document or a document that is not a mapping (a list, a string) raises
    :class:`ConfigError`, before anything is read where possible. ``fix`` ends every message:
    what the user should do about it.
    """
    from saferl_ros.files import read_regular_file  # files.py imports this module
    data = read_regular_file(path, limit, fix)
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as error:
        raise ConfigError(f'{path}: not UTF-8 text ({error.reason} at byte {error.start}); '
                          f'{fix}') from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f'{path}: not valid YAML ({yaml_problem(error)}); {fix}') from None
    if data is None:
        raise ConfigError(f'{path}: empty, expected a mapping of fields; {fix}')
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of fields, found a '
                          f'{type(data).__name__}; {fix}')
    return data


def require_field(mapping: dict, key: str, where: str, kind=None, fix: str = ''):
    """Return ``mapping[key]``; raise :class:`ConfigError` naming ``where`` and ``key``."""
    tail = f'; {fix}' if fix else ''
    if key not in mapping:
        raise ConfigError(f'{where}: field {key!r} is missing{tail}')
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        names = ' or '.join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f'{where}: field {key!r} should be a {names}, found '
                          f'{type(value).__name__} {short_repr(value)}{tail}')
    return value
