"""
Hostile and mistaken inputs: symlinked or oversized bundle files, bad run folders and YAML.

Every case must fail early with one line that names the file and the fix, never follow a
link, never read a file it is about to refuse, and never print a traceback.
"""

import builtins
import io
import json
import os
from pathlib import Path
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
from saferl_ros import bundle as rt
from saferl_ros.bundle import BundleError, load_bundle
from saferl_ros.errors import (
    ConfigError, load_yaml, MissingFileError, read_yaml_mapping, require_field, short_repr,
    UserError)
from saferl_ros.files import atomic_write_yaml, sha256_file
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / 'models' / 'bc_all-ballcircle'
SHA256 = re.compile(r'\b[0-9a-f]{64}\b')


@pytest.fixture
def bundle_copy(tmp_path):
    """Return a writable copy of the shipped BC-All bundle (the smallest one)."""
    return Path(shutil.copytree(SHIPPED, tmp_path / 'bc_all-ballcircle'))


@pytest.fixture
def opened(monkeypatch):
    """Record the path of every file opened through open(), io.open() and os.open()."""
    paths = []

    def spy(original):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                paths.append(os.path.realpath(os.fsdecode(file)))
            return original(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, 'open', spy(builtins.open))
    monkeypatch.setattr(io, 'open', spy(io.open))
    monkeypatch.setattr(os, 'open', spy(os.open))
    return paths


def one_line_error(text: str, *needles) -> str:
    """Assert ``text`` (stderr) is one error line without a traceback that names every needle."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert 'Traceback' not in text, text
    assert len(lines) == 1, text
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- bundle files

@pytest.mark.parametrize('target', ['system', 'copy'])
def test_symlinked_bundle_file_is_refused_before_it_is_opened(
        bundle_copy, tmp_path, opened, target):
    if target == 'system':
        link_to = Path('/etc/passwd')
    else:  # a link to the very file: the checksum would match, the link is refused anyway
        link_to = tmp_path / 'elsewhere' / 'policy.onnx'
        link_to.parent.mkdir()
        shutil.copy(SHIPPED / 'policy.onnx', link_to)
    (bundle_copy / 'policy.onnx').unlink()
    (bundle_copy / 'policy.onnx').symlink_to(link_to)
    opened.clear()
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert 'policy.onnx is a symbolic link' in message and 'regular files only' in message
    assert '\n' not in message and not SHA256.search(message)
    assert str(link_to.resolve()) not in opened
    assert str(bundle_copy / 'manifest.yaml') in opened  # the spy works


def test_symlinked_manifest_is_refused(bundle_copy, tmp_path, opened):
    moved = tmp_path / 'manifest.yaml'
    shutil.move(bundle_copy / 'manifest.yaml', moved)
    (bundle_copy / 'manifest.yaml').symlink_to(moved)
    with pytest.raises(BundleError, match='manifest.yaml is a symbolic link'):
        load_bundle(bundle_copy)
    assert str(moved) not in opened


def test_bundle_folder_may_be_a_symlink(bundle_copy, tmp_path):
    link = tmp_path / 'current'
    link.symlink_to(bundle_copy, target_is_directory=True)
    bundle = load_bundle(link)
    assert bundle.path == bundle_copy.resolve() and bundle.name == 'bc_all-ballcircle'


@pytest.mark.parametrize('kind', ['fifo', 'folder'])
def test_non_regular_bundle_files_are_refused(bundle_copy, kind):
    policy = bundle_copy / 'policy.onnx'
    policy.unlink()
    if kind == 'fifo':
        os.mkfifo(policy)  # opening it for reading would block forever
        expected = 'policy.onnx is a FIFO'
    else:
        policy.mkdir()
        expected = 'policy.onnx is a folder'
    with pytest.raises(BundleError, match=expected):
        load_bundle(bundle_copy)


def test_oversized_bundle_file_is_refused_unread(bundle_copy, monkeypatch, opened):
    monkeypatch.setattr(rt, 'MAX_BUNDLE_FILE_BYTES', 1 << 20)
    golden = bundle_copy / 'golden.npz'
    with open(golden, 'r+b') as stream:
        stream.truncate(10 << 30)  # 10 GB, sparse: no disk space, no time
    opened.clear()
    with pytest.raises(BundleError, match=r'golden.npz: 10737418240 bytes, more than the '
                                          r'1048576 a bundle file may have'):
        load_bundle(bundle_copy)
    assert str(golden) not in opened


@pytest.mark.parametrize('name', ['../policy.onnx', 'sub/policy.onnx', '..', ''])
def test_manifest_file_names_must_be_plain(bundle_copy, name):
    manifest = yaml.safe_load((bundle_copy / 'manifest.yaml').read_text())
    manifest['files'][name] = manifest['files']['policy.onnx']
    (bundle_copy / 'manifest.yaml').write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError, match='plain file names'):
        load_bundle(bundle_copy)


# A nine-level YAML alias bomb ("billion laughs"): 1 kB of text, 10**9 strings once expanded.
ALIAS_BOMB = 'a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n' + ''.join(
    f'a{k}: &a{k} [{",".join([f"*a{k - 1}"] * 10)}]\n' for k in range(1, 9))


def _rewrite_golden(bundle: Path, members: dict, drop=()) -> None:
    """Replace/add golden.npz members {name: raw bytes or (bytes, compression)}; rehash."""
    golden = bundle / 'golden.npz'
    with zipfile.ZipFile(golden) as old:
        kept = {info.filename: old.read(info) for info in old.infolist()
                if info.filename not in members and info.filename not in drop}
    with zipfile.ZipFile(golden, 'w') as new:
        for name, data in {**kept, **members}.items():
            data, compression = data if isinstance(data, tuple) else (data, zipfile.ZIP_STORED)
            new.writestr(name, data, compress_type=compression)
    manifest = yaml.safe_load((bundle / 'manifest.yaml').read_text())
    manifest['files']['golden.npz'] = sha256_file(golden)
    (bundle / 'manifest.yaml').write_text(yaml.safe_dump(manifest, sort_keys=False))


def _npy(shape, payload: bytes = b'') -> bytes:
    """Return a .npy member whose header declares float32 ``shape`` followed by ``payload``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {'descr': '<f4', 'fortran_order': False, 'shape': tuple(shape)})
    return header.getvalue() + payload


