"""calm_dist/data/sources.py: every kind of source reads the same records in the same order, any [start, stop)
range across batch, row-group and mark boundaries, in memory that does not grow with the file; each bad input
is one line naming the file (and the row: a JSONL line number); a memoised fingerprint costs no read."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calm_dist.config import ConfigError
from calm_dist.data import parts
from calm_dist.data.parts import RecordError
from calm_dist.data.sources import open_source, source_fingerprint

KEY = "data.train"
N = 13
RECORDS = [{"prompt": f"p{i} é", "completion": f"c{i}", "n": i} for i in range(N)]


# ---- writers, one per kind ------------------------------------------------------------------------------------
def write_jsonl(path, records, blank_after=()):
    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r, ensure_ascii=False))
        if i in blank_after:
            lines += ["", "   "]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json_list(path, records):
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def write_parquet(path, records, row_group_size=4, compression="snappy"):
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size, compression=compression)
    return path


def write_arrow(path, records, stream=True, batch=5):
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table, max_chunksize=batch)
        writer.close()
    return path


def write_saved(path, records):
    import datasets

    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": lambda d, r: write_jsonl(d / "data.jsonl", r),
    "jsonl_blank_lines": lambda d, r: write_jsonl(d / "data.jsonl", r, blank_after={0, 4, 5}),
    "json_list": lambda d, r: write_json_list(d / "data.json", r),
    "json_lines": lambda d, r: write_jsonl(d / "data.json", r),
    "parquet": lambda d, r: write_parquet(d / "data.parquet", r),
    "arrow_stream": lambda d, r: write_arrow(d / "data.arrow", r),
    "arrow_file": lambda d, r: write_arrow(d / "data.arrow", r, stream=False),
    "saved": lambda d, r: write_saved(d / "saved", r),
}


def only_part(spec):
    parts = open_source(str(spec), KEY)
    assert len(parts) == 1
    return parts[0]


def shrink(part):
    """Small batches, marks and chunks: the ranges below cross every kind of boundary."""
    part.batch_rows = 3
    part.stride = 4
    part.chunk_chars = 7
    return part


# ---- every kind ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_kind_reads_the_records_in_order(tmp_path, kind):
    part = shrink(only_part(WRITERS[kind](tmp_path, RECORDS)))
    assert part.num_rows() == N
    rows, records = zip(*part.records())
    assert list(records) == RECORDS
    if kind == "jsonl_blank_lines":  # a JSONL row number is the record's line number, blank lines counted
        assert rows == (1, 4, 5, 6, 7, 10, 13, 14, 15, 16, 17, 18, 19)
    else:
        assert rows == tuple(range(1, N + 1))


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_any_range_across_batch_and_group_boundaries(tmp_path, kind):
    part = shrink(only_part(WRITERS[kind](tmp_path, RECORDS)))
    everything = list(part.records())
    for start in range(N + 2):
        for stop in [None, *range(start, N + 3)]:
            assert list(part.records(start, stop)) == everything[start:stop], (start, stop)


@pytest.mark.parametrize("counted_first", [False, True])
def test_jsonl_seeks_to_marks_and_counts_once(tmp_path, counted_first):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS * 10, blank_after={3, 50})
    part = shrink(only_part(path))
    everything = list(part.records())
    fresh = shrink(only_part(path))
    if counted_first:
        assert fresh.num_rows() == 10 * N
        assert len(fresh._marks) == (10 * N - 1) // fresh.stride + 1  # a mark every `stride` records
    for start, stop in [(0, 5), (97, 130), (33, 34), (5, 90), (129, None)]:
        assert list(fresh.records(start, stop)) == everything[start:stop]


def test_parts_survive_pickling(tmp_path):
    """prepare's worker processes may receive parts pickled; a dataset part reopens its dataset there."""
    for kind in ("jsonl", "json_list", "parquet", "arrow_stream", "saved"):
        directory = tmp_path / kind
        directory.mkdir()
        part = shrink(only_part(WRITERS[kind](directory, RECORDS)))
        part.num_rows()
        copy = pickle.loads(pickle.dumps(part))
        assert list(copy.records(2, 9)) == list(part.records(2, 9))
        assert copy.fingerprint() == part.fingerprint()


