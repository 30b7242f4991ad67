"""
saferl-loop: deploy -> merge -> retrain -> evaluate -> export, twice, resumable (issue 14).

One tiny loop runs for the whole module (FISOR's 'test' preset, 20 training steps, two
deployments of two 20-step episodes through the real ROS 2 bringup over DDS, one evaluation
episode): first interrupted in the evaluation of iteration 1, then resumed, then rerun with
nothing left to do. The tests read what those three runs left.
"""

import contextlib
import io
import json
from pathlib import Path
import signal
import time

import h5py
from offline_training import loop as loop_module
from offline_training.data.dataset import write_dataset
from offline_training.data.synthetic import synthetic_dataset
from offline_training.loop import Loop, main, STAGES
from offline_training.loop_report import recorded_episodes
import pytest
from saferl_ros.files import sha256_file
from saferl_ros.paths import resolve_path
from saferl_ros.recorder import read_index
from test_ros_support import domain_fixture
import yaml

ros_domain = domain_fixture(74)

START = 'models/bc_all-ballcircle'
MONITOR = 'models/fisor-ballcircle'


def base_config(tmp_path) -> dict:
    """Return a tiny loop's config with a small synthetic base dataset in ``tmp_path``."""
    dataset = tmp_path / 'base.hdf5'
    if not dataset.exists():
        write_dataset(dataset, synthetic_dataset('BallCircle', episodes=6, seed=0,
                                                 max_length=40), 'BallCircle')
    return {'task': 'BallCircle', 'algorithm': 'fisor', 'preset': 'test',
            'start_bundle': START, 'monitor_bundle': MONITOR, 'base_dataset': str(dataset),
            'iterations': 2, 'deploy_episodes': 2, 'deploy_horizon': 20, 'train_steps': 20,
            'eval_episodes': 1, 'output': str(tmp_path / 'loop'),
            'monitor_set': {'threshold_v': 2.5, 'threshold_q': 2.5}}


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def run_main(argv):
    """Run saferl-loop's main; return (exit status, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope='module')
def loop_runs(tmp_path_factory):
    """Run the tiny loop: interrupted in iter-1's evaluation, resumed, rerun; return facts."""
    tmp = tmp_path_factory.mktemp('loop')
    config = base_config(tmp)
    path = write_config(tmp / 'loop.yaml', config)
    out = Path(config['output'])
    facts = {'config': config, 'path': path, 'out': out}
    real_eval = loop_module.Loop.evaluate

    def interrupted_eval(self, k):
        if k == 1:
            # Ctrl-C in the middle of the evaluation: a partial results file, then the interrupt
            partial = self.iteration_dir(k) / '.eval.partial'
            partial.mkdir(parents=True, exist_ok=True)
            (partial / 'results.json').write_text('{"half": ')
            raise KeyboardInterrupt
        return real_eval(self, k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Loop, 'evaluate', interrupted_eval)
        facts['first'] = run_main([path])
    facts['state_after_interrupt'] = json.loads((out / 'state.json').read_text())
    facts['report_after_interrupt'] = (out / 'report.md').read_text()
    facts['partial_left'] = (out / 'iter-1' / '.eval.partial' / 'results.json').exists()
    facts['eval_dir_after_interrupt'] = (out / 'iter-1' / 'eval').exists()
    run_mtime = (out / 'iter-1' / 'run' / 'checkpoint.pt').stat().st_mtime_ns

    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for stage in STAGES:
            real = getattr(Loop, stage)

            def spy(self, k, real=real, stage=stage):
                calls.append((stage, k))
                return real(self, k)
            patch.setattr(Loop, stage, spy)
        facts['second'] = run_main([path])
    facts['resumed_calls'] = calls
    facts['run_untouched'] = (out / 'iter-1' / 'run' / 'checkpoint.pt').stat().st_mtime_ns \
        == run_mtime

    def must_not_run(self, k):
        raise AssertionError('a finished loop ran a stage again')
    with pytest.MonkeyPatch.context() as patch:
        for stage in STAGES:
            patch.setattr(Loop, stage, must_not_run)
        facts['third'] = run_main([path])
    facts['state'] = json.loads((out / 'state.json').read_text())
    return facts


