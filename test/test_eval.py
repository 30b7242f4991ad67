"""Evaluation: DSRL's normalisation exactly, real PyBullet rollouts of a bundle, results table."""

import json
import os
from pathlib import Path

import numpy as np
from offline_training.evaluate import evaluate, load_agent, main, rollout, write_results
from offline_training.export import make_test_bundle
from offline_training.results import result_label, summarize, write_table
import pytest
from saferl_ros.errors import ConfigError
from saferl_ros.tasks import get_task


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    return make_test_bundle(tmp_path_factory.mktemp('eval') / 'fisor', train_steps=5)


def test_normalisation_equals_dsrl_get_normalized_score():
    env = get_task('BallCircle').make_env(offline=True)
    dsrl_env = env.unwrapped
    rows = [{'seed': 0, 'episode': i, 'reward': r, 'cost': c, 'length': 200}
            for i, (r, c) in enumerate([(0.0, 0.0), (350.5, 3.0), (881.46, 41.0), (-5.0, 7.0)])]
    summary = summarize('BallCircle', rows, kappas=(0, 5, 10, 20, 40))
    for kappa in (0, 5, 10, 20, 40):
        dsrl_env.set_target_cost(kappa)
        expected = np.array([dsrl_env.get_normalized_score(r['reward'], r['cost'])
                             for r in rows])
        ours = summary['normalized'][str(kappa)]
        assert ours['reward']['mean'] == pytest.approx(expected[:, 0].mean(), abs=1e-12)
        assert ours['cost']['mean'] == pytest.approx(expected[:, 1].mean(), abs=1e-12)
        assert ours['reward']['std'] == pytest.approx(expected[:, 0].std(), abs=1e-12)
        assert ours['safe_fraction'] == pytest.approx(np.mean(expected[:, 1] <= 1))
    env.close()


def test_units_are_seeds_when_there_are_several():
    rows = [{'seed': s, 'episode': e, 'reward': 100.0 * s + e, 'cost': float(s), 'length': 1}
            for s in (0, 1) for e in (0, 1)]
    summary = summarize('BallCircle', rows, kappas=(10,))
    assert summary['std_over'] == 'seeds' and summary['units'] == 2
    assert summary['reward'] == {'mean': 50.5, 'std': 50.0}  # seed means 0.5 and 100.5


def test_bundle_rollouts_in_pybullet(bundle, tmp_path):
    results = evaluate([bundle], episodes=2, seeds=[0], progress=False)
    rows = results['episodes']
    assert len(rows) == 2 and all(r['length'] == 200 for r in rows)  # BallCircle horizon
    assert all(np.isfinite(r['reward']) and 0 <= r['cost'] <= 200 for r in rows)
    assert results['kinds'] == ['bundle'] and results['algorithm'] == 'fisor'
    assert set(results['summary']['normalized']) == {'5', '10', '20', '40'}
    # Seeded: the same episode again gives the same returns.
    agent = load_agent(bundle)
    env = get_task('BallCircle').make_env()
    again = rollout(agent, env, 0, 1)
    env.close()
    assert again['reward'] == pytest.approx(rows[1]['reward'])
    assert again['cost'] == rows[1]['cost']
    out = write_results(results, tmp_path / 'res' / 'fisor.json')
    assert json.loads(out.read_text())['summary']['episodes'] == 2
    assert len(out.with_suffix('.csv').read_text().splitlines()) == 3
    table = write_table([out], tmp_path / 'docs' / 'results.md', kappa=5)
    text = table.read_text()
    assert '| BallCircle |' in text and 'paper fisor' in text
    assert (tmp_path / 'docs' / 'img' / 'results' / 'reward_cost_BallCircle.png').is_file()
    assert 'BallCircle,fisor,5.0,' in table.with_suffix('.csv').read_text()


