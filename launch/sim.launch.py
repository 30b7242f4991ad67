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

The same file starts the loop on a robot: ``source:=robot_adapter_node`` replaces the simulator
with the robot adapter (robot.launch.py includes this file that way), ``odom_topic`` and
``cmd_vel_topic`` remap the driver's topics, and ``stand_in:=true`` adds a real-time sim_node
that plays the robot. Which nodes exist, which parameters name a bundle and whose exit ends the
launch is described once, in saferl_ros.graph.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.events import matches_action, Shutdown
from launch_ros.actions import LifecycleNode
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition
from saferl_ros import graph as node_graph
from saferl_ros.paths import package_share

LOOPS = {node_graph.SIM: node_graph.SIM_LOOP, node_graph.ROBOT_ADAPTER: node_graph.ROBOT_LOOP}
# A real-time simulator that plays a mobile robot behind robot_adapter_node (stand_in:=true).
STAND_IN_PARAMETERS = {'mode': 'realtime', 'rate_hz': 50.0, 'command_input': 'twist',
                       'publish_odometry': True, 'publish_loop_topics': False}
# The adapter in front of that simulator: the simulated ball moves in any direction, and with no
# hardware there is no e-stop to release (config/robot_sim.yaml sets the same).
STAND_IN_ADAPTER = {'drive': 'holonomic', 'estop_at_start': False}


def managed(name: str, parameters: list, namespace: str, remappings=None) -> list:
    """Return a lifecycle node plus the events that configure and then activate it."""
    node = LifecycleNode(package='saferl_ros', executable=node_graph.spec(name).executable,
                         name=name, namespace=namespace, parameters=parameters,
                         remappings=remappings or [], output='screen', emulate_tty=True,
                         additional_env={'PYTHONUNBUFFERED': '1'})
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


def is_true(value: str) -> bool:
    """Return True for a launch argument meaning yes."""
    return value.lower() in ('true', '1', 'yes')


def loop(context):
    """Build the nodes of the loop from the resolved launch arguments."""
    args = context.launch_configurations
    source = args['source']
    if source not in LOOPS:
        raise ValueError(f'source:={source}: use one of {sorted(LOOPS)}')
    bundle_params = node_graph.bundle_parameters(args['bundle']) if args['bundle'] else {}
    remappings = [('odom', args['odom_topic']), ('cmd_vel', args['cmd_vel_topic'])]
    actions = []
    for name in LOOPS[source]:
        overrides = dict(bundle_params.get(name, {}))
        if name == node_graph.SIM and args['episodes']:
            overrides['episodes'] = int(args['episodes'])
        if name == node_graph.RECORDER and args['output_dir']:
            overrides['output_dir'] = args['output_dir']
        if name == node_graph.ROBOT_ADAPTER and is_true(args['stand_in']):
            overrides.update(STAND_IN_ADAPTER)
        entities = managed(name, [args['config'], overrides], args['namespace'], remappings)
        actions += entities
        if node_graph.spec(name).source:
            node = next(e for e in entities if isinstance(e, LifecycleNode))
            actions.append(end_launch_with(node, f'{name} finished'))
    if source == node_graph.ROBOT_ADAPTER and is_true(args['stand_in']):
        stand_in = {**STAND_IN_PARAMETERS, 'task': args['task']}
        actions += managed(node_graph.SIM, [stand_in], args['namespace'], remappings)
    return actions


def generate_launch_description():
    """Return the launch description of the loop (the simulation loop by default)."""
    share = str(package_share())
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
        DeclareLaunchArgument('source', default_value=node_graph.SIM,
                              choices=sorted(LOOPS),
                              description='the observation source: the simulator or the robot '
                                          'adapter'),
        DeclareLaunchArgument('odom_topic', default_value='odom',
                              description="the robot driver's nav_msgs/Odometry topic"),
        DeclareLaunchArgument('cmd_vel_topic', default_value='cmd_vel',
                              description="the robot driver's velocity command topic"),
        DeclareLaunchArgument('stand_in', default_value='false',
                              description='source:=robot_adapter_node: a real-time sim_node '
                                          'stands in for the robot'),
        DeclareLaunchArgument('task', default_value='BallCircle',
                              description='task of the stand-in simulator'),
        OpaqueFunction(function=loop),
    ])
