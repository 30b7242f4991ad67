"""
Results of evaluations: scores of episodes, merged tables, CSV, plots and the papers' numbers.

    saferl-eval table results/*.json -o docs/results.md [--kappa 5] [--plot-dir docs/img/results]

``summarize`` aggregates episodes into raw and DSRL-normalised scores (evaluate.py calls it for
every evaluation); the rest reads results files written by ``saferl-eval`` and builds the tables
of docs/results.md. Each evaluation seed (and each source, e.g. runs of different training
seeds) is one unit: the unit's mean over its episodes; the reported mean +- std is over units
(over episodes when there is a single unit).
"""

import argparse
import csv
from dataclasses import dataclass
import json
import os
from pathlib import Path
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
from saferl_ros.errors import ConfigError
from saferl_ros.files import read_regular_file
from saferl_ros.tasks import normalized_score

KAPPAS = (5, 10, 20, 40)
TABLE_KAPPA = 5  # FISOR's Table 1 kappa for Bullet-Safety-Gym (paper, Sec. 5)
# FISOR paper, Table 1 (normalised reward, normalised cost), Bullet-Safety-Gym rows, kappa = 5,
# 20 episodes x 3 seeds (the paper's protocol). Shown next to our numbers for reference.
PAPER = {
    'bc_all': {'AntRun': (0.73, 11.73), 'BallRun': (0.67, 11.38), 'CarRun': (0.96, 1.88),
               'DroneRun': (0.55, 5.21), 'AntCircle': (0.65, 19.45),
               'BallCircle': (0.72, 10.02), 'CarCircle': (0.65, 11.16),
               'DroneCircle': (0.82, 13.78)},
    'bcq_lag': {'AntRun': (0.65, 3.30), 'BallRun': (0.43, 6.25), 'CarRun': (0.84, 2.51),
                'DroneRun': (0.80, 17.98), 'AntCircle': (0.67, 19.13),
                'BallCircle': (0.67, 8.50), 'CarCircle': (0.68, 8.84),
                'DroneCircle': (0.95, 18.56)},
    'fisor': {'AntRun': (0.45, 0.03), 'BallRun': (0.18, 0.00), 'CarRun': (0.73, 0.14),
              'DroneRun': (0.30, 0.55), 'AntCircle': (0.20, 0.00), 'BallCircle': (0.34, 0.00),
              'CarCircle': (0.40, 0.11), 'DroneCircle': (0.48, 0.00)},
}
# OASIS paper, Table 1: the "tempting" datasets (most low-cost trajectories removed), kappa = 20,
# 3 seeds, means only. Its BC is trained on all the data (our bc_all); 'oasis' is BCQ-Lag on
# OASIS's generated data. The paper normalises reward by the dataset's best return.
PAPER_OASIS = {
    'bc_all': {'BallRun': (0.55, 2.04), 'CarRun': (0.94, 1.50), 'DroneRun': (0.62, 3.48),
               'BallCircle': (0.73, 2.53), 'CarCircle': (0.59, 3.39),
               'DroneCircle': (0.82, 3.29)},
    'bcq_lag': {'BallRun': (0.51, 1.96), 'CarRun': (0.96, 2.31), 'DroneRun': (0.76, 5.19),
                'BallCircle': (0.76, 2.62), 'CarCircle': (0.79, 3.25),
                'DroneCircle': (0.88, 3.90)},
    'fisor': {'BallRun': (0.17, 0.04), 'CarRun': (0.85, 0.15), 'DroneRun': (0.44, 2.52),
              'BallCircle': (0.28, 0.00), 'CarCircle': (0.24, 0.15),
              'DroneCircle': (0.49, 0.02)},
    'oasis': {'BallRun': (0.28, 0.79), 'CarRun': (0.85, 0.02), 'DroneRun': (0.13, 0.79),
              'BallCircle': (0.70, 0.45), 'CarCircle': (0.76, 0.89),
              'DroneCircle': (0.60, 0.25)},
}


