"""
The node graph of saferl_ros, described once: which nodes exist and how they are started.

Every node is a lifecycle node with a console script (``ros2 run saferl_ros <name>``) of the same
name as the node. :data:`NODES` lists them in start order: consumers first, the observation
source last, so every subscriber is listening before the first observation goes out; stopping
runs the other way. A stand-in (unicycle_node, a kinematic robot for tests and dry runs) plays
the hardware: it starts first and stops last, as a robot that is already on. Who reads this:
``setup.py`` (console scripts), ``saferl_ros.bringup`` (which classes to create, in which
order), ``launch/*.launch.py`` (which nodes each loop starts, which parameters the ``bundle``
argument sets, whose exit ends the launch), ``saferl_ros.demo``, the benches and the tests.

Plain Python, no ROS import: setup.py reads it from the source tree, the launch files import it.
"""

from dataclasses import dataclass
import importlib
from typing import Dict, Tuple

# Node names; each is also the node's console script / ros2 run executable.
RECORDER = 'recorder_node'
MONITOR = 'safety_monitor_node'
CONTROLLER = 'controller_node'
ROBOT_ADAPTER = 'robot_adapter_node'
SIM = 'sim_node'
UNICYCLE = 'unicycle_node'


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name (= executable), its class and the parameters that name a bundle."""

    name: str
    class_name: str
    # Parameters set to the model bundle folder by the launch ``bundle`` argument / the demo.
    bundle_params: Tuple[str, ...] = ()
    # True for an observation source (simulator, robot adapter): activated last, deactivated
    # first; its process ending ends the launch.
    source: bool = False
    # True for a node that plays the robot hardware (odom out, cmd_vel in): started first.
    stand_in: bool = False

    @property
    def module(self) -> str:
        """Return the module of the node class (also the console script's module)."""
        return f'saferl_ros.nodes.{self.name}'

    @property
    def executable(self) -> str:
        """Return the console script / ros2 run executable name."""
        return self.name

    @property
    def entry_point(self) -> str:
        """Return the setuptools console_scripts entry of the node."""
        return f'{self.executable} = {self.module}:main'

    def load(self) -> type:
        """Import and return the node class (imports rclpy)."""
        return getattr(importlib.import_module(self.module), self.class_name)


# Start order: robot stand-in -> recorder -> monitor -> controller -> observation source.
NODES: Tuple[NodeSpec, ...] = (
    NodeSpec(UNICYCLE, 'UnicycleNode', stand_in=True),
    NodeSpec(RECORDER, 'RecorderNode', bundle_params=('bundle', 'monitor_bundle')),
    NodeSpec(MONITOR, 'SafetyMonitorNode', bundle_params=('bundle',)),
    NodeSpec(CONTROLLER, 'ControllerNode', bundle_params=('bundle',)),
    NodeSpec(ROBOT_ADAPTER, 'RobotAdapterNode', source=True),
    NodeSpec(SIM, 'SimNode', source=True),
)
BY_NAME: Dict[str, NodeSpec] = {spec.name: spec for spec in NODES}
START_ORDER: Tuple[str, ...] = tuple(spec.name for spec in NODES)
SOURCES: Tuple[str, ...] = tuple(spec.name for spec in NODES if spec.source)

# The two loops the launch files start (in start order).
SIM_LOOP: Tuple[str, ...] = (RECORDER, MONITOR, CONTROLLER, SIM)
ROBOT_LOOP: Tuple[str, ...] = (RECORDER, MONITOR, CONTROLLER, ROBOT_ADAPTER)


def spec(name: str) -> NodeSpec:
    """Return the spec of node ``name`` (KeyError naming the known nodes)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f'unknown node {name!r}; known: {list(START_ORDER)}') from None


def in_start_order(names) -> Tuple[str, ...]:
    """Return the known nodes among ``names`` in start order."""
    wanted = set(names)
    return tuple(name for name in START_ORDER if name in wanted)


def bundle_parameters(bundle: str, names=START_ORDER) -> Dict[str, Dict[str, str]]:
    """Return {node: {parameter: bundle}} for every bundle parameter of the nodes ``names``."""
    return {name: {param: bundle for param in BY_NAME[name].bundle_params}
            for name in names if BY_NAME[name].bundle_params}


def console_scripts() -> Tuple[str, ...]:
    """Return the setuptools console_scripts entries of the nodes."""
    return tuple(spec.entry_point for spec in NODES)