def test_an_interrupted_loop_keeps_its_finished_stages_and_trusts_nothing_partial(loop_runs):
    code, output = loop_runs['first']
    assert code == 130, output
    assert 'interrupted' in output and 'rerun the same command' in output
    done = set(loop_runs['state_after_interrupt']['stages'])
    assert done == {f'iter-0/{s}' for s in STAGES} | {
        'iter-1/deploy', 'iter-1/merge', 'iter-1/train'}
    # the half-written results stayed in the hidden partial folder, never where they are read
    assert loop_runs['partial_left'] and not loop_runs['eval_dir_after_interrupt']
    # the report already shows the finished stages, and what is still to come
    report = loop_runs['report_after_interrupt']
    assert '8 of 10 stages done' in report and '| 1 | not yet |' in report


def test_the_rerun_resumes_at_the_interrupted_stage(loop_runs):
    code, output = loop_runs['second']
    assert code == 0, output
    assert loop_runs['resumed_calls'] == [('evaluate', 1), ('export', 1)]
    assert loop_runs['run_untouched'], 'the finished training of iteration 1 was redone'
    out = loop_runs['out']
    results = json.loads((out / 'iter-1' / 'eval' / 'results.json').read_text())
    assert results['summary']['episodes'] == 1        # a real evaluation, not the partial file
    assert not (out / 'iter-1' / '.eval.partial').exists()
    assert output.count('done earlier, skipped') == 8


def test_a_finished_loop_reruns_nothing(loop_runs):
    code, output = loop_runs['third']
    assert code == 0, output
    assert output.count('done earlier, skipped') == 10
    assert '0 stage(s) run, 10 of 10 done' in output


def test_each_iteration_trains_on_more_data(loop_runs):
    out, state = loop_runs['out'], loop_runs['state']['stages']
    sizes = []
    for path in (Path(loop_runs['config']['base_dataset']), out / 'iter-0' / 'dataset.hdf5',
                 out / 'iter-1' / 'dataset.hdf5'):
        with h5py.File(path, 'r') as h5:
            sizes.append(len(h5['rewards']))
    assert sizes[0] < sizes[1] < sizes[2]
    # each merge added exactly its deployment's recorded steps
    assert sizes[1] - sizes[0] == state['iter-0/deploy']['steps'] == 2 * 20
    assert sizes[2] - sizes[1] == state['iter-1/deploy']['steps']
    assert [state[f'iter-{k}/merge']['transitions'] for k in (0, 1)] == sizes[1:]
    # the run of each iteration trained on that iteration's dataset
    for k in (0, 1):
        run_config = yaml.safe_load((out / f'iter-{k}' / 'run' / 'config.yaml').read_text())
        assert run_config['dataset']['sha256'] == state[f'iter-{k}/merge']['sha256']
        assert run_config['steps'] == 20


def test_iteration_1_deploys_the_bundle_iteration_0_exported(loop_runs):
    out, state = loop_runs['out'], loop_runs['state']['stages']
    first = read_index(out / 'iter-0' / 'recordings')['attrs']
    second = read_index(out / 'iter-1' / 'recordings')['attrs']
    assert first['bundle_sha256'] == sha256_file(resolve_path(START) / 'manifest.yaml')
    assert second['bundle_sha256'] == sha256_file(out / 'iter-0' / 'bundle' / 'manifest.yaml')
    assert state['iter-1/deploy']['bundle'] == 'iter-0/bundle'
    # under the configured monitor both times, with new start states each time
    monitor = sha256_file(resolve_path(MONITOR) / 'manifest.yaml')
    assert first['monitor_bundle_sha256'] == second['monitor_bundle_sha256'] == monitor
    assert [state[f'iter-{k}/deploy']['seed'] for k in (0, 1)] == [1, 2]
    manifest = yaml.safe_load((out / 'iter-1' / 'bundle' / 'manifest.yaml').read_text())
    assert manifest['name'] == 'loop-iter1' and manifest['algorithm'] == 'fisor'
    # the monitor judged with the config's monitor_set, not the manifest's thresholds (0, 0)
    for k in (0, 1):
        log = (out / f'iter-{k}' / 'deploy.log').read_text()
        assert 'safety_monitor_node.threshold_v=2.5' in log
        assert 'critic feasibility (V_h <= 2.5, Q_h <= 2.5, min_hold 0.1 s)' in log, log[-3000:]


