"""saferl_ros runtime: model bundles, safety monitor, recorder and ROS 2 nodes (no torch here)."""

__version__ = '0.1.0'
