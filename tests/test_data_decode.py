"""Decoding videos the tests encode with PyAV, and frame folders."""

import os

import numpy as np
import pytest
from PIL import Image

from dtf_jax.data import check_videos
from dtf_jax.data import decode
from dtf_jax.data.encode import write_video


def numbered_frames(n, h, w, seed=0):
  """Frames whose top half encodes the frame number (robust to compression).

  Frame k has R = 8 * (k % 32) + 4 and G = 8 * (k // 32) + 4 in its top half;
  the bottom half is random texture.
  """
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (n, h, w, 3)).astype(np.uint8)
  for k in range(n):
    frames[k, :h // 2, :, 0] = 8 * (k % 32) + 4
    frames[k, :h // 2, :, 1] = 8 * (k // 32) + 4
    frames[k, :h // 2, :, 2] = 128
  return frames


def frame_numbers(frames):
  """Inverse of numbered_frames on decoded frames."""
  h = frames.shape[1]
  top = frames[:, 1:h // 2 - 1, 1:-1].reshape(len(frames), -1, 3)
  r = np.median(top[..., 0], axis=1)
  g = np.median(top[..., 1], axis=1)
  return (np.round((r - 4) / 8) + 32 * np.round((g - 4) / 8)).astype(int)


LOSSLESS = {'qp': '0'}


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  d = tmp_path_factory.mktemp('videos')
  out = {}
  # Constant frame rate, GOP 8 so reads must seek past several keyframes.
  out['mp4'] = str(d / 'a.mp4')
  write_video(out['mp4'], numbered_frames(70, 32, 48), gop_size=8,
              pix_fmt='yuv444p', options=LOSSLESS)
  # Odd frame size (yuv444p allows it with libx264).
  out['odd'] = str(d / 'odd size.mp4')
  write_video(out['odd'], numbered_frames(20, 33, 47, 1), gop_size=5,
              pix_fmt='yuv444p', options=LOSSLESS)
  # Variable frame rate: irregular presentation times.
  rng = np.random.default_rng(2)
  pts = np.concatenate([[0], np.cumsum(rng.integers(7, 90, 39))])
  out['vfr'] = str(d / 'vfr.mp4')
  write_video(out['vfr'], numbered_frames(40, 32, 32, 2), gop_size=6,
              pix_fmt='yuv444p', options=LOSSLESS, pts_ms=pts)
  out['three'] = str(d / 'three.mp4')
  write_video(out['three'], numbered_frames(3, 32, 32, 3), pix_fmt='yuv444p',
              options=LOSSLESS)
  out['webm'] = str(d / 'a.webm')
  write_video(out['webm'], numbered_frames(30, 32, 32, 4), codec='libvpx-vp9',
              gop_size=10, options={'lossless': '1'}, pix_fmt='yuv444p')
  out['mkv'] = str(d / 'a.mkv')
  write_video(out['mkv'], numbered_frames(30, 32, 32, 5), gop_size=7,
              pix_fmt='yuv444p', options=LOSSLESS)
  out['avi'] = str(d / 'a.avi')
  write_video(out['avi'], numbered_frames(30, 32, 32, 6), codec='mjpeg',
              pix_fmt='yuvj444p', options={'q:v': '1', 'qmin': '1'})
  # Broken files.
  data = open(out['mp4'], 'rb').read()
  out['truncated'] = str(d / 'truncated.mp4')
  with open(out['truncated'], 'wb') as f:
    f.write(data[:len(data) * 6 // 10])
  mkv = open(out['mkv'], 'rb').read()
  out['truncated_mkv'] = str(d / 'truncated.mkv')
  with open(out['truncated_mkv'], 'wb') as f:
    f.write(mkv[:len(mkv) // 2])
  out['random'] = str(d / 'random.mp4')
  with open(out['random'], 'wb') as f:
    f.write(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
  return out


@pytest.mark.parametrize('name,count', [('mp4', 70), ('odd', 20), ('vfr', 40),
                                        ('three', 3), ('webm', 30),
                                        ('mkv', 30), ('avi', 30)])
def test_reads_exactly_the_requested_frames(videos, name, count):
  assert decode.count_video_frames(videos[name]) == count
  rng = np.random.default_rng(count)
  for indices in ([0], [count - 1], list(range(count)),
                  sorted(rng.choice(count, min(count, 6), replace=False)),
                  [count - 1, 0, 1, 1, count // 2]):
    frames = decode.read_video_frames(videos[name], lambda d: np.array(indices))
    assert frames.dtype == np.uint8 and frames.shape[0] == len(indices)
    np.testing.assert_array_equal(frame_numbers(frames), indices)


def test_odd_size_is_kept(videos):
  frames = decode.read_video_frames(videos['odd'], lambda d: np.arange(d))
  assert frames.shape == (20, 33, 47, 3)


def test_frame_count_passed_to_the_sampler(videos):
  seen = []
  def fn(d):
    seen.append(d)
    return np.arange(0, d, 10)
  frames = decode.read_video_frames(videos['vfr'], fn)
  assert seen == [40]
  np.testing.assert_array_equal(frame_numbers(frames), np.arange(0, 40, 10))
  # A list's num_frames is what the sampler sees.
  decode.read_video_frames(videos['vfr'], fn, num_frames=35)
  assert seen[-1] == 35


def test_seeking_decodes_fewer_frames_than_sequential(videos, monkeypatch):
  """Reading frames 60..63 of a GOP-8 video must not decode from the start."""
  calls = {'frames': 0}
  original = decode._to_rgb
  decoded = []
  import av  # pylint: disable=import-outside-toplevel
  real_decode = av.container.InputContainer.decode

  def counting_decode(self, *args, **kwargs):
    for frame in real_decode(self, *args, **kwargs):
      decoded.append(frame.pts)
      yield frame

  monkeypatch.setattr(av.container.InputContainer, 'decode', counting_decode)
  def counting(frame):
    calls['frames'] += 1
    return original(frame)
  monkeypatch.setattr(decode, '_to_rgb', counting)
  frames = decode.read_video_frames(videos['mp4'],
                                    lambda d: np.arange(60, 64))
  np.testing.assert_array_equal(frame_numbers(frames), np.arange(60, 64))
  assert calls['frames'] == 4  # only the sampled frames are converted
  assert 4 <= len(decoded) <= 8  # from the keyframe at 56, not frame 0
  # Far-apart frames: seek again rather than decode everything in between.
  decoded.clear()
  frames = decode.read_video_frames(videos['mp4'], lambda d: [2, 61])
  np.testing.assert_array_equal(frame_numbers(frames), [2, 61])
  assert len(decoded) <= 3 + 6


@pytest.mark.parametrize('name', ['truncated', 'random'])
def test_broken_files_raise_bad_video_error(videos, name):
  with pytest.raises(decode.BadVideoError, match=os.path.basename(videos[name])):
    decode.read_video_frames(videos[name], lambda d: np.arange(4))


def test_truncated_streamable_file_fails_only_past_the_cut(videos):
  path = videos['truncated_mkv']
  frames = decode.read_video_frames(path, lambda d: np.arange(3))
  np.testing.assert_array_equal(frame_numbers(frames), [0, 1, 2])
  with pytest.raises(decode.BadVideoError):
    decode.read_video_frames(path, lambda d: np.array([0, 29]), num_frames=30)


def test_missing_file(tmp_path):
  with pytest.raises(decode.BadVideoError, match='does not exist'):
    decode.read_video_frames(str(tmp_path / 'nope.mp4'), lambda d: [0])


def test_frame_folders(tmp_path):
  frames = numbered_frames(6, 20, 30, 7)
  folder = tmp_path / 'my video'
  folder.mkdir()
  for k, f in enumerate(frames):
    Image.fromarray(f).save(folder / f'{k + 1:05d}.png')
  got = decode.read_image_frames(str(folder), '%05d.png', [5, 0, 0, 3])
  np.testing.assert_array_equal(got, frames[[5, 0, 0, 3]])
  (folder / '00004.png').unlink()
  with pytest.raises(decode.BadVideoError, match='00004.png'):
    decode.read_image_frames(str(folder), '%05d.png', [3])
  (folder / '00005.png').write_bytes(b'not a png')
  with pytest.raises(decode.BadVideoError, match='00005.png'):
    decode.read_image_frames(str(folder), '%05d.png', [4])


def test_check_videos_cli(videos, tmp_path, capsys):
  root = os.path.dirname(videos['mp4'])
  lst = tmp_path / 'list.csv'
  lst.write_text('a.mp4,0\nodd size.mp4,1\nthree.mp4,2\ntruncated.mp4,3\n'
                 'random.mp4,4\nmissing.mp4,5\na.mkv,6,31\n')
  code = check_videos.main([str(lst), '--root', root, '--clip-length', '16'])
  out, err = capsys.readouterr()
  assert code == 1
  bad = {line.split('\t')[1]: line.split('\t')[2] for line in out.splitlines()}
  assert set(bad) == {'three.mp4', 'truncated.mp4', 'random.mp4',
                      'missing.mp4', 'a.mkv'}
  assert 'too short' in bad['three.mp4']
  assert 'does not exist' in bad['missing.mp4']
  assert '31' in bad['a.mkv']
  assert 'checked 7/7' in err and 'ETA' in err
  assert check_videos.main([str(lst), '--root', root, '--clip-length', '2',
                            '--decode-all']) == 1
  lst.write_text('a.mp4,0\nodd size.mp4,1\n')
  assert check_videos.main([str(lst), '--root', root]) == 0


def test_check_videos_frame_list(tmp_path, capsys):
  for name, n in (('v one', 4), ('v2', 2)):
    (tmp_path / name).mkdir()
    for k in range(n):
      Image.fromarray(numbered_frames(1, 8, 8)[0]).save(
          tmp_path / name / f'{k + 1:05d}.jpg')
  lst = tmp_path / 'l.txt'
  lst.write_text('v one 4 0\nv2 3 1\nv3 4 2')
  assert check_videos.main([str(lst), '--root', str(tmp_path),
                            '--clip-length', '3']) == 1
  out = capsys.readouterr().out
  assert [line.split('\t')[:2] for line in out.splitlines()] == [
      ['2', 'v2'], ['3', 'v3']]
  assert 'missing' in out and 'does not exist' in out
