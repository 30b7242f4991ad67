"""The results grid on Ray: a tiny grid trains, evaluates, skips what is done, reports failures."""

import json

from offline_training.data.dataset import write_dataset
from offline_training.data.synthetic import synthetic_dataset
from offline_training.grid import (branch_source_missing, check_branches, check_data_steps,
                                   check_pages, commands, data_command, data_path, data_step,
                                   data_steps_needed, DataStep, Grid, GRIDS, Job, main, Method,
                                   Page, repo_relative, run_grid, write_tables)
import pytest
import yaml


def synthetic_datasets(tmp_path, episodes: int = 6, max_length: int = 40):
    """Return a folder with one synthetic BallCircle file (a grid's $DSRL_DATASET_DIR)."""
    datasets = tmp_path / 'datasets'
    datasets.mkdir()
    write_dataset(datasets / f'SafetyBallCircle-v0-test-{episodes}.hdf5',
                  synthetic_dataset('BallCircle', episodes=episodes, seed=0,
                                    max_length=max_length), 'BallCircle')
    return datasets


@pytest.fixture
def tiny_grid(tmp_path):
    """
    Five methods on BallCircle (synthetic data).

    Two plain ones, one whose override is a typo, and a DRCORL run with a branch from its
    end-of-pretraining checkpoint (step 8 + 8 + 4).
    """
    datasets = synthetic_datasets(tmp_path)
    return Grid('tiny', (Method('fisor', 'fisor', 6), Method('bc_all', 'bc_all', 4),
                         Method('typo', 'bc_all', 4, ('bach_size=8',)),
                         Method('drcorl', 'drcorl', 30),
                         Method('drcorl-b', 'drcorl', 30, ('slack_start=0.5',),
                                branch_of=('drcorl', 20))),
                tasks=('BallCircle',), preset='test', eval_episodes=1,
                checkpoint_every=2, runs_dir=tmp_path / 'runs', results_dir=tmp_path / 'results',
                table_path=tmp_path / 'results.md', runs_page=tmp_path / 'runs.md',
                notes_path=None, datasets_dir=datasets, description='a test grid',
                pages=(Page(tmp_path / 'headline.md', ('fisor', 'bc_all')),))


def test_a_tiny_grid_trains_evaluates_resumes_and_reports_failures(tiny_grid, tmp_path):
    lines = []
    statuses = run_grid(tiny_grid.jobs(), tiny_grid, workers=2, echo=lines.append)
    assert sorted(statuses) == ['bc_all-BallCircle-s0', 'drcorl-BallCircle-s0',
                                'drcorl-b-BallCircle-s0', 'fisor-BallCircle-s0',
                                'typo-BallCircle-s0']
    for name in ('fisor-BallCircle-s0', 'bc_all-BallCircle-s0', 'drcorl-BallCircle-s0',
                 'drcorl-b-BallCircle-s0'):
        assert statuses[name].startswith('ok'), statuses[name]
        results = json.loads((tmp_path / 'results' / f'{name}.json').read_text())
        assert 'Traceback' not in (tmp_path / 'runs' / 'logs' / f'{name}.log').read_text()
        assert len(results['episodes']) == 1 and 'summary' in results
    # a bad run fails alone, with its log named, and the log says what is wrong
    status = statuses['typo-BallCircle-s0']
    assert status.startswith('FAILED') and 'typo-BallCircle-s0.log' in status
    assert 'bach_size' in (tmp_path / 'runs' / 'logs' / 'typo-BallCircle-s0.log').read_text()
    assert len(lines) == 5 and lines[-1].split()[1] == '[5/5]'
    # the branch started from its parent's kept checkpoint, after the parent had finished
    # (with two workers it would otherwise have started beside it and found no checkpoint)
    branch = yaml.safe_load((tmp_path / 'runs' / 'drcorl-b-BallCircle-s0' / 'config.yaml')
                            .read_text())
    assert branch['initialised_from']['step'] == 20
    assert branch['initialised_from']['checkpoint'].endswith(
        'drcorl-BallCircle-s0/checkpoints/step_000000020.pt')
    order = [line.split()[2].rstrip(':') for line in lines]
    assert order.index('drcorl-BallCircle-s0') < order.index('drcorl-b-BallCircle-s0')
    # the same grid again: finished runs are skipped, not retrained or re-evaluated
    done = [job for job in tiny_grid.jobs() if job.method.tag != 'typo']
    again = run_grid(done, tiny_grid, workers=2, echo=lines.append)
    assert set(again.values()) == {'done already'}
    assert write_tables(tiny_grid) == 0
    assert 'fisor-BallCircle-s0' in (tmp_path / 'runs.md').read_text()
    assert 'not finished' in (tmp_path / 'runs.md').read_text()     # the typo run
    assert (tmp_path / 'results.md').is_file()
    # the further page shows only its methods; the grid's page shows them all
    headline = (tmp_path / 'headline.md').read_text()
    assert 'fisor R↑' in headline and 'bc_all R↑' in headline and 'drcorl' not in headline
    assert 'drcorl R↑' in (tmp_path / 'results.md').read_text()
    # on a machine without (some of) the run folders a finished run keeps its row, not
    # rewritten as unfinished; one that never finished stays unfinished
    import shutil
    page = (tmp_path / 'runs.md').read_text()
    shutil.rmtree(tmp_path / 'runs' / 'fisor-BallCircle-s0')
    assert write_tables(tiny_grid) == 0 and (tmp_path / 'runs.md').read_text() == page
    shutil.rmtree(tmp_path / 'runs')
    assert write_tables(tiny_grid) == 0 and (tmp_path / 'runs.md').read_text() == page
    assert page.count('not finished') == 1


