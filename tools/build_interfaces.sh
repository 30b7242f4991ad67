#!/usr/bin/env bash
# Build the saferl_interfaces messages with rosidl and install them into a Python venv.
#
#   tools/build_interfaces.sh [VENV]        (default: .venv; `make venv` runs it)
#
# Uses the ROS 2 Kilted wheels of the Python package index (requirements/interfaces.txt, pinned
# in requirements/constraints.txt): pip installs the build tools into VENV, CMake configures
# saferl_interfaces/ against VENV with the wheel fix-ups of saferl_interfaces/cmake/, and the
# result is installed with VENV as the install prefix. The venv's Python then imports
# `saferl_interfaces.msg` and rmw_fastrtps_cpp finds its type support with no environment set
# (the ros-wheels bootstrapper sets the library path when Python starts). A ROS distro or a
# colcon workspace builds the same package the usual way (docs/ros.md).
#
# Idempotent: each run rebuilds in a fresh build folder and, once the build succeeded,
# replaces the files an earlier run installed (listed in VENV/share/saferl_interfaces/
# install_manifest.txt). About 30 s on two cores.
#
# Environment: CONSTRAINTS (pip constraints file, default requirements/constraints.txt),
# SKIP_PIP=1 (the build tools are already in VENV), BUILD_DIR (keep the build tree there),
# JOBS (parallel compile jobs, default: number of cores).
set -euo pipefail

die() { echo "build_interfaces.sh: error: $*" >&2; exit 1; }
log() { echo "build_interfaces.sh: $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG_DIR=$ROOT/saferl_interfaces
PKG=saferl_interfaces
[ $# -le 1 ] || die "usage: tools/build_interfaces.sh [VENV]"
VENV_ARG=${1:-$ROOT/.venv}
CONSTRAINTS=${CONSTRAINTS:-$ROOT/requirements/constraints.txt}

# -- tools ------------------------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 || \
    die "cmake not found: building the messages needs cmake >= 3.19 (Debian: apt-get install cmake)"
CMAKE_VERSION=$(cmake --version | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')
[ "$(printf '3.19\n%s\n' "$CMAKE_VERSION" | sort -V | head -n1)" = 3.19 ] || \
    die "cmake $CMAKE_VERSION is too old: building the messages needs cmake >= 3.19"
for tool in cc c++ make; do
    command -v "$tool" >/dev/null 2>&1 || \
        die "'$tool' not found: building the messages needs a C/C++ compiler and make (Debian: apt-get install build-essential)"
done
[ -x "$VENV_ARG/bin/python" ] || \
    die "no Python venv at $VENV_ARG (create it with 'python3.11 -m venv $VENV_ARG' or 'make venv')"
VENV=$(cd "$VENV_ARG" && pwd)
PY=$VENV/bin/python

# -- build requirements -----------------------------------------------------------------------
if [ "${SKIP_PIP:-0}" != 1 ]; then
    [ -f "$CONSTRAINTS" ] || die "constraints file $CONSTRAINTS not found"
    log "pip: build requirements (requirements/interfaces.txt) into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check \
        -r "$ROOT/requirements/interfaces.txt" -c "$CONSTRAINTS" || \
        die "pip could not install requirements/interfaces.txt into $VENV"
fi
for dir in ament_cmake rosidl_default_generators ament_cmake_ros_core std_msgs \
           rosidl_typesupport_fastrtps_c rosidl_generator_py; do
    [ -d "$VENV/share/$dir/cmake" ] || \
        die "$VENV/share/$dir/cmake missing: install requirements/interfaces.txt (drop SKIP_PIP)"
done
"$PY" -c 'import ament_package, catkin_pkg, em, lark, numpy, rosidl_generator_py' 2>/dev/null || \
    die "$PY cannot import the rosidl generators' Python modules: install requirements/interfaces.txt"

# -- configure, build ---------------------------------------------------------------------------
if [ -n "${BUILD_DIR:-}" ]; then
    rm -rf "$BUILD_DIR" && mkdir -p "$BUILD_DIR"
    BUILD=$(cd "$BUILD_DIR" && pwd)
    KEEP=1
else
    BUILD=$(mktemp -d "${TMPDIR:-/tmp}/build_$PKG.XXXXXX")
    KEEP=0
fi
trap '[ "$KEEP" = 1 ] || rm -rf "$BUILD"' EXIT
fail_with_log() {   # $1: step, $2: log file
    KEEP=1
    grep -E -B2 -A6 '[Ee]rror' "$2" | tail -40 >&2 || tail -40 "$2" >&2
    die "$1 failed (full log: $2)"
}

# Build against the venv only: a sourced ROS distro's CMAKE_PREFIX_PATH or PYTHONPATH would mix
# its packages with the wheels'. AMENT_PREFIX_PATH=VENV lets the type support generators find
# each other (ament_index) under the venv.
CLEAN_ENV=(env -u CMAKE_PREFIX_PATH -u PYTHONPATH -u COLCON_PREFIX_PATH AMENT_PREFIX_PATH="$VENV")
START=$(date +%s)
log "configuring $PKG_DIR (build folder $BUILD)"
"${CLEAN_ENV[@]}" cmake -S "$PKG_DIR" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$VENV" \
    -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DPython3_EXECUTABLE="$PY" \
    -DBUILD_TESTING=OFF \
    -DCMAKE_PROJECT_INCLUDE="$PKG_DIR/cmake/ros_wheels_fixups.cmake" \
    > "$BUILD/configure.log" 2>&1 || fail_with_log "cmake configure" "$BUILD/configure.log"
log "building with ${JOBS:-$(nproc)} jobs"
"${CLEAN_ENV[@]}" cmake --build "$BUILD" -j "${JOBS:-$(nproc)}" > "$BUILD/build.log" 2>&1 || \
    fail_with_log "build" "$BUILD/build.log"

# -- install (replacing an earlier install) ---------------------------------------------------
MANIFEST=$VENV/share/$PKG/install_manifest.txt
if [ -f "$MANIFEST" ]; then
    while IFS= read -r file; do
        case "$file" in "$VENV"/*) rm -f -- "$file" ;; esac
    done < "$MANIFEST"
    # the manifest lists files only; an empty *.egg-info folder left behind makes pip warn
    rm -rf "$VENV"/lib/python3*/site-packages/"$PKG" \
           "$VENV"/lib/python3*/site-packages/"$PKG"-*.egg-info \
           "$VENV/include/$PKG" "$VENV/share/$PKG"
fi
"${CLEAN_ENV[@]}" cmake --install "$BUILD" > "$BUILD/install.log" 2>&1 || \
    fail_with_log "install" "$BUILD/install.log"
cp "$BUILD/install_manifest.txt" "$MANIFEST"
log "built and installed into $VENV in $(( $(date +%s) - START )) s"

# -- check: import and serialize in a clean environment ---------------------------------------
(cd / && env -u AMENT_PREFIX_PATH -u PYTHONPATH -u LD_LIBRARY_PATH \
    -u _ROS_WHEELS_BOOTSTRAP_COMPLETE "$PY" -c '
from rclpy.serialization import deserialize_message, serialize_message
from saferl_interfaces.msg import MonitorVerdict, StepRecord
for cls in (StepRecord, MonitorVerdict):
    assert deserialize_message(serialize_message(cls()), cls) == cls()
') || die "the installed saferl_interfaces does not import or serialize in $PY"
log "saferl_interfaces/msg/StepRecord, saferl_interfaces/msg/MonitorVerdict OK"
