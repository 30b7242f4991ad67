"""
Launch the loop on a physical mobile robot: robot_adapter_node, controller, monitor, recorder.

    ros2 launch saferl_ros robot.launch.py bundle:=/path/to/models/fisor-ballcircle

The robot's driver must publish nav_msgs/Odometry on ``odom`` and take geometry_msgs/Twist (or
TwistStamped, parameter ``twist_stamped``) on ``cmd_vel``; remap them with the ``odom_topic`` and
``cmd_vel_topic`` arguments. Parameters come from config/robot.yaml (argument ``config``), the
same file ``saferl-bringup config/robot.yaml`` reads. With ``sim:=true`` a sim_node in real time
stands in for the robot (config/robot_sim.yaml does the same for saferl-bringup).
"""

import importlib.util
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction

# The node and lifecycle wiring lives once, in sim.launch.py next to this file.
_spec = importlib.util.spec_from_file_location(
    'saferl_sim_launch', os.path.join(os.path.dirname(__file__), 'sim.launch.py'))
_sim_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sim_launch)

NODES = ('recorder_node', 'safety_monitor_node', 'controller_node', 'robot_adapter_node')


def robot_graph(context):
    """Build the robot-side nodes (and the stand-in simulator with sim:=true)."""
    remap = [('odom', context.launch_configurations['odom_topic']),
             ('cmd_vel', context.launch_configurations['cmd_vel_topic'])]
    actions = _sim_launch.graph(context, nodes=NODES, remappings=remap)
    if context.launch_configurations['sim'].lower() in ('true', '1', 'yes'):
        stand_in = {'mode': 'realtime', 'rate_hz': 50.0, 'command_input': 'twist',
                    'publish_odometry': True, 'publish_loop_topics': False,
                    'task': context.launch_configurations['task']}
        actions += _sim_launch.managed('sim_node', [stand_in],
                                       context.launch_configurations['namespace'], remap)
    return actions


def generate_launch_description():
    """Return the launch description of the robot loop."""
    share = _sim_launch.package_share()
    return LaunchDescription([
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config',
                                                                   'robot.yaml'),
                              description='ROS 2 parameters file of the robot loop'),
        DeclareLaunchArgument('bundle', default_value='', description='model bundle folder'),
        DeclareLaunchArgument('episodes', default_value='', description='unused on a robot'),
        DeclareLaunchArgument('output_dir', default_value='', description='recording folder'),
        DeclareLaunchArgument('namespace', default_value='', description='ROS namespace'),
        DeclareLaunchArgument('odom_topic', default_value='odom',
                              description="the driver's nav_msgs/Odometry topic"),
        DeclareLaunchArgument('cmd_vel_topic', default_value='cmd_vel',
                              description="the driver's velocity command topic"),
        DeclareLaunchArgument('sim', default_value='false',
                              description='true: a real-time sim_node stands in for the robot'),
        DeclareLaunchArgument('task', default_value='BallCircle',
                              description='task of the stand-in simulator'),
        OpaqueFunction(function=robot_graph),
    ])
