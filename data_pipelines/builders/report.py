"""The build report: examples kept and skipped, per split and by reason.

Written to ``<version folder>/build_report.json`` by every build, and to
``build_report.failed.json`` next to the version folder when a build fails
for skipping too much.
"""

from __future__ import annotations

import collections
import json
import os
import time

from data_pipelines.dataframes import Skip

REPORT_NAME = 'build_report.json'
FAILED_REPORT_NAME = 'build_report.failed.json'
_MAX_LISTED = 5  # Paths listed per reason in a report.


class SplitReport:
  """Counts of kept and skipped examples of one split, by reason."""

  def __init__(self, split: str):
    self.split = split
    self.kept = 0
    self.reasons = collections.OrderedDict()
    self.unknown_categories = collections.Counter()
    self.start = time.perf_counter()
    self.seconds = 0.0

  def skip(self, where: str, error: Skip):
    entry = self.reasons.setdefault(error.reason, {'count': 0, 'paths': [], 'details': []})
    entry['count'] += 1
    if len(entry['paths']) < _MAX_LISTED:
      entry['paths'].append(where)
      entry['details'].append(error.detail)

  @property
  def skipped(self) -> int:
    return sum(e['count'] for e in self.reasons.values())

  def as_dict(self) -> dict:
    total = self.kept + self.skipped
    return {'total': total, 'kept': self.kept, 'skipped': self.skipped,
            'skipped_fraction': self.skipped / total if total else 0.0,
            'seconds': round(self.seconds, 3),
            'seconds_per_image': round(self.seconds / total, 5) if total else None,
            'reasons': dict(self.reasons),
            'unknown_categories': dict(self.unknown_categories.most_common(20))}


def summarise(splits: dict, **header) -> dict:
  """The whole report: header fields, totals over splits, and the splits."""
  total = sum(s['total'] for s in splits.values())
  skipped = sum(s['skipped'] for s in splits.values())
  seconds = sum(s['seconds'] for s in splits.values())
  return {**header, 'total': total, 'kept': total - skipped, 'skipped': skipped,
          'skipped_fraction': skipped / total if total else 0.0,
          'seconds': round(seconds, 3),
          'seconds_per_image': round(seconds / total, 5) if total else None,
          'splits': splits}


def format_report(report: dict) -> str:
  """A few human lines: totals, then each skip reason with its first paths."""
  lines = [f"{report.get('builder')}/{report.get('config')}: kept "
           f"{report['kept']} of {report['total']} "
           f"(skipped {report['skipped']}, {report['skipped_fraction']:.2%}; "
           f"allowed {report.get('max_skipped_fraction', 0):.2%}) in "
           f"{report['seconds']:.1f} s"]
  for split, s in report['splits'].items():
    lines.append(f'  {split}: kept {s["kept"]} of {s["total"]}')
    for reason, e in s['reasons'].items():
      lines.append(f'    {reason}: {e["count"]}  e.g. {", ".join(e["paths"][:3])}')
  if report.get('path'):
    lines.append(f"  report: {os.path.join(report['path'], REPORT_NAME)}")
  return '\n'.join(lines)




def read_report(version_dir: str) -> dict | None:
  path = os.path.join(version_dir, REPORT_NAME)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)