@dataclass(frozen=True)
class PaperTable:
    """A paper's published rows, shown beside ours: (normalised reward, cost) per algorithm."""

    rows: Dict[str, Dict[str, Tuple[float, float]]]
    kappa: float          # the threshold its costs are normalised by
    caption: str          # what the columns are, for the page's header


PAPER_TABLES = {
    'fisor': PaperTable(PAPER, 5.0, 'Table 1 of the FISOR paper (κ = 5, 20 episodes × 3 seeds, '
                        'the hosted DSRL datasets)'),
    'oasis': PaperTable(PAPER_OASIS, 20.0, 'Table 1 of the OASIS paper (tempting variants of '
                        'the hosted DSRL datasets, κ = 20, 3 seeds; reward normalised by the '
                        "dataset's best return)"),
    # DSPO's tables are lost in the copy of the paper available to this project.
    'none': PaperTable({}, float('nan'), "no published rows to compare with (the DSPO paper's "
                       'tables are lost in the copy available to this project)'),
}
DEFAULT_PAPER = 'fisor'


def _mean_std(values) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {'mean': float(values.mean()), 'std': float(values.std()) if len(values) > 1 else 0.0}


def summarize(task, episodes: List[dict], kappas: Sequence[float] = KAPPAS) -> dict:
    """
    Aggregate episodes into raw and normalised scores per kappa.

    Units are (source, seed) pairs: mean +- std over unit means when there are several units,
    over episodes when there is one (``std_over`` says which).
    """
    units: Dict[tuple, List[dict]] = {}
    for row in episodes:
        units.setdefault((row.get('source', ''), row['seed']), []).append(row)
    several = len(units) > 1

    def aggregate(values_of):
        if several:
            return _mean_std([np.mean([values_of(r) for r in rows]) for rows in units.values()])
        return _mean_std([values_of(r) for r in episodes])

    summary = {'std_over': 'seeds' if several else 'episodes', 'units': len(units),
               'episodes': len(episodes),
               'reward': aggregate(lambda r: r['reward']), 'cost': aggregate(lambda r: r['cost']),
               'length': aggregate(lambda r: r['length']), 'normalized': {}}
    for kappa in kappas:
        def norm(row, index, k=kappa):
            return float(normalized_score(task, row['reward'], row['cost'], k)[index])
        summary['normalized'][str(kappa)] = {
            'reward': aggregate(lambda r: norm(r, 0)), 'cost': aggregate(lambda r: norm(r, 1)),
            'safe_fraction': float(np.mean([norm(r, 1) <= 1.0 for r in episodes])),
        }
    return summary


# --------------------------------------------------------------------------- tables

def kappa_entry(normalized: dict, kappa: float) -> dict:
    """Return the entry of ``kappa`` in a results summary's 'normalized' (keys '5' or '5.0')."""
    for key, value in normalized.items():
        if float(key) == float(kappa):
            return value
    raise KeyError(f'no kappa {kappa} in the results; evaluated at {sorted(normalized)}')


def result_label(result: dict) -> str:
    """
    Return the table column of one results file.

    Its ``label`` if set; else, for a run folder named LABEL-TASK-sSEED (saferl-grid,
    e.g. bc_safe-k5-BallCircle-s0), LABEL, so variants of one algorithm (BC-Safe at two kappas)
    stay apart; else the algorithm.
    """
    if result.get('label'):
        return result['label']
    match = re.fullmatch(rf'(.+)-{re.escape(result["task"])}-s\d+', result.get('name', ''))
    return match.group(1) if match else result['algorithm']


def trained_kappa(label: str):
    """Return the threshold a column was trained for (its label ends in -kK), else None."""
    match = re.search(r'-k(\d+(?:\.\d+)?)$', label)
    return float(match.group(1)) if match else None


