"""The one reader of JSON input: bounded, strict, UTF-8, one line naming the source for everything it refuses."""

from __future__ import annotations

import json
import os
import threading

import pytest

from moeplan.simulator.spec import json_input
from moeplan.simulator.spec.json_input import JsonInputError, parse_json, read_json_file


def test_reads_json_with_or_without_a_bom():
    assert parse_json(b'{"a": [1, 2.5, "\xc3\xa9", null, true]}', "f") == {"a": [1, 2.5, "é", None, True]}
    assert parse_json("\ufeff[1]".encode(), "f") == [1]
    assert parse_json('{"a": 1}', "f") == {"a": 1}


@pytest.mark.parametrize(("data", "message"), [
    (b'{"x": NaN}', "f: NaN is not a JSON number"),
    (b"[Infinity]", "f: Infinity is not a JSON number"),
    (b"[-Infinity]", "f: -Infinity is not a JSON number"),
    (b"[1e999]", "f: 1e999 does not fit a float"),
    (b"[" + b"9" * 5000 + b"]", "f: integer 9999999999999999999999999999999999999999... does not fit 64 bits"),
    (b"[9223372036854775808]", "f: integer 9223372036854775808 does not fit 64 bits"),
    (b"\xff\xfe{", "f: not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"a": "caf\xe9"}', "f: not UTF-8 text (byte 0xe9 at offset 10)"),
    (b"[" * 33 + b"]" * 33, "f: nested deeper than 32 levels"),
    (b"[" * 100_000 + b"]" * 100_000, "f: nested deeper than 32 levels"),
    (b'["\\ud800"]', "f: string '\\ud800' holds a lone surrogate"),
    (b'{"\\udfff": 1}', "f: string '\\udfff' holds a lone surrogate"),
    (b"{", "f: malformed JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    (b"", "f: malformed JSON (Expecting value at line 1 column 1)"),
])
def test_refuses_what_is_not_bounded_strict_json(data, message):
    with pytest.raises(JsonInputError) as info:
        parse_json(data, "f")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_deepest_allowed_nesting_is_read():
    assert parse_json(b"[" * 32 + b"]" * 32, "f") is not None


def test_files_are_read_up_to_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(json_input, "MAX_FILE_BYTES", 10)
    (tmp_path / "ok.json").write_text("[1, 2, 3]")
    (tmp_path / "big.json").write_text("[1, 2, 3, 4]")
    assert read_json_file(tmp_path / "ok.json") == [1, 2, 3]
    with pytest.raises(JsonInputError, match=r"big.json: larger than 0 MiB"):
        read_json_file(tmp_path / "big.json")


def test_an_endless_file_is_not_read_to_its_end():
    with pytest.raises(JsonInputError, match=r"/dev/zero: larger than 64 MiB"):
        read_json_file("/dev/zero")


@pytest.mark.parametrize(("name", "reason"), [
    ("missing.json", "No such file or directory"), ("", "Is a directory"), ("x" * 300, "File name too long"),
    ("a\x00b", "embedded null byte"),
])
def test_unreadable_paths_are_one_line(tmp_path, name, reason):
    with pytest.raises(JsonInputError, match=f"cannot read \\({reason}"):
        read_json_file(tmp_path / name if name else tmp_path)


def test_what_it_reads_round_trips_through_json():
    doc = {"a": [1, -2, 0.1, 1e308, -(2**63)], "b": {"c": "é", "d": None}}
    assert parse_json(json.dumps(doc).encode(), "f") == doc


def test_a_pipe_nobody_writes_to_is_read_as_empty_at_once(tmp_path):
    """A plain open() of a named pipe waits for a writer forever; the reader opens it without waiting."""
    os.mkfifo(tmp_path / "pipe.json")
    done: list[BaseException] = []

    def read() -> None:
        try:
            read_json_file(tmp_path / "pipe.json")
        except JsonInputError as exc:
            done.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    finished = bool(done)
    if not finished:  # still blocked in open(): unblock it so that the test process can end
        with open(tmp_path / "pipe.json", "wb"):
            pass
    assert finished and "pipe.json: malformed JSON" in str(done[0]), done


def test_a_pipe_that_is_written_is_read_whole(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")
    doc = {"a": list(range(20_000))}  # more than a pipe's 64 KiB buffer: read while written

    fd = os.open(tmp_path / "pipe.json", os.O_RDWR)  # a writer already there (O_RDWR: the open does not wait)

    def write() -> None:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert read_json_file(tmp_path / "pipe.json") == doc
    writer.join(timeout=10)
