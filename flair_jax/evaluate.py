"""Transfer evaluation of a FLAIR checkpoint on a downstream set.

    python -m flair_jax.evaluate --checkpoint PATH --method zero-shot \\
        --data DATASET_DIR_OR_NAME [--split test] [--data-dir DIR]
    python -m flair_jax.evaluate --checkpoint PATH --method linear-probe \\
        --data sets/25_REFUGE.csv --data-root /data/FUNDUS \\
        --targets "no glaucoma,glaucoma" --folds 5
    python -m flair_jax.evaluate --checkpoint PATH --method all-few-shot \\
        --data DATASET --shots 1,2,4,8,16 [--scenario standard]
    python -m flair_jax.evaluate --checkpoint PATH --method ft --data ... \\
        --shots-train 70% --shots-val 10% --shots-test 20%

Writes ``metrics.json``, ``predictions.npz`` and ``confusion_matrix.png`` to
``--out`` and prints mean ± std over folds; with ``--shots`` (or
``--method all-few-shot``: every method) ``few_shot.json``, ``few_shot.txt``
and ``few_shot_aca.png``, accuracy against shots. The logic lives in
``flair_jax.evaluation``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import jax

from data_pipelines import console
from flair_jax.evaluation import data, finetune, report, run, splits, sweep
from flair_jax.inference import FLAIRModel


def parse_args(argv=None) -> argparse.Namespace:
  p = console.ArgumentParser(prog='python -m flair_jax.evaluate',
                             description=__doc__.splitlines()[0])
  p.add_argument('--checkpoint', required=True,
                 help='flair_jax checkpoint / workdir, or PyTorch FLAIR .pth / folder')
  p.add_argument('--method', choices=(*run.METHODS, sweep.ALL_FEW_SHOT), default='zero-shot',
                 help=f'{sweep.ALL_FEW_SHOT}: every feature-level method, over --shots')
  p.add_argument('--data', required=True,
                 help='built fundus_classification dataset folder or name, or a FLAIR CSV')
  p.add_argument('--split', default='test', help='TFDS split to evaluate on')
  p.add_argument('--data-dir', help='TFDS data dir when --data is a dataset name')
  p.add_argument('--data-root', help='image root of a CSV')
  p.add_argument('--targets', help='class names in label order ("a,b,c") or a target map '
                 '(JSON text or file); required for a CSV, default for TFDS: the label names')
  console.add_bool_flag(p, '--domain-knowledge', default=True,
                        help='prompt with expert descriptions (zero-shot, adapters; default: true)')
  p.add_argument('--knowledge', default='flair_repo',
                 help="expert dictionary: 'flair_repo', 'seed' or a JSON file")
  p.add_argument('--folds', type=int, help='default: 1 for zero-shot, 5 otherwise')
  p.add_argument('--shots-train', help='per class, count or percentage (default 0%% / 80%%)')
  p.add_argument('--shots-val', help='per class (default 0%%)')
  p.add_argument('--shots-test', help='per class (default 100%% / 20%%)')
  p.add_argument('--shots', help='few-shot sweep: shots per class "1,2,4,8,16" (the '
                 f'default of {sweep.ALL_FEW_SHOT}); test --shots-test (default 20%%)')
  p.add_argument('--scenario', choices=splits.SCENARIOS, default='flair',
                 help="training shots: FLAIR's split, or a few-shot scenario: standard "
                 '(k per class), relaxed (C k spread as the classes, one at least), '
                 'realistic (the same, classes may be missing)')
  p.add_argument('--seed', type=int, default=0, help='fold k splits with seed + k')
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--image-size', type=int, help="default: the checkpoint's")
  console.add_bool_flag(p, '--crop-foreground',
                        help="FLAIR's field-of-view crop before resizing")
  p.add_argument('--tokenizer', help="tokenizer folder or hub id (default: the checkpoint's)")
  p.add_argument('--bert-type', help='text tower folder or hub id of a PyTorch FLAIR .pth '
                 "(default: its config.json's, else Bio_ClinicalBERT)")
  p.add_argument('--workers', type=int, default=4, help='image reading threads')
  console.add_bool_flag(p, '--tta', default=False,
                        help="FLAIR's test-time augmentation: logits averaged over 20 augmented "
                        'encodings (zero-shot, linear probe, adapters; default: false)')
  console.add_bool_flag(p, '--fta', default=False,
                        help="FLAIR's training-time augmentation: 20 augmented encodings of each "
                        'training image, or augmented fine-tuning batches (default: false)')
  console.add_bool_flag(p, '--balance', default=False,
                        help="FLAIR's oversampling of each class of the training split to the "
                        'largest (default: false)')
  _add_fine_tuning_flags(p)
  p.add_argument('--out', default='eval_results', help='output folder')
  console.add_verbose_flag(p)
  return p.parse_args(argv)


def _add_fine_tuning_flags(p) -> None:
  """FLAIR's fine-tuning settings (``--method ft`` / ``lp+ft``)."""
  g = p.add_argument_group('fine-tuning (ft, lp+ft)')
  defaults = finetune.Options()
  g.add_argument('--epochs', type=int, default=defaults.epochs, help='default: %(default)s')
  g.add_argument('--train-batch-size', type=int, default=defaults.batch_size,
                 help='images per training step (default: %(default)s)')
  g.add_argument('--lr', type=float, default=defaults.lr, help='AdamW rate (default: %(default)s)')
  g.add_argument('--patience', type=int, default=defaults.patience,
                 help='epochs without a better validation macro F1 before stopping '
                 '(default: %(default)s)')
  console.add_bool_flag(g, '--update-bn', default=True,
                        help='BatchNorm in train mode (default: true)')
  console.add_bool_flag(g, '--freeze-classifier', default=False,
                        help='train the tower only (default: false)')
  console.add_bool_flag(g, '--last-lp', default=False,
                        help='a linear probe on the fine-tuned features replaces the classifier '
                        '(default: false)')