def merge_results(results: Sequence[dict]) -> Dict[tuple, dict]:
    """Group results by (task, label) and re-aggregate the episodes of each group."""
    groups: Dict[tuple, List[dict]] = {}
    for result in results:
        groups.setdefault((result['task'], result_label(result)), []).append(result)
    merged = {}
    for (task, label), items in groups.items():
        episodes = [dict(row, source=row.get('source', item['name']))
                    for item in items for row in item['episodes']]
        kappas = sorted({k for item in items for k in item['kappas']})
        merged[(task, label)] = {
            'summary': summarize(task, episodes, kappas), 'kappas': kappas,
            'algorithm': items[0]['algorithm'],
            'names': [item['name'] for item in items],
            'kinds': sorted({k for item in items for k in item['kinds']}),
            'episodes_per_seed': sorted({item['episodes_per_seed'] for item in items}),
            'seeds': sorted({s for item in items for s in item['seeds']})}
    return merged


def _cell(stat: dict) -> str:
    return f'{stat["mean"]:.2f} ± {stat["std"]:.2f}'


def results_table(results: Sequence[dict], kappa: float = TABLE_KAPPA,
                  details: bool = True, paper: str = DEFAULT_PAPER) -> str:
    """
    Return the markdown results table at ``kappa`` (unsafe costs, C_norm > 1, in bold).

    ``paper``: the PAPER_TABLES entry whose rows of the same algorithms stand beside ours (in
    the table at the paper's kappa).
    """
    # the paper's rows only beside ours at its own kappa (its costs are normalised by it)
    table = PAPER_TABLES[paper]
    published = table.rows if float(kappa) == table.kappa else {}
    merged = merge_results(results)
    tasks = sorted({t for t, _ in merged}, key=lambda t: (t.endswith('Run'), t))
    labels = sorted({label for _, label in merged})
    algorithm_of = {label: entry['algorithm'] for (_, label), entry in merged.items()}
    shown = sorted({algorithm_of[label] for label in labels} & set(published))
    head = ['Task'] + [f'{label} R↑ / C↓' for label in labels]
    head += [f'paper {a} R / C' for a in shown]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * (1 + len(labels) + len(shown))]
    for task in tasks:
        cells = [task]
        for label in labels:
            entry = merged.get((task, label))
            norm = entry and entry['summary']['normalized'].get(str(float(kappa)))
            if not norm:
                cells.append('–')
                continue
            cost = _cell(norm['cost'])
            cost = f'**{cost}**' if norm['cost']['mean'] > 1 else cost
            cells.append(f'{_cell(norm["reward"])} / {cost}')
        for algorithm in shown:
            row = published[algorithm].get(task)
            cells.append(f'{row[0]:.2f} / {row[1]:.2f}' if row else '–')
        lines.append('| ' + ' | '.join(cells) + ' |')
    if not details:
        return '\n'.join(lines) + '\n'
    return '\n'.join(lines + [''] + results_details(merged)) + '\n'


def results_details(merged: Dict[tuple, dict]) -> List[str]:
    """Return one line per (task, label): episodes, seeds, sources, raw returns."""
    out = []
    for (task, label), entry in sorted(merged.items()):
        s = entry['summary']
        out.append(f'- {task} / {label}: {s["episodes"]} episodes '
                   f'({", ".join(str(e) for e in entry["episodes_per_seed"])} per seed), '
                   f'seeds {entry["seeds"]}, {len(entry["names"])} source(s) '
                   f'[{", ".join(entry["names"])}] ({"/".join(entry["kinds"])}); '
                   f'raw reward {s["reward"]["mean"]:.1f}, raw cost {s["cost"]["mean"]:.1f}; '
                   f'± is the std over {s["std_over"]}')
    return out


def results_csv(results: Sequence[dict], path) -> None:
    """Write every (task, algorithm, kappa) aggregate as one CSV row."""
    merged = merge_results(results)
    with open(path, 'w', newline='') as stream:
        writer = csv.writer(stream)
        writer.writerow(['task', 'algorithm', 'kappa', 'reward_norm_mean', 'reward_norm_std',
                         'cost_norm_mean', 'cost_norm_std', 'safe_episode_fraction',
                         'reward_raw_mean', 'cost_raw_mean', 'episodes', 'units', 'std_over',
                         'sources'])
        for (task, label), entry in sorted(merged.items()):
            s = entry['summary']
            for kappa, n in s['normalized'].items():
                writer.writerow([task, label, kappa, f'{n["reward"]["mean"]:.4f}',
                                 f'{n["reward"]["std"]:.4f}', f'{n["cost"]["mean"]:.4f}',
                                 f'{n["cost"]["std"]:.4f}', f'{n["safe_fraction"]:.3f}',
                                 f'{s["reward"]["mean"]:.3f}', f'{s["cost"]["mean"]:.3f}',
                                 s['episodes'], s['units'], s['std_over'],
                                 ';'.join(entry['names'])])


