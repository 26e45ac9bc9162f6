"""Writing results: metrics JSON, a console table and a confusion-matrix PNG."""

from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

from data_pipelines import jsonio
from flair_jax.evaluation.metrics import SCALARS

_LABELS = {'aca': 'ACA (balanced accuracy)', 'kappa': "Cohen's kappa (quadratic)",
           'f1_avg': 'F1 (macro)', 'auc_avg': 'AUC (one-vs-rest, macro)',
           'sensitivity_avg': 'sensitivity (macro)', 'specificity_avg': 'specificity (macro)'}
_PER_CLASS = (('sensitivity_class', 'sens'), ('specificity_class', 'spec'),
              ('f1_class', 'F1'), ('auc_class', 'AUC'))


def _fmt(mean, std) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return 'n/a'
  return f'{mean:.3f} ± {std:.3f}'


def table(results: Mapping) -> str:
  """Mean ± std over folds of every metric, then per class."""
  summary, names = results['summary'], results['class_names']
  exp = results['experiment']
  lines = [f"{results['dataset']}: {exp['method']}, {exp['folds']} fold(s), shots train "
           f"{exp['shots_train']} / val {exp['shots_val']} / test {exp['shots_test']}, "
           f"{results['num_samples']} images"]
  if exp.get('scenario', 'flair') != 'flair':
    lines[0] += f", {exp['scenario']} few-shot scenario"
  width = max(len(v) for v in _LABELS.values())
  lines += [f'  {_LABELS[k]:<{width}}  {_fmt(summary[k]["mean"], summary[k]["std"])}'
            for k in SCALARS]
  name_width = max([len('class')] + [len(n) for n in names])
  header = f"  {'class':<{name_width}}" + ''.join(f'  {h:>13}' for _, h in _PER_CLASS)
  lines += ['', header]
  for i, name in enumerate(names):
    cells = ''.join(f"  {_fmt(summary[k]['mean'][i], summary[k]['std'][i]):>13}"
                    for k, _ in _PER_CLASS)
    lines.append(f'  {name:<{name_width}}{cells}')
  return '\n'.join(lines)


def _jsonable(x):
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, Mapping):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return _jsonable(x.item())
  return x


def write_json(results: Mapping, path: str) -> None:
  """The results as JSON (NaN written as null), without the predictions."""
  jsonio.write_json(path, _jsonable({k: v for k, v in results.items() if k != 'predictions'}))


def plot_confusion(results: Mapping, path: str) -> None:
  """PNG of the confusion matrix: summed counts over folds, row-normalised colour."""
  # The object API renders with Agg and touches no global pyplot state.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  cm = np.sum([np.asarray(f['cm'], np.float64) for f in results['folds']], axis=0)
  with np.errstate(invalid='ignore', divide='ignore'):
    norm = cm / cm.sum(1, keepdims=True)
  names = results['class_names']
  size = 1.2 + 0.9 * len(names)
  fig = Figure(figsize=(size + 1.5, size))
  ax = fig.subplots()
  image = ax.imshow(np.nan_to_num(norm), cmap='Blues', vmin=0, vmax=1)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f'{int(cm[i, j])}\n{np.nan_to_num(norm[i, j]):.2f}', ha='center',
              va='center', fontsize=8, color='white' if norm[i, j] > 0.5 else 'black')
  ax.set_xticks(range(len(names)), names, rotation=45, ha='right')
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  exp = results['experiment']
  summary = results['summary']
  ax.set_title(f"{results['dataset']} {exp['method']}: ACA {summary['aca']['mean']:.3f}",
               fontsize=10)
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def write_predictions(results: Mapping, path: str) -> None:
  """Per-fold test indices and probabilities: ``fold{k}_indices``, ``fold{k}_probs``."""
  arrays = {}
  for k, fold in enumerate(results.get('predictions', ())):
    arrays[f'fold{k}_indices'] = np.asarray(fold['test_indices'])
    arrays[f'fold{k}_probs'] = np.asarray(fold['probs'], np.float32)
  np.savez_compressed(path, class_names=np.asarray(results['class_names']), **arrays)


