"""ROS 2 nodes of saferl_ros (thin adapters around the runtime core)."""