def reward_cost_plots(results: Sequence[dict], out_dir, kappa: float = TABLE_KAPPA,
                      paper: str = DEFAULT_PAPER) -> List[Path]:
    """
    Draw one normalised reward-vs-cost plot per task (safe region: C_norm <= 1).

    The ``paper`` table's points (squares) are drawn on the plots at its own kappa.
    """
    published = PAPER_TABLES[paper]
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    merged = merge_results(results)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    suffix = '' if float(kappa) == float(TABLE_KAPPA) else f'_kappa{kappa:g}'
    for task in sorted({t for t, _ in merged}):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        ax.axvspan(0, 1, color='tab:green', alpha=0.08, label='safe ($C_{norm} \\leq 1$)')
        ax.axvline(1.0, color='tab:green', ls='--', lw=1)
        drawn_paper = set()
        for label, color in zip(sorted(a for t, a in merged if t == task),
                                plt.cm.tab10.colors):
            norm = merged[(task, label)]['summary']['normalized'].get(str(float(kappa)))
            if norm:
                ax.errorbar(norm['cost']['mean'], norm['reward']['mean'],
                            xerr=norm['cost']['std'], yerr=norm['reward']['std'], fmt='o',
                            color=color, capsize=3, label=f'{label} (ours)')
            algorithm = merged[(task, label)]['algorithm']
            point = published.rows.get(algorithm, {}).get(task)
            if point and algorithm not in drawn_paper and float(kappa) == published.kappa:
                drawn_paper.add(algorithm)
                ax.plot(point[1], point[0], marker='s', mfc='none', color=color, ls='none',
                        label=f'{algorithm} (paper, kappa {published.kappa:g})')
        ax.set_xlabel(f'normalised cost (kappa = {kappa:g})')
        ax.set_ylabel('normalised reward')
        ax.set_title(f'{task}: reward vs cost')
        ax.set_xlim(left=-0.5)
        ax.legend(fontsize=7, loc='best')
        fig.tight_layout()
        png = out_dir / f'reward_cost_{task}{suffix}.png'
        fig.savefig(png, dpi=110)
        plt.close(fig)
        written.append(png)
    return written


RESULT_FIELDS = {'name': str, 'task': str, 'algorithm': str, 'kinds': list, 'episodes': list,
                 'kappas': list, 'seeds': list, 'episodes_per_seed': int}


# A results file holds one row per episode (a few hundred bytes each): 64 MiB is ~100 000 rows.
RESULTS_LIMIT = 64 << 20


GENERATED_MARK = '<!-- generated by `saferl-eval table'


def check_kappas(kappas, option: str) -> None:
    """Refuse cost thresholds that are not finite and positive (C_norm divides by kappa)."""
    bad = [k for k in kappas if not (np.isfinite(k) and k > 0)]
    if bad:
        raise ConfigError(f'{option} {bad[0]:g}: a cost threshold must be a finite number > 0 '
                          '(e.g. --kappa 5 10)')


def check_replaceable(out: Path, suffix: str, mark: str, what: str) -> None:
    """
    Refuse to write ``out`` over anything but an earlier output of the same kind.

    ``out`` must end in ``suffix``; an existing ``out`` must be a regular file whose first 64 KiB
    hold ``mark``: -o naming a dataset, a bundle file or someone's notes by mistake loses nothing.
    """
    if out.suffix != suffix:
        raise ConfigError(f'-o {out}: give a {suffix} file name')
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_file():
        raise ConfigError(f'-o {out}: exists and is not a regular file; give a new {suffix} name')
    with open(out, 'rb') as stream:
        head = stream.read(64 << 10)
    if mark.encode() not in head:
        raise ConfigError(f'-o {out}: exists and is not {what}, so it is not replaced; give a '
                          f'new {suffix} name or remove it yourself')


