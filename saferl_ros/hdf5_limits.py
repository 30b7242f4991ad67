"""
What an HDF5 array may declare before any of it is read, for every reader of DSRL-layout files.

The data layer (``offline_training.data.dataset.check_file``) and the recorder's reader
(``saferl_ros.recorder.load_episodes``) apply the same rules. A few KB of HDF5 can declare any
shape: chunks never written read back as fill values, a resizable array may declare one chunk far
larger than its rows, and a stored chunk may inflate to far more than its declared size (HDF5's
deflate filter grows its buffer until the stream ends). Reading what a file declares could
therefore allocate anything. Every rule here reads metadata only, except
`chunk_stream_problem`, which inflates one chunk at a time into at most the chunk's declared
size. The messages say what is wrong; callers add the file, the key and the fix.

Runtime core: numpy + h5py only.
"""

from typing import Optional, Tuple
import zlib

import h5py
import numpy as np

# Row limit: DSRL's largest Bullet-Safety-Gym dataset holds ~2.9 million transitions (AntCircle,
# 5728 episodes of up to 500 steps) and the others 1-2 million; 20 million leaves room for merged
# recordings, while 1e8 rows of 72 float32 columns would already need 29 GB for one key.
MAX_ROWS = 20_000_000
# Bytes of one row of one array (16384 float32 columns): DSRL's widest observation has a few
# dozen. Bounds what reading one row costs, also where no task fixes the widths.
MAX_ROW_BYTES = 64 << 10
# Bytes of one chunk, uncompressed: h5py's own chunks hold at most 1 MiB. A chunk is the unit
# HDF5 decompresses, whatever part of it is read.
MAX_CHUNK_BYTES = 8 << 20
# Declared (uncompressed) bytes per byte actually stored. Deflate (gzip) cannot expand a byte
# into more than ~1032 (shuffle and lzf expand less), so no real gzip'd array exceeds this, however
# compressible: all-zero costs or flags, common in real files, compress 400-700:1, which is why a
# bound on the whole file's ratio (e.g. 200:1) is not used per key. Unwritten chunks store 0.
MAX_EXPANSION = 1100
# Arrays declaring up to this many bytes pass the expansion rule whatever they store.
SMALL_ARRAY_BYTES = 64 * 1024
# The filters a DSRL file uses (h5py's gzip, shuffle and checksum); their output size is known.
_DEFLATE, _SHUFFLE, _FLETCHER32 = (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE,
                                   h5py.h5z.FILTER_FLETCHER32)
_FILTER_NAMES = {_DEFLATE: 'gzip', _SHUFFLE: 'shuffle', _FLETCHER32: 'fletcher32',
                 h5py.h5z.FILTER_SZIP: 'szip', h5py.h5z.FILTER_NBIT: 'nbit',
                 h5py.h5z.FILTER_SCALEOFFSET: 'scaleoffset', 32000: 'lzf'}


def human(nbytes: int) -> str:
    """
    Return a byte count in binary units, e.g. ``3.0 GiB``.

    The exact count follows where rounding hides it (``8.0 MiB (8388640 bytes)``), so a size
    just over a limit reads as over it.
    """
    if nbytes < 1024:
        return f'{nbytes} bytes'
    value, unit = float(nbytes), 'bytes'
    for unit in ('KiB', 'MiB', 'GiB', 'TiB'):
        value /= 1024
        if value < 1024:
            break
    text = f'{value:.1f} {unit}'
    return text if round(value, 1) * 1024 ** ('KMGT'.index(unit[0]) + 1) == nbytes \
        else f'{text} ({nbytes} bytes)'


