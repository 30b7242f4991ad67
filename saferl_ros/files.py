"""
File-safety helpers shared by both layers: atomic writes, bounded reads and content hashes.

Every file the project writes for someone else to read (datasets and their manifests, run
configs and checkpoints, recordings and their index, bundle manifests) goes through
:func:`atomic_path`: the bytes are written to a hidden temporary name in the same folder, flushed
to disk, then renamed over the target. A reader, or a process killed mid-write, therefore sees the
old file or the new one, never half of one.

Every small file the project reads from a user (run configs and summaries through
``saferl_ros.errors.read_yaml_mapping``) goes through :func:`read_regular_file`: it must be a
regular file (a symbolic link to one is fine; a device, FIFO or folder is refused before it is
opened) of at most a given size, checked before reading and again while reading. Bundle files
have a stricter variant, ``saferl_ros.bundle.read_bundle_file`` (no links at all); datasets are
checked by ``offline_training.data.dataset.check_file``. A file named by another file (a
recording's episodes, named by its index) is checked with :func:`plain_file_problem` before it
is opened: a regular file inside the folder, reached through no link and no '..'.
"""

from contextlib import contextmanager
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
import stat
from typing import Iterator, Optional

from saferl_ros.errors import ConfigError, MissingFileError
import yaml

# Flags of every open of an untrusted file: never block on a FIFO put in a file's place, never
# leak the descriptor into a child process.
READ_FLAGS = (os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0)
              | getattr(os, 'O_BINARY', 0))
READ_CHUNK = 1 << 20
FILE_KINDS = ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'),
              (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
              (stat.S_ISBLK, 'a block device'), (stat.S_ISLNK, 'a symbolic link'))


def file_kind(mode: int) -> str:
    """Return what a non-regular file is, from its ``st_mode``: 'a folder', 'a FIFO ...'."""
    return next((text for test, text in FILE_KINDS if test(mode)), 'not a regular file')


def read_regular_file(path, limit: int, fix: str) -> bytes:
    """
    Return the bytes of regular file ``path`` of at most ``limit`` bytes; raise ConfigError else.

    A symbolic link is followed, but what it leads to must be a regular file: a device (e.g.
    ``/dev/zero``), FIFO, socket or folder is refused before it is opened, and a file larger
    than ``limit`` before it is read. The open descriptor is checked to be the file examined,
    and reading stops past ``limit`` bytes (a file that grows meanwhile). A missing file raises
    :class:`~saferl_ros.errors.MissingFileError`. ``fix`` ends every message.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise MissingFileError(f'{path}: missing; {fix}') from None
    except OSError as error:
        raise ConfigError(f'{path}: cannot be examined ({error.strerror}); {fix}') from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f'{path} is {file_kind(info.st_mode)}, not a regular file; {fix}')
    if info.st_size > limit:
        raise ConfigError(f'{path}: {info.st_size} bytes, more than the {limit} this file may '
                          f'have; {fix}')
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as error:
        raise ConfigError(f'{path}: cannot be opened ({error.strerror}); {fix}') from None
    try:
        return b''.join(read_bounded(fd, info, limit))
    except ReadAborted as why:
        raise ConfigError(f'{path}: {why}; try again once nothing writes to it') from None
    except OSError as error:
        raise ConfigError(f'{path}: cannot be read ({error.strerror}); {fix}') from None
    finally:
        os.close(fd)


class ReadAborted(Exception):
    """The file :func:`read_bounded` reads changed under it; the message says how."""


def read_bounded(fd: int, checked: os.stat_result, limit: int) -> Iterator[bytes]:
    """
    Yield the contents of the open file ``fd`` in chunks, at most ``limit`` bytes in all.

    ``checked`` is the stat result the caller's checks were made on: if ``fd`` is not that
    regular file (it was swapped between the check and the open), or the file grows past
    ``limit`` while it is read, :class:`ReadAborted` is raised, so no more than ``limit`` bytes
    are ever held whatever the file does.
    """
    opened = os.fstat(fd)
    if (not stat.S_ISREG(opened.st_mode)
            or (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino)):
        raise ReadAborted('was replaced while being read')
    size = 0
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            return
        size += len(chunk)
        if size > limit:
            raise ReadAborted(f'grew past {limit} bytes while being read')
        yield chunk


def temporary_sibling(path) -> Path:
    """Return the hidden temporary name next to ``path`` that :func:`atomic_path` writes to."""
    path = Path(path)
    return path.with_name(f'.{path.name}.{os.getpid()}.tmp')


def fsync_folder(folder) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass            # some file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """
    Yield a temporary path to write; on success it replaces ``path`` in one rename.

    The temporary file is flushed to disk before the rename. If the block raises, the temporary
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, 'rb+') as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, 'w', encoding='utf-8') as stream:
            stream.write(text)


def atomic_write_json(path, value) -> None:
    """Write ``value`` as indented JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + '\n')


class _NoAliasDumper(yaml.SafeDumper):
    """SafeDumper that writes a value used twice out twice: our readers refuse aliases."""

    def ignore_aliases(self, data) -> bool:
        """Never write an anchor or alias (saferl_ros.errors.StrictSafeLoader refuses them)."""
        return True


def atomic_write_yaml(path, value) -> None:
    """Write ``value`` as block-style YAML, keys in their order, to ``path`` atomically."""
    atomic_write_text(path, yaml.dump(value, Dumper=_NoAliasDumper, sort_keys=False,
                                      width=120))


def sha256_file(path) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB blocks (memory stays bounded)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def plain_file_problem(folder, relative) -> Optional[str]:
    """
    Return why ``folder/relative`` is not a regular file inside ``folder``, or None if it is.

    ``relative`` must be a relative '/'-separated path of plain names (no '..', '.', empty part,
    backslash or NUL). Every folder on the way and the file itself are examined with
    ``os.lstat``: none may be a symbolic link, and the file must be a regular file (not a
    folder, device, FIFO or socket). ``folder`` itself may be a link. Nothing is opened. The
    reason reads after the file's name, e.g. ``is a symbolic link (to /dev/zero)``.
    """
    parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
    if (not parts or relative.startswith('/') or any(part in ('.', '..') for part in parts)
            or '\\' in relative or '\0' in relative):
        return (f'is not a path inside {folder} ({relative!r}); only relative paths of plain '
                "names, without '..', are accepted")
    path = Path(folder)
    for number, part in enumerate(parts, 1):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return 'is missing'
        except OSError as exc:
            return f'cannot be examined ({exc.strerror})'
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)      # the link's text; the target is never opened
            except OSError:
                target = '?'
            if number < len(parts):
                return (f'lies behind the symbolic link {path} (to {target}); only files inside '
                        'the folder itself are read')
            return f'is a symbolic link (to {target}); only regular files are read'
        if number < len(parts) and not stat.S_ISDIR(mode):
            return f'is missing ({path} is not a folder)'
    if not stat.S_ISREG(mode):
        return f'is {file_kind(mode)}, not a regular file'
    return None
