"""TFDS builders end to end (no TensorFlow): a FLAIR-format assembly made
here from the real photographs plus every kind of broken input, the synthetic
set, the downstream sets, the report, the threshold and the command line."""

import csv
import importlib.util
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import build as build_lib
from data_pipelines import cli
from data_pipelines import dataframes
from data_pipelines import images
from data_pipelines import synthetic
from data_pipelines import targets as targets_lib
from data_pipelines.builders import BuildError, fundus_classification
from tests.test_images import png_header_only

CANVAS = 64
HEADER = ['', 'image', 'atributes', 'categories']
REAL = {  # file -> (categories, attributes)
    'HRF_04_g.jpg': (['glaucoma'], ['clean']),
    'HRF_07_dr.jpg': (['diabetic retinopathy', 'microaneurysms'], []),
    'skimage_retina.jpg': (['normal'], ['clean']),
    'skimage_microaneurysms.png': (['microaneurysms'], ['noisy']),
    'flair_normal_sample.png': (['normal'], []),
    'flair_sample_macular_hole.png': (['macular hole'], []),
    'flair_severe_nonprol_dr.jpg': (['severe diabetic retinopathy'], []),
}
EXPECTED_SKIPS = {'missing_file': 1, 'empty_file': 1, 'truncated_image': 1,
                  'corrupt_image': 1, 'too_many_pixels': 1, 'path_escapes_root': 3,
                  'malformed_list': 4, 'unknown_category': 1, 'malformed_row': 2}


def smooth_rgb(h, w):
  yy, xx = np.mgrid[:h, :w]
  return np.stack([(5 * xx) % 256, (7 * yy) % 256, (3 * xx + 2 * yy) % 256], -1).astype(np.uint8)


def mode_images():
  """name -> (PIL image in an awkward mode, expected RGB by NumPy)."""
  rgb = smooth_rgb(30, 40)
  grey = rgb[..., 1]
  palette = np.array([[i, 255 - i, (3 * i) % 256] for i in range(256)], np.uint8)
  pal = Image.fromarray(grey, 'P')
  pal.putpalette(palette.ravel().tolist())
  trns = pal.copy()
  trns.info['transparency'] = bytes(range(0, 256, 1))  # A tRNS chunk.
  v16 = (grey.astype(np.uint16) * 257 + 100).clip(0, 65535).astype(np.uint16)
  cmyk = np.concatenate([rgb, rgb[..., :1] // 2], -1)
  return {
      'rgba.png': (Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), 'RGBA'), rgb),
      'la.png': (Image.fromarray(np.stack([grey, rgb[..., 0]], -1), 'LA'),
                 np.repeat(grey[..., None], 3, -1)),
      'p.png': (pal, palette[grey]),
      'p_transparent.png': (trns, palette[grey]),
      'i16.png': (Image.fromarray(v16),
                  np.repeat(np.round(v16 * 255.0 / 65535).astype(np.uint8)[..., None], 3, -1)),
      'cmyk.jpg': (Image.fromarray(cmyk, 'CMYK'), None),  # JPEG: checked by size only.
  }


def write_csv(path, rows, raw_lines=()):
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(HEADER)
  for i, (image, atr, cats) in enumerate(rows):
    writer.writerow([i, image, atr, cats])
  path.write_text(buf.getvalue() + ''.join(raw_lines))


