"""List files that name the videos of a split.

Two formats are understood:

* **Frame list** (the originals' format, SPEC.md 6.2), one video per line::

      <relative path> <num_frames> <label>

  The path may contain spaces: the last two space-separated fields are split
  off and the rest (re-joined with single spaces) is the path. Blank lines are
  skipped; the last line may lack its newline. With ``legacy_label_parse`` the
  label is read as the original did (SPEC.md 7.14): the last character of the
  line is dropped before parsing, so a final line without a newline loses the
  last digit of its label (``62090 64 19`` -> label 1).

* **CSV/TSV list** for video files: ``path,label[,num_frames]`` (comma; or tab
  for ``.tsv`` files), parsed with Python's ``csv`` module so quoted paths may
  contain the delimiter. An optional header row whose first field is ``path``
  is skipped, as are blank lines and lines starting with ``#``.

A malformed line raises :class:`ListFileError` naming ``file:line``.
"""

from __future__ import annotations

import csv
import dataclasses
import os


class ListFileError(ValueError):
  """A list file has a line that cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One video named by a list file.

  Attributes:
    path: path relative to the dataset root (or absolute).
    label: integer class label.
    num_frames: number of frames, or ``None`` when the list does not say (the
      decoder then counts them).
    line: 1-based line number in the list file (for error messages).
  """
  path: str
  label: int
  num_frames: int | None
  line: int = 0


def _parse_int(text: str, what: str, list_path: str, line_no: int,
               line: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ListFileError(
        f'{list_path}:{line_no}: cannot parse {what} {text!r} as an integer in '
        f'line {line!r}; expected "<relative path> <num_frames> <label>" '
        '(frame list) or "path,label[,num_frames]" (CSV list).') from None


def parse_frame_list(list_path: str, *, legacy_label_parse: bool = False
                     ) -> list[VideoEntry]:
  """Parses a list in the originals' ``<path> <num_frames> <label>`` format.

  Args:
    list_path: the list file.
    legacy_label_parse: reproduce the original's parse, which drops the last
      character of every line (assumed to be a newline) before reading the
      label (SPEC.md 6.7 / 7.14).

  Returns:
    The entries in file order.

  Raises:
    ListFileError: a line has fewer than three fields, a non-integer frame count
      or label, or a negative frame count / label; the message names
      ``file:line``.
  """
  entries = []
  with open(list_path, encoding='utf-8') as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      if legacy_label_parse:
        # The original splits the raw line on ' ' and drops the last character
        # of the label field, newline or not.
        fields = raw.split(' ')
        if len(fields) < 3:
          raise ListFileError(
              f'{list_path}:{line_no}: expected "<relative path> <num_frames> '
              f'<label>", got {raw!r}')
        label_text = fields[-1][:-1]
        frames_text = fields[-2]
        path = ' '.join(fields[:-2])
      else:
        # Split off the last two whitespace-separated fields; the rest
        # (internal spaces preserved) is the path.
        fields = raw.strip().rsplit(None, 2)
        if len(fields) < 3:
          raise ListFileError(
              f'{list_path}:{line_no}: expected "<relative path> <num_frames> '
              f'<label>" (space separated; the path may contain spaces), got '
              f'{raw!r}')
        label_text = fields[-1]
        frames_text = fields[-2]
        path = ' '.join(fields[:-2])
      if not path:
        raise ListFileError(f'{list_path}:{line_no}: empty path in {raw!r}')
      num_frames = _parse_int(frames_text, 'num_frames', list_path, line_no,
                              raw)
      label = _parse_int(label_text, 'label', list_path, line_no, raw)
      if num_frames < 0 or label < 0:
        raise ListFileError(
            f'{list_path}:{line_no}: num_frames and label must be >= 0, got '
            f'num_frames={num_frames}, label={label} in {raw!r}')
      entries.append(VideoEntry(path, label, num_frames, line_no))
  if not entries:
    raise ListFileError(f'{list_path}: the list file has no entries.')
  return entries


def parse_csv_list(list_path: str, *, delimiter: str | None = None
                   ) -> list[VideoEntry]:
  """Parses a ``path,label[,num_frames]`` list (CSV, or TSV for ``.tsv``).

  Args:
    list_path: the list file.
    delimiter: field delimiter; default tab for ``.tsv`` files, else comma.

  Returns:
    The entries in file order (``num_frames`` is ``None`` where absent).

  Raises:
    ListFileError: wrong field count or non-integer fields, naming
      ``file:line``.
  """
  if delimiter is None:
    delimiter = '\t' if list_path.lower().endswith('.tsv') else ','
  entries = []
  with open(list_path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter=delimiter)
    for row in reader:
      line_no = reader.line_num
      if not row or all(not x.strip() for x in row):
        continue
      if row[0].lstrip().startswith('#'):
        continue
      if not entries and row[0].strip().lower() == 'path':
        continue  # header row
      if len(row) not in (2, 3):
        raise ListFileError(
            f'{list_path}:{line_no}: expected "path{delimiter}label'
            f'[{delimiter}num_frames]", got {len(row)} fields: {row!r}')
      path = row[0].strip()
      if not path:
        raise ListFileError(f'{list_path}:{line_no}: empty path in {row!r}')
      label = _parse_int(row[1].strip(), 'label', list_path, line_no,
                         delimiter.join(row))
      num_frames = None
      if len(row) == 3 and row[2].strip():
        num_frames = _parse_int(row[2].strip(), 'num_frames', list_path,
                                line_no, delimiter.join(row))
      if label < 0 or (num_frames is not None and num_frames < 0):
        raise ListFileError(
            f'{list_path}:{line_no}: label and num_frames must be >= 0, got '
            f'{row!r}')
      entries.append(VideoEntry(path, label, num_frames, line_no))
  if not entries:
    raise ListFileError(f'{list_path}: the list file has no entries.')
  return entries


def is_csv_list(list_path: str) -> bool:
  """Whether a list path names a CSV/TSV list (by extension)."""
  return os.path.splitext(list_path)[1].lower() in ('.csv', '.tsv')


def parse_list(list_path: str, *, legacy_label_parse: bool = False
               ) -> list[VideoEntry]:
  """Parses a list file, choosing the format by extension (.csv/.tsv = CSV)."""
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f'list file {list_path!r} does not exist.')
  if is_csv_list(list_path):
    return parse_csv_list(list_path)
  return parse_frame_list(list_path, legacy_label_parse=legacy_label_parse)


def write_csv_list(list_path: str, entries) -> None:
  """Writes ``path,label,num_frames`` rows (``num_frames`` may be None)."""
  with open(list_path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'label', 'num_frames'])
    for e in entries:
      writer.writerow([e.path, e.label,
                       '' if e.num_frames is None else e.num_frames])
