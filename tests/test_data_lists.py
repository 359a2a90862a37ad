"""List-file parsing: the originals' frame lists and the CSV/TSV lists."""

import pytest

from dtf_jax.data import lists


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text.encode())
  return str(path)


def test_frame_list_spaces_in_paths_and_missing_final_newline(tmp_path):
  path = write(tmp_path, 'train.txt',
               'Kinetics_frame128/abseiling/abc_000010_000020 299 0\n'
               'some dir/with  two spaces/vid 48 17\n'
               '\n'
               '62090 64 19')
  entries = lists.parse_frame_list(path)
  assert [(e.path, e.num_frames, e.label, e.line) for e in entries] == [
      ('Kinetics_frame128/abseiling/abc_000010_000020', 299, 0, 1),
      ('some dir/with  two spaces/vid', 48, 17, 2),
      ('62090', 64, 19, 4),
  ]


def test_frame_list_crlf(tmp_path):
  path = write(tmp_path, 'l.txt', 'a b 12 3\r\nc 20 101\r\n')
  entries = lists.parse_frame_list(path)
  assert [(e.path, e.num_frames, e.label) for e in entries] == [
      ('a b', 12, 3), ('c', 20, 101)]


def test_legacy_label_parse_drops_last_character(tmp_path):
  text = '100 30 7\nx y 64 12\n62090 64 19'
  path = write(tmp_path, 'l.txt', text)
  legacy = lists.parse_frame_list(path, legacy_label_parse=True)
  robust = lists.parse_frame_list(path)
  assert [e.label for e in robust] == [7, 12, 19]
  # The original reads the final line's label as 1 (SPEC.md 6.7).
  assert [e.label for e in legacy] == [7, 12, 1]
  assert [e.path for e in legacy] == ['100', 'x y', '62090']


def test_legacy_parse_of_single_digit_label_without_newline_fails(tmp_path):
  path = write(tmp_path, 'l.txt', 'a 30 7\nb 30 4')
  with pytest.raises(lists.ListFileError, match=r'l\.txt:2:.*label'):
    lists.parse_frame_list(path, legacy_label_parse=True)


@pytest.mark.parametrize('bad_line,what', [
    ('onlytwo 12', 'expected'),
    ('vid twelve 3', 'num_frames'),
    ('vid 12 x3', 'label'),
    ('vid -1 3', '>= 0'),
])
def test_malformed_frame_list_line_names_file_and_line(tmp_path, bad_line,
                                                       what):
  path = write(tmp_path, 'val list.txt', f'a 30 1\nb 31 2\n{bad_line}\nc 3 4\n')
  with pytest.raises(lists.ListFileError, match=r'val list\.txt:3: .*' + what):
    lists.parse_frame_list(path)


def test_csv_list_with_header_quotes_and_optional_frames(tmp_path):
  path = write(tmp_path, 'train.csv',
               'path,label,num_frames\n'
               'videos/a.mp4,3,120\n'
               '"videos/with, comma.mp4",0,\n'
               '# a comment\n'
               'videos/b c.webm,7')
  entries = lists.parse_csv_list(path)
  assert [(e.path, e.label, e.num_frames, e.line) for e in entries] == [
      ('videos/a.mp4', 3, 120, 2), ('videos/with, comma.mp4', 0, None, 3),
      ('videos/b c.webm', 7, None, 5)]


def test_tsv_list(tmp_path):
  path = write(tmp_path, 'val.tsv', 'a,b.mp4\t2\nc.mkv\t5\t33\n')
  entries = lists.parse_list(path)
  assert [(e.path, e.label, e.num_frames) for e in entries] == [
      ('a,b.mp4', 2, None), ('c.mkv', 5, 33)]


@pytest.mark.parametrize('bad_line,what', [
    ('x.mp4', 'expected'),
    ('x.mp4,1,2,3', 'expected'),
    ('x.mp4,one', 'label'),
    ('x.mp4,1,many', 'num_frames'),
])
def test_malformed_csv_line_names_file_and_line(tmp_path, bad_line, what):
  path = write(tmp_path, 'l.csv', f'a.mp4,1\n{bad_line}\n')
  with pytest.raises(lists.ListFileError, match=r'l\.csv:2: .*' + what):
    lists.parse_csv_list(path)


def test_empty_and_missing_lists(tmp_path):
  with pytest.raises(lists.ListFileError, match='no entries'):
    lists.parse_list(write(tmp_path, 'e.csv', '\n\n'))
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    lists.parse_list(str(tmp_path / 'nope.txt'))


def test_csv_round_trip(tmp_path):
  entries = [lists.VideoEntry('a b/c,d.mp4', 3, 16),
             lists.VideoEntry('e.mp4', 0, None)]
  path = str(tmp_path / 'x.csv')
  lists.write_csv_list(path, entries)
  back = lists.parse_list(path)
  assert [(e.path, e.label, e.num_frames) for e in back] == [
      (e.path, e.label, e.num_frames) for e in entries]
