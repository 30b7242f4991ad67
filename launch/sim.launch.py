"""
Launch the simulation loop: sim_node, controller_node, safety_monitor_node, recorder_node.

    ros2 launch saferl_ros sim.launch.py
    ros2 launch saferl_ros sim.launch.py bundle:=/path/to/models/mine episodes:=5

Parameters come from config/sim.yaml (argument ``config``), the same file
``saferl-bringup config/sim.yaml`` reads. Every node is a lifecycle node: this file configures
each one at start-up and activates it once it reaches ``inactive``; a node whose configure fails
(e.g. a bundle that does not verify) stays unconfigured and the robot is not driven. The launch
ends when sim_node's process ends: after ``episodes:=N`` episodes (its console script exits once
they are done), on a crash, or on Ctrl-C, which every node handles with a clean deactivation.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import matches_action, Shutdown
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

NODES = ('recorder_node', 'safety_monitor_node', 'controller_node', 'sim_node')
# The node whose process ending ends the launch: the observation source.
ENDS_THE_LAUNCH = ('sim_node', 'robot_adapter_node')
BUNDLE_USERS = {'controller_node': ('bundle',), 'safety_monitor_node': ('bundle',),
                'recorder_node': ('bundle', 'monitor_bundle')}


def package_share() -> str:
    """Return share/saferl_ros, or the source tree when the package is not installed."""
    try:
        return get_package_share_directory('saferl_ros')
    except (LookupError, OSError, ValueError):   # PackageNotFoundError is a LookupError
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def managed(name: str, parameters: list, namespace: str, remappings=None) -> list:
    """Return a lifecycle node plus the events that configure and then activate it."""
    node = LifecycleNode(package='saferl_ros', executable=name, name=name, namespace=namespace,
                         parameters=parameters, remappings=remappings or [], output='screen',
                         emulate_tty=True, additional_env={'PYTHONUNBUFFERED': '1'})
    configure = EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                            transition_id=Transition.TRANSITION_CONFIGURE))
    activate = RegisterEventHandler(OnStateTransition(
        target_lifecycle_node=node, goal_state='inactive',
        entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                              transition_id=Transition.TRANSITION_ACTIVATE))]))
    return [activate, node, configure]


def end_launch_with(node, reason: str) -> RegisterEventHandler:
    """
    Shut the whole launch down when ``node``'s process exits.

    sim_node's process ends after its ``episodes`` (and on a crash); robot_adapter_node's when
    the robot side goes away. Without this the other nodes would run on, and the launch never
    end.
    """
    return RegisterEventHandler(OnProcessExit(
        target_action=node, on_exit=[EmitEvent(event=Shutdown(reason=reason))]))


def graph(context, nodes=NODES, remappings=None):
    """Build the nodes from the resolved launch arguments."""
    config = context.launch_configurations['config']
    bundle = context.launch_configurations['bundle']
    episodes = context.launch_configurations['episodes']
    namespace = context.launch_configurations['namespace']
    actions = []
    for name in nodes:
        overrides = {key: bundle for key in BUNDLE_USERS.get(name, ())} if bundle else {}
        if name == 'sim_node' and episodes:
            overrides['episodes'] = int(episodes)
        if name == 'recorder_node' and context.launch_configurations.get('output_dir'):
            overrides['output_dir'] = context.launch_configurations['output_dir']
        entities = managed(name, [config, overrides], namespace, remappings)
        actions += entities
        if name in ENDS_THE_LAUNCH:
            node = next(e for e in entities if isinstance(e, LifecycleNode))
            actions.append(end_launch_with(node, f'{name} finished'))
    return actions


def generate_launch_description():
    """Return the launch description of the simulation loop."""
    share = package_share()
    return LaunchDescription([
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config', 'sim.yaml'),
                              description='ROS 2 parameters file of the loop'),
        DeclareLaunchArgument('bundle', default_value='',
                              description='model bundle folder for controller, monitor and '
                                          "recorder (default: the config file's)"),
        DeclareLaunchArgument('episodes', default_value='',
                              description='stop the simulator after this many episodes'),
        DeclareLaunchArgument('output_dir', default_value='',
                              description="recording folder (default: the config file's)"),
        DeclareLaunchArgument('namespace', default_value='', description='ROS namespace'),
        OpaqueFunction(function=graph),
    ])