def test_golden_members_the_check_does_not_need_are_never_read(bundle_copy):
    # declares 64 MiB of float32 but holds 16 bytes: reading it would allocate, then fail
    _rewrite_golden(bundle_copy, {'pad.npy': _npy((1 << 24,), bytes(16))})
    assert load_bundle(bundle_copy).name == 'bc_all-ballcircle'


def test_golden_npy_header_larger_than_its_member_is_refused_unallocated(bundle_copy):
    _rewrite_golden(bundle_copy, {'policy.observation.npy': _npy((1 << 20, 8), bytes(32))})
    with pytest.raises(BundleError, match=r'golden.npz: policy.observation declares shape '
                                          r'\(1048576, 8\) of float32 \(33554432 bytes\) in a '
                                          r'member of \d+ bytes'):
        load_bundle(bundle_copy)


def test_golden_member_inflating_past_the_limit_is_refused_uninflated(bundle_copy, monkeypatch):
    monkeypatch.setattr(rt, 'MAX_BUNDLE_FILE_BYTES', 1 << 20)  # above every file on disk
    zeros = _npy((1 << 19, 1), bytes(4 << 19))                  # 2 MiB inflated, ~2 kB on disk
    _rewrite_golden(bundle_copy, {'policy.observation.npy': (zeros, zipfile.ZIP_DEFLATED)})
    assert (bundle_copy / 'golden.npz').stat().st_size < 64 << 10
    with pytest.raises(BundleError, match=r'golden.npz: member policy.observation.npy declares '
                                          r'2097280 bytes uncompressed, past the 1048576'):
        load_bundle(bundle_copy)


def test_golden_with_too_many_members_is_refused(bundle_copy):
    _rewrite_golden(bundle_copy, {f'pad{k}.npy': _npy((0,)) for k in range(300)})
    with pytest.raises(BundleError, match=r'golden.npz: holds up to 30\d zip members, more than '
                                          r'the 256'):
        load_bundle(bundle_copy)


def _no_graph_run(monkeypatch):
    """Make any ONNX graph run during the golden check fail the test."""
    def refuse(self, feeds):
        raise AssertionError(f'{self.name} graph ran on {[v.shape for v in feeds.values()]}')
    monkeypatch.setattr(rt._Graph, 'run', refuse)