def test_the_commands_use_one_thread_and_name_no_machine_path():
    grid = GRIDS['core-hour']
    jobs = grid.jobs()
    # FISOR, DRCORL, DRCORL with the rollout rule, with settled critics x 3 seeds, 4 baselines
    # x 1 seed
    assert len(jobs) == 6 * (3 + 3 + 3 + 3 + 4)
    assert [job.name for job in jobs[:8]] == [
        'fisor-BallCircle-s0', 'drcorl-BallCircle-s0', 'drcorl-rollout-BallCircle-s0',
        'drcorl-settled-BallCircle-s0', 'bc_all-BallCircle-s0', 'bc_safe-k5-BallCircle-s0',
        'bc_safe-k10-BallCircle-s0', 'bcq_lag-k5-BallCircle-s0']
    for branch_job in jobs[2:4]:
        branch, _, _ = commands(branch_job, grid)
        assert branch[branch.index('--init-from') + 1] == \
            'runs/core-hour/drcorl-BallCircle-s0/checkpoints/step_000160000.pt'
    # the settled branch: 50 000 critic-only iterations on top of the parent's 162 000
    settled, _, _ = commands(jobs[3], grid)
    assert settled[settled.index('--steps') + 1] == '212000'
    sets = [settled[i + 1] for i, arg in enumerate(settled) if arg == '--set']
    assert sets == ['critic_settle_steps=50000', 'estimate_states=initial']
    train, evaluate, results = commands(jobs[0], grid)
    assert train[train.index('--threads') + 1] == '1'
    assert train[train.index('--out') + 1] == 'runs/core-hour/fisor-BallCircle-s0'
    assert str(results) == 'docs/results/core-hour/fisor-BallCircle-s0.json'
    assert evaluate[evaluate.index('--episodes') + 1] == '20'


