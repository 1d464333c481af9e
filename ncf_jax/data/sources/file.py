"""Source `file`: any implicit-feedback interactions file (CSV/TSV/other delimiter, Parquet).

config.dataset.name='file' reads `dataset.path` (docs/data.md, "Your own data"). Each row
is one (user, item) interaction, optionally with a timestamp and a rating. Ids may be
integers or arbitrary strings; they are relabelled to the sorted unique values (integers
numerically, strings by code point), so integer ids give the same dense ids as the
GroupLens reader. A repeated (user, item) pair counts once (its latest row). The MLPerf
preprocessing then filters, splits and caches the data exactly as for MovieLens.

Without a timestamp column the test item of a user is a keyed pseudo-random choice
(`holdout='seeded'`: the largest hash of (HOLDOUT_SEED, user, item) over the user's
items, independent of the row order), or its last row (`holdout='last_row'`).

format='ncf_paper' reads the NCF paper's released splits (`<path>.train.rating`,
`.test.rating`, `.test.negative`): the test items and the 99 fixed negatives per user
come from the files (`Dataset.test_negatives`).
"""

import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ncf_jax.data import cache
from ncf_jax.data.dataset import Interactions
from ncf_jax.data.sources import base
from ncf_jax.errors import UserError

NAME = 'file'
FORMATS = ('auto', 'csv', 'tsv', 'parquet', 'ncf_paper')
HOLDOUTS = ('seeded', 'last_row')
# Seed of the keyed choice of the test (and validation) item of a file without timestamps.
HOLDOUT_SEED = 0
# Header names recognised (case-insensitively) when a *_col field is ''.
KNOWN_NAMES = {
  'user': ('user', 'user_id', 'userid', 'uid'),
  'item': ('item', 'item_id', 'itemid', 'movieid', 'iid'),
  'time': ('timestamp', 'time', 'ts'),
  'rating': ('rating', 'weight', 'score'),
}
_FIELD = {'user': 'user_col', 'item': 'item_col', 'time': 'time_col', 'rating': 'rating_col'}
# Delimiters tried, in this order, on the first line of a text file.
_DELIMITERS = (('::', "'::'"), ('\t', 'tabs'), (',', "','"), (';', "';'"), ('|', "'|'"))
_PAPER_SUFFIXES = ('.train.rating', '.test.rating', '.test.negative')


def _column_setting(cfg, field: str) -> str | int | None:
  value = getattr(cfg, field, '')
  if value is None or value == '':
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
    return int(value)
  if isinstance(value, str):
    return int(value) if value.strip().isdigit() else value
  raise UserError(
    f'config.dataset.{field}={value!r} is invalid: use a header name, a 0-based column '
    "position, or '' to recognise it from the header."
  )


class FileSource(base.Source):
  """Interactions read from `config.dataset.path` (identity: the file's SHA-256)."""

  names = (NAME,)

  def __init__(self, settings: base.Settings, cfg=None):
    super().__init__(settings)
    path = getattr(cfg, 'path', '') or ''
    self.path = os.path.abspath(os.path.expanduser(path))
    self.format = getattr(cfg, 'format', 'auto')
    self.columns = {k: _column_setting(cfg, f) for k, f in _FIELD.items()}
    self.threshold = getattr(cfg, 'implicit_threshold', None)
    self.holdout = getattr(cfg, 'holdout', 'seeded')
    self.labels: tuple[list, list] | None = None  # (user labels, item labels) of the last read

  @classmethod
  def from_config(cls, cfg, settings: base.Settings, select) -> 'FileSource':
    del select
    if not getattr(cfg, 'path', ''):
      raise UserError(
        "config.dataset.path is empty: with config.dataset.name='file' set it to your "
        'interactions file (or, with format=ncf_paper, the prefix of the .train.rating files).'
      )
    fmt = getattr(cfg, 'format', 'auto')
    if fmt not in FORMATS:
      raise UserError(f'config.dataset.format={fmt!r} is invalid: use one of {", ".join(FORMATS)}.')
    holdout = getattr(cfg, 'holdout', 'seeded')
    if holdout not in HOLDOUTS:
      raise UserError(
        f'config.dataset.holdout={holdout!r} is invalid: use one of {", ".join(HOLDOUTS)}.'
      )
    threshold = getattr(cfg, 'implicit_threshold', None)
    if threshold is not None and (
      isinstance(threshold, bool)
      or not isinstance(threshold, (int, float, np.integer, np.floating))
      or not np.isfinite(threshold)
    ):
      raise UserError(
        f'config.dataset.implicit_threshold={threshold!r} is invalid: use a number (rows '
        'with rating >= it are kept) or None (every row is kept).'
      )
    return cls(settings, cfg)

  def files(self) -> list[str]:
    """The input files: the one file, or the paper's three."""
    if self.format == 'ncf_paper':
      return [self.path + s for s in _PAPER_SUFFIXES]
    return [self.path]

  def cache_params(self) -> dict[str, Any]:
    return {
      'source': NAME,
      'path': self.path,
      'format': self.format,
      'columns': self.columns,
      'implicit_threshold': None if self.threshold is None else float(self.threshold),
      'holdout': self.holdout,
    }

  def identity(self) -> str:
    digests = []
    for path in self.files():
      if not os.path.isfile(path):
        raise UserError(
          f'{path} not found (config.dataset.path={self.path}); '
          + (
            'format=ncf_paper needs <path>.train.rating, .test.rating and .test.negative.'
            if self.format == 'ncf_paper'
            else 'set config.dataset.path to your interactions file.'
          )
        )
      try:
        digests.append(cache.source_hash(path, self.data_dir))
      except OSError as e:
        raise UserError(
          f'{path} cannot be read ({e.strerror or e}); check its permissions.'
        ) from None
    if len(digests) == 1:
      return digests[0]
    return 'sha256:' + hashlib.sha256('|'.join(digests).encode()).hexdigest()

  def read(self, validation: str) -> Interactions:
    del validation  # the preprocessing splits
    if self.format == 'ncf_paper':
      return read_ncf_paper(self.path)
    table, where, header = _read_table(self.path, self.format, self.columns)
    return _interactions(table, where, header, self)