def test_record_error_is_a_picklable_config_error(tmp_path):
    part = only_part(write_jsonl(tmp_path / "a.jsonl", RECORDS))
    error = RecordError.at(part, 7, "field 'prompt' is missing")
    assert isinstance(error, ConfigError)
    assert str(pickle.loads(pickle.dumps(error))) == f"{KEY}: {part.name} row 7: field 'prompt' is missing"


# ---- directories and globs -----------------------------------------------------------------------------------
def test_directory_reads_its_files_in_name_order_skipping_hidden_ones(tmp_path):
    for name, chunk in (("b.jsonl", RECORDS[4:9]), ("a.jsonl", RECORDS[:4]), ("c.jsonl", RECORDS[9:])):
        write_jsonl(tmp_path / name, chunk)
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".a.jsonl.crc").write_text("x")
    parts = open_source(str(tmp_path), KEY)
    assert [p.name for p in parts] == [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    assert [r for p in parts for _, r in p.records()] == RECORDS


def test_glob_reads_its_matches_in_sorted_order(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    write_parquet(tmp_path / "b" / "x.parquet", RECORDS[5:])
    write_parquet(tmp_path / "a" / "y.parquet", RECORDS[:2])
    write_parquet(tmp_path / "a" / "z.parquet", RECORDS[2:5])
    write_jsonl(tmp_path / "notes.jsonl", RECORDS)  # not matched
    parts = open_source(str(tmp_path / "**" / "*.parquet"), KEY)
    assert [os.path.relpath(p.name, tmp_path) for p in parts] == ["a/y.parquet", "a/z.parquet", "b/x.parquet"]
    assert [r for p in parts for _, r in p.records()] == RECORDS
    flat = open_source(str(tmp_path / "a" / "*.parquet"), KEY)
    assert [r for p in flat for _, r in p.records()] == RECORDS[:5]


def test_glob_of_saved_datasets(tmp_path):
    write_saved(tmp_path / "s1", RECORDS[:6])
    write_saved(tmp_path / "s2", RECORDS[6:])
    parts = open_source(str(tmp_path / "s*"), KEY)
    assert [r for p in parts for _, r in p.records()] == RECORDS


def test_hub_part_reads_a_dataset_in_ranges(tmp_path, monkeypatch):
    """The hub path past load_dataset (tests/integration/test_hf_sources.py loads real caches offline)."""
    import datasets

    monkeypatch.setattr(parts, "_load_hub", lambda *a: datasets.Dataset.from_list(RECORDS))
    part = shrink(only_part("hf:org/name?split=test&config=en"))
    assert part.name == "hf:org/name (config en, split test)"
    assert part.num_rows() == N
    assert list(part.records(2, 11)) == list(zip(range(3, 12), RECORDS[2:11]))


# ---- bad input: one line naming the file (and row) ------------------------------------------------------------
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(KEY), message
    return message


def read_all(spec):
    for part in open_source(str(spec), KEY):
        part.num_rows()
        for _ in part.records():
            pass


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / "nope.jsonl"), KEY)
    assert one_line(e) == f"{KEY}: {tmp_path / 'nope.jsonl'} does not exist"


def test_unset_source():
    with pytest.raises(ConfigError, match=f"^{KEY} is not set$"):
        open_source("", KEY)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / "*.jsonl"), KEY)
    assert one_line(e) == f"{KEY}: the glob {tmp_path / '*.jsonl'} matches nothing"


def test_mixed_formats_in_a_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    write_parquet(tmp_path / "b.parquet", RECORDS)
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path), KEY)
    assert one_line(e) == f"{KEY}: {tmp_path} mixes kinds of files (1 jsonl, 1 parquet): one source holds one kind"


def test_mixed_formats_in_a_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    write_json_list(tmp_path / "b.json", RECORDS)
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / "*"), KEY)
    assert "mixes kinds of files (1 json, 1 jsonl)" in one_line(e)


def test_unsupported_files(tmp_path):
    (tmp_path / "a.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / "a.csv"), KEY)
    assert one_line(e).startswith(f"{KEY}: {tmp_path / 'a.csv'}: unsupported data file")
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path), KEY)
    assert one_line(e).startswith(f"{KEY}: {tmp_path} holds .csv files, which are not data files")


