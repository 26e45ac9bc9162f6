"""Image helpers against independent references: mode conversions by NumPy,
the canvas resize by torchvision (PyTorch FLAIR's own resize), Li's threshold
by a direct float implementation, and every kind of bad file."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images

RNG = np.random.default_rng(0)


def png_bytes(img):
  buf = io.BytesIO()
  img.save(buf, format='PNG')
  return buf.getvalue()


def converted(img):
  return np.asarray(images.to_rgb(img))


def test_greyscale_is_replicated():
  grey = RNG.integers(0, 256, (7, 5), dtype=np.uint8)
  np.testing.assert_array_equal(converted(Image.fromarray(grey, 'L')),
                                np.repeat(grey[..., None], 3, -1))


def test_alpha_is_dropped_not_composited():
  rgba = RNG.integers(0, 256, (7, 5, 4), dtype=np.uint8)
  np.testing.assert_array_equal(converted(Image.fromarray(rgba, 'RGBA')), rgba[..., :3])
  la = RNG.integers(0, 256, (7, 5, 2), dtype=np.uint8)
  np.testing.assert_array_equal(converted(Image.fromarray(la, 'LA')),
                                np.repeat(la[..., :1], 3, -1))


@pytest.mark.parametrize('mode', ['P', 'PA'])
def test_palette_is_looked_up(mode):
  palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
  index = RNG.integers(0, 256, (7, 5), dtype=np.uint8)
  img = Image.fromarray(index, 'P')
  img.putpalette(palette.ravel().tolist())
  if mode == 'PA':
    img = img.convert('PA')
    img.putalpha(Image.fromarray(RNG.integers(0, 256, (7, 5), dtype=np.uint8), 'L'))
  np.testing.assert_array_equal(converted(img), palette[index])


def test_sixteen_bit_is_scaled_not_clipped():
  v = np.array([[0, 1, 128, 129, 256, 32767], [32768, 40000, 65279, 65280, 65534, 65535]],
               np.uint16)
  expected = np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)
  reopened = Image.open(io.BytesIO(png_bytes(Image.fromarray(v))))
  assert reopened.mode.startswith('I')  # A real 16-bit PNG.
  np.testing.assert_array_equal(converted(reopened)[..., 0], expected)
  np.testing.assert_array_equal(converted(reopened)[..., 2], expected)
  wide = Image.fromarray(np.array([[-5, 70000, 65535]], np.int32), 'I')
  np.testing.assert_array_equal(converted(wide)[0, :, 1], [0, 255, 255])


def test_cmyk_follows_subtractive_formula():
  cmyk = RNG.integers(0, 256, (7, 5, 4), dtype=np.uint8).astype(np.float64)
  expected = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
  got = converted(Image.fromarray(cmyk.astype(np.uint8), 'CMYK'))
  assert np.abs(got - expected).max() <= 1.0


def test_bilevel_maps_to_0_and_255():
  bits = RNG.integers(0, 2, (7, 5)).astype(bool)
  np.testing.assert_array_equal(converted(Image.fromarray(bits))[..., 0], bits * 255)


@pytest.mark.parametrize('h, w, canvas, expected', [
    (2336, 3504, 512, (341, 512)), (3504, 2336, 512, (512, 341)),
    (1411, 1411, 512, (512, 512)), (102, 102, 512, (512, 512)),
    (683, 1024, 64, (42, 64)), (3, 1000, 64, (1, 64)), (772, 796, 512, (496, 512))])
def test_fit_size_keeps_aspect_with_longest_side_on_canvas(h, w, canvas, expected):
  assert images.fit_size(h, w, canvas) == expected


@pytest.mark.parametrize('name, canvas', [
    ('flair_severe_nonprol_dr.jpg', 64), ('skimage_retina.jpg', 97),
    ('flair_sample_macular_hole.png', 128)])
def test_resize_matches_torchvision_antialiased_resize(fundus_dir, name, canvas):
  torch = pytest.importorskip('torch')
  from torchvision.transforms import Resize  # pylint: disable=g-import-not-at-top
  img = Image.open(fundus_dir / name).convert('RGB')
  ours = np.asarray(images.resize_longest(img, canvas)).astype(np.float64)
  # PyTorch FLAIR: float in [0, 1], scale factor from the longest side.
  x = torch.tensor(np.asarray(img, np.float32) / 255).permute(2, 0, 1)
  scale = max(x.shape[-2:]) / canvas
  size = (canvas, canvas) if x.shape[-1] == x.shape[-2] else (
      int(x.shape[-2] / scale), int(x.shape[-1] / scale))
  ref = Resize(size, antialias=True)(x).permute(1, 2, 0).numpy() * 255
  assert ours.shape == ref.shape
  assert max(ours.shape[:2]) == canvas
  assert np.abs(ours - ref).max() <= 1.0  # uint8 rounding only.


def li_reference(values):
  """Li's iterative minimum cross-entropy threshold on float pixels."""
  x = values.astype(np.float64).ravel() / 255
  lo = x.min()
  x = x - lo
  tolerance = np.min(np.diff(np.unique(x))) / 2
  t_next, t_curr = x.mean(), -2 * tolerance
  while abs(t_next - t_curr) > tolerance:
    t_curr = t_next
    fore = x > t_curr
    mean_f, mean_b = x[fore].mean(), x[~fore].mean()
    if mean_b == 0:
      break
    t_next = (mean_b - mean_f) / (np.log(mean_b) - np.log(mean_f))
  return (t_next + lo) * 255