def _is_number(value) -> bool:
    """Return whether ``value`` is a finite real number (bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        bool(np.isfinite(value))


def read_results(path) -> dict:
    """Return one results file written by saferl-eval; raise ConfigError naming what is wrong."""
    fix = 'give the JSON files that saferl-eval wrote (saferl-eval SOURCE -o FILE.json)'
    # a regular file of bounded size: /dev/zero or a FIFO is refused before it is read
    data = read_regular_file(path, RESULTS_LIMIT, fix)
    try:
        results = json.loads(data.decode('utf-8'))
    except UnicodeDecodeError:
        raise ConfigError(f'{path}: not a text file; {fix}') from None
    except json.JSONDecodeError as error:
        raise ConfigError(f'{path}: not valid JSON ({error.msg} at line {error.lineno}); '
                          f'{fix}') from None
    except RecursionError:       # '[' * 100 000: nested deeper than any results file
        raise ConfigError(f'{path}: JSON nested too deeply to be a results file; {fix}') from None
    if not isinstance(results, dict):
        raise ConfigError(f'{path}: expected a JSON object, found {type(results).__name__}; '
                          f'{fix}')
    for key, kind in RESULT_FIELDS.items():
        if not isinstance(results.get(key), kind):
            found = 'missing' if key not in results else type(results[key]).__name__
            raise ConfigError(f'{path}: field {key!r} should be a {kind.__name__}, found '
                              f'{found}; {fix}')
    if not results['episodes']:
        raise ConfigError(f'{path}: holds no episodes; {fix}')
    if not all(_is_number(k) and k > 0 for k in results['kappas']):
        raise ConfigError(f'{path}: kappas should be numbers > 0, found '
                          f'{str(results["kappas"])[:80]}; {fix}')
    machine = results.get('machine', {})
    if not isinstance(machine, dict) or (
            'machine' in results and not {'cpu', 'cores'} <= set(machine)):
        raise ConfigError(f"{path}: field 'machine' should be an object with cpu and cores, "
                          f'found {str(machine)[:80]}; {fix}')
    for row in results['episodes']:
        needed = ('seed', 'reward', 'cost', 'length')
        if not isinstance(row, dict) or any(key not in row for key in needed):
            raise ConfigError(f'{path}: an entry of episodes lacks seed, reward, cost or '
                              f'length; {fix}')
        if not (isinstance(row['seed'], int) and isinstance(row['length'], int) and
                _is_number(row['reward']) and _is_number(row['cost'])):
            raise ConfigError(f'{path}: an episode has seed {str(row["seed"])[:40]}, reward '
                              f'{str(row["reward"])[:40]}, cost {str(row["cost"])[:40]}, length '
                              f'{str(row["length"])[:40]}: expected integers and finite '
                              f'numbers; {fix}')
    return results


def write_table(result_files: Sequence, out, kappa=TABLE_KAPPA, plot_dir=None,
                notes=None, paper: str = DEFAULT_PAPER, match_kappa: bool = False) -> Path:
    """
    Write the markdown tables (and the CSV and plots next to them) from results JSON files.

    ``kappa``: one threshold or several (one table and one set of plots each; the first is the
    main one). ``notes``: a markdown file appended below the tables (what was run, caveats).
    ``paper``: the PAPER_TABLES entry shown beside ours. ``match_kappa``: a column trained for
    one threshold (label ending in -kK) stands only in the table of κ = K (the CSV keeps all).
    """
    if paper not in PAPER_TABLES:
        raise ConfigError(f'unknown paper table {paper!r}; choose one of '
                          f'{", ".join(sorted(PAPER_TABLES))}')
    kappas = [float(k) for k in (kappa if isinstance(kappa, (list, tuple)) else [kappa])]
    check_kappas(kappas, '--kappa')
    results = [read_results(f) for f in result_files]
    out = Path(out)
    check_replaceable(out, '.md', GENERATED_MARK, 'a page saferl-eval table wrote')
    out.parent.mkdir(parents=True, exist_ok=True)
    # One folder per page (docs/img/results for docs/results.md, docs/results/img/h200 for
    # docs/results/h200.md): pages side by side must not overwrite each other's plots.
    plot_dir = Path(plot_dir) if plot_dir is not None else out.parent / 'img' / (
        'results' if out.stem == 'results' else out.stem)
    machines = sorted({f'{r["machine"]["cpu"]} ({r["machine"]["cores"]} cores)' for r in results
                       if 'machine' in r})
    kappa_args = ' '.join(f'{k:g}' for k in kappas)
    files = ' '.join(str(f) for f in result_files)
    header = (
        '# Results\n\n'
        f'<!-- generated by `saferl-eval table {files} -o {out} --kappa {kappa_args}'
        f'{f" --notes {notes}" if notes is not None else ""}'
        f'{f" --paper {paper}" if paper != DEFAULT_PAPER else ""}'
        f'{" --match-kappa" if match_kappa else ""}`; edit the sources, not this '
        'page -->\n\n'
        'Each cell: normalised reward (R↑) / normalised cost (C↓), normalised as DSRL does, '
        'mean ± std (over '
        'evaluation units: training seeds or evaluation seeds, or over episodes for a single '
        'one). Costs above 1 (unsafe) are in bold. '
        + (f'The paper columns are {PAPER_TABLES[paper].caption}; ours use the datasets '
           'collected here, so they are comparable in protocol but not in data. '
           if PAPER_TABLES[paper].rows else f'No paper columns: {PAPER_TABLES[paper].caption}. ')
        + 'Other κ: the CSV '
        f'next to this file. Plots: `{plot_dir}`. '
        f'Machine: {"; ".join(machines) or "unknown"}.\n\n')
    sections = []
    if match_kappa:
        elsewhere = sorted({result_label(r) for r in results
                            if trained_kappa(result_label(r)) not in (None, *kappas)})
        if elsewhere:
            sections.append(f'Columns trained for a κ without a table here (the CSV has them): '
                            f'{", ".join(elsewhere)}.\n')
    linked = False
    for k in kappas:
        title = f'## κ = {k:g}' + (f" ({paper.upper()}'s threshold for these tasks)"
                                   if k == PAPER_TABLES[paper].kappa else '')
        shown = [r for r in results
                 if not match_kappa or trained_kappa(result_label(r)) in (None, k)]
        if not shown:
            sections.append(f'{title}\n\nNo results trained for this threshold yet.\n')
            continue
        sections.append(f'{title}\n\n' + results_table(shown, k, details=False, paper=paper))
        pngs = reward_cost_plots(shown, plot_dir, k, paper)
        if not linked:           # the plots of the first table shown
            linked = True
            links = ' '.join(f'![{png.stem}]({os.path.relpath(png, out.parent)})' for png in pngs)
            squares = ' (squares: the paper)' if PAPER_TABLES[paper].rows else ''
            sections.append(f'Reward against cost at κ = {k:g}{squares}:\n\n{links}\n')
    details = '## Evaluation units\n\n' + '\n'.join(results_details(merge_results(results)))
    extra = ''
    if notes is not None:
        text = read_regular_file(notes, MAX_INCLUDED_PAGE_BYTES, 'give a markdown file of '
                                 'notes').decode('utf-8', 'replace')
        extra = f'\n{expand_includes(text, out)}'
    out.write_text(header + '\n'.join(sections) + '\n' + details + '\n' + extra)
    results_csv(results, out.with_suffix('.csv'))
    return out


# A notes line that stands for another generated page's tables (PATH relative to the page
# the notes are appended to), e.g. '<!-- include results/dspo.md -->' in docs/results/NOTES.md
INCLUDE_LINE = re.compile(r'^[ \t]*<!--\s*include\s+(\S+)\s*-->[ \t]*\r?$', re.MULTILINE)
INCLUDE_LEFT = re.compile(r'<!--\s*include\b.*', re.IGNORECASE)
MARKDOWN_LINK = re.compile(r'(\]\()([^)\s]+)((?:\s+"[^"]*")?\))')     # ](target "title")
MAX_INCLUDED_PAGE_BYTES = 4 << 20


def included_tables(relative: str, out: Path) -> str:
    """
    Return the κ tables and plots of the results page ``out.parent / relative``, for ``out``.

    That page must be one ``saferl-eval table`` wrote (rebuild it first: its grid's
    ``--table``); its headings move one level down and its relative links are rewritten to
    resolve from ``out``'s folder.
    """
    page = out.parent / relative
    fix = 'rebuild it with its grid (saferl-grid --grid NAME --table) or drop the include line'
    text = read_regular_file(page, MAX_INCLUDED_PAGE_BYTES, fix).decode('utf-8', 'replace')
    start, end = text.find('\n## κ = '), text.find('\n## Evaluation units')
    if start < 0 or end < start:
        raise ConfigError(f'{page}: not a page saferl-eval table wrote (no "## κ = " tables '
                          f'before "## Evaluation units"); {fix}')
    body = re.sub(r'^## ', '### ', text[start + 1:end], flags=re.MULTILINE)

    def relink(match):
        target = match.group(2)
        if re.match(r'[A-Za-z][A-Za-z+.-]*:|[#/]', target):       # a URL, an anchor, absolute
            return match.group(0)
        moved = os.path.relpath(os.path.normpath(page.parent / target), out.parent)
        return match.group(1) + Path(moved).as_posix() + match.group(3)
    return (f'<!-- the tables of {relative}, copied when this page was built -->\n'
            + MARKDOWN_LINK.sub(relink, body).rstrip() + '\n')


def expand_includes(notes: str, out: Path) -> str:
    """Return ``notes`` with each include line replaced by that page's tables (see above)."""
    expanded = INCLUDE_LINE.sub(lambda match: included_tables(match.group(1), Path(out)), notes)
    left = INCLUDE_LEFT.search(expanded)
    if left:      # e.g. text after the comment on its line: refused, not left as a comment
        raise ConfigError(f'notes line {left.group(0).strip()!r}: an include must stand alone on '
                          "its line as '<!-- include PAGE -->'")
    return expanded