def test_a_report_runs_after_the_evaluation_and_stays_out_of_the_tables(tmp_path):
    from offline_training.grid import report_command, run_job

    # the report writes which run folder it read (a real command in this environment)
    code = 'import json, sys; json.dump({"read": sys.argv[1]}, open(sys.argv[2], "w"))'
    probe = ('probe', 'python', '-c', code, '{run}', '{out}')
    grid = Grid('tiny', (Method('bc_all', 'bc_all', 4, report=probe),),
                tasks=('BallCircle',), preset='test', eval_episodes=1, checkpoint_every=2,
                runs_dir=tmp_path / 'runs', results_dir=tmp_path / 'results',
                table_path=tmp_path / 'results.md', runs_page=None, notes_path=None,
                datasets_dir=synthetic_datasets(tmp_path))
    job = grid.jobs()[0]
    report = tmp_path / 'results' / 'reports' / 'bc_all-BallCircle-s0-probe.json'
    assert report_command(job, grid)[1] == report
    name, status = run_job(job, grid)
    assert status.startswith('ok'), status
    assert json.loads(report.read_text()) == {'read': str(tmp_path / 'runs' / name)}
    # a run evaluated without its report (say the report failed) makes the report alone
    report.unlink()
    assert run_job(job, grid) == (name, 'report made') and report.is_file()
    assert run_job(job, grid) == (name, 'done already')
    # a report that fails says so, and the next run of the grid makes it again
    from dataclasses import replace
    failing = replace(grid, methods=(replace(grid.methods[0], report=(
        'probe', 'python', '-c', 'raise SystemExit(3)')),))
    report.unlink()
    status = run_job(failing.jobs()[0], failing)[1]
    assert status.startswith('FAILED (its report: exit 3') and not report.exists()
    assert run_job(job, grid) == (name, 'report made')
    # retrained (its results deleted), the run's report is made again, not kept from before
    report.write_text('{"read": "the model trained before"}')
    (tmp_path / 'results' / f'{name}.json').unlink()
    import shutil
    shutil.rmtree(tmp_path / 'runs' / name)
    assert run_job(job, grid)[1].startswith('ok')
    assert json.loads(report.read_text()) == {'read': str(tmp_path / 'runs' / name)}
    # without the run folder there is nothing to report on: done, nothing run
    report.unlink()
    shutil.rmtree(tmp_path / 'runs' / name)
    assert run_job(job, grid) == (name, 'done already') and not report.exists()
    # the tables read the results files only, not the reports beside them
    report.write_text('{"read": "not a results file"}')
    assert write_tables(grid) == 0
    assert 'bc_all-BallCircle-s0.json' in (tmp_path / 'results.md').read_text()
    assert 'probe' not in (tmp_path / 'results.md').read_text()
    # DSPO's report: its discriminator against the held-out trajectories of its own kappa
    dspo = next(job for job in GRIDS['dspo'].jobs() if job.name == 'dspo-k5-CarRun-s0')
    command, out = report_command(dspo, GRIDS['dspo'])
    assert command[:3] == ['python', '-m', 'offline_training.discriminator_quality']
    assert command[3:] == ['runs/dspo/dspo-k5-CarRun-s0',
                           'runs/dspo/data/split-k5-CarRun-heldout.hdf5', '--kappa', '5',
                           '-o', 'docs/results/dspo/reports/dspo-k5-CarRun-s0-discriminator.json']
    assert str(out) == command[-1]


def test_a_branch_names_an_earlier_method_and_needs_its_kept_checkpoint(tmp_path):
    from dataclasses import replace

    from offline_training.algos import drcorl
    from saferl_ros.errors import ConfigError

    for grid in GRIDS.values():
        check_branches(grid)
    rollout = next(m for m in GRIDS['core-hour'].methods if m.tag == 'drcorl-rollout')
    # the branch step is where the cpu preset's pretraining ends (the checkpoint kept there)
    assert rollout.branch_of == ('drcorl', drcorl.milestones(drcorl.make_config('cpu'))[0])
    with pytest.raises(ConfigError, match="'b' branches from 'a', which is not an earlier"):
        check_branches(Grid('bad', (Method('b', 'drcorl', 3, branch_of=('a', 1)),
                                    Method('a', 'drcorl', 3))))
    with pytest.raises(ConfigError, match='with all of its seeds'):
        check_branches(Grid('bad', (Method('a', 'drcorl', 3),
                                    Method('b', 'drcorl', 3, seeds=(0, 1),
                                           branch_of=('a', 1)))))
    grid = replace(GRIDS['core-hour'], runs_dir=tmp_path / 'runs',
                   results_dir=tmp_path / 'results')
    job = Job(rollout, 'BallCircle', 0)
    # a parent trained before checkpoints were kept (or elsewhere): one line saying what to do
    problem = branch_source_missing(job, grid)
    assert 'drcorl-BallCircle-s0 at step 160000' in problem and 'retrain it' in problem
    kept = tmp_path / 'runs' / 'drcorl-BallCircle-s0' / 'checkpoints' / 'step_000160000.pt'
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b'a checkpoint')
    assert branch_source_missing(job, grid) is None
    kept.unlink()       # a branch begun earlier resumes from its own copy
    (tmp_path / 'runs' / job.name).mkdir()
    (tmp_path / 'runs' / job.name / 'checkpoint.pt').write_bytes(b'its own copy')
    assert branch_source_missing(job, grid) is None


def test_the_command_line_refuses_bad_options_in_one_line(capsys):
    with pytest.raises(SystemExit):
        main(['--only', 'no-such-run', '--dry-run'])
    assert 'no run of grid' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--workers', '0'])
    assert '--workers must be >= 1' in capsys.readouterr().err
    # checked before Ray starts every run only to see each fail
    with pytest.raises(SystemExit):
        main(['--preset', 'nosuch', '--dry-run'])
    assert "--preset 'nosuch': bc_all, bc_safe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--device', 'tpu', '--dry-run'])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    assert main(['--grid', 'core-hour', '--only', 'fisor-CarRun-s2', '--dry-run']) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith('saferl-train fisor --task CarRun')