# ------------------------------------------------------------------------------------------
# Reading a table.


def _is_parquet(path: str) -> bool:
  with open(path, 'rb') as f:
    return f.read(4) == b'PAR1'


def _read_table(path: str, fmt: str, columns: dict) -> tuple[pa.Table, str, int]:
  """(table of string or typed columns, where, lines before the first data row)."""
  if fmt == 'parquet' or (fmt == 'auto' and _is_parquet(path)):
    try:
      return pq.read_table(path), path, -1
    except (pa.ArrowInvalid, OSError) as e:
      raise UserError(
        f'{path} is not a readable Parquet file ({e}); check config.dataset.format.'
      ) from None
  with open(path, 'rb') as f:
    data = f.read()
  data = data.removeprefix(b'\xef\xbb\xbf')
  if not data.strip():
    raise UserError(f'{path} is empty: expected one interaction (user, item, ...) per line.')
  lines = data[: 1 << 16].strip().splitlines()[:3]
  first = lines[0].decode('utf-8', 'replace')
  sep = {'csv': ',', 'tsv': '\t'}.get(fmt) or _sniff(first)
  if sep == '::':
    data = data.replace(b'::', b'\t')
    sep = '\t'
  elif sep == ' ':  # runs of spaces or tabs: one tab
    data = re.sub(rb'[ \t]+', b'\t', re.sub(rb'(?m)^[ \t]+|[ \t]+(?=\r?$)', b'', data))
    sep = '\t'
  head = data[: 1 << 16].splitlines()[:2]
  first_fields = head[0].decode('utf-8', 'replace').split(sep)
  second = head[1].decode('utf-8', 'replace').split(sep) if len(head) > 1 else []
  named = any(isinstance(c, str) for c in columns.values())
  known = {n for names in KNOWN_NAMES.values() for n in names}
  header = named or any(f.strip().lower() in known for f in first_fields)
  if not header and not any(_numeric(f) for f in first_fields) and any(_numeric(f) for f in second):
    header = True
  names = (
    [f.strip() for f in first_fields] if header else [f'f{i}' for i in range(len(first_fields))]
  )
  if len(set(names)) != len(names):
    raise UserError(f'{path} line 1: the header {first[:80]!r} repeats a column name; rename it.')
  try:
    table = pacsv.read_csv(
      pa.BufferReader(data),
      read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(header)),
      parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=False),
      convert_options=pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, strings_can_be_null=False
      ),
    )
  except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
    where, found = path, str(e).splitlines()[0]
    for number, line in enumerate(data.decode('utf-8', 'replace').splitlines(), 1):
      if number > header and line.strip() and len(line.split(sep)) != len(names):
        where, found = f'{path} line {number}', f'{len(line.split(sep))}: {line[:80]!r}'
        break
    raise UserError(
      f'{where}: expected {len(names)} fields separated by {_sep_name(sep)} (as on line 1), '
      f'found {found}; fix the line or the delimiter (config.dataset.format).'
    ) from None
  return table, path, int(header)


