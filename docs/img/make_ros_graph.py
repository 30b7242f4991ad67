"""
Draw docs/img/ros_graph.png: the saferl_ros node graph with its topics (matplotlib only).

    python docs/img/make_ros_graph.py
"""

from pathlib import Path

import matplotlib

matplotlib.use('Agg')
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

W, H = 0.2, 0.12   # box size (axes fraction)
BOXES = {
    'sim': ((0.13, 0.52), 'sim_node\nBullet-Safety-Gym task', '#e8f0fe'),
    'ctl': ((0.47, 0.84), 'controller_node\nbundle policy', '#e8f0fe'),
    'mon': ((0.47, 0.52), 'safety_monitor_node\ncritics + fallback', '#fde8e8'),
    'rec': ((0.85, 0.52), 'recorder_node\nDSRL HDF5 + MCAP', '#e8f5e9'),
    'rob': ((0.13, 0.14), 'robot_adapter_node\nodom -> observation\ncmd_vel <- action',
            '#fff8e1'),
}
# (from point, to point, label, label position, curvature)
EDGES = [
    ((0.18, 0.58), (0.40, 0.78), 'observation\nJointState, best effort', (0.23, 0.72), 0.0),
    ((0.23, 0.54), (0.37, 0.54), 'observation', (0.30, 0.575), 0.0),
    ((0.47, 0.78), (0.47, 0.58), 'action/proposed\nreliable, keep last 1', (0.575, 0.68), 0.0),
    ((0.37, 0.49), (0.23, 0.49), 'action/final\nreliable, keep last 1', (0.30, 0.425), 0.0),
    ((0.57, 0.52), (0.75, 0.52), 'monitor/verdict\nreliable, depth 200', (0.66, 0.57), 0.0),
    ((0.13, 0.46), (0.85, 0.46), 'step: one DSRL transition (reliable, depth 200)',
     (0.56, 0.30), 0.35),
    ((0.13, 0.20), (0.13, 0.46), 'on a robot: publishes the same\nobservation / step topics,\n'
     'takes action/final (replaces sim_node)', (0.29, 0.24), 0.0),
]


def main():
    fig, ax = plt.subplots(figsize=(11, 6.5))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis('off')
    for (x, y), text, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle='round,pad=0.01',
                                    fc=colour, ec='#555'))
        ax.text(x, y, text, ha='center', va='center', fontsize=9.5)
    for start, end, label, where, rad in EDGES:
        dashed = start[1] < 0.3
        ax.add_patch(FancyArrowPatch(start, end, connectionstyle=f'arc3,rad={rad}',
                                     arrowstyle='-|>', mutation_scale=14, color='#333',
                                     linestyle='--' if dashed else '-'))
        ax.text(*where, label, fontsize=8, ha='center', va='center', color='#222')
    ax.text(0.5, 0.02, 'monitor/status: DiagnosticStatus, reliable + transient local  |  '
            '/diagnostics: DiagnosticArray  |  episode: String (JSON)  |  odom, cmd_vel: '
            'Odometry, Twist/TwistStamped', ha='center', fontsize=8, color='#555')
    ax.set_title('saferl_ros node graph: every message of control step t carries the stamp of '
                 'observation t', fontsize=11)
    out = Path(__file__).with_name('ros_graph.png')
    fig.savefig(out, dpi=110, bbox_inches='tight')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