def _gpu_grid_tool():
    """Import tools/gpu_grid.py (a script, not a package module)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / 'tools' / 'gpu_grid.py'
    spec = importlib.util.spec_from_file_location('gpu_grid', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_machine_tool_sizes_steps_packs_slim_runs_that_the_grid_only_evaluates(
        tmp_path, monkeypatch):
    # tools/gpu_grid.py on the CPU (what it does on a GPU machine): probe, size the steps to the
    # budget, train, slim the checkpoints, pack; the grid here then evaluates without training.
    import tarfile

    import torch
    from offline_training.grid import run_job, trained_already

    datasets = synthetic_datasets(tmp_path)
    monkeypatch.setenv('DSRL_DATASET_DIR', str(datasets))
    tool = _gpu_grid_tool()
    out, runs = tmp_path / 'out', tmp_path / 'runs'
    code = tool.main(['--grid', 'core-hour', '--method', 'fisor', '--only', 'BallCircle',
                      '--skip', 'fisor-BallCircle-s1', 'fisor-BallCircle-s2', '--device', 'cpu',
                      '--preset', 'test', '--max-steps', '1000', '--budget', '300',
                      '--probe', '0.5', '--runs-dir', str(runs), '--out', str(out),
                      '--pack-dir', str(tmp_path / 'pack')])
    assert code == 0
    report = json.loads((out / 'gpu-grid.json').read_text())
    assert report['steps'] == 1000 and report['statuses']['fisor-BallCircle-s0'].startswith('ok')
    assert set(report['rates']['fisor-BallCircle-s0']) == {'critic_it_s', 'actor_it_s',
                                                           'critic_fraction'}
    assert report['packs_in_out'] == report['packs']
    back = tmp_path / 'back'
    with tarfile.open(out / report['packs'][0]) as tar:
        tar.extractall(back, filter='data')
    run_dir = next(back.rglob('fisor-BallCircle-s0'))
    assert run_dir == back / 'runs' / 'fisor-BallCircle-s0'    # runs dir outside the repo
    state = torch.load(run_dir / 'checkpoint.pt', weights_only=False)
    assert 'trainer' not in state and state['step'] == 1000 and 'model' in state
    # the run folder on the training machine keeps its full checkpoint (it can be extended)
    assert 'trainer' in torch.load(runs / 'fisor-BallCircle-s0' / 'checkpoint.pt',
                                   weights_only=False)
    # the grid here: trained already (1000 >= the method's steps) -> evaluation only
    grid = Grid('back', (Method('fisor', 'fisor', 1000),), tasks=('BallCircle',), preset='test',
                eval_episodes=1, runs_dir=run_dir.parent, results_dir=tmp_path / 'results',
                notes_path=None, datasets_dir=datasets)
    job = grid.jobs()[0]
    assert trained_already(job, grid)
    assert not trained_already(Job(Method('fisor', 'fisor', 2000), 'BallCircle', 0), grid)
    # a grid that wants more steps than the slimmed run has: one clear line, nothing runs
    longer = Grid('longer', (Method('fisor', 'fisor', 2000),), tasks=('BallCircle',),
                  preset='test', runs_dir=run_dir.parent, results_dir=tmp_path / 'longer')
    _, refused = run_job(longer.jobs()[0], longer)
    assert refused.startswith('FAILED') and 'slimmed' in refused and 'h200' in refused
    name, status = run_job(job, grid)
    assert status.startswith('ok'), status
    log = (run_dir.parent / 'logs' / f'{name}.log').read_text()
    assert '$ saferl-eval' in log and '$ saferl-train' not in log
    assert (tmp_path / 'results' / f'{name}.json').is_file()


def test_one_machine_tool_sizes_each_schedule_by_its_own_phases():
    tool = _gpu_grid_tool()
    assert tool.seconds_per_step({'it_s': 100.0}) == pytest.approx(0.01)
    # critics-first: 40 % of the steps at the critic rate, the rest at the actor rate
    probe = {'critic_it_s': 200.0, 'actor_it_s': 100.0, 'critic_fraction': 0.4}
    assert tool.seconds_per_step(probe) == pytest.approx(0.4 / 200 + 0.6 / 100)


def test_one_machine_tool_names_packed_runs_where_they_unpack(tmp_path):
    from pathlib import Path

    tool = _gpu_grid_tool()
    repo = Path(__file__).resolve().parents[1]
    assert tool.pack_name(repo / 'runs' / 'core-hour' / 'fisor-X-s0') == \
        'runs/core-hour/fisor-X-s0'                  # unpack at the repository root
    assert tool.pack_name(tmp_path / 'my-runs' / 'fisor-X-s0') == 'my-runs/fisor-X-s0'


def _tempting_and_reshape_steps():
    """Return OASIS's two data steps in small: a tempting variant, a reshape of it ('gen')."""
    tempting = DataStep('tempting', ('tempting', '{source}', '--task', '{task}',
                                     '--remove-ratio', '0.5', '-o', '{out}'))
    reshaped = DataStep('gen', ('reshape', '{source}', '--task', '{task}', '--kappa', '20',
                                '--preset', '{preset}', '--no-progress', '-o', '{out}'),
                        source='tempting', keep=('.report.json', '.conditions.png'))
    return tempting, reshaped