def link_problem(h5: h5py.File, key: str) -> Optional[str]:
    """Return why top-level name ``key`` is not a plain object of this file; never follows it."""
    try:
        link = h5.get(key, getlink=True)
    except (OSError, TypeError, ValueError, KeyError) as err:
        return f'is a link of a kind h5py cannot inspect ({err})'
    if isinstance(link, h5py.HardLink):
        return None
    if isinstance(link, h5py.SoftLink):
        return f'is a soft link to {link.path}'
    if isinstance(link, h5py.ExternalLink):
        return f'is an external link to {link.path} in {link.filename}'
    return f'is a {type(link).__name__}, not a plain dataset'


def elsewhere_problem(ds: h5py.Dataset) -> Optional[str]:
    """Return why a dataset's data lies outside its file (virtual, external raw files), or None."""
    if ds.is_virtual:
        return 'is a virtual dataset whose data lies in other files'
    if ds.external:
        files = ', '.join(str(entry[0]) for entry in ds.external)
        return f'keeps its data in external raw file(s) {files}'
    return None


def rows_problem(rows: int) -> Optional[str]:
    """Return why ``rows`` rows are too many for one array, or None."""
    if rows > MAX_ROWS:
        return (f'declares {rows} rows, more than the {MAX_ROWS} accepted (DSRL datasets hold at '
                'most ~3 million)')
    return None


def _filters(ds: h5py.Dataset) -> list:
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]


def declaration_problem(ds: h5py.Dataset) -> Optional[str]:
    """
    Return why what a dataset declares could not be read in bounded memory, or None; reads no data.

    Variable-length values, more than MAX_ROWS rows, rows of more than MAX_ROW_BYTES, chunks of
    more than MAX_CHUNK_BYTES, and filters other than gzip, shuffle and fletcher32 (with gzip
    the outermost but for the checksum, so that `chunk_stream_problem` can check it).
    """
    if ds.dtype.hasobject:
        return 'holds variable-length values, whose size cannot be bounded before reading'
    shape = ds.shape or ()
    itemsize = ds.dtype.itemsize
    if shape:
        problem = rows_problem(shape[0])
        if problem:
            return problem
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    if row > MAX_ROW_BYTES:
        return (f'declares rows of {human(row)} (shape {shape}, {itemsize}-byte values), more '
                f'than the {human(MAX_ROW_BYTES)} one row may hold')
    if ds.chunks:
        chunk = int(np.prod(ds.chunks, dtype=np.int64)) * itemsize
        if chunk > MAX_CHUNK_BYTES:
            return (f'declares chunks of {human(chunk)} (chunk shape {ds.chunks} for shape '
                    f'{shape}), more than the {human(MAX_CHUNK_BYTES)} accepted (h5py writes '
                    'chunks of at most 1 MiB)')
        ids = _filters(ds)
        odd = [i for i in ids if i not in (_DEFLATE, _SHUFFLE, _FLETCHER32)]
        if odd or ids.count(_DEFLATE) > 1 or (
                _DEFLATE in ids and set(ids[ids.index(_DEFLATE) + 1:]) - {_FLETCHER32}):
            names = ', '.join(_FILTER_NAMES.get(i, f'#{i}') for i in ids)
            return (f'is stored through the HDF5 filters {names}, whose output cannot be bounded '
                    'before reading (DSRL files use gzip, optionally after shuffle: '
                    '`h5repack -f GZIP=4 IN OUT` rewrites a file so)')
    return None