@pytest.fixture(scope='module')
def assembly(tmp_path_factory, fundus_dir):
  """A FLAIR-format assembly: 13 good images, 15 bad rows of every kind."""
  tmp = tmp_path_factory.mktemp('assembly')
  root, frames, outside = tmp / 'root', tmp / 'frames', tmp / 'outside'
  for d in (root / '10_REAL', root / '20_MODES', root / '30_BAD', frames, outside):
    d.mkdir(parents=True)
  for name in REAL:
    shutil.copy(fundus_dir / name, root / '10_REAL' / name)
  write_csv(frames / '10_REAL.csv',
            [(f'10_REAL/{n}', str(a), str(c)) for n, (c, a) in REAL.items()])
  modes = mode_images()
  for name, (img, _) in modes.items():
    img.save(root / '20_MODES' / name)
  write_csv(frames / '20_MODES.csv', [(f'20_MODES/{n}', '[]', "['normal']") for n in modes])

  bad = root / '30_BAD'
  jpeg = (fundus_dir / 'flair_severe_nonprol_dr.jpg').read_bytes()
  (bad / 'empty.png').write_bytes(b'')
  (bad / 'truncated.jpg').write_bytes(jpeg[: len(jpeg) // 3])
  (bad / 'corrupt.png').write_bytes(b'\x89PNG but not really' + os.urandom(300))
  (bad / 'bomb.png').write_bytes(png_header_only(6000, 6000))
  Image.fromarray(smooth_rgb(20, 20)).save(outside / 'secret.png')
  os.symlink(outside / 'secret.png', bad / 'link.png')
  pwned = tmp / 'PWNED'
  ok_cats = "['normal']"
  write_csv(frames / '30_BAD.csv', [
      ('30_BAD/missing.png', '[]', ok_cats),
      ('30_BAD/empty.png', '[]', ok_cats),
      ('30_BAD/truncated.jpg', '[]', ok_cats),
      ('30_BAD/corrupt.png', '[]', ok_cats),
      ('30_BAD/bomb.png', '[]', ok_cats),
      ('30_BAD/link.png', '[]', ok_cats),
      ('../outside/secret.png', '[]', ok_cats),
      (str(outside / 'secret.png'), '[]', ok_cats),
      ('10_REAL/HRF_04_g.jpg', '[]', f"__import__('os').system('touch {pwned}')"),
      ('10_REAL/HRF_04_g.jpg', '[]', "['glaucoma',"),
      ('10_REAL/HRF_04_g.jpg', '[]', "'glaucoma'"),
      ('10_REAL/HRF_04_g.jpg', '[1, 2]', ok_cats),
      ('10_REAL/HRF_04_g.jpg', '[]', "['glaucomaa']"),
  ], raw_lines=['13,10_REAL/HRF_04_g.jpg,[],[],extra\n', '14,10_REAL/HRF_04_g.jpg\n'])
  options = dict(dataframes_dir=str(frames), data_root=str(root), canvas=CANVAS,
                 image_format='png', max_pixels=10_000_000, max_skipped_fraction=0.6)
  data_dir = tmp / 'tfds'
  report = build_lib.build('fundus_assembly', data_dir, **options)
  return {'tmp': tmp, 'root': root, 'data_dir': data_dir, 'options': options,
          'report': report, 'pwned': pwned, 'modes': modes}


def read_all(report, split='train'):
  source = build_lib.data_source(report, split)
  return {ex['path'].decode(): ex for ex in (source[i] for i in range(len(source)))}


def test_assembly_report_counts_every_bad_kind(assembly):
  report = assembly['report']
  train = report['splits']['train']
  assert {k: v['count'] for k, v in train['reasons'].items()} == EXPECTED_SKIPS
  assert report['kept'] == 13 and report['skipped'] == 15 and report['total'] == 28
  assert report['skipped_fraction'] == pytest.approx(15 / 28)
  reasons = train['reasons']
  assert reasons['empty_file']['paths'] == ['30_BAD/empty.png']
  assert reasons['too_many_pixels']['paths'] == ['30_BAD/bomb.png']
  assert reasons['truncated_image']['paths'] == ['30_BAD/truncated.jpg']
  assert train['unknown_categories'] == {'glaucomaa': 1}
  on_disk = json.loads((open(os.path.join(report['path'], 'build_report.json'))).read())
  assert on_disk['splits'] == report['splits'] and on_disk['kept'] == 13


def test_nothing_is_executed_from_a_csv(assembly):
  assert not assembly['pwned'].exists()
  details = assembly['report']['splits']['train']['reasons']['malformed_list']['details']
  assert any('__import__' in d for d in details)


def test_real_images_are_resized_once_like_flair(assembly, fundus_dir):
  examples = read_all(assembly['report'])
  assert len(examples) == 13
  for name, (cats, attributes) in REAL.items():
    ex = examples[f'10_REAL/{name}']
    src = Image.open(fundus_dir / name)
    rgb = src.convert('RGB')  # FLAIR's conversion.
    h, w = images.fit_size(rgb.height, rgb.width, CANVAS)
    expected = np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR))
    assert ex['image'].dtype == np.uint8 and ex['image'].shape == (h, w, 3)
    assert max(h, w) == CANVAS
    np.testing.assert_array_equal(ex['image'], expected)  # PNG: lossless.
    np.testing.assert_array_equal(ex['original_size'], [src.height, src.width])
    assert ex['dataset'] == b'10_REAL'
    assert [c.decode() for c in ex['categories']] == cats
    assert [a.decode() for a in ex['attributes']] == attributes