def write_all(results: Mapping, out_dir: str) -> dict:
  """``metrics.json``, ``predictions.npz`` and ``confusion_matrix.png`` in ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'metrics': os.path.join(out_dir, 'metrics.json'),
           'predictions': os.path.join(out_dir, 'predictions.npz'),
           'confusion_matrix': os.path.join(out_dir, 'confusion_matrix.png')}
  write_json(results, paths['metrics'])
  write_predictions(results, paths['predictions'])
  plot_confusion(results, paths['confusion_matrix'])
  return paths


def _shot_label(k: int) -> str:
  return f"{k} shot{'s' if k != 1 else ''}"


def sweep_table(sweep: Mapping, metric: str = 'aca') -> str:
  """One row per method, one column per shot count: mean ± std over folds."""
  exp = sweep['experiment']
  lines = [f"{sweep['dataset']}: {_LABELS[metric]}, mean ± std over {exp['folds']} fold(s); "
           f"scenario {exp['scenario']}, test {exp['shots_test']} per class, "
           f"{sweep['num_samples']} images"]
  width = max(len('method'), *(len(m) for m in sweep['methods']))
  cell = 13
  lines.append(f"  {'method':<{width}}" + ''.join(f'  {_shot_label(k):>{cell}}'
                                                  for k in sweep['shots']))
  for method in sweep['methods']:
    row = []
    for k in sweep['shots']:
      result = sweep['cells'][method][k]
      row.append('skipped' if 'error' in result else
                 _fmt(result['summary'][metric]['mean'], result['summary'][metric]['std']))
    lines.append(f'  {method:<{width}}' + ''.join(f'  {c:>{cell}}' for c in row))
  errors = {}
  for method in sweep['methods']:
    for k in sweep['shots']:
      if 'error' in sweep['cells'][method][k]:
        errors.setdefault((method, sweep['cells'][method][k]['error']), []).append(str(k))
  for (method, error), ks in errors.items():
    lines.append(f"  skipped {method} at {','.join(ks)} shot(s): {error}")
  return '\n'.join(lines)


def plot_sweep(sweep: Mapping, path: str, metric: str = 'aca') -> None:
  """PNG of ``metric`` against shots (log 2 axis), one line per method.

  Error bars are ± std over folds, clipped to [0, 1]; the methods are nudged
  apart along the shots axis so that bars of close curves stay legible.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  shots, methods = sweep['shots'], sweep['methods']
  fig = Figure(figsize=(10, 5.8))
  ax = fig.subplots()
  colours = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
             '#7f7f7f', '#bcbd22', '#17becf', '#393b79', '#637939', '#8c6d31']
  markers = 'osD^v<>ph*XP8'
  for i, method in enumerate(methods):
    # A skipped cell is NaN: a gap in the line, not a bridge over it.
    nan = {'mean': np.nan, 'std': np.nan}
    points = [nan if 'error' in sweep['cells'][method][k] else
              sweep['cells'][method][k]['summary'][metric] for k in shots]
    if all(p is nan for p in points):
      continue
    nudge = 2 ** (0.012 * (i - (len(methods) - 1) / 2))
    ks = np.asarray(shots, float) * nudge
    mean = np.asarray([p['mean'] for p in points], float)
    std = np.asarray([p['std'] for p in points], float)
    low, high = mean - np.maximum(mean - std, 0), np.minimum(mean + std, 1) - mean
    zero_shot = method == 'zero-shot'
    _, caps, bars = ax.errorbar(
        ks, mean, yerr=[low, high], color='black' if zero_shot else colours[i % len(colours)],
        marker=None if zero_shot else markers[i % len(markers)],
        linestyle='--' if zero_shot else '-', linewidth=1.5, markersize=5, capsize=2.5,
        elinewidth=0.8, label=method, zorder=3 if zero_shot else 2)
    for artist in (*caps, *bars):
      artist.set_alpha(0.5)  # the lines first, the spread behind them
  ax.set_xscale('log', base=2)
  ax.set_xticks(shots, [str(k) for k in shots])
  ax.minorticks_off()
  ax.set_xlabel('shots per class')
  ax.set_ylabel(_LABELS[metric])
  ax.grid(True, alpha=0.3)
  exp = sweep['experiment']
  ax.set_title(f"{sweep['dataset']}\nscenario {exp['scenario']}, {exp['folds']} fold(s), test "
               f"{exp['shots_test']} per class; bars: ± std over folds", fontsize=9)
  ax.legend(loc='center left', bbox_to_anchor=(1.01, 0.5), fontsize=9, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=130)


def write_sweep(sweep: Mapping, out_dir: str) -> dict:
  """``few_shot.json``, ``few_shot.txt`` (the table) and ``few_shot_aca.png`` in ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'metrics': os.path.join(out_dir, 'few_shot.json'),
           'table': os.path.join(out_dir, 'few_shot.txt'),
           'plot': os.path.join(out_dir, 'few_shot_aca.png')}
  cells = {m: {str(k): v for k, v in per.items()} for m, per in sweep['cells'].items()}
  jsonio.write_json(paths['metrics'], _jsonable({**sweep, 'cells': cells}))
  with open(paths['table'], 'w', encoding='utf-8') as f:
    f.write(sweep_table(sweep) + '\n')
  plot_sweep(sweep, paths['plot'])
  return paths