# --------------------------------------------------------------------------- command line

def table_main(argv=None) -> int:
    """Command-line entry point of ``saferl-eval table``."""
    parser = argparse.ArgumentParser(
        prog='saferl-eval table', description='Build the markdown/CSV results table and the '
        'reward-cost plots from saferl-eval results files.')
    parser.add_argument('results', nargs='+', help='results JSON files written by saferl-eval')
    parser.add_argument('-o', '--out', required=True, help='markdown file, e.g. docs/results.md '
                        '(the CSV is written next to it)')
    parser.add_argument('--kappa', type=float, nargs='+', default=[TABLE_KAPPA],
                        help=f'cost thresholds, one table each (default {TABLE_KAPPA}, as FISOR; '
                             'e.g. --kappa 5 10)')
    parser.add_argument('--plot-dir', default=None,
                        help='folder of the reward-cost PNGs (default OUT_DIR/img/results for '
                        'results.md, else OUT_DIR/img/STEM)')
    parser.add_argument('--notes', default=None,
                        help='markdown file appended below the table (runs, caveats); a line '
                        "'<!-- include PAGE -->' in it stands for the tables of another page "
                        "this command wrote (PAGE relative to the output's folder)")
    parser.add_argument('--paper', default=DEFAULT_PAPER, choices=sorted(PAPER_TABLES),
                        help="whose published rows stand beside ours: 'fisor' (FISOR's Table 1, "
                        "kappa 5; default), 'oasis' (OASIS's Table 1, tempting data, kappa 20) "
                        "or 'none'")
    parser.add_argument('--match-kappa', action='store_true',
                        help='a column trained for one threshold (its name ends in -kK, e.g. '
                        'dspo-k10) stands only in the table of that kappa')
    args = parser.parse_args(argv)
    out = write_table(args.results, args.out, args.kappa, args.plot_dir, args.notes, args.paper,
                      args.match_kappa)
    print(f'saferl-eval: wrote {out} and {out.with_suffix(".csv")}')
    return 0
