"""The launch files and parameter files are consistent (runs without a ROS 2 distro)."""

import ast
from pathlib import Path

import pytest
from saferl_ros.bringup import load_parameters, node_classes, parameter_overrides
from test_ros_support import domain_fixture

ros_domain = domain_fixture(64)
REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / 'config').glob('*.yaml'))


@pytest.mark.parametrize('launch_file', ['sim.launch.py', 'robot.launch.py'])
def test_launch_files_parse_and_name_known_nodes(launch_file):
    source = (REPO / 'launch' / launch_file).read_text()
    tree = ast.parse(source)
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str)}
    assert 'generate_launch_description' in source
    assert {'recorder_node', 'safety_monitor_node', 'controller_node'} <= names


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
