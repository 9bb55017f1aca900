"""CLAIR (Chan et al. 2023): an LLM judge scores 0-100 how likely a candidate caption set describes the same image
as a reference set. Prompt and parsing are the original's (DavidMChan/clair): up to 3 tries; each answer is read as
the first {...} JSON object's "score" (and "reason"), else as the first number in the text (a number below 1 is taken
as already normalised and multiplied by 100); three unreadable answers score 0. Scores are stored divided by 100.

The judge is any OpenAI-compatible endpoint, asked through the `openai` client (`pip install 'neverfade[clair]'`):
chat completions at `url`, temperature 0, the key (when set) from an environment variable as a Bearer token. Calls
run `concurrency` at a time; the client retries HTTP 429, 5xx, time-outs and dropped connections with exponential
backoff and jitter, honouring Retry-After. Every judge answer is appended to a JSONL cache, flushed and synced as it
arrives, keyed by (judge model, prompt, try number), so an interrupted evaluation resumes without asking any question
twice.

    judge = clair.Judge("https://api.openai.com/v1", "gpt-4o", api_key=os.environ["OPENAI_API_KEY"])
    result = clair.evaluate(captions.load("out/sparc.jsonl"), clair.load_references("IIW-400/data.jsonl"),
                            judge, clair.AnswerCache("clair-cache.jsonl"))
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neverfade import jsonl
from neverfade.data.coco import AnnotationError, read_jsonl
from neverfade.errors import UserError
from neverfade.eval import report
from neverfade.eval.captions import Captions

PROMPT = """\
You are trying to tell if a candidate set of captions is describing the same image as a reference set of captions.
Candidate set:
{candidate_statements}
Reference set:
{target_statements}
On a precise scale from 0 to 100, how likely is it that the candidate set is \
describing the same image as the reference set? (JSON format, with a key "score", \
value between 0 and 100, and a key "reason" with a string value.)
"""
TABLE_COLUMNS = [("CLAIR", "CLAIR", True), ("n", "n", False)]


class JudgeError(UserError):
    """The judge cannot be used: a refused request, or no answer after every retry. Answers so far are cached."""


def build_prompt(candidates: list[str], references: list[str]) -> str:
    return PROMPT.format(
        candidate_statements="".join(f"- {c}\n" for c in candidates),
        target_statements="".join(f"- {t}\n" for t in references),
    )


def parse(text: str) -> tuple[float | None, str | None]:
    """(score 0-100, reason) from a judge answer, (None, None) when it holds neither JSON score nor number."""
    try:
        data = json.loads("{" + text.split("{")[1].split("}")[0] + "}")
        return float(data["score"]), str(data.get("reason", "Unknown"))
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError):
        pass
    numbers = re.findall(r"\d*\.?\d+", text)
    if not numbers:
        return None, None
    score = float(numbers[0])
    reason = re.findall(r"(?i)reason.*", text)
    return (
        score * 100 if score < 1 else score,
        reason[0].strip()[len("reason") :].replace(":", "").strip() if reason else "Unknown",
    )


def _retried_by_client(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500  # what the openai client retries


def _content(response: Any) -> str | None:
    """The answer's text, None when `response` is not a chat completion (the client gives a str for a non-JSON
    body, such as a proxy's error page)."""
    try:
        return str(response.choices[0].message.content or "")
    except (AttributeError, IndexError, TypeError):
        return None


