"""
Model bundles: load, verify and run the ONNX graphs an offline training run exported.

A bundle is a folder (``models/<name>/``) written by ``saferl-export``::

    manifest.yaml   format, task, observation channels, action bounds, graphs, critic, provenance,
                    evaluation metrics, and the sha256 of every other file
    policy.onnx     proposes an action; FISOR's whole sampler (N candidates, T denoising steps,
                    argmin over max-of-heads Q_h) with the noise as an explicit input
    critic.onnx     V_h(s) and max_j Q_h^j(s, a) (kind ``feasibility``), Q_c(s, a) (``cost``),
                    or a cost ensemble's mean and std of Q_c(s, a) (``cost_ucb``, DRCORL)
    fallback.onnx   the infeasible-region policy (FISOR: argmin Q_h over more candidates)
    golden.npz      inputs and the outputs the exporting torch model produced for them

Every graph takes RAW observations: the normalisation is inside the graph, so a robot feeds the
vector exactly as the simulator builds it. ``load_bundle`` refuses a bundle whose format version,
checksums, dimensions or golden outputs do not match, with a :class:`BundleError` that names the
file or field, what was expected and found, and the fix. Every file it reads must be a regular
file directly inside the bundle folder (never a symbolic link, a device or a FIFO) and at most
:data:`MAX_BUNDLE_FILE_BYTES` long; each is read once, and the bytes that were hashed are the
bytes that are parsed.

This module is part of the runtime core: numpy, onnxruntime and pyyaml only (never torch), so a
robot needs none of the training stack. See docs/bundle.md for the full contract.
"""

import errno
import hashlib
import io
import math
import os
from pathlib import Path
import stat
from typing import Dict, List, Optional, Tuple
import zipfile

import numpy as np
import onnxruntime as ort
from saferl_ros.errors import (
    load_yaml, MAX_REPR_CHARS, MAX_YAML_BYTES, short_repr, UserError, yaml_problem)
from saferl_ros.files import file_kind, read_bounded, READ_FLAGS, ReadAborted
import yaml

FORMAT = 'saferl_bundle/1'
MANIFEST = 'manifest.yaml'
GOLDEN = 'golden.npz'
GRAPH_NAMES = ('policy', 'critic', 'fallback')
CRITIC_KINDS = ('feasibility', 'cost', 'cost_ucb', 'none')
# Outputs of the critic graph for each critic kind (docs/bundle.md).
CRITIC_OUTPUTS = {'feasibility': ('v_h', 'q_h'), 'cost': ('q_c',),
                  'cost_ucb': ('q_c_mean', 'q_c_std'), 'none': ()}
GOLDEN_ATOL = 1e-4
BATCH = 'batch'  # name of the dynamic batch dimension in the manifest's shapes
REEXPORT = 're-export the bundle with `saferl-export RUN -o DIR`'
# Largest file load_bundle reads (checked before reading): shipped graphs are a few MB, a
# paper-size FISOR sampler tens of MB; anything larger is not a file saferl-export wrote.
MAX_BUNDLE_FILE_BYTES = 256 << 20
MAX_MANIFEST_BYTES = MAX_YAML_BYTES
# golden.npz: at most this many zip members (golden.npz has one per graph input and output);
# the arrays load_bundle reads from it may hold at most MAX_BUNDLE_FILE_BYTES together, checked
# against the sizes the zip directory and each .npy header declare before anything is inflated.
MAX_GOLDEN_MEMBERS = 256
# golden.npz: largest batch (leading dimension) of a golden array (saferl-export writes 4). Every
# other dimension must be the one the manifest declares, checked on each .npy header before its
# data is read, so the golden check never feeds the graphs (or allocates) more than this.
MAX_GOLDEN_BATCH = 64
# Flags of every open of a bundle file: those of every untrusted read (saferl_ros.files), and
# never follow a symbolic link (the lstat check comes first; this closes the gap between check
# and open).
_OPEN_FLAGS = READ_FLAGS | getattr(os, 'O_NOFOLLOW', 0)


class BundleError(UserError, RuntimeError):
    """A model bundle that cannot be used: the message names the file or field and the fix."""


def golden_key(graph: str, tensor: str) -> str:
    """Return the golden.npz key of one input or output tensor of one graph."""
    return f'{graph}.{tensor}'


