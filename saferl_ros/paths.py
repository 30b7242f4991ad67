"""
Where the package's files are, and how path parameters are resolved.

A bundle path in a parameters file or on the command line may be:

- ``package://saferl_ros/models/fisor-ballcircle``: inside a package's share folder (found with
  ament_index when the package is installed in a ROS 2 workspace; for saferl_ros itself the
  source checkout of an editable install, else ``<prefix>/share/saferl_ros``);
- an absolute path;
- a relative path: relative to the current folder if it exists there, else to saferl_ros's share
  folder, so ``models/fisor-ballcircle`` names the shipped bundle from any folder.

The shipped configuration files use ``package://`` so they work wherever the process starts
(``ros2 launch`` starts nodes in the caller's folder).
"""

import os
from pathlib import Path
import sys

from saferl_ros.errors import MissingFileError

PACKAGE = 'saferl_ros'
SCHEME = 'package://'


class PathResolutionError(MissingFileError):
    """A path parameter that names nothing (the message lists the places tried)."""


def package_share(package: str = PACKAGE) -> Path:
    """
    Return the share folder of ``package``.

    ament_index first (a colcon workspace or an installed distro package); for saferl_ros, then
    the source checkout (an editable install, where ament_index does not see the package), then
    ``<sys.prefix>/share/saferl_ros`` (a pip install with data files).
    """
    try:
        from ament_index_python.packages import get_package_share_directory
        return Path(get_package_share_directory(package))
    except (ImportError, LookupError, OSError, ValueError):
        pass
    if package == PACKAGE:
        source = Path(__file__).resolve().parents[1]
        if (source / 'package.xml').is_file():
            return source
        return Path(sys.prefix) / 'share' / PACKAGE
    raise PathResolutionError(f'package {package!r} not found by ament_index; source the '
                              'workspace that installs it (source install/setup.bash)')


def resolve_path(value: str, what: str = 'path') -> Path:
    """Return the file or folder that the path parameter ``value`` names (rules above)."""
    value = os.path.expanduser(str(value))
    if value.startswith(SCHEME):
        package, _, relative = value[len(SCHEME):].partition('/')
        path = package_share(package) / relative
        if not path.exists():
            raise PathResolutionError(f'{what} {value!r}: {path} does not exist')
        return path
    path = Path(value)
    if path.is_absolute() or path.exists():
        return path
    shipped = package_share() / path
    if shipped.exists():
        return shipped
    raise PathResolutionError(
        f'{what} {value!r} not found: tried {Path.cwd() / path} and {shipped}; give an '
        f'absolute path, a path relative to the current folder or {SCHEME}{PACKAGE}/<path>')


def shown_path(path) -> str:
    """
    Return ``path`` as a file written for other people should name it.

    Relative to the current folder when it lies inside it (``datasets/X.hdf5``), else the file's
    name alone: a bundle or results file must not name the folders of the machine that wrote it
    (its sha256 identifies the file).
    """
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return path.name