@pytest.mark.parametrize('member, shape', [
    ('policy.observation', (rt.MAX_GOLDEN_BATCH + 1, 8)),  # batch past the cap
    ('policy.observation', (4, 9)),                        # observation.dim is 8
    ('policy.observation', (4, 8, 1)),                     # one dimension too many
    ('policy.observation', (32,)),                         # one too few
    ('policy.action', (rt.MAX_GOLDEN_BATCH + 1, 2)),       # outputs are checked before runs
    ('policy.action', (4, 3)),                             # action.dim is 2
])
def test_golden_array_off_its_declared_shape_is_refused_before_any_graph_runs(
        bundle_copy, monkeypatch, member, shape):
    count = int(np.prod(shape))  # a few kB at most: the member really holds the data
    _rewrite_golden(bundle_copy, {f'{member}.npy': _npy(shape, bytes(4 * count))})
    _no_graph_run(monkeypatch)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    message = str(info.value)
    assert '\n' not in message
    assert message.startswith(f'{bundle_copy / "golden.npz"}: {member} has shape {shape}, the '
                              f'manifest declares [batch, ')
    assert f'a golden batch may be at most {rt.MAX_GOLDEN_BATCH}' in message


def test_huge_golden_batch_in_a_small_file_is_refused_unallocated(bundle_copy, monkeypatch):
    # The reviewer's case, scaled down: a batch of 6,000,000 declared in a tiny member (the
    # header alone); neither the data nor the graph's buffers may be allocated.
    _rewrite_golden(bundle_copy, {'policy.observation.npy': _npy((6_000_000, 8), bytes(32))})
    assert (bundle_copy / 'golden.npz').stat().st_size < 16 << 10
    _no_graph_run(monkeypatch)
    with pytest.raises(BundleError, match=r'golden.npz: policy.observation declares shape '
                                          r'\(6000000, 8\)'):
        load_bundle(bundle_copy)


def test_golden_batch_at_the_cap_is_accepted(bundle_copy):
    obs = np.linspace(-1, 1, rt.MAX_GOLDEN_BATCH * 8, dtype=np.float32).reshape(-1, 8)
    action = load_bundle(bundle_copy, verify_golden=False).policy(obs)
    buffers = {}
    for key, value in (('policy.observation', obs), ('policy.action', action)):
        buffers[key] = io.BytesIO()
        np.save(buffers[key], value)
    _rewrite_golden(bundle_copy, {f'{k}.npy': v.getvalue() for k, v in buffers.items()})
    assert load_bundle(bundle_copy).name == 'bc_all-ballcircle'


def test_golden_inputs_of_one_graph_with_different_batches_are_refused(tmp_path, monkeypatch):
    bundle = Path(shutil.copytree(REPO / 'models' / 'bcq_lag-ballcircle', tmp_path / 'b'))
    _rewrite_golden(bundle, {'critic.action.npy': _npy((3, 2), bytes(4 * 6))})
    _no_graph_run(monkeypatch)
    with pytest.raises(BundleError, match=r'golden.npz: the golden inputs of the critic graph '
                                          r'have different batch sizes'):
        load_bundle(bundle)


def test_yaml_anchors_and_aliases_are_refused_everywhere(bundle_copy, tmp_path):
    from offline_training.overrides import parse_override
    from saferl_ros.bringup import BringupError, load_parameters
    manifest = (bundle_copy / 'manifest.yaml').read_text()
    (bundle_copy / 'manifest.yaml').write_text(ALIAS_BOMB + manifest.replace(
        'name: bc_all-ballcircle', 'name: *a8', 1))
    with pytest.raises(BundleError, match=r'manifest.yaml: not valid YAML \(anchor &a0 at line '
                                          r'1: YAML anchors and aliases are not allowed'):
        load_bundle(bundle_copy)
    config = tmp_path / 'config.yaml'
    config.write_text(ALIAS_BOMB + 'algorithm: *a8\n')
    with pytest.raises(ConfigError, match='anchor &a0 at line 1: YAML anchors and aliases'):
        read_yaml_mapping(config, 'FIX')
    config.write_text('x: 1\ny: *x\n')  # an alias of an undefined anchor: refused just as well
    with pytest.raises(ConfigError, match=r'alias \*x at line 2'):
        read_yaml_mapping(config, 'FIX')
    params = tmp_path / 'params.yaml'
    params.write_text('common: &c {ros__parameters: {a: 1}}\nsim_node: *c\n')
    with pytest.raises(BringupError, match='params.yaml: cannot read the parameters file '
                                           r'\(not valid YAML: anchor &c at line 1'):
        load_parameters(params)
    with pytest.raises(Exception, match='anchor &a'):
        parse_override('hidden=[&a 8, *a]')
    with pytest.raises(yaml.YAMLError):
        load_yaml(ALIAS_BOMB)
    shared = [1, 2]                 # our own writer never emits an alias for a shared value
    atomic_write_yaml(tmp_path / 'w.yaml', {'a': shared, 'b': shared})
    assert read_yaml_mapping(tmp_path / 'w.yaml', 'FIX') == {'a': [1, 2], 'b': [1, 2]}