def test_a_data_step_reads_what_another_made_and_notices_when_it_changes(tmp_path):
    # OASIS's start-state ablation: a second reshape with the first one's generator. It runs
    # after that step, records the sha256 of what it read, and refuses its files once that
    # changed (they would describe another generator's output).
    from offline_training.grid import data_stamp_path, run_data_step

    datasets = synthetic_datasets(tmp_path, episodes=12)
    tempting, reshaped = _tempting_and_reshape_steps()
    starts = DataStep('starts', ('reshape', '{source}', '--task', '{task}', '--kappa', '20',
                                 '--preset', '{preset}', '--start-states', 'training',
                                 '--generator', '{data[gen]}.generator.pt', '--no-progress',
                                 '-o', '{out}'), source='tempting', needs=('gen',))
    grid = Grid('data', (Method('oasis', 'oasis', 6, ('cost_limit=20',), data='starts'),),
                tasks=('BallCircle',), preset='test', runs_dir=tmp_path / 'runs',
                results_dir=tmp_path / 'results', notes_path=None, datasets_dir=datasets,
                data_steps=(tempting, reshaped, starts))
    check_data_steps(grid)
    order = [s.tag for s, _ in data_steps_needed(grid.jobs(), grid)]
    assert order == ['tempting', 'gen', 'starts']
    assert run_data_step(tempting, 'BallCircle', grid)[1].startswith('ok')
    missing = run_data_step(starts, 'BallCircle', grid)[1]
    assert missing.startswith('FAILED: its input') and \
        'gen-BallCircle.hdf5 was not made' in missing
    assert run_data_step(reshaped, 'BallCircle', grid)[1].startswith('ok')
    assert run_data_step(starts, 'BallCircle', grid)[1].startswith('ok')
    log = (tmp_path / 'runs' / 'logs' / 'data-starts-BallCircle.log').read_text()
    assert 'generator    loaded' in log and 'gen-BallCircle.hdf5.generator.pt' in log
    made_by = json.loads(data_stamp_path(starts, 'BallCircle', grid).read_text())
    assert set(made_by['needs_sha256']) == {'gen'}
    assert run_data_step(starts, 'BallCircle', grid)[1] == 'done already'
    gen_file = tmp_path / 'runs' / 'data' / 'gen-BallCircle.hdf5'
    gen_file.write_bytes(gen_file.read_bytes() + b'another generator')
    status = run_data_step(starts, 'BallCircle', grid)[1]
    assert status.startswith('FAILED: its files were made by another version of its inputs (gen)')