def test_the_report_shows_deployments_interventions_and_evaluations(loop_runs):
    out = loop_runs['out']
    report = (out / 'report.md').read_text()
    assert (out / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '10 of 10 stages done' in report
    for k in (0, 1):
        # interventions from the recordings agree with the recorder's own per-episode counts
        episodes = recorded_episodes(out / f'iter-{k}' / 'recordings')
        index = read_index(out / f'iter-{k}' / 'recordings')['episodes']
        assert [e['replaced'] for e in episodes] == [e['fallback_steps'] for e in index]
        assert [e['kept'] for e in episodes] == [e['kept_steps'] for e in index]
        assert [round(e['reward'], 3) for e in episodes] == \
            [round(e['reward'], 3) for e in index]
        steps, replaced = sum(e['steps'] for e in episodes), sum(e['replaced'] for e in episodes)
        assert f'{100 * replaced / steps:.1f} % ({replaced} of {steps})' in report
        evaluation = loop_runs['state']['stages'][f'iter-{k}/evaluate']
        # each mean with its standard error over the evaluation episodes (std / sqrt(n))
        summary = json.loads((out / evaluation['results']).read_text())['summary']
        norm, n = summary['normalized'], summary['episodes']
        se = {key: norm[kappa][part]['std'] / n ** 0.5 for key, kappa, part in (
            ('r', '5', 'reward'), ('c5', '5', 'cost'), ('c10', '10', 'cost'))}
        assert f'| {k} | {evaluation["reward_norm_k5"]:.3f} ± {se["r"]:.3f} | ' \
               f'{evaluation["cost_norm_k5"]:.2f} ± {se["c5"]:.2f} | ' \
               f'{evaluation["cost_norm_k10"]:.2f} ± {se["c10"]:.2f} |' in report
    assert f'| 0 | `{START}` | 2 | 40 |' in report
    assert '| 1 | `iter-0/bundle` | 2 | 40 |' in report


def test_a_rerun_with_another_config_is_refused(loop_runs):
    code, output = run_main([loop_runs['path'], '--set', 'train_steps=30'])
    assert code == 2
    assert 'train_steps=20' in output and 'another output folder' in output


def test_a_state_file_from_before_a_key_existed_counts_it_at_its_default(loop_runs):
    # a loop started before 'eval_shield' existed ran unshielded evaluations: rerunning it with
    # today's code (eval_shield false by default) is the same config, not a changed one
    path = loop_runs['out'] / 'state.json'
    state = json.loads(path.read_text())
    del state['config']['eval_shield']
    path.write_text(json.dumps(state))
    code, output = run_main([loop_runs['path']])
    assert code == 0 and 'iter-1/export: done earlier, skipped' in output, output
    code, output = run_main([loop_runs['path'], '--set', 'eval_shield=true'])
    assert code == 2 and 'this loop was run with eval_shield=False' in output, output


def test_a_deployment_stopped_by_ctrl_c_is_deployed_again_not_trusted(tmp_path, monkeypatch):
    # 100-step episodes: the interrupt surely lands in the second one
    config = {**base_config(tmp_path), 'iterations': 1, 'deploy_horizon': 100}
    path = write_config(tmp_path / 'loop.yaml', config)
    out = Path(config['output'])
    real_follow = loop_module._follow

    def ctrl_c_after_one_episode(process, index_file, episodes, label):
        # Ctrl-C reaches the bringup once its first episode is recorded (as it does from a
        # terminal, where the whole process group gets it): it stops in order, exit 130.
        while process.poll() is None:
            try:
                if json.loads(index_file.read_text())['episodes']:
                    process.send_signal(signal.SIGINT)
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return real_follow(process, index_file, episodes, label)

    monkeypatch.setattr(loop_module, '_follow', ctrl_c_after_one_episode)
    code, output = run_main([path])
    assert code == 130, output
    partial = out / 'iter-0' / '.recordings.partial' / 'run'
    # the deployment stopped before its two episodes were complete (the recorder marks an
    # episode in progress partial; on a fast machine the signal may land between episodes, so
    # there may be none): the recording is left for a look and never merged
    episodes = read_index(partial)['episodes']
    assert len([e for e in episodes if not e.get('partial')]) < 2
    assert not (out / 'iter-0' / 'recordings').exists()
    assert json.loads((out / 'state.json').read_text())['stages'] == {}

    monkeypatch.setattr(loop_module, '_follow', real_follow)

    def stop(self, k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Loop, 'merge', stop)              # stop after the deployment
    code, output = run_main([path])
    assert code == 130, output
    assert len(read_index(out / 'iter-0' / 'recordings')['episodes']) == 2
    assert not partial.parent.exists()
    assert list(json.loads((out / 'state.json').read_text())['stages']) == ['iter-0/deploy']


# --------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize('change, message', [
    ({'iteration': 2}, "unknown key 'iteration'"),
    ({'task': None}, "key 'task' is missing"),
    ({'iterations': 'two'}, "key 'iterations' should be an integer"),
    ({'deploy_episodes': True}, "key 'deploy_episodes' should be an integer"),
    ({'iterations': 0}, "key 'iterations' is 0; give at least 1"),
    ({'task': 'BallSquare'}, "key 'task': unknown task 'BallSquare'"),
    ({'algorithm': 'fisr'}, "key 'algorithm' is 'fisr', not a registered algorithm"),
    ({'preset': 'fast'}, "key 'preset': unknown FISOR preset 'fast'"),
    ({'train_set': {'num_candidate': 3}}, "key 'train_set': unknown FISOR config fields"),
    ({'train_set': {'steps': 3}}, "as the key 'train_steps'"),
    ({'monitor_set': 3}, "key 'monitor_set' should be a mapping"),
    ({'monitor_set': {'threshold': 3}}, "key 'monitor_set': 'threshold' is not a monitor "
                                        'parameter'),
    ({'monitor_set': {'min_hold': -1}}, "key 'monitor_set': min_hold is -1"),
    ({'monitor_set': {'budget': 1}}, "key 'monitor_set': budget does not apply to monitor "
                                     "bundle 'fisor-ballcircle'"),
    ({'start_bundle': 'models/nothing-here'}, "key 'start_bundle'"),
    ({'monitor_bundle': START}, "key 'monitor_bundle': models/bc_all-ballcircle (bc_all) "
                                'has no critic'),
    ({'monitor_bundle': None}, "key 'monitor_bundle' is not set, and the start bundle"),
    ({'monitor_bundle': None, 'start_bundle': MONITOR, 'algorithm': 'bc_all'},
     'bc_all bundles have no critic to monitor themselves'),
    ({'monitor_bundle': None, 'start_bundle': MONITOR, 'eval_shield': True},
     "key 'eval_shield' is true but no 'monitor_bundle'"),
    ({'task': 'CarRun'}, "key 'start_bundle': models/bc_all-ballcircle is a BallCircle bundle"),
    ({'base_dataset': 'no/such.hdf5'}, "key 'base_dataset': no/such.hdf5 is not a file"),
    ({'deploy_config': 'config/robot.yaml'}, "key 'deploy_config': config/robot.yaml starts no"),
])
def test_a_bad_config_fails_with_one_line_naming_the_key(tmp_path, change, message):
    config = {**base_config(tmp_path), **change}
    config = {key: value for key, value in config.items() if value is not None}   # None: absent
    code, output = run_main([write_config(tmp_path / 'loop.yaml', config)])
    lines = output.strip().splitlines()
    assert code == 2 and len(lines) == 1, output
    assert lines[0].startswith('saferl-loop: error: ') and message in lines[0], lines[0]
    assert not (tmp_path / 'loop').exists(), 'a bad config must not start the loop'