def test_saferl_eval_cli(bundle, tmp_path, capfd):
    out = tmp_path / 'r.json'
    assert main([str(bundle), '--episodes', '1', '--seeds', '3', '-o', str(out),
                 '--no-progress', '--update-manifest', '--label', 'fisor-test']) == 0
    assert result_label(json.loads(out.read_text())) == 'fisor-test'
    printed = capfd.readouterr().out
    assert 'kappa    5' in printed and 'R_norm' in printed
    from saferl_ros.bundle import load_bundle
    metrics = load_bundle(bundle).manifest['metrics']['evaluation']
    assert metrics['seeds'] == [3] and '10' in metrics['normalized']
    (tmp_path / 'notes.md').write_text('## Status\n\nOnly a test bundle.\n')
    assert main(['table', str(out), '-o', str(tmp_path / 'results.md'), '--notes',
                 str(tmp_path / 'notes.md')]) == 0
    assert (tmp_path / 'results.md').read_text().endswith('Only a test bundle.\n')
    assert main([str(tmp_path / 'missing'), '--episodes', '1']) == 2
    # -o replaces an earlier output of its own, nothing else (a dataset given by mistake)
    dataset = tmp_path / 'data.hdf5'
    dataset.write_bytes(b'\x89HDF\r\n\x1a\n' + bytes(100))
    notes = tmp_path / 'notes.md'
    capfd.readouterr()
    for argv, needle in (
            ([str(bundle), '-o', str(dataset)], 'give a .json file name'),
            ([str(bundle), '-o', str(tmp_path / 'notes.json')], 'not a results file'),
            ([str(bundle), '--kappa', 'nan', '-o', str(tmp_path / 'k.json')],
             'a cost threshold must be a finite number > 0'),
            (['table', str(out), '-o', str(notes)], 'is not a page saferl-eval table wrote'),
            (['table', str(out), '-o', str(tmp_path / 'results.md'), '--kappa', '0'],
             '--kappa 0: a cost threshold')):
        (tmp_path / 'notes.json').write_text('{"mine": 1}')
        assert main(argv + ['--episodes', '1'] * (argv[0] != 'table')) == 2, argv
        err = capfd.readouterr().err
        assert needle in err and 'Traceback' not in err, err
    assert dataset.read_bytes().startswith(b'\x89HDF') and notes.read_text().startswith('## ')
    assert json.loads((tmp_path / 'notes.json').read_text()) == {'mine': 1}
    assert main([str(bundle), '--episodes', '1', '-o', str(out), '--no-progress']) == 0


@pytest.mark.parametrize('selection', ['minqc', 'feasible-maxq'])
def test_run_folder_and_its_bundle_act_alike(tmp_path, ballcircle_arrays, selection):
    from offline_training.export import export_run
    from offline_training.train import train
    run = train('fisor', 'BallCircle', preset='test', data=ballcircle_arrays, steps=3,
                out=tmp_path / 'run', progress=False, overrides={'selection': selection})
    torch_agent = load_agent(run)
    onnx_agent = load_agent(export_run(run, tmp_path / 'bundle'))
    assert (torch_agent.kind, onnx_agent.kind) == ('run', 'bundle')
    # a run trained (or a bundle exported) as a variant is labelled as one without --set
    expected = {} if selection == 'minqc' else {'selection': selection}
    assert torch_agent.variant == onnx_agent.variant == expected
    env = get_task('BallCircle').make_env()
    np.random.seed(0)
    obs, _ = env.reset(seed=0)
    rng_torch, rng_onnx = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(20):  # real observations along a real trajectory
        action = onnx_agent.act(obs, rng_onnx)
        np.testing.assert_allclose(torch_agent.act(obs, rng_torch), action, atol=1e-4)
        obs, *_ = env.step(action)
    env.close()