def test_directory_without_data(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path), KEY)
    assert "is a directory without data files" in one_line(e)
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path), KEY)
    assert "holds subdirectories (sub): name its files with a glob" in one_line(e)


def test_dataset_dict_directory(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / "dd"), KEY)
    assert "is a DatasetDict written by save_to_disk: name one split's directory" in one_line(e)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow"])
def test_empty_file(tmp_path, kind):
    (tmp_path / f"a.{kind}").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        open_source(str(tmp_path / f"a.{kind}"), KEY)
    assert one_line(e) == f"{KEY}: {tmp_path / f'a.{kind}'} is empty: it holds no records"


@pytest.mark.parametrize("kind", ["blank_jsonl", "empty_list", "parquet", "arrow", "saved"])
def test_empty_data_set(tmp_path, kind):
    schema = pa.schema([("prompt", pa.string())])
    path = {"blank_jsonl": tmp_path / "a.jsonl", "empty_list": tmp_path / "a.json",
            "parquet": tmp_path / "a.parquet", "arrow": tmp_path / "a.arrow", "saved": tmp_path / "saved"}[kind]
    if kind == "blank_jsonl":
        path.write_text("\n  \n\n")
    elif kind == "empty_list":
        path.write_text(" [ ] ")
    elif kind == "parquet":
        pq.write_table(schema.empty_table(), path)
    elif kind == "arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema):
            pass
    else:
        import datasets

        datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(path))
    part = only_part(path)
    with pytest.raises(ConfigError) as e:
        part.num_rows()
    assert one_line(e) == f"{KEY}: {path} is empty: it holds no records"


def test_invalid_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS, blank_after={1})
    lines = path.read_text().splitlines()
    lines[5] = '{"prompt": "x", "completion": }'  # line 6, the 4th record
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError) as e:
        read_all(path)
    assert one_line(e) == f"{KEY}: {path} row 6: invalid JSON (Expecting value at column 31)"


def test_invalid_json_line_in_a_json_file_hints_at_the_formats(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"prompt": "x",\n "completion": "y"}\n')
    with pytest.raises(RecordError) as e:
        read_all(path)
    assert one_line(e).startswith(f"{KEY}: {path} row 1: invalid JSON (")
    assert one_line(e).endswith("(a .json file holds a JSON list of objects or one object per line)")


@pytest.mark.parametrize("kind", ["jsonl", "json_list"])
def test_invalid_utf8_names_the_row(tmp_path, kind):
    path = WRITERS[kind](tmp_path, RECORDS)
    data = path.read_bytes()
    assert data.count("p2 é".encode()) == 1
    path.write_bytes(data.replace("p2 é".encode(), b"p2 \xe9"))  # latin-1, not UTF-8
    with pytest.raises(RecordError) as e:
        read_all(path)
    detail = " (byte 16 of the line)" if kind == "jsonl" else ""
    assert one_line(e) == f"{KEY}: {path} row 3: invalid UTF-8{detail}"


@pytest.mark.parametrize("kind", ["parquet", "arrow_stream", "arrow_file", "saved"])
def test_invalid_utf8_in_columnar_data_names_the_row(tmp_path, kind):
    """Neither Arrow reader checks UTF-8 (a memory-mapped file is not checked at all): the part does."""
    import datasets

    values = [r["prompt"].encode() for r in RECORDS]
    values[7] = b"p7 \xe9"
    table = pa.table({"prompt": pa.array(values, pa.binary()).view(pa.string()), "n": range(N)})
    if kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset(table).save_to_disk(str(path))
    else:
        path = tmp_path / ("a.parquet" if kind == "parquet" else "a.arrow")
        if kind == "parquet":
            pq.write_table(table, path, row_group_size=4)
        else:
            with pa.OSFile(str(path), "wb") as sink:
                writer = (pa.ipc.new_stream if kind == "arrow_stream" else pa.ipc.new_file)(sink, table.schema)
                writer.write_table(table, max_chunksize=5)
                writer.close()
    part = shrink(only_part(path))
    assert [r["n"] for _, r in part.records(0, 7)] == list(range(7))  # the rows before it read
    with pytest.raises(RecordError) as e:
        list(part.records(2))
    assert one_line(e) == f"{KEY}: {path} row 8: invalid UTF-8"