def test_error_messages_quote_a_huge_value_briefly(bundle_copy):
    with pytest.raises(ConfigError) as info:
        require_field({'algorithm': [['x'] * 10_000] * 10_000}, 'algorithm', 'c.yaml', str)
    assert len(str(info.value)) < 200 and '...' in str(info.value)
    manifest = yaml.safe_load((bundle_copy / 'manifest.yaml').read_text())
    manifest['name'] = ['x' * 100] * 5000
    (bundle_copy / 'manifest.yaml').write_text(yaml.safe_dump(manifest))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert "field 'name' should be a str, found list" in str(info.value)
    assert len(str(info.value)) < 300
    # a long message keeps its beginning, where it says what is wrong (not cut in the middle)
    text = 'episode_len is unset; call resolve_config first ' + 'x' * 200 + ' END'
    quoted = short_repr(text)
    assert quoted.startswith("'episode_len is unset; call resolve_config first xxx")
    assert quoted.endswith('x...') and len(quoted) == 80
    assert short_repr('short') == "'short'"


@pytest.mark.parametrize('kind', ['device', 'fifo', 'huge'])
def test_yaml_files_must_be_small_regular_files(tmp_path, kind, opened):
    config = tmp_path / 'config.yaml'
    if kind == 'device':
        config.symlink_to('/dev/zero')   # endless: reading it would never finish
        expected = 'config.yaml is a character device, not a regular file; FIX'
    elif kind == 'fifo':
        os.mkfifo(config)                # opening it for reading would block forever
        expected = 'config.yaml is a FIFO (named pipe), not a regular file; FIX'
    else:
        with open(config, 'wb') as stream:
            stream.truncate(10 << 30)    # 10 GB, sparse
        expected = 'config.yaml: 10737418240 bytes, more than the 4194304 this file may have'
    opened.clear()
    with pytest.raises(ConfigError, match=re.escape(expected)):
        read_yaml_mapping(config, 'FIX')
    assert str(config.resolve()) not in opened


# --------------------------------------------------------------------------- shared helpers

@pytest.mark.parametrize('text, found', [('', 'empty'), ('- a\n- b\n', 'found a list'),
                                         ('just text', 'found a str'),
                                         ('a: [1\n', 'not valid YAML')])
def test_yaml_mapping_helper_rejects_non_mappings(tmp_path, text, found):
    path = tmp_path / 'config.yaml'
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        read_yaml_mapping(path, 'FIX IT')
    assert str(info.value).startswith(f'{path}: ') and found in str(info.value)
    assert str(info.value).endswith('FIX IT') and '\n' not in str(info.value)
    with pytest.raises(MissingFileError, match='missing; FIX IT'):
        read_yaml_mapping(tmp_path / 'nothing.yaml', 'FIX IT')


def test_config_values_are_type_checked():
    from offline_training.algos import fisor
    with pytest.raises(ConfigError, match="FISOR config field 'steps' should be an integer, "
                                          "found str 'abc'"):
        fisor.make_config('cpu', steps='abc')
    with pytest.raises(ConfigError, match="'critic_hidden' should be a list of an integer"):
        fisor.make_config('cpu', critic_hidden=[64, 'x'])
    assert fisor.make_config('cpu', actor_lr='1e-4').actor_lr == 1e-4  # YAML 1.1 reads a str
    with pytest.raises(KeyError, match='unknown task'):  # still a KeyError for callers
        from saferl_ros.tasks import get_task
        get_task('BallSquare')


# --------------------------------------------------------------------------- command lines