def test_eval_set_changes_a_run_folders_inference_and_labels_the_result(
        tmp_path, ballcircle_arrays, bundle, capfd):
    from offline_training.train import train
    run = train('fisor', 'BallCircle', preset='test', data=ballcircle_arrays, steps=3,
                out=tmp_path / 'fisor-BallCircle-s0', progress=False)
    out = tmp_path / 'r.json'
    assert main([str(run), '--episodes', '1', '-o', str(out), '--no-progress',
                 '--set', 'selection=feasible-maxq', '--set', 'num_candidates=4']) == 0
    result = json.loads(out.read_text())
    assert result['inference'] == result['variant'] == {'selection': 'feasible-maxq',
                                                        'num_candidates': 4}
    assert result_label(result) == 'fisor+num_candidates=4+selection=feasible-maxq'
    # a setting equal to the run's own changes nothing and labels nothing
    assert main([str(run), '--episodes', '1', '-o', str(out), '--no-progress',
                 '--set', 'selection=minqc']) == 0
    result = json.loads(out.read_text())
    assert 'inference' not in result and result_label(result) == 'fisor'
    capfd.readouterr()
    # --set without -o would replace the run's own RUN/eval/results.json
    with pytest.raises(SystemExit):
        main([str(run), '--episodes', '1', '--set', 'selection=feasible-maxq'])
    assert 'give -o' in capfd.readouterr().err and not (run / 'eval').exists()
    # Refused, each with one line naming the cause: a training setting, a setting the algorithm
    # has not, bad values, a setting evaluation does not use, and a bundle (graphs are fixed).
    for args, message in (([str(run), '--set', 'steps=5'], 'not inference settings'),
                          ([str(run), '--set', 'selection=best'], "selection 'best'"),
                          ([str(run), '--set', 'num_candidates=0'], 'must lie in [1, 1024]'),
                          ([str(run), '--set', 'num_candidates=100000000'],
                           'must lie in [1, 1024]'),
                          ([str(run), '--set', 'ddpm_temperature=-1'], 'must be >= 0'),
                          ([str(run), '--set', 'fallback_candidates=8'], 'saferl-export'),
                          ([str(bundle), '--set', 'num_candidates=4'], 'is a bundle')):
        assert main([*args, '--episodes', '1', '-o', str(tmp_path / 'x.json'),
                     '--no-progress']) == 2
        assert message in capfd.readouterr().err
    bc = train('bc_all', 'BallCircle', preset='test', data=ballcircle_arrays, steps=2,
               out=tmp_path / 'bc', progress=False)
    assert main([str(bc), '--set', 'num_candidates=4', '--episodes', '1', '-o',
                 str(tmp_path / 'x.json'), '--no-progress']) == 2
    assert 'bc_all, which has no' in capfd.readouterr().err
    assert not (tmp_path / 'x.json').exists()
    # runs of two variants do not pool into one result (refused before any rollout)
    other = train('fisor', 'BallCircle', preset='test', data=ballcircle_arrays, steps=3,
                  out=tmp_path / 'fisor-BallCircle-s1', progress=False,
                  overrides={'selection': 'feasible-maxq'})
    with pytest.raises(ConfigError, match='different variants'):
        evaluate([run, other], episodes=1, progress=False)


def _fake_result(name, algorithm, costs, task='BallCircle'):
    rows = [{'reward': 400.0, 'cost': float(c), 'length': 200, 'seed': 0, 'episode': i,
             'source': name} for i, c in enumerate(costs)]
    return {'name': name, 'task': task, 'algorithm': algorithm, 'kinds': ['run'],
            'sources': [name], 'episodes_per_seed': len(rows), 'seeds': [0],
            'kappas': [5.0, 10.0], 'episodes': rows,
            'summary': summarize(task, rows, (5.0, 10.0))}


@pytest.mark.parametrize('edit, needle', [
    (lambda r: r['episodes'][0].update(reward='1'), 'expected integers and finite numbers'),
    (lambda r: r['episodes'][0].update(cost=None), 'expected integers and finite numbers'),
    (lambda r: r['episodes'][0].update(seed=[0]), 'expected integers and finite numbers'),
    (lambda r: r.update(kappas=['5']), 'kappas should be numbers > 0'),
    (lambda r: r.update(machine='x'), "field 'machine' should be an object"),
    (lambda r: r.update(episodes=[]), 'holds no episodes'),
], ids=['reward', 'cost', 'seed', 'kappas', 'machine', 'no-episodes'])
def test_table_refuses_malformed_results_in_one_line(tmp_path, edit, needle):
    result = _fake_result('fisor-BallCircle-s0', 'fisor', [0, 1])
    edit(result)
    (tmp_path / 'r.json').write_text(json.dumps(result))
    with pytest.raises(ConfigError, match=needle):
        write_table([tmp_path / 'r.json'], tmp_path / 'results.md')