def test_awkward_modes_are_converted_not_skipped(assembly):
  examples = read_all(assembly['report'])
  for name, (_, expected_rgb) in assembly['modes'].items():
    ex = examples[f'20_MODES/{name}']
    assert ex['image'].shape == (48, 64, 3)  # 30x40 upscaled, aspect kept.
    if expected_rgb is not None:
      expected = np.asarray(
          Image.fromarray(expected_rgb).resize((64, 48), Image.Resampling.BILINEAR))
      np.testing.assert_array_equal(ex['image'], expected)


def test_rebuild_is_idempotent(assembly, capsys):
  first = assembly['report']
  shard = [f for f in os.listdir(first['path']) if 'array_record' in f][0]
  mtime = os.path.getmtime(os.path.join(first['path'], shard))
  again = build_lib.build('fundus_assembly', assembly['data_dir'], **assembly['options'])
  assert again['reused'] and not first['reused']
  assert again['path'] == first['path'] and again['splits'] == first['splits']
  assert os.path.getmtime(os.path.join(first['path'], shard)) == mtime
  assert 'kept 13 of 28' in capsys.readouterr().out


def test_threshold_failure_raises_and_leaves_no_dataset(assembly):
  options = dict(assembly['options'], datasets=['20_MODES', '30_BAD'])
  with pytest.raises(BuildError, match=r'15 of 21 examples \(71\.43%\).*60\.00%'):
    build_lib.build('fundus_assembly', assembly['data_dir'], **options)
  name = build_lib.make_config('fundus_assembly', **options).name
  config_dir = assembly['data_dir'] / 'fundus_assembly' / name
  assert not (config_dir / '1.0.0').exists()
  failed = json.loads((config_dir / 'build_report.failed.json').read_text())
  assert failed['splits']['train']['kept'] == 6
  # A looser threshold builds the same folder and clears the failed report.
  report = build_lib.build('fundus_assembly', assembly['data_dir'],
                           **dict(options, max_skipped_fraction=0.75))
  assert report['kept'] == 6 and report['path'] == str(config_dir / '1.0.0')
  assert not (config_dir / 'build_report.failed.json').exists()


def test_cli_exit_codes(assembly, capsys):
  args = ['build', 'fundus_assembly', '--data-dir', str(assembly['data_dir']),
          '--dataframes_dir', assembly['options']['dataframes_dir'],
          '--data_root', assembly['options']['data_root'], '--canvas', str(CANVAS),
          '--image_format', 'png', '--max_pixels', '10000000']
  assert cli.main(args + ['--max_skipped_fraction', '0.6']) == 0  # Reused.
  assert 'kept 13 of 28' in capsys.readouterr().out
  assert cli.main(args + ['--datasets', '30_BAD', '--max_skipped_fraction', '0.6']) == 2
  assert 'no example kept' in capsys.readouterr().err
  assert cli.main(args + ['--canvas', '3']) == 2
  with pytest.raises(SystemExit):
    cli.main(['build', 'no_such_set', '--data-dir', 'x'])