def storage_shortfall(ds: h5py.Dataset) -> Optional[Tuple[str, int, int, int]]:
    """
    Return how a dataset's declared size is not backed by stored data, or None if it is.

    The result is (kind, declared bytes, stored bytes or chunks, expected chunks), kind being
    ``unwritten``, ``chunks`` or ``expansion`` (see `describe_shortfall`). Reads metadata only. A
    real array has every chunk stored, and each stored byte expands to at most ~1032 bytes
    (deflate's limit; shuffle and lzf expand less): a real file, however compressible (all-zero
    costs compress ~600:1), passes all three rules.
    """
    if not ds.shape:
        return None
    declared = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize
    if declared == 0:
        return None
    stored = ds.id.get_storage_size()
    if stored == 0:
        return 'unwritten', declared, 0, 0
    if ds.chunks:
        expected = 1
        for size, chunk in zip(ds.shape, ds.chunks):
            expected *= -(-size // chunk)
        try:
            present = ds.id.get_num_chunks()
        except (AttributeError, RuntimeError, OSError):   # HDF5 < 1.10.5 cannot count chunks
            present = expected
        if present < expected:
            return 'chunks', declared, present, expected
    if declared > MAX_EXPANSION * stored + SMALL_ARRAY_BYTES:
        return 'expansion', declared, stored, 0
    return None


def describe_shortfall(kind: str, declared: int, stored: int, expected: int) -> str:
    """Return the message of a `storage_shortfall` (or of the sums of several of one kind)."""
    if kind == 'unwritten':
        return f'{human(declared)} declared, none of it stored in the file (never written)'
    if kind == 'chunks':
        return (f'{human(declared)} declared, but only {stored} of {expected} chunks stored (the '
                'rest was never written and would read as fill values)')
    return (f'{human(declared)} declared, but only {human(stored)} stored, more than gzip can '
            f'expand ({MAX_EXPANSION}:1)')


def chunk_stream_problem(ds: h5py.Dataset) -> Optional[str]:
    """
    Return why a stored chunk would inflate past its declared size, or None.

    HDF5's deflate filter keeps inflating until the stream ends, so one chunk declared as a few
    KB can allocate gigabytes when read. Each gzip'd chunk is inflated here first, one at a
    time and in pieces of 1 MiB that are counted and dropped, up to its declared size plus one
    byte (after checking that its stored size is no more than deflate needs for it). Call it
    only on a dataset that `declaration_problem` accepts. A stream zlib cannot read is left to
    the real read, which reports it.
    """
    if not ds.chunks:
        return None
    ids = _filters(ds)
    if _DEFLATE not in ids:
        return None            # shuffle and fletcher32 keep (or add 4 bytes to) a chunk's size
    skipped_bit = 1 << ids.index(_DEFLATE)
    chunk = int(np.prod(ds.chunks, dtype=np.int64)) * ds.dtype.itemsize
    # deflate's worst case for incompressible data (5 bytes per 16 KB block) plus headers
    # and fletcher32's checksum
    most = chunk + chunk // 1000 + 1024
    found = []

    def visit(info):
        if info.size > most:
            found.append(f'stores a chunk of {human(info.size)} at {info.chunk_offset}, more '
                         f'than its declared {human(chunk)} needs')
            return True
        if info.filter_mask & skipped_bit:
            return None        # stored without gzip: it reads as stored
        _, data = ds.id.read_direct_chunk(info.chunk_offset)
        inflater, size = zlib.decompressobj(), 0
        try:                   # in pieces of at most 1 MiB, counted and dropped
            while size <= chunk and not inflater.eof:
                piece = len(inflater.decompress(data, 1 << 20))
                size += piece
                data = inflater.unconsumed_tail
                if not data and piece < 1 << 20:
                    break
        except zlib.error:
            return None
        if size > chunk:
            found.append(f'stores a chunk at {info.chunk_offset} that inflates past its '
                         f'declared {human(chunk)} (a forged gzip stream)')
            return True
        return None

    try:
        ds.id.chunk_iter(visit)
    except AttributeError:     # h5py < 3.8 or HDF5 without H5Dchunk_iter: one chunk at a time
        for i in range(ds.id.get_num_chunks()):
            if visit(ds.id.get_chunk_info(i)):
                break
    return found[0] if found else None


def array_problem(ds: h5py.Dataset) -> Optional[str]:
    """Return the first reason (declaration, storage, chunk streams) not to read ``ds``."""
    problem = elsewhere_problem(ds) or declaration_problem(ds)
    if problem:
        return problem
    shortfall = storage_shortfall(ds)
    if shortfall:
        return describe_shortfall(*shortfall)
    return chunk_stream_problem(ds)
