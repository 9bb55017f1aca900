import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from eval_fixtures import write_jsonl

from neverfade.cli import main
from neverfade.errors import UserError
from neverfade.eval import captions, clair


class ChatServer:
    """A local OpenAI-style chat-completions endpoint. `script(n, prompt)` -> (status, body or content, headers,
    delay), n counting requests from 1; a str body with status 200 is wrapped as the answer's content."""

    def __init__(self, script=None):
        self.script = script or (lambda n, prompt: (200, '{"score": 50, "reason": "ok"}', {}, 0))
        self.requests, self.answered, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    n = len(server.requests)
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    status, content, headers, delay = server.script(n, prompt)
                    time.sleep(delay)
                    if status == 200 and isinstance(content, str):
                        content = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    data = content if isinstance(content, bytes) else json.dumps(content).encode()
                    if status == 200:
                        with server.lock:
                            server.answered.append(prompt)
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def judge(server, **kw):
    return clair.Judge(server.url, "judge-1", **{"timeout": 5.0, **kw})


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"score": 75, "reason": "same dog"}', (75.0, "same dog")),
        ('Here you go: {"score": 60}', (60.0, "Unknown")),
        ("Score: 0.85. Reason: both show a red bus", (85.0, "both show a red bus")),  # below 1: taken as normalised
        ("I would say 70 out of 100.", (70.0, "Unknown")),
        ('{"score": "high"} so 40', (40.0, "Unknown")),
        ("I cannot tell.", (None, None)),
    ],
)
def test_parsing_is_the_originals(text, expected):
    assert clair.parse(text) == expected


def test_request_is_chat_completions_with_the_key(server, tmp_path):
    cache = clair.AnswerCache(tmp_path / "cache.jsonl")
    result = clair.score_one(judge(server, api_key="sk-test"), cache, ["A dog."], ["A brown dog.", "A puppy."])
    assert result == {"score": 0.5, "reason": "ok", "tries": 1}
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "judge-1" and request["body"]["temperature"] == 0.0
    assert request["body"]["messages"][0]["content"] == (
        "You are trying to tell if a candidate set of captions is describing the same image as a reference set of "
        "captions.\nCandidate set:\n- A dog.\n\nReference set:\n- A brown dog.\n- A puppy.\n\nOn a precise scale "
        "from 0 to 100, how likely is it that the candidate set is describing the same image as the reference set? "
        '(JSON format, with a key "score", value between 0 and 100, and a key "reason" with a string value.)\n'
    )