def test_data_steps_make_each_dataset_once_before_the_runs_that_train_on_it(tmp_path):
    from dataclasses import replace

    # OASIS's shape: a tempting variant of the task's data, a reshaped file made from it, runs
    # on each; and a step whose command fails, whose run then fails with its dataset named.
    datasets = synthetic_datasets(tmp_path, episodes=12)
    tempting, reshaped = _tempting_and_reshape_steps()
    broken = DataStep('broken', ('tempting', '{source}', '--task', '{task}', '--remove-ratio',
                                 '2', '-o', '{out}'))
    grid = Grid('data', (Method('oasis', 'oasis', 6, ('cost_limit=20',), data='gen'),
                         Method('bc_all', 'bc_all', 4, data='tempting'),
                         Method('bc_safe', 'bc_safe', 4, data='broken')),
                tasks=('BallCircle',), preset='test', eval_episodes=1, checkpoint_every=2,
                runs_dir=tmp_path / 'runs', results_dir=tmp_path / 'results',
                table_path=tmp_path / 'results.md', runs_page=tmp_path / 'runs.md',
                notes_path=None, datasets_dir=datasets, data_steps=(tempting, reshaped, broken),
                kappas=(20,), paper='oasis')
    check_data_steps(grid)
    # the data steps come before the runs, each after the step it reads
    assert [(s.tag, t) for s, t in data_steps_needed(grid.jobs(), grid)] == [
        ('tempting', 'BallCircle'), ('gen', 'BallCircle'), ('broken', 'BallCircle')]
    command = data_command(reshaped, 'BallCircle', grid)
    source = tmp_path / 'runs' / 'data' / 'tempting-BallCircle.hdf5'
    assert command[:3] == ['saferl-data', 'reshape', str(source)]
    assert command[command.index('-o') + 1].endswith('runs/data/gen-BallCircle.hdf5')
    assert '{' not in ' '.join(command) and command[command.index('--preset') + 1] == 'test'
    lines = []
    statuses = run_grid(grid.jobs(), grid, workers=2, echo=lines.append)
    for name in ('data-tempting-BallCircle', 'data-gen-BallCircle', 'oasis-BallCircle-s0',
                 'bc_all-BallCircle-s0'):
        assert statuses[name].startswith('ok'), (name, statuses[name])
    assert len(lines) == 6 and lines[-1].split()[1] == '[6/6]'
    # the reshape's report and picture are kept with the results (runs/ is this machine's)
    for suffix in ('.report.json', '.conditions.png'):
        kept = tmp_path / 'results' / 'data' / f'gen-BallCircle{suffix}'
        made = tmp_path / 'runs' / 'data' / f'gen-BallCircle.hdf5{suffix}'
        assert kept.read_bytes() == made.read_bytes()
    assert 'conditions' in json.loads(
        (tmp_path / 'results' / 'data' / 'gen-BallCircle.report.json').read_text())
    from offline_training.grid import keep_side_files
    assert 'did not write' in keep_side_files(replace(reshaped, keep=('.nothing',)),
                                              'BallCircle', grid)
    assert statuses['data-broken-BallCircle'].startswith('FAILED')
    assert '--remove-ratio must lie in [0, 1]' in (
        tmp_path / 'runs' / 'logs' / 'data-broken-BallCircle.log').read_text()
    failed = statuses['bc_safe-BallCircle-s0']
    assert failed.startswith('FAILED: its data step failed (data-broken-BallCircle: FAILED')
    assert 'data-broken-BallCircle.log' in failed
    # each run trained on its step's file: OASIS on the generated one, BC on the tempting one
    for run, tag in (('oasis-BallCircle-s0', 'gen'), ('bc_all-BallCircle-s0', 'tempting')):
        config = yaml.safe_load((tmp_path / 'runs' / run / 'config.yaml').read_text())
        assert config['dataset']['path'].endswith(f'runs/data/{tag}-BallCircle.hdf5')
    # nothing is made twice: a data step whose files exist is done already, with a record of
    # the command and source that made it; one made otherwise is refused, not reused
    from offline_training.grid import data_stamp_path, run_data_step
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'runs' / 'data').glob('*.hdf5')}
    assert run_data_step(reshaped, 'BallCircle', grid)[1] == 'done already'
    assert made == {p.name: p.stat().st_mtime_ns
                    for p in (tmp_path / 'runs' / 'data').glob('*.hdf5')}
    stamp = data_stamp_path(reshaped, 'BallCircle', grid)
    assert json.loads(stamp.read_text())['command'] == command
    other = replace(grid, preset='cpu')
    status = run_data_step(reshaped, 'BallCircle', other)[1]
    assert status.startswith('FAILED: its files were made by another command') and \
        'gen-BallCircle*' in status
    # a run that waited for that step does not train on its file
    from offline_training.grid import run_job
    newcomer = Job(Method('oasis2', 'oasis', 6, ('cost_limit=20',), data='gen'), 'BallCircle', 0)
    name, refused = run_job(newcomer, other, ('data-gen-BallCircle', status))
    assert refused.startswith('FAILED: its data step failed (data-gen-BallCircle: FAILED')
    assert not (tmp_path / 'runs' / 'oasis2-BallCircle-s0').exists()
    stamp.unlink()                # files from before records were kept: adopted, and said so
    assert 'adopted' in run_data_step(reshaped, 'BallCircle', grid)[1]
    assert run_data_step(reshaped, 'BallCircle', grid)[1] == 'done already'
    # runs that are done need no data: without the datasets (a fresh clone holds the results,
    # not runs/), the finished runs are done already and no data step runs
    import shutil
    shutil.rmtree(tmp_path / 'runs' / 'data')
    again = run_grid(grid.jobs()[:2], grid, workers=2, echo=lines.append)
    assert again == {'oasis-BallCircle-s0': 'done already', 'bc_all-BallCircle-s0': 'done already'}
    assert not (tmp_path / 'runs' / 'data').exists()
    # the results page stands the OASIS paper's rows beside ours, at kappa 20
    assert write_tables(grid) == 0
    page = (tmp_path / 'results.md').read_text()
    assert '## κ = 20' in page and '## κ = 5' not in page and '--paper oasis' in page
    assert 'paper oasis R / C' in page and 'Table 1 of the OASIS paper' in page


