"""
saferl-demo: a shipped FISOR bundle in the ROS 2 loop, a few episodes (BallCircle by default).

Runs ``config/demo.yaml`` through :mod:`saferl_ros.bringup` (sim -> controller -> safety monitor
-> sim, recorder), prints per-episode reward, cost, DSRL-normalised scores, fallback steps and
control latency, validates the recording and says where it is.

``--task CarRun`` runs ``models/fisor-carrun`` on CarRun (the simulator, the recorder's task and
the zero safe action follow the task). With ``--bundle`` the task is the bundle's own; a
``--task`` or ``--monitor-bundle`` of another task is refused before anything starts (the nodes
would only hold the safe action, the observation channels being another robot's). The default
bundle is ``models/fisor-ballcircle``. If the
default BallCircle bundle is missing (a checkout without trained models), the demo says so and
builds a tiny, untrained test bundle with
``offline_training.export.make_test_bundle`` in a temporary folder, in a separate process: the
runtime never imports the training stack (torch) itself. Its numbers then only show that the
loop works, not what FISOR achieves.
"""

import argparse
import os
from pathlib import Path
import subprocess
import sys
import tempfile

from saferl_ros import graph
from saferl_ros.bringup import BringupError, run
from saferl_ros.bundle import bundle_task, BundleError
from saferl_ros.errors import UnknownNameError
from saferl_ros.paths import package_share
from saferl_ros.tasks import get_task

DEFAULT_TASK = 'BallCircle'


def shipped_bundle(task: str) -> str:
    """Return the shipped FISOR bundle folder of a task, relative to the package share."""
    return f'models/fisor-{task.lower()}'


DEFAULT_BUNDLE = shipped_bundle(DEFAULT_TASK)


def package_file(relative: str) -> Path:
    """Return a file of the package (its share folder, or the source checkout)."""
    return package_share() / relative


def build_test_bundle(out_dir: str, task: str = DEFAULT_TASK) -> str:
    """Build make_test_bundle's tiny FISOR bundle in a subprocess; return its folder."""
    code = ('import torch; torch.set_num_threads(1); '
            'from offline_training.export import make_test_bundle; '
            f'print(make_test_bundle({out_dir!r}, task={task!r}))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if result.returncode != 0:
        raise BringupError('cannot build a test bundle (is the training side installed?):\n'
                           + result.stderr[-2000:])
    return result.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    """Console script saferl-demo."""
    parser = argparse.ArgumentParser(prog='saferl-demo',
                                     description=__doc__.strip().split('\n')[0])
    parser.add_argument('--episodes', type=int, default=3)
    parser.add_argument('--task', default=None,
                        help=f"task to run (default: --bundle's task, else {DEFAULT_TASK}); its "
                             'bundle is models/fisor-<task> unless --bundle is given')
    parser.add_argument('--bundle', default=None,
                        help=f'bundle folder (default: {DEFAULT_BUNDLE}, else a test bundle)')
    parser.add_argument('--monitor-bundle', default=None,
                        help="the safety monitor's bundle (default: --bundle's own critics), "
                             'e.g. a FISOR bundle shielding a DRCORL or BC controller')
    parser.add_argument('--config', default=str(package_file('config/demo.yaml')))
    parser.add_argument('--output', default='recordings/demo', help='recording folder')
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f'--episodes must be >= 1, got {args.episodes}')
    try:
        given = {option: (folder, get_task(bundle_task(folder)).name)
                 for option, folder in (('--bundle', args.bundle),
                                        ('--monitor-bundle', args.monitor_bundle)) if folder}
        spec = get_task(args.task if args.task is not None else
                        given['--bundle'][1] if '--bundle' in given else DEFAULT_TASK)
    except (UnknownNameError, BundleError) as exc:
        print(f'saferl-demo: {exc.args[0]}', file=sys.stderr)
        return 2
    for option, (folder, task) in given.items():
        if task != spec.name:
            print(f'saferl-demo: {option} {folder} is a {task} bundle, but the task is '
                  f"{spec.name}; pass --task {task} (or leave --task out: the bundle's task is "
                  'used) or a bundle of the same task', file=sys.stderr)
            return 2
    bundle = args.bundle
    if bundle is None:
        shipped = package_file(shipped_bundle(spec.name))
        if (shipped / 'manifest.yaml').is_file():
            bundle = str(shipped)
        elif spec.name != DEFAULT_TASK:
            have = sorted(path.parent.name
                          for path in package_file('models').glob('fisor-*/manifest.yaml'))
            print(f'saferl-demo: no shipped bundle for {spec.name} ({shipped_bundle(spec.name)} '
                  f'is missing); shipped FISOR bundles: {", ".join(have) or "none"}. Train and '
                  f'export one (docs/bundle.md) and pass --bundle.', file=sys.stderr)
            return 2
        else:
            tmp = tempfile.mkdtemp(prefix='saferl-demo-bundle-')
            print(f'saferl-demo: {DEFAULT_BUNDLE} is not in this checkout; building an '
                  f'UNTRAINED test bundle in {tmp} (make_test_bundle). The loop, monitor and '
                  'recorder work the same; the scores are meaningless.', flush=True)
            bundle = build_test_bundle(tmp)
    shield = f', monitor {args.monitor_bundle}' if args.monitor_bundle else ''
    print(f'saferl-demo: bundle {bundle}{shield}, {args.episodes} episodes of {spec.name} '
          '(lock-step)', flush=True)
    overrides = [f'{node}.{param}={value}' for node, params in
                 graph.bundle_parameters(bundle, graph.SIM_LOOP).items()
                 for param, value in params.items()]
    if args.monitor_bundle is not None:
        overrides += [f'{graph.MONITOR}.bundle={args.monitor_bundle}',
                      f'{graph.RECORDER}.monitor_bundle={args.monitor_bundle}']
    zero_action = [0.0] * spec.act_dim
    overrides += [f'{graph.SIM}.task={spec.name}', f'{graph.RECORDER}.task={spec.name}',
                  f'{graph.SIM}.safe_action={zero_action}',
                  f'{graph.MONITOR}.safe_action={zero_action}',
                  f'{graph.RECORDER}.output_dir={args.output}']
    os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
    try:
        summary = run(args.config, episodes=args.episodes, overrides=overrides)
    except BringupError as exc:
        print(f'saferl-demo: {exc}', file=sys.stderr)
        return 1
    if not summary['recording']:
        print('saferl-demo: no recording was written', file=sys.stderr)
        return 1
    check = subprocess.run([sys.executable, '-m', 'offline_training.data.cli', 'validate',
                            summary['recording']], capture_output=True, text=True)
    print((check.stdout or check.stderr).strip())
    return check.returncode or summary['exit_code']
