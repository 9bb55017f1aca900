"""One JSONL policy for every reader: a torn last line is ignored with a warning; any other bad line is an error
naming the file and the line."""

import logging

import pytest

from neverfade import jsonl
from neverfade.data.coco import AnnotationError, read_jsonl
from neverfade.data.images import InputError, read_manifest
from neverfade.errors import UserError
from neverfade.eval import clair
from neverfade.results import NotResults, ResultsFile, read_records

TORN = b'{"id": "c", "run": "r", "capt'  # what a writer killed mid-line leaves


def write(tmp_path, data: bytes, name="f.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_values_with_line_numbers_blank_lines_skipped(tmp_path):
    path = write(tmp_path, b'{"a": 1}\n\n  \n[2, 3]\r\n"x"\n{"last": true}')  # a whole last line needs no newline
    assert list(jsonl.read_jsonl(path)) == [(1, {"a": 1}), (4, [2, 3]), (5, "x"), (6, {"last": True})]


@pytest.mark.parametrize("tail", [TORN, b"not json", b'{"id": "\xe2\x82'])  # the last cut mid-character
def test_a_torn_last_line_is_ignored_with_a_warning(tmp_path, caplog, tail):
    path = write(tmp_path, b'{"id": "a"}\n{"id": "b"}\n' + tail)
    with caplog.at_level(logging.WARNING, logger="neverfade"):
        assert [v for _, v in jsonl.read_jsonl(path)] == [{"id": "a"}, {"id": "b"}]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:3: ignoring a torn last line (no newline, not JSON), as an interrupted writer leaves it"
    ]


@pytest.mark.parametrize(
    "data, number, why",
    [
        (b'{"id": "a"}\nnot json\n{"id": "b"}\n', 2, "not valid JSON (Expecting value)"),
        (b'{"id": "a"}\n{"id": "b"\n', 2, "not valid JSON (Expecting ',' delimiter)"),  # last, but with its newline
        (b'{"id": "\xff"}\n{"id": "b"}\n', 1, "not UTF-8 text"),
        (b'{"id": "a"}\n' + TORN + b'\n{"id": "b"}\n', 2, "not valid JSON (Invalid control character at)"),
    ],
)
def test_any_other_bad_line_is_an_error_naming_file_and_line(tmp_path, data, number, why):
    path = write(tmp_path, data)
    with pytest.raises(jsonl.BadLine) as caught:
        list(jsonl.read_jsonl(path))
    assert (str(caught.value), caught.value.number) == (f"{path}:{number}: {why}", number)
    assert isinstance(caught.value, UserError)


def test_a_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nothing.jsonl: no such file"):
        list(jsonl.read_jsonl(tmp_path / "nothing.jsonl"))


def test_every_reader_follows_the_policy(tmp_path):
    """Annotations, manifests, results and the judge's answers: the torn tail ignored, a bad line in the middle
    an error of the reader's kind naming its line."""
    good = b'{"id": "a", "run": "r", "image": "a.png", "key": "k", "answer": "50"}\n'
    torn, bad = write(tmp_path, good + TORN, "torn.jsonl"), write(tmp_path, b"oops\n" + good, "bad.jsonl")
    assert [n for n, _ in read_jsonl(torn)] == [1]
    assert [item.id for item in read_manifest(torn)] == ["a"]
    assert len(read_records(torn)) == 1
    assert clair.AnswerCache(torn).answers == {"k": "50"}
    with pytest.raises(AnnotationError, match="bad.jsonl: line 1 is not valid JSON"):
        list(read_jsonl(bad))
    with pytest.raises(InputError, match="bad.jsonl:1: not valid JSON"):
        read_manifest(bad)
    with pytest.raises(NotResults, match="bad.jsonl:1: not a neverfade results record"):
        read_records(bad)
    with pytest.raises(jsonl.BadLine, match="bad.jsonl:1: not valid JSON"):
        clair.AnswerCache(bad)


def test_the_answer_cache_cuts_a_torn_tail_before_appending(tmp_path):
    path = write(tmp_path, b'{"key": "k1", "answer": "a1"}\n' + b'{"key": "k2", "ans')
    cache = clair.AnswerCache(path)
    cache.put("k3", "m", "a3")
    assert clair.AnswerCache(path).answers == {"k1": "a1", "k3": "a3"}  # no glued line in the middle
    whole = write(tmp_path, b'{"key": "k1", "answer": "a1"}', "whole.jsonl")  # short of its newline only
    clair.AnswerCache(whole).put("k2", "m", "a2")
    assert clair.AnswerCache(whole).answers == {"k1": "a1", "k2": "a2"}


def test_a_results_file_is_not_taken_for_torn(tmp_path):
    """A last line that does not begin like a record is refused (the file is not results), not ignored."""
    path = write(tmp_path, b'{"id": "a", "run": "r"}\nmy notes')
    with pytest.raises(NotResults, match="f.jsonl:2: not a neverfade results record"):
        read_records(path)
    with pytest.raises(NotResults):
        ResultsFile(path)
    assert path.read_bytes() == b'{"id": "a", "run": "r"}\nmy notes'