def _run_folder(tmp_path, config_text=None, checkpoint=b'not a checkpoint'):
    run = tmp_path / 'run'
    run.mkdir()
    if config_text is not None:
        (run / 'config.yaml').write_text(config_text)
    if checkpoint is not None:
        (run / 'checkpoint.pt').write_bytes(checkpoint)
    return run


GOOD_CONFIG = ('algorithm: bc_all\nobs_dim: 8\nact_dim: 2\ntask: {name: BallCircle}\n'
               'algo_config: {hidden: [16, 16]}\n')


@pytest.mark.parametrize('case, needle', [
    ('missing', 'does not exist'),
    ('no config', 'config.yaml is missing'),
    ('empty', 'config.yaml: empty'),
    ('list', 'config.yaml: expected a mapping of fields, found a list'),
    ('unknown algorithm', "config.yaml: unknown algorithm 'sac'"),
    ('bad field', "config.yaml: BC config field 'hidden' should be"),
    ('no field', "config.yaml: field 'obs_dim' is missing"),
    ('garbage checkpoint', 'checkpoint.pt: not a readable checkpoint'),
    ('foreign checkpoint', "checkpoint.pt: not a saferl-train checkpoint (missing ['model'"),
    ('compressed checkpoint', 'is compressed, which torch.save never does'),
    ('alias bomb', 'config.yaml: not valid YAML (anchor &a0 at line 1: YAML anchors and aliases'),
    ('config is /dev/zero', 'config.yaml is a character device, not a regular file'),
    ('negative obs_dim', "config.yaml: field 'obs_dim' is -3, expected a positive integer"),
    ('zero act_dim', "config.yaml: field 'act_dim' is 0, expected a positive integer"),
    ('huge obs_dim', 'config.yaml: obs_dim 100000 and act_dim 2 do not match task BallCircle '
                     '(8 and 2)'),
    # the same shapes as another task's model would be exported as a "verified" bundle of it
    ('other task', 'config.yaml: obs_dim 8 and act_dim 2 do not match task BallRun (7 and 2)'),
    ('text step', "checkpoint.pt: its step is 'abc', not an integer >= 0"),
    ('huge hidden', 'config.yaml: obs_dim 8, act_dim 2 and the layer sizes of algo_config '
                    'describe a model of 4024002 values, more than the 262144'),
    ('negative hidden', 'config.yaml: cannot build the model it describes (RuntimeError'),
    ('deep hidden', "config.yaml: algo_config field 'hidden' asks for 30000 layers, more than "
                    'the 64'),
    ('huge integer', 'config.yaml: not valid YAML (a value cannot be read:'),
])
def test_export_and_eval_report_bad_run_folders_in_one_line(tmp_path, capsys, monkeypatch, case,
                                                            needle):
    from offline_training import evaluate, export
    # a model of more than 1 MiB of float32 is "too large" here: nothing large is allocated
    # even where the check were missing
    monkeypatch.setattr(rt, 'MAX_BUNDLE_FILE_BYTES', 1 << 20)
    texts = {'no config': None, 'empty': '', 'list': '- algorithm: bc_all\n',
             'unknown algorithm': GOOD_CONFIG.replace('bc_all', 'sac'),
             'bad field': GOOD_CONFIG.replace('[16, 16]', 'wide'),
             'no field': GOOD_CONFIG.replace('obs_dim: 8\n', ''),
             'alias bomb': ALIAS_BOMB + GOOD_CONFIG.replace('algorithm: bc_all', 'algorithm: *a8'),
             'config is /dev/zero': None,
             'negative obs_dim': GOOD_CONFIG.replace('obs_dim: 8', 'obs_dim: -3'),
             'zero act_dim': GOOD_CONFIG.replace('act_dim: 2', 'act_dim: 0'),
             'huge obs_dim': GOOD_CONFIG.replace('obs_dim: 8', 'obs_dim: 100000'),
             'other task': GOOD_CONFIG.replace('BallCircle', 'BallRun'),
             'huge hidden': GOOD_CONFIG.replace('[16, 16]', '[2000, 2000]'),
             'negative hidden': GOOD_CONFIG.replace('[16, 16]', '[16, -5]'),
             # a 30 000-layer model took 16 s to build (twice) before its size was known
             'deep hidden': GOOD_CONFIG.replace('[16, 16]', str([1] * 30_000)),
             # Python refuses to parse integers of more than 4300 digits (ValueError)
             'huge integer': GOOD_CONFIG.replace('obs_dim: 8', 'obs_dim: ' + '9' * 5000)}
    if case == 'missing':
        run = tmp_path / 'nothing'
    else:
        run = _run_folder(tmp_path, texts.get(case, GOOD_CONFIG))
        if case == 'foreign checkpoint':
            torch.save({'weights': 1}, run / 'checkpoint.pt')
        if case == 'text step':
            torch.save({'model': {}, 'step': 'abc'}, run / 'checkpoint.pt')
        if case == 'config is /dev/zero':
            (run / 'config.yaml').symlink_to('/dev/zero')
        if case == 'compressed checkpoint':
            torch.save({'model': {}, 'step': 1}, tmp_path / 'plain.pt')
            with zipfile.ZipFile(tmp_path / 'plain.pt') as plain, \
                    zipfile.ZipFile(run / 'checkpoint.pt', 'w', zipfile.ZIP_DEFLATED) as packed:
                for info in plain.infolist():
                    packed.writestr(info.filename, plain.read(info))
    assert export.main([str(run), '-o', str(tmp_path / 'bundle')]) == 2
    one_line_error(capsys.readouterr().err, 'saferl-export: error: ', run, needle)
    assert not (tmp_path / 'bundle').exists()
    if case in ('missing', 'no config'):  # saferl-eval does not know what it was meant to be
        needle = {'missing': 'no such folder', 'no config': 'neither a model bundle'}[case]
    assert evaluate.main([str(run), '--episodes', '1', '--no-progress']) == 2
    one_line_error(capsys.readouterr().err, 'saferl-eval: error: ', run, needle)