def test_classification_labels_from_first_category(assembly):
  frames = assembly['tmp'] / 'frames_downstream'
  frames.mkdir()
  write_csv(frames / 'MINI.csv', [
      ('10_REAL/HRF_04_g.jpg', '[]', "['glaucoma']"),
      ('10_REAL/HRF_07_dr.jpg', '[]', "['diabetic retinopathy']"),
      ('10_REAL/skimage_retina.jpg', '[]', "['normal']"),
      ('10_REAL/flair_normal_sample.png', '[]', "['normal', 'no glaucoma']"),
      ('10_REAL/flair_sample_macular_hole.png', '[]', "['macular hole']"),
      ('top_level.png', '[]', "['glaucoma']")])  # No dataset folder: dataset ''.
  shutil.copy(assembly['root'] / '20_MODES' / 'p.png', assembly['root'] / 'top_level.png')
  targets = {'normal': 0, 'glaucoma': 1, 'diabetic retinopathy': 2}
  report = build_lib.build(
      'fundus_classification', assembly['data_dir'], dataframe=str(frames / 'MINI.csv'),
      data_root=assembly['options']['data_root'], targets=json.dumps(targets),
      canvas=32, max_skipped_fraction=0.25)
  assert report['splits']['test']['reasons']['unknown_target']['count'] == 1
  examples = read_all(report, 'test')
  labels = {p.split('/')[-1]: (int(e['label']), e['label_name'].decode())
            for p, e in examples.items()}
  assert labels == {'HRF_04_g.jpg': (1, 'glaucoma'), 'HRF_07_dr.jpg': (2, 'diabetic retinopathy'),
                    'skimage_retina.jpg': (0, 'normal'), 'flair_normal_sample.png': (0, 'normal'),
                    'top_level.png': (1, 'glaucoma')}
  assert examples['top_level.png']['dataset'] == b''
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  info = tfds.builder_from_directory(report['path']).info
  assert info.features['label'].names == ['normal', 'glaucoma', 'diabetic retinopathy']
  by_name = tfds.data_source(report['tfds_name'], data_dir=str(assembly['data_dir']))
  assert len(by_name['test']) == 5 and isinstance(by_name['test'][0]['label'], int)


