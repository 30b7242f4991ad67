"""
Launch the loop on a physical mobile robot: robot_adapter_node, controller, monitor, recorder.

    ros2 launch saferl_ros robot.launch.py bundle:=/path/to/models/fisor-ballcircle

The robot's driver must publish nav_msgs/Odometry on ``odom`` and take geometry_msgs/Twist (or
TwistStamped, parameter ``twist_stamped``) on ``cmd_vel``; remap them with the ``odom_topic`` and
``cmd_vel_topic`` arguments. Parameters come from config/robot.yaml (argument ``config``), the
same file ``saferl-bringup config/robot.yaml`` reads. With ``sim:=true`` a sim_node in real time
stands in for the robot (config/robot_sim.yaml does the same for saferl-bringup).

The nodes and their lifecycle wiring live once, in sim.launch.py: this file includes it with the
robot adapter as the observation source.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from saferl_ros import graph as node_graph
from saferl_ros.paths import package_share


def generate_launch_description():
    """Return the launch description of the robot loop."""
    share = str(package_share())
    loop = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   'sim.launch.py')),
        launch_arguments={
            'source': node_graph.ROBOT_ADAPTER,
            'config': LaunchConfiguration('config'),
            'bundle': LaunchConfiguration('bundle'),
            'output_dir': LaunchConfiguration('output_dir'),
            'namespace': LaunchConfiguration('namespace'),
            'odom_topic': LaunchConfiguration('odom_topic'),
            'cmd_vel_topic': LaunchConfiguration('cmd_vel_topic'),
            'stand_in': LaunchConfiguration('sim'),
            'task': LaunchConfiguration('task'),
        }.items())
    return LaunchDescription([
        DeclareLaunchArgument('config', default_value=os.path.join(share, 'config',
                                                                   'robot.yaml'),
                              description='ROS 2 parameters file of the robot loop'),
        DeclareLaunchArgument('bundle', default_value='', description='model bundle folder'),
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
        loop,
    ])