def test_eval_reports_bad_bundles_in_one_line(bundle_copy, tmp_path, capsys):
    from offline_training.evaluate import main
    with open(bundle_copy / 'policy.onnx', 'r+b') as stream:  # tamper with one byte
        stream.seek(100)
        byte = stream.read(1)
        stream.seek(100)
        stream.write(bytes([byte[0] ^ 1]))
    assert main([str(bundle_copy), '--episodes', '1', '--no-progress']) == 2
    one_line_error(capsys.readouterr().err, 'saferl-eval: error: ',
                   bundle_copy / 'policy.onnx', 'sha256 mismatch', 're-export')
    (bundle_copy / 'manifest.yaml').write_text('- not\n- a mapping\n')
    assert main([str(bundle_copy), '--episodes', '1', '--no-progress']) == 2
    one_line_error(capsys.readouterr().err, bundle_copy / 'manifest.yaml', 'expected a mapping')
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert main([str(empty), '--episodes', '1', '--no-progress']) == 2
    one_line_error(capsys.readouterr().err, empty, 'neither a model bundle')
    assert main(['table', str(bundle_copy / 'manifest.yaml'), '-o', str(tmp_path / 't.md')]) == 2
    one_line_error(capsys.readouterr().err, 'manifest.yaml: not valid JSON')
    (tmp_path / 'list.json').write_text('[1, 2]')
    assert main(['table', str(tmp_path / 'list.json'), '-o', str(tmp_path / 't.md')]) == 2
    one_line_error(capsys.readouterr().err, 'list.json: expected a JSON object, found list')
    assert not (tmp_path / 't.md').exists()


def test_saferl_eval_command_on_a_symlinked_bundle_file(bundle_copy, tmp_path):
    """The installed command, in a fresh process: exit 2, one line, no traceback."""
    (bundle_copy / 'golden.npz').unlink()
    (bundle_copy / 'golden.npz').symlink_to('/etc/passwd')
    command = Path(sys.executable).parent / 'saferl-eval'
    argv = [str(command)]
    if not command.exists():
        argv = [sys.executable, '-m', 'offline_training.evaluate']
    result = subprocess.run(argv + [str(bundle_copy), '--episodes', '1', '--no-progress'],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, 'saferl-eval: error: ', bundle_copy / 'golden.npz',
                   'is a symbolic link', 'regular files only')
    assert not (tmp_path / 'results').exists()