def main(argv=None) -> dict:
  """Evaluates as ``argv`` asks, writes the reports; returns the results."""
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format='%(message)s')
  logging.getLogger('flair_jax').setLevel(logging.INFO)
  log = logging.getLogger('flair_jax.evaluate')
  log.info('devices: %s', jax.devices())
  sweeping = args.method == sweep.ALL_FEW_SHOT or args.shots is not None
  shots = sweep.parse_shots(args.shots or ','.join(map(str, sweep.DEFAULT_SHOTS)))
  model = FLAIRModel.from_pretrained(args.checkpoint, tokenizer=args.tokenizer,
                                     bert_type=args.bert_type)
  dataset = data.load(args.data, split=args.split, data_dir=args.data_dir,
                      data_root=args.data_root, targets=args.targets)
  experiment = run.Experiment(
      method='zero-shot' if sweeping else args.method, folds=args.folds,
      shots_train=args.shots_train,
      shots_val=args.shots_val, shots_test=args.shots_test, seed=args.seed,
      domain_knowledge=args.domain_knowledge, knowledge=args.knowledge,
      batch_size=args.batch_size, crop_foreground=args.crop_foreground,
      image_size=args.image_size, num_workers=args.workers, scenario=args.scenario,
      balance=args.balance, tta=args.tta, fta=args.fta, fine_tuning=finetune.Options(
          epochs=args.epochs, batch_size=args.train_batch_size, lr=args.lr,
          patience=args.patience, update_bn=args.update_bn,
          freeze_classifier=args.freeze_classifier, last_lp=args.last_lp))
  if sweeping:
    return _sweep(args, model, dataset, experiment, shots)
  # Fine-tuning checkpoints each fold there: the same command resumes.
  results = run.run(model, dataset, experiment, workdir=os.path.join(args.out, 'finetune'))
  paths = report.write_all(results, args.out)
  print(report.table(results))
  print('\nwrote ' + ', '.join(paths.values()))
  return results


def _sweep(args, model, dataset, experiment, shots) -> dict:
  """Every method (or ``--method``) at every ``--shots``; writes the sweep's reports."""
  methods = sweep.FEATURE_METHODS if args.method == sweep.ALL_FEW_SHOT else (args.method,)
  results = sweep.run_sweep(model, dataset, experiment, methods, shots)
  paths = report.write_sweep(results, args.out)
  print(report.sweep_table(results))
  print('\nwrote ' + ', '.join(paths.values()))
  return results


if __name__ == '__main__':
  # The data, split, target and shot checks raise ValueError.
  sys.exit(console.run(main, expected=(ValueError,)))