def test_a_config_that_is_no_mapping_or_no_file_is_refused(tmp_path):
    path = tmp_path / 'list.yaml'
    path.write_text('- task\n- BallCircle\n')
    code, output = run_main([str(path)])
    assert code == 2 and 'expected a mapping of fields, found a list' in output
    code, output = run_main([str(tmp_path / 'missing.yaml')])
    assert code == 2 and 'no such loop config file' in output


def test_set_overrides_are_validated_like_the_file(tmp_path):
    path = write_config(tmp_path / 'loop.yaml', base_config(tmp_path))
    # values as the monitor reads them: YAML's string '1e9' becomes the number it means
    config = loop_module.read_config(path, {'monitor_set': {'threshold_v': '1e9'}})
    assert config.monitor_set == {'threshold_v': 1e9}
    code, output = run_main([path, '--set', 'eval_episodes=0'])
    assert code == 2 and "key 'eval_episodes' is 0; give at least 1" in output
    code, output = run_main([path, '--set', 'colour=blue'])
    assert code == 2 and "unknown key 'colour'" in output


def test_the_base_dataset_defaults_to_the_tasks_file_as_saferl_train_finds_it(
        tmp_path, monkeypatch):
    from offline_training.data import dataset as dataset_module

    config = {key: value for key, value in base_config(tmp_path).items()
              if key != 'base_dataset'}
    path = write_config(tmp_path / 'loop.yaml', config)
    found = tmp_path / 'datasets' / 'SafetyBallCircle-v0-80-6.hdf5'
    write_dataset(found, synthetic_dataset('BallCircle', episodes=6, seed=1, max_length=40),
                  'BallCircle')
    monkeypatch.setattr(dataset_module, 'dataset_dirs', lambda: [found.parent])
    loop = Loop(loop_module.read_config(path))
    assert Path(loop.resolve_base_dataset()).resolve() == found.resolve()
    # none there: one line naming the key, and no loop folder left behind
    monkeypatch.setattr(dataset_module, 'dataset_dirs', lambda: [tmp_path / 'empty'])
    code, output = run_main([path])
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "key 'base_dataset' is not set and no dataset for BallCircle" in output
    assert '--collect-missing' in output
    assert not (tmp_path / 'loop').exists()


