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


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "results")


def test_every_committed_results_row_has_its_header_s_fields():
    """A row with more or fewer fields than its header (a device string with a comma, pasted unquoted)
    shifts its values into the wrong columns: its date reads as the version, its device loses its kernel
    copy, and the plots and the target tables read it as another machine's."""
    problems = []
    for folder, _, files in os.walk(RESULTS):
        for name in sorted(f for f in files if f.endswith(".csv")):
            path = os.path.join(folder, name)
            where = os.path.relpath(path, RESULTS)
            with open(path, newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader)
                problems += [
                    f"{where}:{reader.line_num}: {len(row)} fields, header {len(header)}"
                    for row in reader
                    if len(row) != len(header)
                ]
    assert not problems, "\n".join(problems[:20])
