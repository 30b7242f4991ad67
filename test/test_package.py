"""Packaging: package.xml, the installable wheel, entry points and the layer rules."""

import configparser
from importlib import metadata
import os
from pathlib import Path
import subprocess
import sys
import zipfile

from catkin_pkg.package import parse_package
import pytest

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_PACKAGES = {'std_msgs', 'sensor_msgs', 'geometry_msgs', 'nav_msgs', 'diagnostic_msgs',
                    'std_srvs', 'lifecycle_msgs'}


def test_package_xml_is_a_valid_format3_ament_python_package():
    package = parse_package(str(ROOT / 'package.xml'))
    package.validate()
    assert package.package_format == 3
    assert package.name == 'saferl_ros'
    assert package.get_build_type() == 'ament_python'
    exec_depends = {d.name for d in package.exec_depends}
    assert {'rclpy'} | MESSAGE_PACKAGES <= exec_depends
    test_depends = {d.name for d in package.test_depends}
    assert {'ament_flake8', 'ament_pep257', 'launch_pytest'} <= test_depends
    # the messages of this repository: needed to build (colcon's order) and to run
    assert 'saferl_interfaces' in {d.name for d in package.build_depends} & exec_depends


def test_interface_package_xml_is_a_rosidl_package():
    package = parse_package(str(ROOT / 'saferl_interfaces' / 'package.xml'))
    package.validate()
    assert package.package_format == 3 and package.name == 'saferl_interfaces'
    assert package.get_build_type() == 'ament_cmake'
    assert {'ament_cmake', 'rosidl_default_generators'} <= \
        {d.name for d in package.buildtool_depends}
    assert 'rosidl_default_runtime' in {d.name for d in package.exec_depends}
    assert [g.name for g in package.member_of_groups] == ['rosidl_interface_packages']


def test_setup_cfg_installs_scripts_where_ros2_run_looks():
    config = configparser.ConfigParser()
    config.read(ROOT / 'setup.cfg')
    assert config['develop']['script_dir'] == '$base/lib/saferl_ros'
    assert config['install']['install_scripts'] == '$base/lib/saferl_ros'


def test_every_console_script_resolves_to_a_callable():
    scripts = [ep for ep in metadata.entry_points(group='console_scripts')
               if ep.value.split('.')[0] in ('saferl_ros', 'offline_training')]
    names = {ep.name for ep in scripts}
    assert 'saferl-data' in names
    for entry_point in scripts:
        assert callable(entry_point.load()), entry_point


def _copy_tracked_files(destination):
    """Copy the git-tracked files (a clean checkout) to ``destination``; return it."""
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).write_bytes((ROOT / name).read_bytes())
    return destination


def test_wheel_contains_packages_data_files_and_ament_marker(tmp_path):
    # Build from a copy: setuptools leaves a build/ folder in the source tree it builds.
    source = _copy_tracked_files(tmp_path / 'src')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                    '--quiet', '-w', str(tmp_path), str(source)], check=True, timeout=240)
    wheel = next(tmp_path.glob('saferl_ros-*.whl'))
    names = zipfile.ZipFile(wheel).namelist()
    data = 'saferl_ros-0.1.0.data/data/'
    assert data + 'share/ament_index/resource_index/packages/saferl_ros' in names
    assert data + 'share/saferl_ros/package.xml' in names
    assert 'saferl_ros/__init__.py' in names
    assert 'offline_training/data/dataset.py' in names
    for folder in ('launch', 'config', 'models'):
        expected = {f'{data}share/saferl_ros/{p.relative_to(source)}'
                    for p in (source / folder).rglob('*') if p.is_file()}
        assert expected <= set(names), f'{folder}/ files missing from the wheel'
    assert not [n for n in names if n.startswith('test/')]


def _modules(package):
    return sorted(str(p.relative_to(ROOT).with_suffix('')).replace('/', '.')
                  for p in (ROOT / package).rglob('*.py'))


def _imported_after(modules):
    """Import ``modules`` in a fresh interpreter; return the top-level packages it loaded."""
    code = ('import importlib, sys\n'
            f'for m in {modules!r}:\n'
            '    importlib.import_module(m)\n'
            'print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.mark.parametrize('package, forbidden', [('saferl_ros', 'torch'),
                                                ('offline_training', 'rclpy')])
def test_layer_rules(package, forbidden):
    # docs/architecture.md: deployment needs only numpy + onnxruntime + rclpy; training never
    # needs rclpy.
    loaded = _imported_after(_modules(package))
    assert package in loaded
    assert forbidden not in loaded, f'importing {package} modules imports {forbidden}'


def test_colcon_builds_both_packages_in_a_workspace(tmp_path):
    # The build a ROS 2 user runs (docs/ros.md "Build in a colcon workspace"): colcon with its
    # ROS extension builds saferl_interfaces (rosidl, CMake) first, then the ament_python
    # package; scripts land in lib/saferl_ros, where `ros2 run` looks. Here against the ROS 2
    # wheels of this venv, with their CMake fix-up hook.
    source = _copy_tracked_files(tmp_path / 'src' / 'saferl_ros')
    venv = Path(sys.prefix)
    colcon = Path(sys.executable).with_name('colcon')
    env = {**os.environ, 'PATH': f'{venv / "bin"}{os.pathsep}{os.environ["PATH"]}',
           'AMENT_PREFIX_PATH': str(venv), 'CMAKE_PREFIX_PATH': str(venv)}
    result = subprocess.run(
        [str(colcon), 'build', '--paths', 'src/saferl_ros', 'src/saferl_ros/saferl_interfaces',
         '--cmake-args', '-DBUILD_TESTING=OFF', f'-DPython3_EXECUTABLE={sys.executable}',
         '-DCMAKE_PROJECT_INCLUDE=' + str(source / 'saferl_interfaces' / 'cmake' /
                                          'ros_wheels_fixups.cmake')],
        cwd=tmp_path, capture_output=True, text=True, timeout=480, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.index('Finished <<< saferl_interfaces') < out.index('Starting >>> saferl_ros')
    install = tmp_path / 'install' / 'saferl_ros'
    assert (install / 'share' / 'saferl_ros' / 'package.xml').is_file()
    assert (install / 'share' / 'ament_index' / 'resource_index' / 'packages' /
            'saferl_ros').is_file()
    scripts = {ep.name for ep in metadata.entry_points(group='console_scripts')
               if ep.value.split('.')[0] in ('saferl_ros', 'offline_training')}
    installed = {p.name for p in (install / 'lib' / 'saferl_ros').iterdir()}
    assert scripts <= installed
    # the workspace's messages are the ones found once its setup script is sourced
    check = ('import saferl_interfaces.msg as m; '
             'from rclpy.serialization import deserialize_message as d, serialize_message as s; '
             'r = m.StepRecord(observation_names=["x"], observation=[1.5]); '
             'assert d(s(r), m.StepRecord) == r; print(m.__file__)')
    found = subprocess.run(['bash', '-c', f'source install/setup.bash && '
                                          f'"{sys.executable}" -c \'{check}\''],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env={**env, 'PYTHONPATH': ''})
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(str(tmp_path / 'install' / 'saferl_interfaces'))