@pytest.mark.parametrize("value, name", [("[1, 2]", "list"), ('"text"', "string"), ("3", "number"),
                                         ("null", "null")])
@pytest.mark.parametrize("kind", ["jsonl", "json_list"])
def test_a_json_value_that_is_not_an_object(tmp_path, kind, value, name):
    path = tmp_path / ("a.jsonl" if kind == "jsonl" else "a.json")
    if kind == "jsonl":
        path.write_text(json.dumps(RECORDS[0]) + "\n" + value + "\n")
    else:
        path.write_text("[" + json.dumps(RECORDS[0]) + ",\n" + value + "]")
    with pytest.raises(RecordError) as e:
        read_all(path)
    assert one_line(e) == f"{KEY}: {path} row 2: a JSON {name}, not an object"


@pytest.mark.parametrize("text, message", [
    ('[{"a": 1}, {"a": }]', " row 2: invalid JSON (Expecting value)"),
    ('[{"a": 1}, {"a": 2}', " row 2: invalid JSON (the list ends without ']' after this record)"),
    ('[{"a": 1} {"a": 2}]', " row 1: invalid JSON ('{' where ',' or ']' belongs after this record)"),
    ('[{"a": 1}] {"a": 2}', ": invalid JSON (data after the list's closing ']')"),
    ('[{"a": "unterminated}]', " row 1: invalid JSON (Unterminated string starting at)"),
])
def test_malformed_json_list(tmp_path, text, message):
    path = tmp_path / "a.json"
    path.write_text(text)
    part = only_part(path)
    part.chunk_chars = 4  # the malformation is found across chunks, not only in one buffer
    with pytest.raises(ConfigError) as e:
        list(part.records())
    assert one_line(e) == f"{KEY}: {path}{message}"


def test_corrupt_parquet_pages(tmp_path):
    path = write_parquet(tmp_path / "a.parquet", RECORDS, row_group_size=N)
    data = bytearray(path.read_bytes())
    data[8:48] = b"\xff" * 40  # the first page's header; the footer is intact
    path.write_bytes(bytes(data))
    part = only_part(path)
    assert part.num_rows() == N
    with pytest.raises(ConfigError) as e:
        list(part.records())
    assert one_line(e).startswith(f"{KEY}: {path}: cannot read it as Parquet (from row 1 on): ")


def test_corrupt_parquet_and_arrow(tmp_path):
    for name, what in (("a.parquet", "Parquet"), ("a.arrow", "Arrow IPC")):
        (tmp_path / name).write_bytes(b"not columnar data at all" * 10)
        for read in (lambda part: part.num_rows(), lambda part: list(part.records(1))):
            with pytest.raises(ConfigError) as e:
                read(only_part(tmp_path / name))
            assert one_line(e).startswith(f"{KEY}: {tmp_path / name}: cannot read it as {what}: ")


def test_damaged_saved_dataset(tmp_path):
    path = write_saved(tmp_path / "saved", RECORDS)
    (path / "dataset_info.json").write_text("{not json")
    with pytest.raises(ConfigError) as e:
        read_all(path)
    assert one_line(e).startswith(f"{KEY}: {path}: cannot read it as a saved dataset: ")


@pytest.mark.parametrize("spec", ["hf:", "hf:org/name?split=train&split=test", "hf:org/name?splt=train",
                                  "hf:org/name?split=", "hf:org/name?split"])
def test_malformed_hub_names(spec, monkeypatch):
    monkeypatch.setattr(parts, "_load_hub", lambda *a: pytest.fail("loaded a malformed name"))
    with pytest.raises(ConfigError) as e:
        open_source(spec, KEY)
    assert one_line(e).startswith(f"{KEY}: {spec}: ")