def test_a_grid_shows_another_grids_runs_beside_its_own_only_when_they_exist(tmp_path):
    from dataclasses import replace

    from offline_training.grid import reference_files
    from saferl_ros.errors import ConfigError

    dspo = GRIDS['dspo']
    files = reference_files(dspo)
    # the core-hour grid's FISOR (3 seeds) and BC-Safe runs on the labelled data, as they exist
    names = {path.name for path in files}
    assert {'fisor-BallCircle-s0.json', 'fisor-BallCircle-s2.json',
            'bc_safe-k10-CarRun-s0.json', 'bc_safe-k5-DroneRun-s0.json'} <= names
    assert all(path.parent == GRIDS['core-hour'].results_dir for path in files)
    assert not any(name.startswith(('drcorl', 'bc_all', 'bcq')) for name in names)
    assert reference_files(replace(dspo, tasks=('CarRun',))) == [
        path for path in files if '-CarRun-' in path.name]
    for bad in (('core-hour', 'fisr'), ('no-such-grid', 'fisor'), ('dspo', 'dspo-k10')):
        with pytest.raises(ConfigError, match=f'reference {bad[0]}/{bad[1]}'):
            check_pages(replace(dspo, references=(bad,)))
    # a reference whose column name is one of the grid's own would pool the two in one cell
    with pytest.raises(ConfigError, match='shares a column name'):
        check_pages(replace(dspo, methods=dspo.methods + (Method('fisor', 'fisor', 10),)))


def test_a_page_shows_methods_of_its_grid(tmp_path):
    from saferl_ros.errors import ConfigError

    for grid in GRIDS.values():
        check_pages(grid)
    assert [page.path.name for page in GRIDS['core-hour'].pages] == ['results.md']
    with pytest.raises(ConfigError, match="shows fisr, not among the grid's methods"):
        check_pages(Grid('bad', (Method('fisor', 'fisor', 3),),
                         pages=(Page(tmp_path / 'p.md', ('fisor', 'fisr')),)))
    with pytest.raises(ConfigError, match='shows no method'):
        check_pages(Grid('bad', (Method('fisor', 'fisor', 3),),
                         pages=(Page(tmp_path / 'p.md', ()),)))


def test_a_data_step_must_exist_and_come_after_its_source():
    from saferl_ros.errors import ConfigError

    for grid in GRIDS.values():
        check_data_steps(grid)
    first, second = DataStep('a', ('x',)), DataStep('b', ('y',), source='a')
    with pytest.raises(ConfigError, match="reads 'a', which is not an earlier data step"):
        check_data_steps(Grid('bad', (), data_steps=(second, first)))
    with pytest.raises(ConfigError, match="reads 'a', which is not an earlier data step"):
        check_data_steps(Grid('bad', (), data_steps=(DataStep('b', ('y',), needs=('a',)), first)))
    with pytest.raises(ConfigError, match="trains on data step 'c', which the grid does not"):
        check_data_steps(Grid('bad', (Method('m', 'bc_all', 3, data='c'),),
                              data_steps=(first,)))
    with pytest.raises(ConfigError, match="two data steps are tagged 'a'"):
        check_data_steps(Grid('bad', (), data_steps=(first, first)))
    with pytest.raises(ConfigError, match='has {data} in an override but trains on no data'):
        check_data_steps(Grid('bad', (Method('m', 'dspo', 3, ('demos={data}-demos.hdf5',)),)))
    # {data} is the only placeholder: other braces in an override stay as they are
    braces = Grid('ok', (Method('m', 'bc_all', 3, ('x={a: 1}', 'y={data}.h5'), data='a'),),
                  data_steps=(first,))
    check_data_steps(braces)
    train, _, _ = commands(braces.jobs()[0], braces)
    sets = [train[i + 1] for i, arg in enumerate(train) if arg == '--set']
    assert sets == ['x={a: 1}', 'y=runs/data/a-BallCircle.h5']
    # the OASIS grid: its tempting step reads the collected data, the reshape reads that
    oasis = GRIDS['oasis']
    assert [s.tag for s in oasis.data_steps][:2] == ['tempting', 'oasis-k20']
    # the data-efficiency runs (the paper's Fig. 6) are BallCircle's alone, on subsets
    names = [job.name for job in oasis.jobs()]
    assert 'oasis-n2400-BallCircle-s0' in names and 'bcq_lag-k20-n12000-BallCircle-s0' in names
    assert not [n for n in names if '-n2400-' in n and 'BallCircle' not in n]
    assert len(names) == 6 * (3 + 3 + 3 + 1 + 1 + 1) + 4
    # the start-state ablation reshapes with the oasis-k20 step's generator: made after it, and
    # the generator file is that step's
    ablation = GRIDS['oasis'].jobs()[names.index('oasis-training-starts-CarCircle-s0')]
    steps = [s.tag for s, t in data_steps_needed([ablation], oasis)]
    assert steps == ['tempting', 'oasis-k20', 'oasis-k20-training-starts']
    command = data_command(data_step('oasis-k20-training-starts', oasis), 'CarCircle', oasis)
    generator = command[command.index('--generator') + 1]
    assert generator == str(repo_relative(data_path('oasis-k20', 'CarCircle', oasis))) + \
        '.generator.pt'
    assert command[command.index('--start-states') + 1] == 'training'
    subsets = [s for s, t in data_steps_needed(oasis.jobs(), oasis) if s.tag.endswith('-n2400')]
    assert [s.source for s in subsets] == ['oasis-k20', 'tempting']
    train, _, _ = commands(Job(oasis.methods[0], 'CarRun', 1), oasis)
    assert train[:2] == ['saferl-train', 'oasis']
    assert train[train.index('--dataset') + 1] == 'runs/oasis/data/oasis-k20-CarRun.hdf5'