def test_li_threshold_matches_float_iteration(fundus_dir):
  red = np.asarray(Image.open(fundus_dir / 'skimage_retina.jpg').convert('RGB'))[::4, ::4, 0]
  bimodal = np.concatenate([RNG.normal(30, 8, 3000), RNG.normal(170, 25, 5000)])
  for values in (red, np.clip(bimodal, 0, 255).astype(np.uint8),
                 np.array([3, 3, 3, 200], np.uint8)):
    assert images.li_threshold(values) == pytest.approx(li_reference(values), abs=1e-9)


def test_foreground_box_is_largest_eight_connected_bright_component():
  img = np.zeros((60, 80, 3), np.uint8)
  yy, xx = np.mgrid[:60, :80]
  img[(yy - 30) ** 2 + (xx - 35) ** 2 <= 20 ** 2] = (200, 90, 40)  # FOV.
  img[2:6, 70:76] = 255  # A brighter but smaller blob.
  # A diagonal chain touching the FOV only by a corner (at (44, 49)) belongs
  # to it under 8-connectivity (skimage's default in FLAIR's crop).
  for k in range(10):
    img[45 + k, 50 + k] = (200, 90, 40)
  assert images.foreground_box(img) == (10, 55, 15, 60)
  assert images.foreground_box(np.zeros((5, 5, 3), np.uint8)) is None


def test_crop_then_resize_of_real_fundus(fundus_dir):
  path = fundus_dir / 'flair_severe_nonprol_dr.jpg'
  red = np.asarray(Image.open(path).convert('RGB'))[..., 0]
  top, bottom, left, right = images.foreground_box(np.stack([red] * 3, -1))
  # Independent: the bounding box of pixels clearly above the black border.
  rows, cols = np.flatnonzero((red > 25).any(1)), np.flatnonzero((red > 25).any(0))
  np.testing.assert_allclose([top, bottom, left, right],
                             [rows[0], rows[-1] + 1, cols[0], cols[-1] + 1], atol=4)
  out = images.prepare(str(path), 64, crop=True)
  assert out.original_size == (683, 1024)
  assert right - left < 1024 - 100  # The black side bands are gone.
  assert images.decode(out.encoded).shape[:2] == images.fit_size(bottom - top, right - left, 64)


def test_jpeg_draft_stays_close_to_full_decode(fundus_dir):
  path = str(fundus_dir / 'HRF_07_dr.jpg')
  full = images.decode(images.prepare(path, 128).encoded).astype(float)
  draft = images.decode(images.prepare(path, 128, jpeg_draft=True).encoded).astype(float)
  assert full.shape == draft.shape == (85, 128, 3)
  assert np.abs(full - draft).mean() < 2.0


def test_png_round_trip_is_exact_and_jpeg_close():
  yy, xx = np.mgrid[:72, :104]
  smooth = np.stack([2 * xx, 3 * yy, xx + yy], -1).astype(np.uint8)
  img = Image.fromarray(smooth)
  np.testing.assert_array_equal(images.decode(images.encode(img, 'png')), smooth)
  jpeg = images.decode(images.encode(img, 'jpeg', 95)).astype(float)
  assert np.abs(jpeg - smooth).mean() < 1.5
  with pytest.raises(ValueError, match='image_format'):
    images.encode(img, 'webp')


