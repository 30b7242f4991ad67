"""The launch files and parameter files are consistent (runs without a ROS 2 distro)."""

import ast
import inspect
from pathlib import Path
import sys

import pytest
from saferl_ros import graph
from saferl_ros.bringup import load_parameters, node_classes, parameter_overrides
from test_ros_support import domain_fixture

ros_domain = domain_fixture(64)
REPO = Path(__file__).resolve().parents[1]
# The ROS 2 parameters files; config/loop_*.yaml are saferl-loop configs (test_loop.py).
CONFIGS = sorted(p for p in (REPO / 'config').glob('*.yaml') if not p.name.startswith('loop_'))


def _tree(launch_file):
    return ast.parse((REPO / 'launch' / launch_file).read_text())


def _calls(tree):
    return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)}


@pytest.mark.parametrize('launch_file', ['sim.launch.py', 'robot.launch.py'])
def test_launch_files_parse_and_take_the_nodes_from_the_graph_module(launch_file):
    tree = _tree(launch_file)
    assert any(isinstance(f, ast.FunctionDef) and f.name == 'generate_launch_description'
               for f in tree.body)
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               for a in n.names}
    assert ('saferl_ros', 'graph') in imports
    # no node list of its own: node names come from saferl_ros.graph only
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert not names & set(graph.START_ORDER), names & set(graph.START_ORDER)


def test_the_robot_launch_includes_the_sim_launch_with_the_adapter_as_source():
    tree = _tree('robot.launch.py')
    assert {'IncludeLaunchDescription', 'PythonLaunchDescriptionSource'} <= _calls(tree)
    assert 'importlib' not in (REPO / 'launch' / 'robot.launch.py').read_text()
    include = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                   and getattr(n.func, 'id', '') == 'PythonLaunchDescriptionSource')
    assert 'sim.launch.py' in {n.value for n in ast.walk(include) if isinstance(n, ast.Constant)}
    arguments = next(n for n in ast.walk(tree) if isinstance(n, ast.Dict)
                     and any(getattr(k, 'value', '') == 'source' for k in n.keys))
    source = dict(zip((k.value for k in arguments.keys), arguments.values))['source']
    assert ast.unparse(source) == 'node_graph.ROBOT_ADAPTER'
    # every argument the robot file passes is one the sim file declares
    declared = {n.args[0].value for n in ast.walk(_tree('sim.launch.py'))
                if isinstance(n, ast.Call)
                and getattr(n.func, 'id', '') == 'DeclareLaunchArgument'}
    assert {k.value for k in arguments.keys} <= declared


def test_the_launch_ends_when_the_observation_source_exits():
    # launch is not installable here: check the wiring in the source. sim.launch.py registers an
    # OnProcessExit handler emitting Shutdown for each source node of saferl_ros.graph.
    calls = _calls(_tree('sim.launch.py'))
    assert {'OnProcessExit', 'Shutdown', 'RegisterEventHandler', 'end_launch_with'} <= calls
    assert set(graph.SOURCES) == {'sim_node', 'robot_adapter_node'}


def test_the_graph_module_describes_every_node_once():
    classes = node_classes()
    assert list(classes) == list(graph.START_ORDER)
    for spec in graph.NODES:
        cls = classes[spec.name]
        assert inspect.signature(cls.__init__).parameters['name'].default == spec.name
        declared = {p.name for p in sys.modules[cls.__module__].PARAMS}
        assert set(spec.bundle_params) <= declared, spec.name
    for loop in (graph.SIM_LOOP, graph.ROBOT_LOOP):
        assert graph.in_start_order(loop) == loop and graph.spec(loop[-1]).source
        assert sum(graph.spec(name).source for name in loop) == 1
    # setup.py installs exactly the graph's console scripts
    setup = (REPO / 'setup.py').read_text()
    assert "GRAPH['console_scripts']()" in setup and 'nodes.sim_node:main' not in setup
    assert graph.console_scripts()[-1] == 'sim_node = saferl_ros.nodes.sim_node:main'
    with pytest.raises(KeyError, match='unknown node .*known'):
        graph.spec('planner_node')


def test_sim_node_process_exits_by_itself_after_its_episodes(tmp_path):
    import subprocess
    import time
    from test_ros_support import start_node
    log = tmp_path / 'sim.log'
    proc = start_node('sim_node', {'task': 'BallCircle', 'episodes': 1, 'horizon': 5,
                                   'min_subscribers': 0, 'command_timeout': 0.05}, log)
    start = time.monotonic()
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError('sim_node kept running after its episodes: ' + log.read_text())
    assert code == 0 and 'Traceback' not in log.read_text(), log.read_text()[-2000:]
    assert '"steps": 5' in log.read_text() and time.monotonic() - start < 60


@pytest.mark.parametrize('config', CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parameter_is_declared_by_its_node(config):
    pytest.importorskip('rclpy')
    classes = node_classes()
    nodes = load_parameters(config)
    assert nodes
    for name, params in nodes.items():
        assert name in classes, f'{config.name}: unknown node {name}'
        parameter_overrides(classes[name], params)   # raises on an unknown parameter


@pytest.mark.parametrize('override, message', [
    ('controller_node.no_such_parameter=1', 'unknown parameter'),
    ('controller_node.diagnostics_period=-1.0', 'out of range'),
    ('controller_node.seed=abc', 'controller_node'),
    ('nonsense', 'NODE.PARAM=VALUE'),
])
def test_bringup_rejects_bad_parameters_clearly(override, message):
    from saferl_ros.bringup import BringupError, run
    with pytest.raises(BringupError, match=message):
        run(REPO / 'config' / 'sim.yaml', overrides=[override], quiet=True, duration=0.1)


def test_bringup_rejects_a_file_without_ros_parameters(tmp_path):
    from saferl_ros.bringup import BringupError
    bad = tmp_path / 'bad.yaml'
    bad.write_text('controller_node:\n  bundle: x\n')
    with pytest.raises(BringupError, match='ros__parameters'):
        load_parameters(bad)


def test_this_module_runs_in_its_own_ros_domain():
    import os
    assert os.environ['ROS_DOMAIN_ID'] == '64'