@dataclass
class Judge:
    """A chat-completions endpoint through the `openai` client, which retries HTTP 408, 409, 429, 5xx, time-outs and
    dropped connections up to `retries` times with exponential backoff and jitter, honouring Retry-After. `stop` (an
    Event) keeps further prompts from being asked."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 6
    max_tokens: int = 1024
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        try:
            import openai
        except ImportError:
            raise UserError("the CLAIR judge needs the openai package: pip install 'neverfade[clair]'") from None
        self._openai = openai
        # The key is always given, so the client never reads OPENAI_API_KEY; without one, no Authorization header.
        self._client = openai.OpenAI(
            base_url=self.url, api_key=self.api_key or "none", max_retries=self.retries, timeout=self.timeout
        )
        self._headers = {} if self.api_key else {"Authorization": openai.Omit()}

    def complete(self, prompt: str) -> str:
        """The judge's answer to `prompt`; JudgeError when it refuses or no answer comes after every retry. An answer
        that is not a chat completion is asked for again, up to `retries` times."""
        openai, failed = self._openai, f"judge at {self.url} failed {self.retries + 1} times, last:"
        for _ in range(self.retries + 1):
            if self.stop.is_set():
                raise JudgeError("stopped")
            try:
                response = self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=0.0,
                    max_tokens=self.max_tokens,
                    extra_headers=self._headers,
                )
            except openai.APIStatusError as err:
                if _retried_by_client(err.status_code):
                    raise JudgeError(f"{failed} HTTP {err.status_code}") from None
                hint = " (no API key was given)" if err.status_code in (401, 403) and not self.api_key else ""
                raise JudgeError(
                    f"judge at {self.url} answered HTTP {err.status_code}{hint}: {err.response.text[:300]}"
                ) from None
            except openai.APITimeoutError:
                raise JudgeError(f"{failed} no answer within {self.timeout:g} s") from None
            except openai.APIConnectionError as err:
                cause = err.__cause__ or err
                raise JudgeError(f"{failed} {type(cause).__name__}: {cause}") from None
            content = _content(response)
            if content is not None:
                return content
        raise JudgeError(f"{failed} not a chat-completions answer: {str(response)[:200]!r}")


class AnswerCache:
    """Judge answers by (model, prompt, try), kept in an append-only JSONL file, read by neverfade.jsonl's policy: a
    torn last line (a killed run) is ignored with a warning and cut off before anything is appended; any other bad
    line is a UserError naming it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self._lock = threading.Lock()
        if not self.path.is_file():
            return
        number = 0
        for number, record in jsonl.read_jsonl(self.path):
            if not (
                isinstance(record, dict)
                and isinstance(record.get("key"), str)
                and isinstance(record.get("answer"), str)
            ):
                raise UserError(f"{self.path}:{number}: not a judge answer (a JSON object with 'key' and 'answer')")
            self.answers[record["key"]] = record["answer"]
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn tail is cut off; a whole answer short of its newline gets it
            with open(self.path, "r+b") as f:
                if number == data.count(b"\n") + 1:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(data.rfind(b"\n") + 1)

    @staticmethod
    def key(model: str, prompt: str, attempt: int) -> str:
        return hashlib.sha256(json.dumps([model, prompt, attempt]).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, model: str, answer: str) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "model": model, "answer": answer}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.answers[key] = answer


def score_one(
    judge: Judge, cache: AnswerCache, candidates: list[str], references: list[str], tries: int = 3
) -> dict[str, Any]:
    """CLAIR of one candidate set: {"score" (0-1), "reason", "tries"}, asking the judge only what is not cached."""
    prompt = build_prompt(candidates, references)
    for attempt in range(tries):
        key = AnswerCache.key(judge.model, prompt, attempt)
        answer = cache.get(key)
        if answer is None:
            answer = judge.complete(prompt)
            cache.put(key, judge.model, answer)
        score, reason = parse(answer)
        if score is not None:
            return {"score": score / 100, "reason": reason, "tries": attempt + 1}
    return {"score": 0.0, "reason": None, "tries": tries, "unparsed": True}


def load_references(path: str | Path) -> dict[str, list[str]]:
    """id -> reference descriptions, from IIW-400 or DOCCI JSONL, or {"id", "references": [...] | str} records."""
    from neverfade.data.docci import docci
    from neverfade.data.iiw import iiw400

    _, first = next(read_jsonl(path), (0, {}))
    if "references" in first:
        references = {}
        for number, record in read_jsonl(path):
            if "id" not in record or not isinstance(record.get("references"), (list, str)):
                raise AnnotationError(f"{path}: line {number} needs 'id' and 'references' (a list or a string)")
            refs = record["references"]
            references[str(record["id"])] = [refs] if isinstance(refs, str) else [str(r) for r in refs]
        return references
    items = docci(path, split=None) if "example_id" in first else iiw400(path)
    return {item.id: item.meta["references"] for item in items}


def metrics(sums: np.ndarray) -> dict[str, np.ndarray]:
    return {"CLAIR": report.ratio(sums[..., 0], sums[..., 1])}


def evaluate(
    captions: Captions,
    references: dict[str, list[str]],
    judge: Judge,
    cache: AnswerCache,
    concurrency: int = 8,
    tries: int = 3,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean CLAIR over the captions, a bootstrap CI over images, and each caption's score and reason."""
    reference_of = {key: references.get(key, references.get(Path(key).stem)) for key in captions.records}
    missing = [key for key, refs in reference_of.items() if refs is None]  # ids may be image file names
    if missing:
        raise AnnotationError(
            f"{captions.path}: {len(missing)} caption id(s) have no reference (first: {missing[0]!r})"
        )
    keys = list(captions.records)
    judge.stop.clear()
    scored: dict[str, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {
            pool.submit(score_one, judge, cache, [captions.records[k]["caption"]], reference_of[k], tries): k
            for k in keys
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="CLAIR", unit="caption"):
            scored[futures[future]] = future.result()
    except BaseException:
        judge.stop.set()  # in-flight calls finish and are cached; queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    per_caption = [{"id": k, **scored[k]} for k in keys]
    counts = np.array([[r["score"], 1.0] for r in per_caption])
    return {
        "metric": "clair",
        **captions.describe(),
        "judge": {"url": judge.url, "model": judge.model, "tries": tries},
        "overall": {
            **report.point(counts, metrics),
            "n": len(counts),
            "unparsed": sum(1 for r in per_caption if r.get("unparsed")),
        },
        "ci": report.bootstrap(counts, metrics, n=n_boot, seed=seed) if n_boot else {},
        "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "over": "images"},
        "per_caption": per_caption,
    }