def png_header_only(width, height):
  """A PNG whose header claims width x height but holds almost no data."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
          + chunk(b'IDAT', zlib.compress(b'\x00' * 64)) + chunk(b'IEND', b''))


def reason(source, **kw):
  with pytest.raises(images.ImageError) as info:
    images.prepare(source, 32, **kw)
  return info.value.reason


def test_bad_files_map_to_reasons(tmp_path, fundus_dir):
  jpeg = (fundus_dir / 'flair_severe_nonprol_dr.jpg').read_bytes()
  png = (fundus_dir / 'flair_normal_sample.png').read_bytes()
  (tmp_path / 'empty.png').write_bytes(b'')
  (tmp_path / 'folder.png').mkdir()
  assert reason(str(tmp_path / 'absent.png')) == 'missing_file'
  assert reason(str(tmp_path / 'empty.png')) == 'empty_file'
  assert reason(str(tmp_path / 'folder.png')) in ('unreadable_file', 'corrupt_image')
  assert reason(jpeg[: len(jpeg) // 2]) == 'truncated_image'
  assert reason(png[: len(png) // 2]) == 'truncated_image'
  assert reason(b'GIF89a not really' + bytes(range(256))) == 'corrupt_image'
  assert reason(bytes(RNG.integers(0, 256, 5000, dtype=np.uint8))) == 'corrupt_image'


def test_pixel_limit_refuses_from_header_without_decoding():
  bomb = png_header_only(6000, 6000)  # 36 Mpx claimed, 64 bytes of data.
  assert reason(bomb, max_pixels=10_000_000) == 'too_many_pixels'
  # Decoding it would have failed differently, which shows it was not decoded.
  assert reason(bomb, max_pixels=40_000_000) == 'truncated_image'
  # Past PIL's own bomb limit, PIL refuses in open(); same reason.
  assert reason(png_header_only(20000, 20000), max_pixels=10**10) == 'too_many_pixels'


def test_stored_canvas_reads_arrays_png_and_jpeg_and_refuses_another_canvas():
  canvas = 16
  image = np.random.default_rng(1).integers(0, 256, (canvas, 9, 3), dtype=np.uint8)
  expected = np.zeros((canvas, canvas, 3), np.uint8)
  expected[:, :9] = image
  np.testing.assert_array_equal(images.stored_canvas(image, canvas), expected)
  np.testing.assert_array_equal(images.stored_canvas(png_bytes(Image.fromarray(image)), canvas),
                                expected)
  jpeg = images.encode(Image.fromarray(image), 'jpeg')
  decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB'))
  np.testing.assert_array_equal(images.stored_canvas(jpeg, canvas)[:, :9], decoded)
  with pytest.raises(ValueError, match='canvas is 32'):
    images.stored_canvas(image, 32)


def test_stored_canvas_into_a_used_buffer_overwrites_pixels_and_padding():
  canvas = 16
  rng = np.random.default_rng(2)
  rows_bcc3 = np.full((3, canvas, canvas, 3), 255, np.uint8)  # a batch slot's stale pixels
  for row, shape in enumerate([(canvas, 9, 3), (5, canvas, 3), (canvas, canvas, 3)]):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    for stored in (image, png_bytes(Image.fromarray(image))):
      out = images.stored_canvas(stored, canvas, out=rows_bcc3[row])
      assert np.shares_memory(out, rows_bcc3[row])
      np.testing.assert_array_equal(rows_bcc3[row], images.stored_canvas(image, canvas))
  with pytest.raises(ValueError, match='expected uint8 \\[16, 16, 3\\]'):
    images.stored_canvas(image, canvas, out=np.zeros((canvas, canvas + 1, 3), np.uint8))
  with pytest.raises(ValueError, match='canvas is 32'):
    images.stored_canvas(image, 32, out=np.zeros((32, 32, 3), np.uint8))


def test_array_to_rgb_repeats_greyscale_and_drops_alpha():
  grey = RNG.integers(0, 256, (7, 5), dtype=np.uint8)
  np.testing.assert_array_equal(images.to_rgb(grey), np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(images.to_rgb(grey[..., None]), np.repeat(grey[..., None], 3, -1))
  rgba = RNG.integers(0, 256, (7, 5, 4), dtype=np.uint8)
  np.testing.assert_array_equal(images.to_rgb(rgba), rgba[..., :3])
  with pytest.raises(ValueError, match='channels'):
    images.to_rgb(np.zeros((4, 4, 2), np.uint8))


def test_flair_size_is_float_division_and_fit_size_exact():
  # FLAIR's int(side / (longest / canvas)) in floats: 116 / (116 / 224) and
  # 35 / (56 / 24) fall just below 224 and 15; exact integers do not.
  assert images.flair_size(116, 116, 224) == (223, 223)
  assert images.fit_size(116, 116, 224) == (224, 224)
  assert images.flair_size(35, 56, 24) == (14, 24)
  assert images.fit_size(35, 56, 24) == (15, 24)  # 35 * 24 // 56 = 15
