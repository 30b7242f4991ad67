"""
File-safety helpers shared by both layers: atomic writes and content hashes.

Every file the project writes for someone else to read (datasets and their manifests, run
configs and checkpoints, recordings and their index, bundle manifests) goes through
:func:`atomic_path`: the bytes are written to a hidden temporary name in the same folder, flushed
to disk, then renamed over the target. A reader, or a process killed mid-write, therefore sees the
old file or the new one, never half of one. (Reading untrusted files is guarded where they are
read: ``saferl_ros.bundle.read_bundle_file`` and ``offline_training.data.dataset.check_file``.)
"""

from contextlib import contextmanager
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator


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


def atomic_write_yaml(path, value) -> None:
    """Write ``value`` as block-style YAML, keys in their order, to ``path`` atomically."""
    import yaml
    atomic_write_text(path, yaml.safe_dump(value, sort_keys=False, width=120))


def sha256_file(path) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB blocks (memory stays bounded)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        for block in iter(lambda: stream.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