@pytest.mark.parametrize('kind', ['deep', 'device', 'fifo'])
def test_table_refuses_results_that_are_not_small_regular_json(tmp_path, kind):
    path = tmp_path / 'r.json'
    if kind == 'deep':
        path.write_text('[' * 100_000 + ']' * 100_000)
        needle = 'nested too deeply'
    elif kind == 'device':
        path = Path('/dev/zero')
        needle = 'not a regular file'
    else:
        os.mkfifo(path)
        needle = 'not a regular file'
    with pytest.raises(ConfigError, match=needle):
        write_table([path], tmp_path / 'results.md')


def test_table_keeps_variants_apart_and_writes_one_table_per_kappa(tmp_path):
    files = []
    for name, costs in (('bc_safe-k5-BallCircle-s0', [2, 4]),
                        ('bc_safe-k10-BallCircle-s0', [8, 12]),
                        ('fisor-BallCircle-s0', [0, 0]), ('fisor-BallCircle-s1', [0, 2])):
        result = _fake_result(name, name.split('-')[0], costs)
        files.append(tmp_path / f'{name}.json')
        files[-1].write_text(json.dumps(result))
    assert result_label(json.loads(files[0].read_text())) == 'bc_safe-k5'
    assert result_label({'name': 'fisor-ballcircle', 'task': 'BallCircle',
                         'algorithm': 'fisor'}) == 'fisor'     # a bundle: its algorithm
    out = write_table(files, tmp_path / 'results.md', kappa=[5, 10])
    text = out.read_text()
    assert '## κ = 5' in text and '## κ = 10' in text
    header = [line for line in text.splitlines() if line.startswith('| Task')][0]
    assert 'bc_safe-k5 R↑' in header and 'bc_safe-k10 R↑' in header and 'paper fisor' in header
    # bc_safe-k10: mean cost 10 -> C_norm 2.00 at kappa 5 (bold, unsafe), 1.00 at kappa 10.
    k5, k10 = text.split('## κ = 10')
    assert '**2.00 ± 0.40**' in k5 and '1.00 ± 0.20' in k10.split('## Evaluation units')[0]
    # the paper's kappa-5 rows stand beside ours at kappa 5 only
    assert '0.34 / 0.00' in k5 and 'paper fisor' not in k10.split('## Evaluation units')[0]
    # FISOR's two training seeds are two units: the std is over seeds.
    assert 'BallCircle / fisor: 4 episodes' in text and 'std over seeds' in text
    assert (tmp_path / 'img' / 'results' / 'reward_cost_BallCircle_kappa10.png').is_file()
    # a second page beside it (a grid's) draws into its own folder, never over this page's plots
    shared_plot = tmp_path / 'img' / 'results' / 'reward_cost_BallCircle.png'
    before = shared_plot.read_bytes()
    write_table(files[2:], tmp_path / 'grid.md', kappa=5)
    assert (tmp_path / 'img' / 'grid' / 'reward_cost_BallCircle.png').is_file()
    assert shared_plot.read_bytes() == before
    csv_text = out.with_suffix('.csv').read_text()
    assert 'BallCircle,bc_safe-k10,10.0,' in csv_text and 'BallCircle,bc_safe-k5,5.0,' in csv_text
    # --match-kappa: a column trained for one threshold stands in that threshold's table only
    matched = write_table(files, tmp_path / 'matched.md', kappa=[5, 10], match_kappa=True)
    k5, k10 = matched.read_text().split('## Evaluation units')[0].split('## κ = 5')[1].split(
        '## κ = 10')
    assert 'bc_safe-k5 R↑' in k5 and 'bc_safe-k10' not in k5 and 'fisor R↑' in k5
    assert 'bc_safe-k10 R↑' in k10 and 'bc_safe-k5' not in k10 and 'fisor R↑' in k10
    assert '--match-kappa' in matched.read_text().splitlines()[2]
    assert 'BallCircle,bc_safe-k10,5.0,' in matched.with_suffix('.csv').read_text()
    # a first kappa without any column: the plots of the next table are linked; a column of a
    # kappa without a table is named, not lost
    only = write_table(files[:2], tmp_path / 'only.md', kappa=[20, 5], match_kappa=True)
    text = only.read_text()
    assert 'No results trained for this threshold yet' in text.split('## κ = 5')[0]
    assert 'Reward against cost at κ = 5' in text and '![' in text.split('## κ = 5')[1]
    assert 'without a table here (the CSV has them): bc_safe-k10.' in text