def test_429_is_retried_after_retry_after(server, tmp_path):
    server.script = lambda n, p: (
        (429, {"error": "slow down"}, {"Retry-After": "0.3"}, 0)
        if n == 1
        else (200, '{"score": 80, "reason": "r"}', {}, 0)
    )
    start = time.monotonic()
    result = clair.score_one(judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert time.monotonic() - start >= 0.3
    assert result["score"] == 0.8 and len(server.requests) == 2


def test_time_outs_5xx_and_broken_answers_are_retried(server, tmp_path):
    server.script = lambda n, p: {
        1: (200, "late", {}, 1.0),
        2: (503, {}, {}, 0),
        3: (200, b"<html>not json</html>", {}, 0),
    }.get(n, (200, '{"score": 10}', {}, 0))
    result = clair.score_one(judge(server, timeout=0.3), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert result["score"] == 0.1 and len(server.requests) == 4


def test_unreadable_answer_is_asked_again_then_read_as_a_number(server, tmp_path):
    server.script = lambda n, p: (200, "I cannot decide." if n == 1 else "85", {}, 0)
    result = clair.score_one(judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert result == {"score": 0.85, "reason": "Unknown", "tries": 2}


def test_three_unreadable_answers_score_zero(server, tmp_path):
    server.script = lambda n, p: (200, "no idea", {}, 0)
    result = clair.score_one(judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert result == {"score": 0.0, "reason": None, "tries": 3, "unparsed": True}
    assert len(server.requests) == 3


def test_refusals_and_exhausted_retries_stop_with_a_clear_error(server, tmp_path):
    server.script = lambda n, p: (401, {"error": "bad key"}, {}, 0)
    with pytest.raises(clair.JudgeError, match="answered HTTP 401"):
        clair.score_one(judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert len(server.requests) == 1
    server.script = lambda n, p: (500, {}, {}, 0)
    with pytest.raises(clair.JudgeError, match="failed 3 times, last: HTTP 500"):
        clair.score_one(judge(server, retries=2), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert len(server.requests) == 4


def test_without_a_key_no_authorization_is_sent_even_with_openai_api_key_set(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    clair.score_one(judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert [r["auth"] for r in server.requests] == [None]


def test_answers_that_are_never_chat_completions_stop_with_a_clear_error(server, tmp_path):
    server.script = lambda n, p: (200, b"<html>a proxy page</html>", {}, 0)
    with pytest.raises(clair.JudgeError, match="failed 2 times, last: not a chat-completions answer: .*a proxy page"):
        clair.score_one(judge(server, retries=1), clair.AnswerCache(tmp_path / "c.jsonl"), ["a"], ["b"])
    assert len(server.requests) == 2


def test_judge_down_names_the_refused_connection(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(clair.JudgeError, match=f"judge at http://127.0.0.1:{port}/v1 failed 1 times, last: .*refused"):
        clair.Judge(f"http://127.0.0.1:{port}/v1", "m", retries=0).complete("hello")


def test_without_the_openai_package_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # import openai now raises ImportError
    needs = r"^the CLAIR judge needs the openai package: pip install 'neverfade\[clair\]'$"
    with pytest.raises(UserError, match=needs):
        clair.Judge("http://127.0.0.1:1/v1", "m")


def write_captions(tmp_path, n):
    return write_jsonl(tmp_path / "caps.jsonl", [{"id": f"im{i}", "caption": f"caption {i}"} for i in range(n)])


REFERENCES = {f"im{i}": [f"reference {i}"] for i in range(8)}


def test_calls_run_at_most_concurrency_at_once(server, tmp_path):
    server.script = lambda n, p: (200, '{"score": 40, "reason": "r"}', {}, 0.15)
    result = clair.evaluate(
        captions.load(write_captions(tmp_path, 8)),
        REFERENCES,
        judge(server),
        clair.AnswerCache(tmp_path / "c.jsonl"),
        concurrency=3,
        n_boot=0,
    )
    assert 2 <= server.most_in_flight <= 3
    assert result["overall"]["CLAIR"] == pytest.approx(0.4)
    assert [r["id"] for r in result["per_caption"]] == [f"im{i}" for i in range(8)]
    assert all(r["reason"] == "r" for r in result["per_caption"])


def test_an_interrupted_evaluation_resumes_without_asking_again(server, tmp_path):
    path = write_captions(tmp_path, 8)
    score_of = lambda prompt: 10 * int(prompt.split("- caption ")[1][0])  # noqa: E731
    server.script = lambda n, p: (
        (200, json.dumps({"score": score_of(p), "reason": "r"}), {}, 0.02)
        if n <= 3
        else (400, {"error": "stop"}, {}, 0)
    )
    with pytest.raises(clair.JudgeError, match="HTTP 400"):
        clair.evaluate(
            captions.load(path),
            REFERENCES,
            judge(server),
            clair.AnswerCache(tmp_path / "c.jsonl"),
            concurrency=2,
            n_boot=0,
        )
    cached_first = len(server.answered)
    assert cached_first == 3 and len((tmp_path / "c.jsonl").read_text().splitlines()) == 3
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('{"key": "torn')  # what a killed process leaves
    requests_first = len(server.requests)
    server.script = lambda n, p: (200, json.dumps({"score": score_of(p), "reason": "r"}), {}, 0)
    result = clair.evaluate(
        captions.load(path), REFERENCES, judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), concurrency=2, n_boot=0
    )
    assert len(server.requests) - requests_first == 8 - cached_first
    assert max(Counter(server.answered).values()) == 1  # no prompt answered twice over both runs
    assert [r["score"] for r in result["per_caption"]] == pytest.approx([i / 10 for i in range(8)])


def test_captions_without_references_are_an_error(server, tmp_path):
    with pytest.raises(clair.AnnotationError, match="1 caption id\\(s\\) have no reference \\(first: 'im8'\\)"):
        clair.evaluate(
            captions.load(write_captions(tmp_path, 9)),
            REFERENCES,
            judge(server),
            clair.AnswerCache(tmp_path / "c.jsonl"),
        )
    assert server.requests == []


def test_references_from_iiw_docci_or_plain_jsonl(tmp_path):
    iiw = write_jsonl(tmp_path / "iiw.jsonl", [{"image/key": "aar_test_1", "IIW": "A long description."}])
    docci = write_jsonl(
        tmp_path / "docci.jsonl",
        [{"example_id": "test_1", "image_file": "test_1.jpg", "description": "D.", "split": "test"}],
    )
    plain = write_jsonl(tmp_path / "refs.jsonl", [{"id": 7, "references": ["a", "b"]}, {"id": "8", "references": "c"}])
    assert clair.load_references(iiw) == {"aar_test_1": ["A long description."]}
    assert clair.load_references(docci) == {"test_1": ["D."]}
    assert clair.load_references(plain) == {"7": ["a", "b"], "8": ["c"]}


def test_cli_scores_saves_reasons_and_reuses_the_cache(server, tmp_path, capsys, monkeypatch):
    server.script = lambda n, p: (200, '{"score": 62.5, "reason": "close"}', {}, 0)
    monkeypatch.setenv("JUDGE_KEY", "sk-env")
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": k, "references": v} for k, v in REFERENCES.items()])
    args = [
        "eval",
        "clair",
        str(write_captions(tmp_path, 4)),
        "--references",
        str(refs),
        "--judge-url",
        server.url,
        "--judge-model",
        "m",
        "--key-env",
        "JUDGE_KEY",
        "--cache",
        str(tmp_path / "c.jsonl"),
        "--out",
        str(tmp_path / "r.json"),
        "--bootstrap",
        "0",
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["caps", "62.50", "4"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["per_caption"][0] == {"id": "im0", "score": 0.625, "reason": "close", "tries": 1}
    assert {r["auth"] for r in server.requests} == {"Bearer sk-env"} and len(server.requests) == 4
    assert main(args) == 0
    assert len(server.requests) == 4


def test_caption_ids_that_are_image_file_names_find_their_references(server, tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [{"id": "im3.jpg", "caption": "c"}])
    result = clair.evaluate(
        captions.load(path), REFERENCES, judge(server), clair.AnswerCache(tmp_path / "c.jsonl"), n_boot=0
    )
    assert result["per_caption"][0]["id"] == "im3.jpg"
    assert "- reference 3\n" in server.requests[0]["body"]["messages"][0]["content"]
