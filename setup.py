"""Build script for saferl_ros (ament_python; also installs with plain pip)."""

from glob import glob
import os
import runpy

from setuptools import find_packages, setup

PACKAGE_NAME = 'saferl_ros'
# The node graph (names, console scripts) is described once, in saferl_ros/graph.py: plain
# Python, read here without importing the package.
GRAPH = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), PACKAGE_NAME,
                                    'graph.py'))


def tree(folder):
    """Return data_files entries that install every file under ``folder`` into share/."""
    entries = {}
    for path in glob(os.path.join(folder, '**', '*'), recursive=True):
        if os.path.isfile(path):
            target = os.path.join('share', PACKAGE_NAME, os.path.dirname(path))
            entries.setdefault(target, []).append(path)
    return sorted(entries.items())


setup(
    name=PACKAGE_NAME,
    version='0.1.0',
    packages=find_packages(include=['saferl_ros', 'saferl_ros.*',
                                    'offline_training', 'offline_training.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE_NAME]),
        ('share/' + PACKAGE_NAME, ['package.xml']),
        *tree('launch'),
        *tree('config'),
        *tree('models'),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='saferl_ros maintainers',
    maintainer_email='saferl-ros@example.com',
    description='Offline safe RL (FISOR and friends) from logged data to a ROS 2 robot and back.',
    license='Apache-2.0',
    python_requires='>=3.10',
    entry_points={
        'console_scripts': [
            # Command-line tools of the offline workspace.
            'saferl-data = offline_training.data.cli:main',
            'saferl-train = offline_training.train:main',
            'saferl-export = offline_training.export:main',
            'saferl-eval = offline_training.evaluate:main',
            'saferl-grid = offline_training.grid:main',
            'saferl-loop = offline_training.loop:main',
            # ROS 2 nodes (lifecycle; `--autostart` configures + activates from a plain shell).
            *GRAPH['console_scripts'](),
            # The node graph of a parameters file in one process, and the demo.
            'saferl-bringup = saferl_ros.bringup:main',
            'saferl-demo = saferl_ros.demo:main',
        ],
    },
)