def test_notes_include_another_pages_tables_with_links_that_resolve(tmp_path):
    import re

    from saferl_ros.errors import UserError

    files = []
    for name, costs in (('dspo-k10-BallCircle-s0', [20, 30]), ('bc_all-BallCircle-s0', [4, 6])):
        files.append(tmp_path / 'data' / f'{name}.json')
        files[-1].parent.mkdir(exist_ok=True)
        files[-1].write_text(json.dumps(_fake_result(name, name.split('-')[0], costs)))
    # a grid's own page in docs/results/, then the main page whose notes include its tables
    docs = tmp_path / 'docs'
    sub = write_table(files[:1], docs / 'results' / 'dspo.md', kappa=[10, 5], paper='none')
    notes = tmp_path / 'NOTES.md'
    notes.write_text('## DSPO\n\nText before.\n<!-- include results/dspo.md -->\nText after.\n')
    main_page = write_table(files[1:], docs / 'results.md', kappa=5, notes=notes).read_text()
    dspo_part = main_page.split('## DSPO')[1]
    assert 'Text before.' in dspo_part and 'Text after.' in dspo_part
    assert '### κ = 10' in dspo_part and '### κ = 5' in dspo_part   # one level below its section
    assert '**2.50 ± 0.50**' in dspo_part.split('### κ = 5')[0]     # cost 25 at kappa 10
    assert '## Evaluation units' not in dspo_part and 'include' not in dspo_part
    images = re.findall(r'!\[[^]]*\]\(([^)]+)\)', dspo_part)
    assert images and all((docs / image).is_file() for image in images)
    assert all(image.startswith('results/img/dspo/') for image in images)
    assert 'reward_cost' in sub.read_text()
    # spaces and a CRLF line end are tolerated; text after the comment is refused, not dropped
    notes.write_text('  <!--  include   results/dspo.md  -->  \r\n')
    assert '### κ = 10' in write_table(files[1:], docs / 'results.md', kappa=5,
                                       notes=notes).read_text()
    notes.write_text('<!-- include results/dspo.md --> and more\n')
    with pytest.raises(UserError, match='must stand alone'):
        write_table(files[1:], docs / 'results.md', kappa=5, notes=notes)
    # a link with a title is rewritten too; anchors and URLs are kept
    from offline_training.results import included_tables
    (docs / 'results' / 'titled.md').write_text(
        '# R\n\n## κ = 5\n\n![a](img/a.png "A plot") [b](#top) [c](https://x.org/y.md)\n\n'
        '## Evaluation units\n')
    copied = included_tables('results/titled.md', docs / 'results.md')
    assert '![a](results/img/a.png "A plot")' in copied
    assert '[b](#top)' in copied and '[c](https://x.org/y.md)' in copied
    # an include of a missing page, or of a page that is not a table page, is refused by name
    for target, content in (('results/none.md', None), ('results/prose.md', '# Just text\n')):
        if content is not None:
            (docs / target).write_text(content)
        notes.write_text(f'<!-- include {target} -->\n')
        with pytest.raises(UserError, match=re.escape(target.split('/')[1])):
            write_table(files[1:], docs / 'results.md', kappa=5, notes=notes)


