"""``bench/common.write_csv``: appending rows to a results CSV, including one written before a bench gained
a column (its rows are kept, under the new header)."""

from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from common import write_csv  # noqa: E402


def _read(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_append_keeps_the_header_and_fills_missing_keys(tmp_path):
    path = str(tmp_path / "results" / "r.csv")
    write_csv([{"a": 1, "b": 2}], path, ["a", "b"])
    write_csv([{"a": 3}], path, ["a", "b"])
    assert _read(path) == (["a", "b"], [{"a": "1", "b": "2"}, {"a": "3", "b": ""}])


def test_a_file_with_other_columns_is_rewritten_with_its_rows_kept(tmp_path):
    path = str(tmp_path / "r.csv")
    write_csv([{"a": 1, "b": 2, "old": "x"}, {"a": 4, "b": 5, "old": "y"}], path, ["a", "old", "b"])
    write_csv([{"a": 6, "new": 0.5, "b": 7}], path, ["a", "b", "new"])
    header, rows = _read(path)
    assert header == ["a", "b", "new", "old"]  # the new columns, then those only the old file had
    assert rows == [
        {"a": "1", "b": "2", "new": "", "old": "x"},
        {"a": "4", "b": "5", "new": "", "old": "y"},
        {"a": "6", "b": "7", "new": "0.5", "old": ""},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temporary file left beside it
    write_csv([{"a": 8, "b": 9, "new": 1}], path, ["a", "b", "new"])  # the same columns now: appended
    assert _read(path)[0] == header and len(_read(path)[1]) == 4