def _sniff(line: str) -> str:
  for sep, _ in _DELIMITERS:
    if sep in line:
      return sep
  return ' '


def _sep_name(sep: str) -> str:
  return dict(_DELIMITERS).get(sep, repr(sep))


def _numeric(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _resolve(table: pa.Table, where: str, columns: dict) -> dict[str, str | None]:
  """The table column of each role (user, item, time, rating); None for an absent optional."""
  names = table.column_names
  lower = {n.lower(): n for n in names}
  out: dict[str, str | None] = {}
  for role, setting in columns.items():
    field = f'config.dataset.{_FIELD[role]}'
    if isinstance(setting, int):
      if setting >= len(names):
        raise UserError(
          f'{where} line 1 column {setting + 1}: {field}={setting} but the file has '
          f'{len(names)} columns; use a position in 0..{len(names) - 1}.'
        )
      out[role] = names[setting]
    elif isinstance(setting, str):
      if setting not in names:
        raise UserError(
          f'{where} line 1: no column {setting!r} ({field}); the header has '
          f'{", ".join(names)}. Set {field} to one of them.'
        )
      out[role] = setting
    else:
      found = [lower[n] for n in KNOWN_NAMES[role] if n in lower]
      if not found and all(n.startswith('f') and n[1:].isdigit() for n in names):
        # No header: user, item, then rating, then timestamp, by position.
        default = {'user': 0, 'item': 1, 'rating': 2, 'time': 3}[role]
        found = [names[default]] if default < len(names) else []
      if not found and role in ('user', 'item'):
        raise UserError(
          f'{where} line 1: no {role} column (header: {", ".join(names)}); recognised names '
          f'are {", ".join(KNOWN_NAMES[role])}: set {field} to a header name or 0-based position.'
        )
      out[role] = found[0] if found else None
  return out


def _bad_row(values: list, ok) -> int:
  return next(i for i, v in enumerate(values) if not ok(v))


def _line(where: str, header: int, row: int) -> str:
  """Where data row `row` (0-based) is: its line in a text file, its row in Parquet."""
  if header < 0:
    return f'{where} row {row + 1}'
  return f'{where} line {header + row + 1}'


def _ids(column: pa.ChunkedArray, role: str, where: str, header: int, col: int):
  """(codes int64, sorted unique labels) of an id column: integers, or strings."""
  if pa.types.is_dictionary(column.type):  # a categorical column (pandas): its values
    column = pc.cast(column, column.type.value_type)
  if pa.types.is_integer(column.type):
    values = column.to_numpy().astype(np.int64)
  elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
    column = pc.utf8_trim_whitespace(column)
    is_int = pc.match_substring_regex(column, r'^[+-]?[0-9]{1,18}$').to_numpy(zero_copy_only=False)
    if is_int.all():
      values = pc.cast(column, pa.int64()).to_numpy()
    elif is_int.any():
      kind = 'an integer' if is_int[0] else 'a string'
      row = int(np.argmin(is_int == is_int[0]))
      raise UserError(
        f'{_line(where, header, row)} column {col + 1}: {role} id '
        f'{column[row].as_py()!r} is not {kind} like the first row\'s {column[0].as_py()!r} '
        f'(mixed id types); make the {role} ids all integers or all strings.'
      )
    else:
      labels, codes = np.unique(
        column.to_numpy(zero_copy_only=False).astype(str), return_inverse=True
      )
      return codes.astype(np.int64), labels.tolist()
  else:
    raise UserError(
      f'{where} column {col + 1}: {role} ids of type {column.type} are not integers or '
      f'strings; convert the {role} column to one of them.'
    )
  labels, codes = np.unique(values, return_inverse=True)
  return codes.astype(np.int64), labels.tolist()


def _numbers(column: pa.ChunkedArray, what: str, where: str, header: int, col: int, fix: str):
  """A numeric column as float64 or int64 numpy (strings parsed; one error line if not)."""
  if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
    return pc.cast(pc.cast(column, pa.timestamp('s')), pa.int64()).to_numpy()
  if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
    values = column.to_numpy()
  else:
    text = pc.utf8_trim_whitespace(column)
    try:
      values = pc.cast(text, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
      try:
        values = pc.cast(text, pa.float64()).to_numpy()
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        strings = text.to_pylist()
        row = _bad_row(strings, _numeric)
        raise UserError(
          f'{_line(where, header, row)} column {col + 1}: {what} {strings[row]!r} is not a '
          f'number; {fix}'
        ) from None
  if values.dtype.kind == 'f' and not np.isfinite(values).all():
    row = int(np.argmin(np.isfinite(values)))
    raise UserError(
      f'{_line(where, header, row)} column {col + 1}: {what} {values[row]!r} is not a '
      f'finite number; {fix}'
    )
  return values


def _interactions(table: pa.Table, where: str, header: int, source: FileSource) -> Interactions:
  if table.num_rows == 0:
    raise UserError(f'{where} has no interactions (only a header); add rows user, item, ...')
  cols = _resolve(table, where, source.columns)
  index = {n: i for i, n in enumerate(table.column_names)}
  user_codes, user_labels = _ids(
    table.column(cols['user']), 'user', where, header, index[cols['user']]
  )
  item_codes, item_labels = _ids(
    table.column(cols['item']), 'item', where, header, index[cols['item']]
  )
  n = table.num_rows
  keep = np.ones(n, bool)
  if source.threshold is not None:
    if cols['rating'] is None:
      raise UserError(
        f'{where}: config.dataset.implicit_threshold={source.threshold} needs a rating '
        f'column and none was found (header: {", ".join(table.column_names)}); set '
        'config.dataset.rating_col, or implicit_threshold=None.'
      )
    ratings = _numbers(
      table.column(cols['rating']),
      'rating',
      where,
      header,
      index[cols['rating']],
      'ratings must be numbers (or set implicit_threshold=None to ignore them).',
    )
    keep = ratings >= source.threshold
    if not keep.any():
      raise UserError(
        f'{where}: no row has rating >= config.dataset.implicit_threshold='
        f'{source.threshold} (the highest is {ratings.max()}); lower the threshold.'
      )
  if cols['time'] is not None:
    ts = _numbers(
      table.column(cols['time']),
      'timestamp',
      where,
      header,
      index[cols['time']],
      'timestamps must be numbers (seconds, or any increasing number); set '
      "config.dataset.time_col to another column.",
    )
    if ts.dtype.kind == 'f':  # keep the order (and ties) of fractional times
      ts = np.unique(ts, return_inverse=True)[1]
    timestamps = ts.astype(np.int64)
  elif source.holdout == 'last_row':
    timestamps = np.arange(n, dtype=np.int64)
  else:
    timestamps = keyed_times(user_codes, item_codes, len(item_labels))
  users, items, timestamps = user_codes[keep], item_codes[keep], timestamps[keep]
  users, items, timestamps = _dedupe(users, items, timestamps, len(item_labels))
  # Relabel densely (items of rows left after the threshold only), keep the labels.
  ukept, users = np.unique(users, return_inverse=True)
  ikept, items = np.unique(items, return_inverse=True)
  source.labels = ([user_labels[i] for i in ukept], [item_labels[i] for i in ikept])
  return Interactions(
    users.astype(np.int32), items.astype(np.int32), timestamps - timestamps.min(), where
  )


def keyed_times(users: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
  """Pseudo-timestamps of a file without times: a splitmix64 hash of (HOLDOUT_SEED, user,
  item) over the dense ids, so the held-out items do not depend on the row order."""
  x = (users.astype(np.uint64) * np.uint64(num_items) + items.astype(np.uint64)) ^ np.uint64(
    HOLDOUT_SEED
  )
  with np.errstate(over='ignore'):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return (x >> np.uint64(2)).astype(np.int64)


def _dedupe(users, items, timestamps, num_items: int):
  """Keeps one row per (user, item): the latest (last in the file among equal times)."""
  key = users * num_items + items
  order = np.lexsort((np.arange(key.size), timestamps, key))
  last = np.r_[key[order][1:] != key[order][:-1], True]
  rows = np.sort(order[last])
  return users[rows], items[rows], timestamps[rows]


def write_labels(cache_path: str, labels: tuple[list, list]) -> None:
  """Writes `<cache>.users.json` and `<cache>.items.json`: the original id of each dense id."""
  for what, values in zip(('users', 'items'), labels):
    path = f'{cache_path}.{what}.json'
    fd, tmp = cache.public_temp_file(os.path.dirname(path), '.' + os.path.basename(path), '.tmp')
    try:
      with os.fdopen(fd, 'w') as f:
        json.dump([v.item() if isinstance(v, np.generic) else v for v in values], f)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)


# ------------------------------------------------------------------------------------------
# The NCF paper's released splits (github.com/hexiangnan/neural_collaborative_filtering/Data).


def _int_table(path: str, columns: int, what: str, data: bytes | None = None) -> np.ndarray:
  """int64 [rows, columns] of a tab-separated file of integers (one error line if not)."""
  if data is None:
    with open(path, 'rb') as f:
      data = f.read()
  if not data.strip():
    raise UserError(f'{path} is empty: expected {what}.')
  names = [f'f{i}' for i in range(columns)]
  try:
    table = pacsv.read_csv(
      pa.BufferReader(data),
      read_options=pacsv.ReadOptions(column_names=names),
      parse_options=pacsv.ParseOptions(delimiter='\t'),
      convert_options=pacsv.ConvertOptions(column_types={n: pa.int64() for n in names}),
    )
  except (pa.ArrowInvalid, pa.ArrowTypeError):
    for number, line in enumerate(data.decode('utf-8', 'replace').splitlines(), 1):
      fields = line.split('\t')
      if line and (len(fields) != columns or not all(f.strip().isdigit() for f in fields)):
        raise UserError(
          f'{path} line {number}: expected {what} ({columns} tab-separated non-negative '
          f'integers), found {line[:80]!r}; restore the NCF paper\'s file.'
        ) from None
    raise UserError(f'{path}: cannot parse; expected {what}.') from None
  return np.stack([table.column(n).to_numpy() for n in names], axis=1)


def read_ncf_paper(prefix: str) -> Interactions:
  """The paper's splits as interactions whose latest row per user is its test row.

  Training rows keep their timestamps; each user's test row gets a time after every
  training row, so the MLPerf preprocessing holds exactly it out (and, with a validation
  split, the latest training row). Ids are kept (the files' are dense already), and the
  .test.negative negatives go to `Interactions.test_negatives`.
  """
  train_path, test_path, neg_path = (prefix + s for s in _PAPER_SUFFIXES)
  train = _int_table(train_path, 4, 'user, item, rating, timestamp')
  test = _int_table(test_path, 4, 'user, item, rating, timestamp')
  with open(neg_path, 'rb') as f:
    raw = f.read()
  first = raw.split(b'\n', 1)[0].decode('utf-8', 'replace')
  k = first.count('\t')
  if not first.startswith('(') or k < 1:
    raise UserError(
      f'{neg_path} line 1: expected \'(user,item)\' then tab-separated negatives, found '
      f'{first[:80]!r}; restore the NCF paper\'s file.'
    )
  flat = raw.replace(b'(', b'').replace(b')', b'').replace(b',', b'\t')
  negs = _int_table(neg_path, k + 2, f'(user,item) and {k} negatives', flat)
  users, order = np.unique(test[:, 0], return_index=True)
  if users.size != test.shape[0]:
    dup = int(np.flatnonzero(np.bincount(test[:, 0]) > 1)[0])
    raise UserError(
      f'{test_path}: user {dup} has more than one test row; the paper holds out one per user.'
    )
  missing = np.setdiff1d(np.unique(train[:, 0]), users)
  if missing.size:
    raise UserError(
      f'{train_path}: user {int(missing[0])} has no row in {test_path}; every user needs '
      'one test item.'
    )
  if negs.shape[0] != test.shape[0] or not np.array_equal(negs[:, :2], test[:, :2]):
    row = int(np.argmax(np.any(negs[: test.shape[0], :2] != test[: negs.shape[0], :2], axis=1)))
    row = min(row, negs.shape[0], test.shape[0])
    raise UserError(
      f'{neg_path} line {row + 1}: its (user,item) does not match line {row + 1} of '
      f'{test_path}; the two files must list the same test pairs in the same order.'
    )
  num_users = int(max(train[:, 0].max(), test[:, 0].max())) + 1
  num_items = int(max(train[:, 1].max(), test[:, 1].max(), negs[:, 2:].max())) + 1
  test_negatives = np.zeros((num_users, k), np.int32)
  test_negatives[test[:, 0]] = negs[:, 2:]
  after = int(train[:, 3].max()) + 1 if train.size else 0
  return Interactions(
    users=np.concatenate([train[:, 0], test[:, 0]]).astype(np.int32),
    items=np.concatenate([train[:, 1], test[:, 1]]).astype(np.int32),
    timestamps=np.concatenate([train[:, 3], np.full(test.shape[0], after)]).astype(np.int64),
    where=train_path,
    num_items=num_items,
    test_negatives=test_negatives,
  )