def test_collect_missing_collects_the_tasks_dataset_first(tmp_path, monkeypatch):
    from offline_training.data import cli as data_cli
    from offline_training.data import dataset as dataset_module

    config = {key: value for key, value in base_config(tmp_path).items()
              if key != 'base_dataset'}
    folder = tmp_path / 'datasets'
    monkeypatch.setattr(dataset_module, 'dataset_dirs', lambda: [folder])
    calls = []

    def collect(argv):   # stands in for the minute-long collection from the behaviour agents
        calls.append(argv)
        write_dataset(folder / 'SafetyBallCircle-v0-80-6.hdf5',
                      synthetic_dataset('BallCircle', episodes=6, seed=1, max_length=40),
                      'BallCircle')
        return 0
    monkeypatch.setattr(data_cli, 'main', collect)
    loop = Loop(loop_module.read_config(write_config(tmp_path / 'loop.yaml', config)),
                echo=lambda line: None, collect_missing=True)
    found = Path(loop.resolve_base_dataset())
    assert calls == [['collect', '--task', 'BallCircle']]
    assert found.resolve() == (folder / 'SafetyBallCircle-v0-80-6.hdf5').resolve()
    # a failed collection stops with its exit status, naming the command
    monkeypatch.setattr(data_cli, 'main', lambda argv: 1)
    (folder / 'SafetyBallCircle-v0-80-6.hdf5').unlink()
    with pytest.raises(loop_module.StageError, match='saferl-data collect ended with exit '
                                                     'status 1'):
        loop.resolve_base_dataset()


@pytest.mark.parametrize('shipped', sorted((Path(__file__).resolve().parents[1] / 'config')
                                           .glob('loop_*.yaml')), ids=lambda p: p.name)
def test_the_shipped_loop_configs_are_valid(shipped):
    config = loop_module.read_config(shipped)
    assert config.iterations >= 1 and config.monitor_bundle is not None
