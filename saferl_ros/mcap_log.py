"""
Write raw ROS 2 messages (CDR bytes) to MCAP, replayable with ``ros2 bag play``.

rosbag2's MCAP storage takes a channel's topic type from its schema name and expects
``pkg/msg/Type`` names with the ``ros2msg`` schema encoding (the message definition followed by
every nested definition, separated by ``=`` lines and ``MSG: pkg/Type`` headers) and ``cdr``
message encoding. The recorder subscribes with ``raw=True``, so the bytes written here are
exactly what went over DDS. Runtime core: the ``mcap`` package and the .msg files the ROS message
packages install (share/<pkg>/msg/), no ROS import.
"""

import os
from pathlib import Path
import re
import sys
from typing import Dict, List, Optional

from mcap.writer import CompressionType, Writer

PRIMITIVES = {'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16',
              'int32', 'uint32', 'int64', 'uint64', 'string', 'wstring'}
SEPARATOR = '=' * 80


def _share_dirs() -> List[Path]:
    dirs = [Path(p) / 'share' for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep)
            if p]
    dirs.append(Path(sys.prefix) / 'share')
    return dirs


def msg_file(type_name: str) -> Path:
    """Return the .msg file of ``pkg/msg/Type`` (or ``pkg/Type``)."""
    pkg, _, name = type_name.replace('/msg/', '/').partition('/')
    for share in _share_dirs():
        path = share / pkg / 'msg' / f'{name}.msg'
        if path.is_file():
            return path
    raise FileNotFoundError(f'no message definition for {type_name} under '
                            f'{[str(d) for d in _share_dirs()]}; install the message package')


def _dependencies(text: str, pkg: str) -> List[str]:
    deps = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        # 'float64[] position', 'string<=5 name', 'Header header', 'byte OK=0' (constant)
        field_type = re.sub(r'<=\d+$', '', re.sub(r'\[.*?\]$', '', line.split()[0]))
        if field_type in PRIMITIVES:
            continue
        full = field_type if '/' in field_type else f'{pkg}/{field_type}'
        deps.append(full.replace('/msg/', '/'))
    return deps


def message_definition(type_name: str) -> str:
    """Return the full ros2msg definition of ``pkg/msg/Type`` with nested types appended."""
    root = type_name.replace('/msg/', '/')
    text = msg_file(root).read_text()
    parts, seen, queue = [text.rstrip('\n')], {root}, _dependencies(text, root.split('/')[0])
    while queue:
        dep = queue.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        dep_text = msg_file(dep).read_text()
        parts.append(f'{SEPARATOR}\nMSG: {dep}\n{dep_text.rstrip(chr(10))}')
        queue.extend(_dependencies(dep_text, dep.split('/')[0]))
    return '\n'.join(parts) + '\n'


class McapLog:
    """An MCAP file of raw CDR messages, one channel per topic."""

    def __init__(self, path, metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.stream = open(self.path, 'wb')
        self.writer = Writer(self.stream, compression=CompressionType.ZSTD)
        self.writer.start(profile='ros2', library='saferl_ros')
        self.channels: Dict[str, int] = {}
        self.schemas: Dict[str, int] = {}
        self.sequence = 0
        if metadata:
            self.writer.add_metadata('saferl_ros', {k: str(v) for k, v in metadata.items()})

    def add_topic(self, topic: str, type_name: str, qos_yaml: str = '') -> None:
        """Register ``topic`` with its type (``pkg/msg/Type``)."""
        if type_name not in self.schemas:
            self.schemas[type_name] = self.writer.register_schema(
                name=type_name, encoding='ros2msg',
                data=message_definition(type_name).encode())
        self.channels[topic] = self.writer.register_channel(
            topic=topic, message_encoding='cdr', schema_id=self.schemas[type_name],
            metadata={'offered_qos_profiles': qos_yaml} if qos_yaml else {})

    def write(self, topic: str, data: bytes, log_time_ns: int,
              publish_time_ns: Optional[int] = None) -> None:
        """Append one serialized message."""
        self.sequence += 1
        self.writer.add_message(channel_id=self.channels[topic], log_time=log_time_ns,
                                data=data, publish_time=publish_time_ns or log_time_ns,
                                sequence=self.sequence)

    def close(self) -> None:
        """Write the summary and close the file."""
        if self.stream.closed:
            return
        self.writer.finish()
        self.stream.close()


class McapSeries:
    """
    Raw topics as one MCAP file per episode, so a killed recorder loses only the open one.

    An MCAP file is readable only once its summary and end magic are written (``finish``); a
    process killed with SIGKILL never writes them. Each episode therefore goes to
    ``<folder>/episode_<k>.mcap.partial``, which :meth:`rotate` (called when the recorder has
    written episode k's last step message) and :meth:`close` finish and rename to
    ``episode_<k>.mcap``: every ``.mcap`` file in the folder is complete, and a ``.partial`` one
    is what a kill interrupted. Each file is a self-contained bag that ``ros2 bag play`` replays.
    """

    def __init__(self, folder, metadata: Optional[Dict[str, str]] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metadata = dict(metadata or {})
        self.topics: List[tuple] = []        # (topic, type name, qos yaml), for every file
        self.index = -1
        self.log: Optional[McapLog] = None
        self.files: List[Path] = []          # finished files, in order
        self.rotate()

    def _name(self, index: int) -> Path:
        return self.folder / f'episode_{index:06d}.mcap'

    def add_topic(self, topic: str, type_name: str, qos_yaml: str = '') -> None:
        """Register ``topic`` in the open file and in every later one."""
        self.topics.append((topic, type_name, qos_yaml))
        self.log.add_topic(topic, type_name, qos_yaml)

    def write(self, topic: str, data: bytes, log_time_ns: int) -> None:
        """Append one serialized message to the open file."""
        self.log.write(topic, data, log_time_ns)

    def rotate(self) -> None:
        """Finish the open file (if any) and start the next episode's."""
        self._finish()
        self.index += 1
        partial = self._name(self.index).with_suffix('.mcap.partial')
        self.log = McapLog(partial, metadata={**self.metadata, 'segment': self.index})
        for topic, type_name, qos_yaml in self.topics:
            self.log.add_topic(topic, type_name, qos_yaml)

    def _finish(self) -> None:
        if self.log is None:
            return
        self.log.close()
        final = self._name(self.index)
        if self.log.sequence:                 # keep only files that hold messages
            os.replace(self.log.path, final)
            self.files.append(final)
        else:
            self.log.path.unlink()
        self.log = None

    def close(self) -> None:
        """Finish the open file."""
        self._finish()