def test_a_data_step_of_several_files_is_made_again_when_one_is_missing(tmp_path):
    # DSPO's split writes three files; one missing (killed between two) means made again, and
    # the runs find the one they train on and the demonstrations through {data}.
    from offline_training.grid import data_files, run_data_step
    from saferl_ros.errors import ConfigError

    datasets = synthetic_datasets(tmp_path, episodes=30, max_length=20)
    split = DataStep('split', ('split-demos', '{source}', '--task', '{task}', '--kappa', '40',
                               '--num-demos', '3', '--holdout', '0.2', '-o', '{prefix}'),
                     files=('-unlabelled.hdf5', '-demos.hdf5', '-heldout.hdf5'))
    grid = Grid('split', (Method('dspo', 'dspo', 4, ('demos={data}-demos.hdf5',), data='split'),
                          Method('demos', 'bc_all', 4, data='split', data_file='-demos.hdf5')),
                tasks=('BallCircle',), preset='test', runs_dir=tmp_path / 'runs',
                results_dir=tmp_path / 'results', datasets_dir=datasets, data_steps=(split,))
    check_data_steps(grid)
    name, status = run_data_step(split, 'BallCircle', grid)
    assert name == 'data-split-BallCircle' and status.startswith('ok'), status
    files = data_files(split, 'BallCircle', grid)
    assert all(f.is_file() for f in files)
    assert run_data_step(split, 'BallCircle', grid)[1] == 'done already'
    files[1].unlink()                     # killed after the first file
    stale = files[0].stat().st_mtime_ns
    assert run_data_step(split, 'BallCircle', grid)[1].startswith('ok')
    assert all(f.is_file() for f in files) and files[0].stat().st_mtime_ns != stale
    dspo, _, _ = commands(grid.jobs()[0], grid)
    prefix = str(tmp_path / 'runs' / 'data' / 'split-BallCircle')
    assert dspo[dspo.index('--dataset') + 1] == prefix + '-unlabelled.hdf5'
    assert dspo[dspo.index('--set') + 1] == f'demos={prefix}-demos.hdf5'
    demos, _, _ = commands(grid.jobs()[1], grid)
    assert demos[demos.index('--dataset') + 1] == prefix + '-demos.hdf5'
    with pytest.raises(ConfigError, match="file '-demo.hdf5' of data step 'split', which writes"):
        check_data_steps(Grid('bad', (Method('m', 'bc_all', 3, data='split',
                                             data_file='-demo.hdf5'),), data_steps=(split,)))
    # the DSPO grid: each kappa's split, DSPO on its cost-free set with its demonstrations
    dspo_grid = GRIDS['dspo']
    train, _, _ = commands(Job(dspo_grid.methods[3], 'CarRun', 2), dspo_grid)
    assert train[train.index('--dataset') + 1] == 'runs/dspo/data/split-k5-CarRun-unlabelled.hdf5'
    assert 'demos=runs/dspo/data/split-k5-CarRun-demos.hdf5' in train