# ---- fingerprints --------------------------------------------------------------------------------------------
def test_fingerprint_is_the_content(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS)
    c = write_jsonl(tmp_path / "c.jsonl", RECORDS[::-1])
    fa, fb, fc = (only_part(p).fingerprint() for p in (a, b, c))
    assert fa == fb != fc and len(fa) == 16 and int(fa, 16) >= 0
    assert source_fingerprint(str(a), KEY) == source_fingerprint(str(b), KEY) != source_fingerprint(str(c), KEY)
    saved = write_saved(tmp_path / "saved", RECORDS)
    assert only_part(saved).fingerprint() == only_part(saved).fingerprint()
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "1.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "d" / "2.jsonl", RECORDS[3:])
    before = source_fingerprint(str(tmp_path / "d"), KEY)
    os.rename(tmp_path / "d" / "1.jsonl", tmp_path / "d" / "3.jsonl")  # same files, another order
    assert source_fingerprint(str(tmp_path / "d"), KEY) != before


def test_memoised_fingerprint_costs_no_read(tmp_path, monkeypatch):
    for i in range(3):
        write_jsonl(tmp_path / f"{i}.jsonl", RECORDS[i:])
    write_saved(tmp_path / "saved", RECORDS)
    memo = tmp_path / "memo"
    first = {spec: source_fingerprint(spec, KEY, memo) for spec in (str(tmp_path / "*.jsonl"), str(tmp_path / "saved"))}
    assert json.loads((memo / parts.MEMO_FILE).read_text())
    opened, hashed = [], []
    real_open, real_hash = builtins.open, parts.sha256_file
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    monkeypatch.setattr(parts, "sha256_file", lambda path: hashed.append(path) or real_hash(path))
    for spec, fp in first.items():
        assert source_fingerprint(spec, KEY, memo) == fp
        assert source_fingerprint(spec, KEY, memo, hashing=False) == fp
    assert hashed == [] and [f for f in opened if not f.endswith(parts.MEMO_FILE)] == []
    # a changed file (same size, new mtime) is hashed again, and only it
    path = tmp_path / "1.jsonl"
    path.write_text(path.read_text().replace("p1", "q1"))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert source_fingerprint(str(tmp_path / "*.jsonl"), KEY, memo, hashing=False) is None
    assert hashed == []
    changed = source_fingerprint(str(tmp_path / "*.jsonl"), KEY, memo)
    assert changed != first[str(tmp_path / "*.jsonl")] and hashed == [path]
    assert source_fingerprint(str(tmp_path / "*.jsonl"), KEY, memo, hashing=False) == changed


def test_memo_without_a_directory_or_with_a_damaged_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS)
    expected = source_fingerprint(str(tmp_path / "a.jsonl"), KEY)
    assert source_fingerprint(str(tmp_path / "a.jsonl"), KEY, hashing=False) is None  # nothing memoised
    (tmp_path / "memo").mkdir()
    (tmp_path / "memo" / parts.MEMO_FILE).write_text("{half")
    assert source_fingerprint(str(tmp_path / "a.jsonl"), KEY, tmp_path / "memo") == expected
    assert source_fingerprint(str(tmp_path / "a.jsonl"), KEY, tmp_path / "memo", hashing=False) == expected


# ---- memory does not grow with the file ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["jsonl", "json_list", "parquet", "arrow_stream", "saved"])
def test_reading_holds_a_batch_not_the_file(tmp_path, kind):
    # ~9 MB; 27 MB of Parquet, whose reader holds a few MB (pages, dictionary, read buffer) whatever the size
    big = [{"text": f"{i} " + "lorem ipsum " * 60, "n": i} for i in range(36_000 if kind == "parquet" else 12_000)]
    # one row group of it all, uncompressed: the file's size is the data's
    writers = {"parquet": lambda d, r: write_parquet(d / "big.parquet", r, row_group_size=len(r), compression="none"),
               "arrow_stream": lambda d, r: write_arrow(d / "big.arrow", r, batch=4000)}
    path = writers.get(kind, WRITERS[kind])(tmp_path, big)
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()))
    part = only_part(path)
    part.batch_rows = 256
    part.chunk_chars = 1 << 16
    arrow_base = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        arrow_peak, count = 0, 0
        for _, record in part.records(100):
            count += 1
            if count % 256 == 0:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(big) - 100
    assert python_peak < 0.25 * size, (python_peak, size)
    assert arrow_peak < 0.3 * size, (arrow_peak, size)