@pytest.mark.parametrize('argv, needle', [
    (['fisor', '--task', 'BallSquare'], "unknown task 'BallSquare'"),
    (['fisor', '--task', 'BallCircle', '--set', 'steps=abc'],
     "FISOR config field 'steps' should be an integer, found str 'abc'"),
    (['bc_all', '--task', 'BallCircle', '--set', 'widht=3'], "unknown BC config fields ['widht']"),
    (['bc_all', '--task', 'BallCircle', '--preset', 'huge'], "unknown BC preset 'huge'"),
    # checked before anything is allocated: 1e8 rows took the machine's memory
    (['bc_all', '--task', 'BallCircle', '--set', 'batch_size=100000000'],
     "BC config field 'batch_size' is 100000000; a batch must hold 1 to 131072 rows"),
    (['fisor', '--task', 'BallCircle', '--set', 'critic_batch_size=0'],
     "'critic_batch_size' is 0; a batch must hold 1 to"),
    (['bc_all', '--task', 'BallCircle', '--set', 'hidden=[200000,200000]'],
     ('more than the', 'lower the layer sizes given with --set')),
    (['fisor', '--task', 'BallCircle', '--set', 'actor_lr=nan'],
     "FISOR config field 'actor_lr' is nan; give a finite number"),
])
def test_train_reports_bad_values_in_one_line(tmp_path, capsys, argv, needle):
    from offline_training.train import main
    assert main(argv + ['--out', str(tmp_path / 'run'), '--no-progress']) == 2
    needles = needle if isinstance(needle, tuple) else (needle,)
    one_line_error(capsys.readouterr().err, 'saferl-train: error: ', *needles)
    assert not (tmp_path / 'run').exists()


def test_train_rejects_unknown_algorithms_and_bad_set_values(capsys):
    from offline_training.train import main
    for argv in (['sac', '--task', 'BallCircle'],
                 ['fisor', '--task', 'BallCircle', '--set', 'steps=[1'],
                 ['fisor', '--task', 'BallCircle', '--steps', '0'],
                 ['fisor', '--task', 'BallCircle', '--seed', '-1'],
                 ['fisor', '--task', 'BallCircle', '--log-every', '0'],
                 ['fisor', '--task', 'BallCircle', '--checkpoint-every', '0'],
                 ['fisor', '--task', 'BallCircle', '--threads', '-2']):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert 'Traceback' not in err and 'saferl-train: error:' in err
        assert argv[-2] in ('--task', '--set') or f'{argv[-2]} must be >= ' in err


def test_export_and_eval_refuse_negative_seeds(tmp_path, capsys):
    from offline_training import evaluate, export
    for main, argv, needle in (
            (export.main, [str(tmp_path), '-o', str(tmp_path / 'b'), '--seed', '-1'],
             'saferl-export: error: --seed must be >= 0, got -1'),
            (evaluate.main, [str(tmp_path), '--seeds', '0', '-2'],
             'saferl-eval: error: --seeds must be >= 0, got -2')):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert 'Traceback' not in err and needle in err


def test_user_errors_keep_their_builtin_types():
    from offline_training.algos import get_algorithm
    with pytest.raises(KeyError) as info:
        get_algorithm('sac')
    assert isinstance(info.value, UserError) and str(info.value).startswith('unknown algorithm')
    assert issubclass(BundleError, RuntimeError) and issubclass(BundleError, UserError)


# --------------------------------------------------------------------------- smaller items

def test_creating_an_environment_warns_nothing():
    from saferl_ros.tasks import get_task
    spec = get_task('BallCircle')
    spec.make_env().close()  # imports and registers everything outside the strict block
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        env = spec.make_env()
        env.close()


def test_eval_writes_next_to_the_source_by_default(bundle_copy, tmp_path, monkeypatch, capfd):
    from offline_training.evaluate import main
    work = tmp_path / 'work'
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([str(bundle_copy), '--episodes', '1', '--no-progress']) == 0
    out = bundle_copy / 'eval' / 'results.json'
    assert json.loads(out.read_text())['name'] == 'bc_all-ballcircle'
    assert out.with_suffix('.csv').is_file() and not any(work.iterdir())
    assert str(out) in capfd.readouterr().out
    load_bundle(bundle_copy)  # eval/ is not part of the verified files
    with pytest.raises(SystemExit):
        main([str(bundle_copy), str(bundle_copy), '--episodes', '1'])
    assert 'give -o' in capfd.readouterr().err
    blocked = tmp_path / 'a-file'
    blocked.write_text('')
    assert main([str(bundle_copy), '-o', str(blocked / 'r.json'), '--no-progress']) == 2
    one_line_error(capfd.readouterr().err, blocked / 'r.json', 'cannot be written', 'give -o')
