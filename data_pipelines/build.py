"""``build(name, data_dir, **options) -> report``: build a fundus dataset once.

Options are the fields of the builder's config class (``options(name)``
lists them). The folder of a build is named after its options, so building
the same options again reuses it (idempotent) and other options never
overwrite it. The report says where the data is (``path``) and its TFDS name
(``tfds_name``, for ``tfds.data_source(tfds_name, data_dir=data_dir)``).

Bad examples are skipped and counted by reason; the report goes to
``<path>/build_report.json`` (and, when the build fails because more than
``max_skipped_fraction`` (default 0.05) of a split was bad, to
``build_report.failed.json`` in the folder above, with no dataset left).
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from data_pipelines.builders import BUILDERS
from data_pipelines.builders import report as report_lib


def _lookup(name: str):
  if name not in BUILDERS:
    raise KeyError(f'unknown builder {name!r}; expected one of {sorted(BUILDERS)}')
  return BUILDERS[name]


def options(name: str) -> dict:
  """Option name -> default of builder ``name``."""
  _, config_cls, _ = _lookup(name)
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
          for f in dataclasses.fields(config_cls) if f.name not in base}


def make_config(name: str, config_name: str | None = None, **opts):
  """The validated builder config of ``name`` for these options."""
  _, config_cls, naming = _lookup(name)
  unknown = sorted(set(opts) - set(options(name)))
  if unknown:
    raise TypeError(f'{name} has no options {unknown}; its options are '
                    f'{sorted(options(name))}')
  if 'datasets' in opts:
    opts['datasets'] = tuple(opts['datasets'])
  cfg = config_cls(name='pending', **opts)
  cfg.validate()
  cfg.name = config_name or naming(cfg)
  return cfg


def build(name: str, data_dir: str | os.PathLike, *, config_name: str | None = None,
          verbose: bool = True, **opts) -> dict:
  """Builds dataset ``name`` under ``data_dir`` unless built; returns its report.

  Raises:
    builders.BuildError: more than ``max_skipped_fraction`` examples were bad
      (the failed report is written next to the version folder).
  """
  builder_cls = _lookup(name)[0]
  cfg = make_config(name, config_name, **opts)
  builder = builder_cls(data_dir=os.fspath(data_dir), config=cfg)
  reused = builder.is_prepared()
  if not reused:
    builder.download_and_prepare()
  path = os.fspath(builder.data_path)
  report = report_lib.read_report(path)
  if report is None:  # Built by other means (e.g. an older version): counts only.
    splits = {s: {'total': i.num_examples, 'kept': i.num_examples, 'skipped': 0,
                  'skipped_fraction': 0.0, 'seconds': 0.0, 'reasons': {}}
              for s, i in builder.info.splits.items()}
    report = report_lib.summarise(splits, builder=name, config=cfg.name,
                              version=str(builder.version), path=path)
  report.update(reused=reused, path=path, data_dir=os.fspath(data_dir),
                tfds_name=f'{name}/{cfg.name}:{builder.version}')
  if verbose:
    print(report_lib.format_report(report))
  return report


def data_source(report_or_path, split: str, decode_images: bool = True):
  """Random-access source of a built split (``report['path']`` or a path).

  Images come back as uint8 HxWx3 arrays, or as the stored PNG/JPEG bytes
  with ``decode_images=False``.
  """
  path = report_or_path['path'] if isinstance(report_or_path, dict) else report_or_path
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  return tfds.builder_from_directory(os.fspath(path)).as_data_source(
      split, decoders=decoders)