def test_shielding_applies_the_monitor_rule_and_counts_replacements(tmp_path, capfd):
    # BC-All (no critics of its own) under the shipped FISOR bundle's critics, as the monitor
    # node would shield it; thresholds pin the two extremes of the rule.
    from pathlib import Path

    from saferl_ros.monitor import MonitorConfig

    models = Path(__file__).resolve().parents[1] / 'models'
    policy, monitor = models / 'bc_all-ballcircle', models / 'fisor-ballcircle'
    alone = evaluate([policy], episodes=1, seeds=[0], progress=False)
    never = evaluate([policy], episodes=1, seeds=[0], progress=False, shield=monitor,
                     shield_config=MonitorConfig(threshold_v=1e9, threshold_q=1e9))
    # a monitor that never intervenes leaves the episode exactly as it was
    assert never['episodes'][0]['reward'] == alone['episodes'][0]['reward']
    assert never['shield']['replaced'] == 0
    assert never['shield']['decisions'] == alone['episodes'][0]['length']
    always = evaluate([policy], episodes=1, seeds=[0], progress=False, shield=monitor,
                      shield_config=MonitorConfig(threshold_v=-1e9, threshold_q=-1e9))
    row = always['episodes'][0]
    # every state judged infeasible: each action is the fallback's or kept because none was safer
    assert row['replaced'] + row['kept'] == row['decisions'] == row['length']
    assert row['replaced'] > 0 and row['reward'] != alone['episodes'][0]['reward']
    assert result_label(always) == 'bc_all+fisor-ballcircle'
    # the command line: the shielded share is printed; a monitor of another task is refused
    out = tmp_path / 'shielded.json'
    assert main([str(policy), '--shield', str(monitor), '--episodes', '1', '--no-progress',
                 '-o', str(out)]) == 0
    assert 'actions replaced' in capfd.readouterr().out
    assert 0 <= json.loads(out.read_text())['shield']['replaced_share'] <= 1
    assert main([str(policy), '--shield', str(models / 'fisor-carrun'), '--episodes', '1',
                 '-o', str(tmp_path / 'x.json')]) == 2
    assert 'cannot shield a BallCircle policy' in capfd.readouterr().err


def test_monitor_parameters_are_set_from_the_command_line(tmp_path, capfd):
    from pathlib import Path

    models = Path(__file__).resolve().parents[1] / 'models'
    policy, monitor = str(models / 'bc_all-ballcircle'), str(models / 'fisor-ballcircle')
    out = tmp_path / 'never.json'
    # thresholds so high that nothing is replaced: the episode is BC-All's own
    assert main([policy, '--shield', monitor, '--monitor-set', 'threshold_v=1e9',
                 '--monitor-set', 'threshold_q=1e9', '--monitor-set', 'min_hold=0',
                 '--episodes', '1', '--no-progress', '-o', str(out)]) == 0
    shield = json.loads(out.read_text())['shield']
    assert shield['replaced'] == 0
    assert shield['monitor_config'] == {'threshold_v': 1e9, 'threshold_q': 1e9, 'min_hold': 0}
    alone = evaluate([policy], episodes=1, seeds=[0], progress=False)
    assert json.loads(out.read_text())['episodes'][0]['reward'] == alone['episodes'][0]['reward']
    capfd.readouterr()
    for args, message in ((['--monitor-set', 'hold=0'], "'hold' is not a monitor parameter"),
                          (['--monitor-set', 'min_hold=-1'], 'min_hold is -1'),
                          (['--monitor-set', 'min_hold=soon'], 'min_hold'),
                          (['--monitor-set', 'seed=3'], "'seed' is not a monitor parameter"),
                          (['--monitor-set', 'budget=1'],
                           "budget does not apply to monitor bundle 'fisor-ballcircle'"),
                          (['--monitor-set', 'safe_action=[]'], 'safe_action is []'),
                          (['--monitor-set', 'fallback_samples=1.5'], 'give an integer')):
        assert main([policy, '--shield', monitor, *args, '--episodes', '1',
                     '-o', str(tmp_path / 'x.json')]) == 2, args
        assert message in capfd.readouterr().err, args
    with pytest.raises(SystemExit):
        main([policy, '--monitor-set', 'min_hold=0', '-o', str(tmp_path / 'y.json')])
    assert 'give --shield' in capfd.readouterr().err


def test_a_shielded_bundle_evaluation_needs_no_torch(tmp_path):
    # bundles run on ONNX Runtime alone, with --monitor-set too (its parser imports no torch)
    from pathlib import Path
    import subprocess
    import sys

    models = Path(__file__).resolve().parents[1] / 'models'
    code = ('import sys\n'
            'from offline_training.evaluate import main\n'
            f'code = main([{str(models / "bc_all-ballcircle")!r}, "--shield", '
            f'{str(models / "fisor-ballcircle")!r}, "--monitor-set", "threshold_v=3", '
            f'"--episodes", "1", "--no-progress", "-o", {str(tmp_path / "r.json")!r}])\n'
            'assert code == 0, code\n'
            'assert "torch" not in sys.modules, "torch was imported"\n')
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / 'r.json').read_text())['shield']['monitor_config'] == \
        {'threshold_v': 3.0}