def make_session(model, threads: int = 1) -> ort.InferenceSession:
    """
    Open an ONNX Runtime CPU session with ``threads`` intra-op threads (1 for low latency).

    ``model`` is the serialised ONNX model (bytes) or a path. One thread avoids the thread-pool
    hand-off that dominates a batch-1 call on a small CPU and leaves the other cores to the ROS
    executor and the simulator.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not isinstance(model, (bytes, bytearray)):
        model = str(model)
    return ort.InferenceSession(model, sess_options=options, providers=['CPUExecutionProvider'])


class _Graph:
    """
    One ONNX graph of a bundle with the input and output names the manifest declares.

    ``model`` is the graph's verified bytes; ``path`` names the file in messages.
    """

    def __init__(self, name: str, path: Path, spec: dict, model: bytes):
        self.name = name
        self.path = path
        self.inputs: Dict[str, list] = dict(spec.get('inputs') or {})
        self.outputs: Dict[str, list] = dict(spec.get('outputs') or {})
        try:
            self.session = make_session(model)
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise BundleError(f'{path}: onnxruntime cannot load the {name} graph ({exc}); '
                              f'{REEXPORT}') from exc
        self._output_names = list(self.outputs)

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        values = self.session.run(self._output_names, feeds)
        return dict(zip(self._output_names, values))


class Bundle:
    """A verified model bundle; call :func:`load_bundle` to get one."""

    def __init__(self, path: Path, manifest: dict, manifest_sha256: str,
                 graphs: Dict[str, _Graph]):
        self.path = path
        self.manifest = manifest
        self.sha256 = manifest_sha256
        self._graphs = graphs
        obs = manifest['observation']
        act = manifest['action']
        self.name: str = manifest['name']
        self.algorithm: str = manifest['algorithm']
        self.task_name: str = manifest['task']['name']
        self.obs_channels: List[str] = list(obs['channels'])
        self.obs_dim: int = int(obs['dim'])
        self.act_dim: int = int(act['dim'])
        self.action_low = np.asarray(act['low'], dtype=np.float32)
        self.action_high = np.asarray(act['high'], dtype=np.float32)
        self.critic_kind: str = manifest['critic']['kind']
        self.has_fallback: bool = 'fallback' in graphs
        self._rng = np.random.default_rng()

    # -- description ---------------------------------------------------------------------------

    @property
    def critic_config(self) -> dict:
        """Return the manifest's critic section (kind and thresholds or budget)."""
        return dict(self.manifest['critic'])

    def noise_shape(self, graph: str = 'policy', batch: int = 1) -> Optional[tuple]:
        """Return the shape of ``graph``'s noise input for ``batch`` rows (None: no noise)."""
        spec = self._graph(graph).inputs.get('noise')
        if spec is None:
            return None
        return tuple(batch if d == BATCH else int(d) for d in spec)

    def __repr__(self) -> str:
        return (f'Bundle({self.name!r}, algorithm={self.algorithm!r}, task={self.task_name!r}, '
                f'critic={self.critic_kind!r}, graphs={sorted(self._graphs)})')

    # -- inference -----------------------------------------------------------------------------

    def sample_noise(self, batch: int, rng: Optional[np.random.Generator] = None,
                     graph: str = 'policy') -> Optional[np.ndarray]:
        """Draw standard normal noise of the shape ``graph`` takes (None if it takes none)."""
        shape = self.noise_shape(graph, batch)
        if shape is None:
            return None
        rng = self._rng if rng is None else rng
        return rng.standard_normal(shape, dtype=np.float32)

    def policy(self, obs, noise=None, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """
        Return actions [B, act_dim] for raw observations [B, obs_dim] (or one [obs_dim]).

        ``noise`` makes a stochastic policy reproducible; without it, noise is drawn from ``rng``
        (or the bundle's own generator).
        """
        return self._act('policy', obs, noise, rng)

    def fallback(self, obs, noise=None, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Return the infeasible-region (fallback) policy's actions [B, act_dim]."""
        if not self.has_fallback:
            raise BundleError(f'{self.path}: bundle {self.name!r} has no fallback graph; use a '
                              'bundle with one for the monitor, or configure a fixed safe action')
        return self._act('fallback', obs, noise, rng)

    def critic(self, obs, act) -> Dict[str, np.ndarray]:
        """Return the critic graph's outputs for (s, a), each [B] (names: CRITIC_OUTPUTS)."""
        if self.critic_kind == 'none':
            raise BundleError(f'{self.path}: bundle {self.name!r} has no critic (critic kind '
                              "'none'); a safety monitor needs a bundle with a feasibility or "
                              'cost critic')
        obs = self._obs(obs)
        act = np.asarray(act, dtype=np.float32)
        if act.ndim == 1:
            act = act[None]
        if act.shape != (obs.shape[0], self.act_dim):
            raise BundleError(f'critic: action has shape {act.shape}, expected '
                              f'({obs.shape[0]}, {self.act_dim}) to match the observation batch')
        return self._graphs['critic'].run({'observation': obs, 'action': act})

    def _graph(self, name: str) -> _Graph:
        if name not in self._graphs:
            raise BundleError(f'{self.path}: bundle {self.name!r} has no {name} graph')
        return self._graphs[name]

    def _obs(self, obs) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None]
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise BundleError(f'observation has shape {obs.shape}, expected [batch, '
                              f'{self.obs_dim}] (channels {self.obs_channels})')
        return obs

    def _act(self, name: str, obs, noise, rng) -> np.ndarray:
        graph = self._graph(name)
        obs = self._obs(obs)
        feeds = {'observation': obs}
        if 'noise' in graph.inputs:
            if noise is None:
                noise = self.sample_noise(obs.shape[0], rng, graph=name)
            noise = np.asarray(noise, dtype=np.float32)
            expected = self.noise_shape(name, obs.shape[0])
            if noise.shape != expected:
                raise BundleError(f'{name}: noise has shape {noise.shape}, expected {expected}; '
                                  'use bundle.sample_noise(batch, rng, graph=...) to make it')
            feeds['noise'] = noise
        return graph.run(feeds)['action']


# -- loading and verification ------------------------------------------------------------------


def _require(mapping, key: str, where: str, kind=None):
    if not isinstance(mapping, dict) or key not in mapping:
        raise BundleError(f'{where}: field {key!r} is missing; {REEXPORT}')
    value = mapping[key]
    if kind is not None and not isinstance(value, kind):
        raise BundleError(f'{where}: field {key!r} should be a {kind.__name__}, found '
                          f'{type(value).__name__} ({short_repr(value)}); {REEXPORT}')
    return value


def _require_number(mapping, key: str, where: str, minimum: Optional[float] = None) -> float:
    """Return ``mapping[key]`` if it is a finite real number (at least ``minimum``)."""
    value = _require(mapping, key, where)
    # bool is an int in Python, and true as a threshold is a typo, not 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or (minimum is not None and value < minimum):
        wanted = 'a finite number' + (f' >= {minimum:g}' if minimum is not None else '')
        raise BundleError(f'{where}: field {key!r} is {short_repr(value)}; it must be '
                          f'{wanted}; {REEXPORT}')
    return float(value)


def is_plain_name(name) -> bool:
    """Return whether ``name`` is a plain file name: no folder part, no ``..``, no NUL."""
    return (isinstance(name, str) and name not in ('', '.', '..') and '/' not in name
            and '\\' not in name and '\0' not in name and os.sep not in name
            and (os.altsep is None or os.altsep not in name))


def _not_regular(file: Path, mode: int) -> BundleError:
    """Return the error for a bundle file that is not a regular file (``mode`` from lstat)."""
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(file)  # the link's text; the target itself is never opened
        except OSError:
            target = 'TARGET'
        return BundleError(f'{file} is a symbolic link (to {target}); a bundle holds regular '
                           f'files only: copy the file in (`cp --remove-destination {target} '
                           f'{file}`) or {REEXPORT}')
    return BundleError(f'{file} is {file_kind(mode)}; a bundle holds regular files only: put '
                       f'the file itself there or {REEXPORT}')


def read_bundle_file(folder: Path, name: str, missing: str, keep: bool = True,
                     limit: Optional[int] = None) -> Tuple[str, Optional[bytes]]:
    """
    Return (sha256, bytes or None) of file ``name`` of the resolved bundle folder ``folder``.

    The file must be a regular file directly inside ``folder`` (checked with ``os.lstat``
    before it is opened, and again on the open descriptor) of at most ``limit`` bytes; it is
    opened with ``O_NOFOLLOW`` and read once, so the hash is that of the bytes returned.
    ``missing`` ends the message when the file does not exist. ``keep=False`` only hashes.
    ``limit`` defaults to MAX_BUNDLE_FILE_BYTES (read at call time).
    """
    limit = MAX_BUNDLE_FILE_BYTES if limit is None else limit
    if not is_plain_name(name):
        raise BundleError(f'{folder / MANIFEST}: names the file {short_repr(name)}; bundle files '
                          f'are plain file names inside the bundle folder; {REEXPORT}')
    file = folder / name
    try:
        info = os.lstat(file)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(f'{file}: missing; {missing}') from None
    except OSError as exc:
        raise BundleError(f'{file}: cannot be examined ({exc.strerror}); check the bundle '
                          f"folder's permissions") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(file, info.st_mode)
    if info.st_size > limit:
        raise BundleError(f'{file}: {info.st_size} bytes, more than the {limit} a bundle file '
                          f'may have (saferl_ros.bundle.MAX_BUNDLE_FILE_BYTES); it is not a file '
                          f'saferl-export wrote; {REEXPORT}')
    if os.path.dirname(os.path.realpath(file)) != str(folder):
        raise BundleError(f'{file}: resolves outside the bundle folder {folder}; a bundle holds '
                          f'regular files only: copy the file in or {REEXPORT}')
    try:
        fd = os.open(file, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a symbolic link after the check
            raise _not_regular(file, stat.S_IFLNK) from None
        raise BundleError(f'{file}: cannot be opened ({exc.strerror}); check its '
                          f'permissions') from None
    digest, chunks = hashlib.sha256(), []
    try:
        for chunk in read_bounded(fd, info, limit):
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    except ReadAborted as why:
        raise BundleError(f'{file}: {why}; load the bundle again once nothing writes to its '
                          f'folder') from None
    except OSError as exc:
        raise BundleError(f'{file}: cannot be read ({exc.strerror}); {REEXPORT}') from None
    finally:
        os.close(fd)
    return digest.hexdigest(), (b''.join(chunks) if keep else None)


def _read_manifest(path: Path):
    """Return (manifest dict, sha256 of its bytes), hashing exactly the bytes that were parsed."""
    file = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f'{path}: not a model bundle folder (it does not exist or is a file); '
                          f'point at the folder `saferl-export` wrote, e.g. models/<name>/')
    sha256, data = read_bundle_file(
        path, MANIFEST, f'a bundle folder must contain {MANIFEST}; {REEXPORT}',
        limit=MAX_MANIFEST_BYTES)
    try:
        manifest = load_yaml(data.decode('utf-8'))
    except UnicodeDecodeError as exc:
        raise BundleError(f'{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); '
                          f'{REEXPORT}') from None
    except yaml.YAMLError as exc:
        raise BundleError(f'{file}: not valid YAML ({yaml_problem(exc)}); {REEXPORT}') from None
    if not isinstance(manifest, dict):
        raise BundleError(f'{file}: expected a mapping, found {type(manifest).__name__}; '
                          f'{REEXPORT}')
    found = manifest.get('format')
    if found != FORMAT:
        raise BundleError(
            f'{file}: field format is {short_repr(found)}, expected {FORMAT!r}: this runtime '
            f'reads only {FORMAT} bundles; {REEXPORT} with the saferl_ros version you deploy')
    return manifest, sha256


def _check_manifest(manifest: dict, where: str) -> None:
    for key in ('name', 'algorithm'):
        _require(manifest, key, where, str)
    task = _require(manifest, 'task', where, dict)
    _require(task, 'name', f'{where} task', str)
    obs = _require(manifest, 'observation', where, dict)
    dim = _require(obs, 'dim', f'{where} observation', int)
    channels = _require(obs, 'channels', f'{where} observation', list)
    if len(channels) != dim:
        raise BundleError(f'{where}: observation.channels has {len(channels)} names, expected '
                          f'observation.dim = {dim}; {REEXPORT}')
    norm = obs.get('normalization')
    if norm is not None:
        for key in ('mean', 'std'):
            values = _require(norm, key, f'{where} observation.normalization', list)
            if len(values) != dim:
                raise BundleError(f'{where}: observation.normalization.{key} has {len(values)} '
                                  f'entries, expected {dim}; {REEXPORT}')
    act = _require(manifest, 'action', where, dict)
    act_dim = _require(act, 'dim', f'{where} action', int)
    _check_task_layout(task['name'], channels, act_dim, where)
    bounds = {}
    for key in ('low', 'high'):
        values = _require(act, key, f'{where} action', list)
        if len(values) != act_dim:
            raise BundleError(f'{where}: action.{key} has {len(values)} entries, expected '
                              f'action.dim = {act_dim}; {REEXPORT}')
        # The controller clips every action to these bounds: a NaN bound would turn every
        # action into NaN, swapped ones into a constant full-scale command.
        bounds[key] = [_require_number(dict(enumerate(values)), i, f'{where} action.{key}')
                       for i in range(act_dim)]
    if any(lo >= hi for lo, hi in zip(bounds['low'], bounds['high'])):
        raise BundleError(f'{where}: action.low {short_repr(bounds["low"])} must lie below '
                          f'action.high {short_repr(bounds["high"])} in every entry; {REEXPORT}')
    critic = _require(manifest, 'critic', where, dict)
    kind = _require(critic, 'kind', f'{where} critic', str)
    if kind not in CRITIC_KINDS:
        raise BundleError(f'{where}: critic.kind is {short_repr(kind)}, expected one of '
                          f'{CRITIC_KINDS}; {REEXPORT}')
    # The monitor compares the critic with these: inf or NaN would switch the shield off (or
    # on for good) without a word, so they are checked like the monitor's own parameters.
    if kind == 'feasibility':
        _require_number(critic, 'threshold_v', f'{where} critic')
        _require_number(critic, 'threshold_q', f'{where} critic')
    if kind in ('cost', 'cost_ucb'):
        _require_number(critic, 'budget', f'{where} critic')
    if kind == 'cost_ucb':
        _require_number(critic, 'k', f'{where} critic', minimum=0.0)
    graphs = _require(manifest, 'graphs', where, dict)
    _require(graphs, 'policy', f'{where} graphs', dict)
    unknown = sorted(set(graphs) - set(GRAPH_NAMES))
    if unknown:
        raise BundleError(f'{where}: graphs has unknown entries {short_repr(unknown)}, expected '
                          f'a subset of '
                          f'{GRAPH_NAMES}; {REEXPORT}')
    if (kind == 'none') != ('critic' not in graphs):
        raise BundleError(f'{where}: critic.kind is {kind!r} but graphs '
                          f'{"has" if "critic" in graphs else "lacks"} a critic entry; '
                          f'{REEXPORT}')
    _require(manifest, 'files', where, dict)


def _check_task_layout(name: str, channels: list, act_dim: int, where: str) -> None:
    """
    Refuse a manifest whose observation channels or action size are not its task's.

    BallCircle and CarCircle (BallRun and CarRun) have the same sizes, so only the channel names
    tell a ball's model from a car's: a manifest naming the other task would otherwise run one
    robot's policy on the other. A task outside the registry is not checked here.
    """
    from saferl_ros.observation import channel_names
    from saferl_ros.tasks import get_task
    try:
        spec = get_task(name)
    except KeyError:
        return
    expected = channel_names(spec.name)
    if list(channels) != expected or act_dim != spec.act_dim:
        raise BundleError(f'{where}: task {spec.name} observes {expected} and acts in '
                          f'{spec.act_dim} values, but the manifest lists channels '
                          f'{short_repr(channels)} and action.dim {act_dim}: the task does not '
                          f'match the model; {REEXPORT}')


def _check_files(path: Path, manifest: dict) -> Dict[str, bytes]:
    """Verify every listed file; return the bytes of the graphs and golden.npz, as hashed."""
    files = manifest['files']
    where = path / MANIFEST
    needed = [GOLDEN] + [_require(spec, 'file', f'{where} graphs.{graph}', str)
                         for graph, spec in manifest['graphs'].items()]
    for name in needed:
        if name not in files:
            raise BundleError(f'{where}: files has no sha256 for {name}; {REEXPORT}')
    for name in files:
        if not is_plain_name(name) or name == MANIFEST:
            raise BundleError(f'{where}: files lists {short_repr(name)}; entries must be plain '
                              f'file names inside the bundle folder (not {MANIFEST}); '
                              f'{REEXPORT}')
    contents = {}
    for name, expected in files.items():
        found, data = read_bundle_file(
            path, name, f'the manifest lists it with sha256 {str(expected)[:12]}...; copy the '
            f'whole bundle folder or {REEXPORT}', keep=name in needed)
        if found != expected:
            raise BundleError(f'{path / name}: sha256 mismatch, manifest expects '
                              f'{short_repr(expected)}, '
                              f'file has {found}; the file was modified or corrupted; '
                              f'{REEXPORT}')
        if data is not None:
            contents[name] = data
    return contents


def _expected_shape(spec, graph: str, tensor: str, where: str) -> list:
    if not isinstance(spec, list) or not spec:
        raise BundleError(f'{where}: graphs.{graph}.{tensor} shape should be a non-empty list, '
                          f'found {short_repr(spec)}; {REEXPORT}')
    return spec


def _fmt(shape) -> str:
    """Format a shape the way the manifest writes it: [batch, 8] (a long one cut short)."""
    text = '[' + ', '.join(str(d) for d in shape[:8]) + (', ...]' if len(shape) > 8 else ']')
    return text if len(text) <= MAX_REPR_CHARS else text[:MAX_REPR_CHARS - 3] + '...'


def _check_graph(graph: _Graph, manifest: dict, where: str) -> None:
    """Compare the ONNX graph's declared inputs/outputs with the manifest and its dimensions."""
    obs_dim = manifest['observation']['dim']
    act_dim = manifest['action']['dim']
    known = {'observation': [BATCH, obs_dim], 'action': [BATCH, act_dim]}
    for tensor, spec in graph.inputs.items():
        spec = _expected_shape(spec, graph.name, tensor, where)
        if tensor in known and spec != known[tensor]:
            raise BundleError(f'{where}: graphs.{graph.name}.inputs.{tensor} is {_fmt(spec)}, '
                              f'expected {_fmt(known[tensor])} from observation.dim/action.dim; '
                              f'{REEXPORT}')
        if tensor == 'noise' and (len(spec) != 4 or spec[0] != BATCH or spec[-1] != act_dim):
            raise BundleError(f'{where}: graphs.{graph.name}.inputs.noise is {_fmt(spec)}, '
                              f'expected [batch, candidates, steps, {act_dim}]; {REEXPORT}')
    onnx_inputs = {i.name: i.shape for i in graph.session.get_inputs()}
    onnx_outputs = {o.name: o.shape for o in graph.session.get_outputs()}
    for side, declared, actual in (('inputs', graph.inputs, onnx_inputs),
                                   ('outputs', graph.outputs, onnx_outputs)):
        if set(declared) != set(actual):
            raise BundleError(f'{graph.path}: ONNX {side} are {sorted(actual)}, the manifest '
                              f'declares {sorted(declared)}; {REEXPORT}')
        for tensor, spec in declared.items():
            spec = _expected_shape(spec, graph.name, tensor, where)
            onnx_shape = actual[tensor]
            fixed_ok = len(onnx_shape) == len(spec) and all(
                isinstance(o, str) or o is None or o == s
                for o, s in zip(onnx_shape, spec) if s != BATCH)
            if not fixed_ok:
                raise BundleError(f'{graph.path}: {tensor} has ONNX shape {_fmt(onnx_shape)}, the '
                                  f'manifest declares {_fmt(spec)}; {REEXPORT}')
            if spec[0] == BATCH and isinstance(onnx_shape[0], int):
                raise BundleError(f'{graph.path}: {tensor} has a fixed batch dimension '
                                  f'{onnx_shape[0]}, expected a dynamic one; {REEXPORT}')
    if graph.name in ('policy', 'fallback'):
        if list(graph.outputs) != ['action'] or graph.outputs['action'] != [BATCH, act_dim]:
            raise BundleError(f'{where}: graphs.{graph.name}.outputs should be '
                              f'{{action: [batch, {act_dim}]}}, found '
                              f'{short_repr(graph.outputs)}; '
                              f'{REEXPORT}')
    if graph.name == 'critic':
        kind = manifest['critic']['kind']
        expected = set(CRITIC_OUTPUTS[kind])
        if set(graph.outputs) != expected:
            raise BundleError(f'{where}: graphs.critic.outputs are '
                              f'{short_repr(sorted(graph.outputs))}, a '
                              f'{kind} critic has {sorted(expected)}; {REEXPORT}')


def _read_golden(file: Path, data: bytes, shapes: Dict[str, list]) -> Dict[str, np.ndarray]:
    """
    Return the golden.npz arrays ``shapes`` names (key: declared shape); absent ones left out.

    Only the members named by ``shapes`` are read, and only after the size the zip directory
    declares for each (all of them together at most MAX_BUNDLE_FILE_BYTES), the size its .npy
    header declares (shape x dtype, at most the member's size) and the header's shape (the
    declared one, batch dimension at most MAX_GOLDEN_BATCH) have been checked, so a small file
    that inflates to gigabytes, or feeds the graphs a huge batch, is refused, not read.
    """
    limit = MAX_BUNDLE_FILE_BYTES
    # Each zip directory entry starts with this signature, so the count bounds the entries
    # zipfile would parse (and keep in memory) before any check below.
    entries = data.count(b'PK\x01\x02')
    if entries > MAX_GOLDEN_MEMBERS:
        raise BundleError(f'{file}: holds up to {entries} zip members, more than the '
                          f'{MAX_GOLDEN_MEMBERS} a golden file may have; it is not a file '
                          f'saferl-export wrote; {REEXPORT}')
    arrays, total = {}, 0
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for key, spec in shapes.items():
                info = members.get(f'{key}.npy')
                if info is None:
                    continue
                total += info.file_size
                if total > limit:
                    raise BundleError(
                        f'{file}: member {key}.npy declares {info.file_size} bytes '
                        f'uncompressed, past the {limit} the golden arrays may hold together '
                        f'(saferl_ros.bundle.MAX_BUNDLE_FILE_BYTES); it is not a file '
                        f'saferl-export wrote; {REEXPORT}')
                with archive.open(info) as stream:
                    arrays[key] = _read_npy(file, key, stream, info.file_size, spec)
    except BundleError:
        raise
    except Exception as exc:  # a corrupt zip raises zipfile/ValueError/OSError variants
        raise BundleError(f'{file}: cannot be read ({short_repr(str(exc))}); '
                          f'{REEXPORT}') from None
    return arrays


def _golden_shape_ok(shape: tuple, spec: list) -> bool:
    """Return whether a golden array's ``shape`` fits the manifest's ``spec``."""
    if len(shape) != len(spec):
        return False
    for dim, declared in zip(shape, spec):
        if isinstance(declared, int) and not isinstance(declared, bool):
            if int(dim) != declared:
                return False
        elif int(dim) > MAX_GOLDEN_BATCH:  # the batch (or another symbolic) dimension
            return False
    return True


def _read_npy(file: Path, key: str, stream, size: int, spec: list) -> np.ndarray:
    """Read one .npy member of ``size`` bytes; its header's size and shape are checked first."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f'{key}.npy has .npy format version {version}, expected 1.0 or 2.0')
    if dtype.kind not in 'biuf' or dtype.hasobject:
        raise BundleError(f'{file}: {key} has dtype {short_repr(str(dtype))}, expected numbers; '
                          f'{REEXPORT}')
    count = 1
    for dim in shape:
        count *= int(dim)
    nbytes = count * dtype.itemsize
    if nbytes > size:
        raise BundleError(f'{file}: {key} declares shape {short_repr(tuple(shape))} of '
                          f'{dtype} ({nbytes} bytes) in a member of {size} bytes; it is not a '
                          f'file saferl-export wrote; {REEXPORT}')
    if not _golden_shape_ok(shape, spec):
        raise BundleError(f'{file}: {key} has shape {short_repr(tuple(shape))}, the manifest '
                          f'declares {_fmt(spec)} and a golden batch may be at most '
                          f'{MAX_GOLDEN_BATCH} (saferl_ros.bundle.MAX_GOLDEN_BATCH); it is not '
                          f'a file saferl-export wrote; {REEXPORT}')
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
        raise BundleError(f'{file}: {key} is truncated ({len(raw)} of {nbytes} bytes); '
                          f'{REEXPORT}')
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order='F' if fortran else 'C')


def _check_golden(path: Path, data: bytes, graphs: Dict[str, _Graph], atol: float) -> None:
    file = path / GOLDEN
    golden = _read_golden(file, data, {golden_key(graph.name, tensor): spec
                                       for graph in graphs.values()
                                       for tensor, spec in (*graph.inputs.items(),
                                                            *graph.outputs.items())})
    # Every input is read and checked (shape, batch) before any graph runs.
    all_feeds = {}
    for graph in graphs.values():
        feeds, batches = {}, {}
        for tensor, spec in graph.inputs.items():
            key = golden_key(graph.name, tensor)
            if key not in golden:
                raise BundleError(f'{file}: array {key!r} is missing (golden input of the '
                                  f'{graph.name} graph); {REEXPORT}')
            feeds[tensor] = golden[key].astype(np.float32, copy=False)
            if spec[0] == BATCH:
                batches[key] = feeds[tensor].shape[0]
        if len(set(batches.values())) > 1:
            raise BundleError(f'{file}: the golden inputs of the {graph.name} graph have '
                              f'different batch sizes ({short_repr(batches)}); {REEXPORT}')
        all_feeds[graph.name] = feeds
    for graph in graphs.values():
        try:
            outputs = graph.run(all_feeds[graph.name])
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise BundleError(f'{graph.path}: onnxruntime cannot run the {graph.name} graph on '
                              f'the golden inputs ({short_repr(str(exc))}); {REEXPORT}') from None
        for tensor, value in outputs.items():
            key = golden_key(graph.name, tensor)
            if key not in golden:
                raise BundleError(f'{file}: array {key!r} is missing (golden output of the '
                                  f'{graph.name} graph); {REEXPORT}')
            expected = golden[key]
            if expected.shape != value.shape:
                raise BundleError(f'{file}: {key} has shape {expected.shape}, the ONNX graph '
                                  f'gives {value.shape}; {REEXPORT}')
            error = float(np.max(np.abs(expected - value))) if value.size else 0.0
            if not np.isfinite(value).all() or error > atol:
                raise BundleError(
                    f'{graph.path}: golden output {key} differs from what the exporting torch '
                    f'model produced by up to {error:.3g} (tolerance {atol:g}); the graph does '
                    f'not compute what was trained (or onnxruntime differs); {REEXPORT} and '
                    'check onnxruntime is the pinned version')


def bundle_task(path) -> str:
    """Return the task named in bundle folder ``path``'s manifest (nothing else is verified)."""
    path = Path(os.path.expanduser(str(path))).resolve()
    manifest, _ = _read_manifest(path)
    where = str(path / MANIFEST)
    return _require(_require(manifest, 'task', where, dict), 'name', f'{where}: task', str)


def load_bundle(path, verify_golden: bool = True, golden_atol: float = GOLDEN_ATOL) -> Bundle:
    """
    Load and verify the bundle in folder ``path``; raise BundleError if it cannot be used.

    ``path`` itself may be a symbolic link (it is resolved once); every file read inside it must
    be a regular file of at most MAX_BUNDLE_FILE_BYTES (see :func:`read_bundle_file`).
    Checks, in order: the format version, the manifest's fields and dimensions, every file's
    sha256, each ONNX graph's inputs and outputs against the manifest, and (``verify_golden``)
    that the graphs reproduce the exporting torch model's outputs on golden.npz within
    ``golden_atol``.
    """
    path = Path(os.path.expanduser(str(path))).resolve()
    manifest, manifest_sha256 = _read_manifest(path)
    where = str(path / MANIFEST)
    _check_manifest(manifest, where)
    contents = _check_files(path, manifest)
    graphs = {}
    for name, spec in manifest['graphs'].items():
        graphs[name] = _Graph(name, path / spec['file'], spec, contents[spec['file']])
        _check_graph(graphs[name], manifest, where)
    if verify_golden:
        _check_golden(path, contents[GOLDEN], graphs, golden_atol)
    return Bundle(path, manifest, manifest_sha256, graphs)