@pytest.fixture(scope='module')
def synthetic_set(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('synthetic')
  report = build_lib.build('fundus_synthetic', data_dir, canvas=48, n_train=40, n_test=12, seed=3)
  return data_dir, report


def test_synthetic_schema_as_read_back(synthetic_set):
  data_dir, report = synthetic_set
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sources = tfds.data_source(report['tfds_name'], data_dir=str(data_dir))
  assert len(sources['train']) == 40 and len(sources['test']) == 12
  ex = sources['train'][0]
  assert sorted(ex) == ['attributes', 'categories', 'dataset', 'image', 'original_size', 'path']
  assert ex['image'].dtype == np.uint8 and ex['image'].ndim == 3 and ex['image'].shape[2] == 3
  assert max(ex['image'].shape[:2]) == 48
  assert ex['original_size'].dtype == np.int32 and ex['original_size'].shape == (2,)
  assert isinstance(ex['dataset'], bytes) and isinstance(ex['path'], bytes)
  assert isinstance(ex['categories'], list) and all(isinstance(c, bytes) for c in ex['categories'])
  raw = build_lib.data_source(report, 'train', decode_images=False)[0]
  assert isinstance(raw['image'], bytes) and raw['image'][:4] == b'\x89PNG'


def test_synthetic_set_matches_pure_generator(synthetic_set):
  _, report = synthetic_set
  examples = read_all(report, 'train')
  for path, ex in examples.items():
    index = int(path.split('/')[-1].split('.')[0])
    ref = synthetic.example(3, 'train', index, 40, 48)
    np.testing.assert_array_equal(ex['image'], ref['image'])
    assert ex['dataset'].decode() == ref['dataset'] == path.split('/')[0]
    assert [c.decode() for c in ex['categories']] == ref['categories']
  assert {e['dataset'] for e in examples.values()} == {s.name.encode() for s in synthetic.SOURCES}


def test_synthetic_downstream_is_the_synthetic_test_split(synthetic_set):
  data_dir, report = synthetic_set
  down = build_lib.build('fundus_classification', data_dir, synthetic=True, n_test=12,
                         seed=3, canvas=48, num_workers=2)  # Spawned workers.
  test_split = read_all(report, 'test')
  labelled = read_all(down, 'test')
  assert sorted(labelled) == sorted(test_split)
  for path, ex in labelled.items():
    np.testing.assert_array_equal(ex['image'], test_split[path]['image'])
    name = test_split[path]['categories'][0].decode()
    assert ex['label_name'].decode() == name
    assert int(ex['label']) == fundus_classification.SYNTHETIC_TARGETS[name]


def test_builds_and_reads_without_tensorflow(tmp_path):
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed here; this checks an environment without it')
  report = build_lib.build('fundus_synthetic', tmp_path, canvas=24, n_train=6, n_test=0)
  assert max(build_lib.data_source(report, 'train')[5]['image'].shape[:2]) == 24
  assert 'tensorflow' not in sys.modules


def test_bad_options_are_named():
  with pytest.raises(TypeError, match='no options'):
    build_lib.make_config('fundus_synthetic', canvass=64)
  with pytest.raises(ValueError, match='dataframes_dir'):
    build_lib.make_config('fundus_assembly')
  with pytest.raises(ValueError, match='labels must be'):
    build_lib.make_config('fundus_classification', synthetic=True, targets={'normal': 1})


@pytest.mark.parametrize('written', [
    'normal,glaucoma , diabetic retinopathy',
    '["normal", "glaucoma", "diabetic retinopathy"]',
    '{"glaucoma": 1, "normal": 0, "diabetic retinopathy": 2}',
    ['normal', 'glaucoma', 'diabetic retinopathy'],
    {'diabetic retinopathy': 2, 'normal': 0, 'glaucoma': 1},
    'FILE_LIST', 'FILE_MAP',
])
def test_every_form_of_a_target_map_reads_the_same(written, tmp_path):
  want = {'normal': 0, 'glaucoma': 1, 'diabetic retinopathy': 2}
  if written in ('FILE_LIST', 'FILE_MAP'):
    path = tmp_path / 'targets.json'
    path.write_text(json.dumps(list(want) if written == 'FILE_LIST' else want))
    written = str(path)
  assert targets_lib.parse_targets(written) == want
  assert targets_lib.class_names(targets_lib.parse_targets(written)) == tuple(want)


@pytest.mark.parametrize('written, message', [
    ('', 'expected class names in label order'),
    ({}, 'expected class names in label order'),
    ('missing.json', 'targets file missing.json does not exist'),
    ('{"normal": 0', 'is not valid JSON'),
    ({'normal': 0, 'glaucoma': 2}, r'labels must be 0\.\.1, each once'),
    ({'normal': 'zero'}, 'labels must be integers'),
    ('normal,glaucoma,normal', r"classes \['normal'\] are listed more than once"),
])
def test_a_bad_target_map_is_a_user_error_saying_what_is_wrong(written, message):
  with pytest.raises(targets_lib.TargetsError, match=message):
    targets_lib.parse_targets(written)


def test_dataframe_rows_carry_their_line_and_bad_rows_are_skips(tmp_path):
  path = tmp_path / 'set.csv'
  path.write_text(',image,categories\n'
                  '0,a.png,"[\'normal\']"\n'
                  '1,"b\nc.png","[\'glaucoma\']"\n'  # a quoted cell over two lines
                  '2,d.png\n'
                  '3,e.png,"[1]"\n')
  rows = list(dataframes.read_rows(str(path), ('image', 'categories')))
  assert [line for line, _ in rows] == [2, 4, 5, 6]  # the line each row ends on
  assert rows[1][1]['image'] == 'b\nc.png'
  assert isinstance(rows[2][1], dataframes.Skip) and rows[2][1].reason == 'malformed_row'
  assert dataframes.parse_list(rows[0][1]['categories'], 'categories') == ['normal']
  with pytest.raises(dataframes.Skip, match='not a list of strings'):
    dataframes.parse_list(rows[3][1]['categories'], 'categories')
  assert dataframes.location(str(path), 4) == 'set.csv:4'
  with pytest.raises(ValueError, match=r"columns \['atributes'\] missing"):
    next(dataframes.read_rows(str(path), ('image', 'atributes')))
