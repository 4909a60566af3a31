"""`train.py synth`: an instruction-data factory over any OpenAI-compatible chat API (OpenAI, vLLM, our serve.py).

    OPENAI_API_KEY=... python train.py synth --base-url https://api.openai.com/v1 --model gpt-3.5-turbo \\
        --recipe style --out data/synth/style

The four steps:
  1. topics      one request -> `1_topics.txt` (one per line; or give your own with --topics FILE)
  2. dialogues   per_topic requests per topic -> `2_dialogues.jsonl` {"id", "topic", <fields>}
  3. rewrite     one request per dialogue -> `3_rewritten.jsonl` (optional step; the style recipe restyles the answer)
  4. final       `dataset.json` (alpaca: instruction / input / output, the `TslDial.json` layout) and
                 `data/` (our parquet splits, through `utils.prepare`: cleaned, deduplicated, split)

A recipe is a folder (`utils/recipes/NAME/` or any path): `recipe.json` names a prompt file, the message role, the
sampling options and the expected JSON fields of each step; prompt files are plain text in which `{count}`, `{topic}`,
`{dialogue}` (the step-2 record as JSON) and `{<field>}` are replaced; other braces stay as written. A new recipe
needs no code. Replies are parsed as JSON (the first JSON value in the reply, so a chatty preamble or a code fence
is tolerated; never `eval`), validated, and a failing reply is asked again up to --attempts times; every failure
lands in `errors.jsonl` with the raw reply, and a run in which any item failed ends with "N items failed, rerun to
retry them" and exit status 3 (0 only when every item is done). HTTP 429 / 5xx / timeouts / dropped connections are
retried with exponential backoff and jitter (Retry-After honoured); 401 / 403 / 404 stop the run. Every record is
appended (and flushed) the moment it arrives, keyed by id (`t03-00017`: topic 3, dialogue 17), so a killed run
restarted with the same --out continues where it stopped: nothing done twice, nothing lost. The API key comes from
OPENAI_API_KEY only and is never printed or written. The HTTP client is httpx (a thread-safe connection pool); no
OpenAI SDK needed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from utils.io import atomic_write_text

RECIPES = Path(__file__).resolve().parent / "recipes"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}
TOPICS_FILE, DIALOGUES_FILE, REWRITTEN_FILE = "1_topics.txt", "2_dialogues.jsonl", "3_rewritten.jsonl"
ERRORS_FILE, DATASET_FILE, PARQUET_DIR = "errors.jsonl", "dataset.json", "data"
RESERVED_FIELDS = ("id", "topic", "dialogue", "count")  # record keys and placeholders the factory fills itself
EXIT_ITEMS_FAILED = 3  # the run finished, but some items failed every attempt: a rerun retries them


# ---- recipes -------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    prompt: str                        # template text
    role: str = "user"                 # the message role the prompt is sent as
    sampling: dict = field(default_factory=dict)  # request fields: max_tokens, temperature, top_p, ...
    fields: tuple[str, ...] = ()       # string keys the JSON reply must hold (steps 2 and 3)
    keep: tuple[str, ...] = ()         # fields the rewrite must leave unchanged
    count: int = 0                     # topics to ask for (step 1)
    per_topic: int = 0                 # dialogues per topic (step 2)


@dataclass
class Recipe:
    name: str
    topics: Step
    dialogues: Step
    rewrite: Step | None
    final: dict[str, str]              # alpaca key -> a field of the last step, "topic", or "" (left empty)


def _recipe_dir(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if (path / "recipe.json").is_file():
        return path
    if (RECIPES / str(name_or_path) / "recipe.json").is_file():
        return RECIPES / str(name_or_path)
    known = sorted(p.name for p in RECIPES.iterdir() if (p / "recipe.json").is_file())
    raise FileNotFoundError(f"recipe {str(name_or_path)!r}: no recipe.json there nor in {RECIPES} "
                            f"(known: {', '.join(known)})")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe folder, checked up front: every error names the file and the key."""
    folder = _recipe_dir(name_or_path)
    file = folder / "recipe.json"
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None

    def step(key: str, required: bool = True) -> Step | None:
        d = spec.get(key)
        if d is None and not required:
            return None
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise ValueError(f"{file}: key {key!r} must be an object with a 'prompt' file name")
        prompt_file = folder / d["prompt"]
        if not prompt_file.is_file():
            raise FileNotFoundError(f"{file}: {key}.prompt: {prompt_file} not found")
        s = Step(key, prompt_file.read_text(encoding="utf-8").rstrip("\n"), d.get("role", "user"),
                 dict(d.get("sampling", {})), tuple(d.get("fields", ())), tuple(d.get("keep", ())),
                 int(d.get("count", 0)), int(d.get("per_topic", 0)))
        if s.role not in ("system", "user"):
            raise ValueError(f"{file}: {key}.role must be 'system' or 'user', got {s.role!r}")
        if key != "topics" and not s.fields:
            raise ValueError(f"{file}: {key}.fields must list the JSON keys the reply holds")
        if clash := [f for f in s.fields if f in RESERVED_FIELDS]:
            raise ValueError(f"{file}: {key}.fields {clash} collide with names the factory uses itself "
                             f"({', '.join(RESERVED_FIELDS)}); rename them")
        if not set(s.keep) <= set(s.fields):
            raise ValueError(f"{file}: {key}.keep {list(s.keep)} must be among its fields {list(s.fields)}")
        return s

    topics, dialogues, rewrite = step("topics"), step("dialogues"), step("rewrite", required=False)
    if topics.count < 1 or dialogues.per_topic < 1:
        raise ValueError(f"{file}: topics.count and dialogues.per_topic must be >= 1")
    last = rewrite or dialogues
    final = spec.get("final", {"instruction": "", "input": last.fields[0], "output": last.fields[-1]})
    if not isinstance(final, dict) or not {"input", "output"} <= set(final):
        raise ValueError(f"{file}: 'final' must map alpaca keys (instruction, input, output) to fields")
    for k, v in final.items():
        if v not in (*last.fields, "topic", ""):
            raise ValueError(f"{file}: final.{k} = {v!r} names no field of step {last.name!r} "
                             f"({', '.join(last.fields)}), nor 'topic', nor '' (left empty)")
    return Recipe(folder.name, topics, dialogues, rewrite, final)


def render(template: str, **values: str) -> str:
    """Replace `{name}` for the given names only (JSON examples in a prompt keep their braces), in one pass: a value
    that itself holds `{topic}` is left as written."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), template)


# ---- replies -------------------------------------------------------------------------------------------------------
class InvalidReply(ValueError):
    pass


def parse_json_reply(text: str, kind: type) -> Any:
    """The first JSON value of type `kind` (dict or list) in a reply: preambles, code fences and trailing chatter
    are skipped. Never eval."""
    opener = "{" if kind is dict else "["
    decoder = json.JSONDecoder()
    start, tries = text.find(opener), 0
    while start >= 0 and tries < 50:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, kind):
                return value
        except json.JSONDecodeError:
            pass
        start, tries = text.find(opener, start + 1), tries + 1
    raise InvalidReply(f"no JSON {'object' if kind is dict else 'list'} in the reply")


def validate_topics(reply: str, count: int) -> list[str]:
    value = parse_json_reply(reply, list)
    topics = list(dict.fromkeys(t.strip() for t in value if isinstance(t, str) and t.strip()))
    if not topics:
        raise InvalidReply("the topic list holds no non-empty string")
    return topics[:count]


def validate_record(reply: str, step: Step, source: dict | None = None) -> dict[str, str]:
    value = parse_json_reply(reply, dict)
    out = {}
    for key in step.fields:
        v = value.get(key)
        if not isinstance(v, str) or not v.strip():
            raise InvalidReply(f"key {key!r} is missing or not a non-empty string")
        out[key] = v.strip()
    for key in step.keep:
        if source is not None and out[key] != source[key]:
            raise InvalidReply(f"key {key!r} was changed (the recipe keeps it as it was)")
    return out


# ---- the HTTP client -----------------------------------------------------------------------------------------------
class FatalAPIError(RuntimeError):
    """Retrying cannot help (bad key, unknown model or URL): the run stops, resumable."""


class RequestFailed(RuntimeError):
    """The request failed after every retry (or with a non-retryable 4xx)."""


class ChatClient:
    """POST {base_url}/chat/completions with retries; thread-safe (one httpx connection pool)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 120.0,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self.http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout)
        except httpx.InvalidURL as e:
            raise FatalAPIError(_bad_url(base_url, e)) from None
        self.model, self.max_retries, self.backoff, self.max_backoff = model, max_retries, backoff, max_backoff
        self.retried = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def close(self) -> None:
        """Also tells requests still in flight on other threads (a stopped run) to give up rather than retry."""
        self._closed.set()
        self.http.close()

    def _wait(self, attempt: int, response: httpx.Response | None) -> None:
        with self._lock:
            self.retried += 1
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        if response is not None:
            try:
                delay = max(delay, min(self.max_backoff, float(response.headers.get("retry-after", 0))))
            except ValueError:
                pass
        if self._closed.wait(delay):
            raise RequestFailed("the run stopped")

    def complete(self, messages: list[dict], sampling: dict) -> str:
        """The reply's text (choices[0].message.content)."""
        body = {"model": self.model, "messages": messages, **sampling}
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            if self._closed.is_set():
                raise RequestFailed("the run stopped")
            try:
                r = self.http.post("chat/completions", json=body)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:  # a TransportError, but no retry can help
                raise FatalAPIError(_bad_url(str(self.http.base_url), e)) from None
            except (httpx.TimeoutException, httpx.TransportError) as e:
                if last:
                    raise RequestFailed(f"{type(e).__name__} after {attempt} retries: {e}") from None
                self._wait(attempt, None)
                continue
            if r.status_code == 200:
                try:
                    content = r.json()["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    raise RequestFailed(f"a 200 response without choices[0].message.content: {r.text[:500]}") \
                        from None
                return content or ""
            message = _error_message(r)
            if r.status_code in FATAL_STATUS:
                raise FatalAPIError(f"HTTP {r.status_code} from {r.request.url}: {message}")
            if r.status_code not in RETRY_STATUS or last:
                raise RequestFailed(f"HTTP {r.status_code} after {attempt} retries: {message}")
            self._wait(attempt, r)
        raise AssertionError("unreachable")


def _bad_url(url: str, e: Exception) -> str:
    return f"bad --base-url {url!r}: {e} (give the full URL, e.g. http://127.0.0.1:8000/v1)"


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


# ---- append-only JSON lines ----------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file that a killed run may have left with a torn last line: the torn tail is cut off
    (in the file too, so appends start on a fresh line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    records = []
    # "\n" only: str.splitlines() also splits on U+2028 / U+2029 / U+0085, which ensure_ascii=False writes as is
    for n, line in enumerate(data.decode("utf-8").split("\n")[:-1], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e}); fix or remove the line to resume") from None
    return records


class Appender:
    """One JSON object per line, flushed at once (a SIGKILL loses at most the line being written)."""

    def __init__(self, path: Path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


# ---- the run -------------------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    base_url: str
    model: str
    out_dir: str | Path
    recipe: str | Path = "style"
    topics_file: str | Path | None = None  # skip step 1: one topic per line
    per_topic: int | None = None           # None = the recipe's
    workers: int = 8
    attempts: int = 2                      # asks per item when the reply fails validation
    max_retries: int = 6                   # HTTP retries per ask (429 / 5xx / timeouts)
    timeout: float = 120.0
    backoff: float = 1.0                   # first retry waits about this many seconds, doubling
    temperature: float | None = None       # overrides every step's temperature
    max_tokens: int | None = None          # overrides every step's max_tokens
    parquet: bool = True
    seed: int = 23333
    progress: bool = True


@dataclass
class StepStats:
    done: int = 0        # written in this run
    resumed: int = 0     # already in the file
    failed: int = 0      # items that failed every attempt
    invalid: int = 0     # replies that failed validation (each one is in errors.jsonl)


@dataclass
class Outcome:
    key: str
    record: dict | None
    failures: list[tuple[str, str | None]]  # (error, raw reply)


def _ask(client: ChatClient, step: Step, sampling: dict, prompt: str, key: str, attempts: int,
         validate: Callable[[str], dict]) -> Outcome:
    failures: list[tuple[str, str | None]] = []
    for _ in range(attempts):
        try:
            raw = client.complete([{"role": step.role, "content": prompt}], sampling)
        except RequestFailed as e:
            return Outcome(key, None, failures + [(str(e), None)])
        try:
            return Outcome(key, validate(raw), failures)
        except InvalidReply as e:
            failures.append((str(e), raw))
    return Outcome(key, None, failures)


def _run_pool(jobs: Iterable[tuple[str, Callable[[], Outcome]]], workers: int) -> Iterator[Outcome]:
    """Run jobs with at most `workers` in flight (plus as many queued); yield outcomes as they complete, in the
    calling thread, so one writer appends every line. A job that raises (FatalAPIError) stops the run after the
    outcomes that finished with it are yielded; on any stop the queued jobs are cancelled and the in-flight ones are
    not waited for (the client's close() makes them give up instead of retrying), so a stop is prompt."""
    jobs = iter(jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth")
    running: set[Future] = set()
    try:
        while True:
            for key, fn in jobs:
                running.add(pool.submit(fn))
                if len(running) >= 2 * workers:
                    break
            if not running:
                return
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            errors = [f.exception() for f in finished if f.exception() is not None]
            yield from (f.result() for f in finished if f.exception() is None)
            if errors:
                raise errors[0]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class Factory:
    def __init__(self, cfg: SynthConfig, console: Console | None = None):
        self.cfg = cfg
        self.recipe = load_recipe(cfg.recipe)
        self.out = Path(cfg.out_dir)
        self.console = console or Console(stderr=True)
        self.client = ChatClient(cfg.base_url, cfg.model, os.environ.get("OPENAI_API_KEY") or None, cfg.timeout,
                                 cfg.max_retries, cfg.backoff)
        self.stats: dict[str, StepStats] = {}
        self.errors: Appender | None = None

    def sampling(self, step: Step) -> dict:
        s = dict(step.sampling)
        if self.cfg.temperature is not None:
            s["temperature"] = self.cfg.temperature
        if self.cfg.max_tokens is not None:
            s["max_tokens"] = self.cfg.max_tokens
        return s

    def log_failures(self, step: str, outcome: Outcome) -> None:
        for error, raw in outcome.failures:
            self.errors.write({"step": step, "id": outcome.key, "error": error, "raw": raw})

    # -- step 1
    def topics(self) -> list[str]:
        path = self.out / TOPICS_FILE
        if self.cfg.topics_file is not None:
            source = Path(self.cfg.topics_file)
            topics = [t.strip() for t in source.read_text(encoding="utf-8").splitlines() if t.strip()]
            if not topics:
                raise ValueError(f"{source}: no topics (one per line)")
            if path.exists() and [t.strip() for t in path.read_text(encoding="utf-8").splitlines()] != topics:
                raise ValueError(f"{path} holds other topics than {source}: topic ids would change; use a new --out")
        elif path.exists():
            topics = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
            self.stats["topics"] = StepStats(resumed=len(topics))
            return topics
        else:
            step = self.recipe.topics
            outcome = _ask(self.client, step, self.sampling(step), render(step.prompt, count=str(step.count)),
                           "topics", self.cfg.attempts, lambda raw: {"topics": validate_topics(raw, step.count)})
            self.log_failures("topics", outcome)
            self.stats["topics"] = StepStats(invalid=len(outcome.failures))
            if outcome.record is None:
                raise RuntimeError(f"step 1 gave no valid topic list in {self.cfg.attempts} attempts (see "
                                   f"{self.out / ERRORS_FILE}); retry, or pass --topics FILE")
            topics = outcome.record["topics"]
            self.stats["topics"].done = len(topics)
        atomic_write_text(path, "".join(t + "\n" for t in topics))
        return topics

    # -- steps 2 and 3
    def run_step(self, step: Step, file: str, jobs: list[tuple[str, str, dict | None, dict]]) -> list[dict]:
        """jobs: (id, prompt, source record or None, extra fields); returns every record of the step's file."""
        path = self.out / file
        have = {r["id"]: r for r in read_jsonl(path)}
        todo = [j for j in jobs if j[0] not in have]
        stats = self.stats[step.name] = StepStats(resumed=len(jobs) - len(todo))
        sampling, retried0 = self.sampling(step), self.client.retried
        extras = {key: (source, extra) for key, _, source, extra in todo}

        def job(key: str, prompt: str, source: dict | None) -> Callable[[], Outcome]:
            return lambda: _ask(self.client, step, sampling, prompt, key, self.cfg.attempts,
                                lambda raw: validate_record(raw, step, source))

        out = Appender(path)
        progress = Progress(TextColumn(f"step {step.name:<9}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("[green]done {task.fields[done]}[/] [red]failed {task.fields[failed]}[/] "
                                       "[yellow]retried {task.fields[retried]}[/] [dim]invalid {task.fields[invalid]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                            disable=not self.cfg.progress)
        try:
            with progress:
                bar = progress.add_task(step.name, total=len(jobs), completed=stats.resumed, done=0, failed=0,
                                        retried=0, invalid=0)
                for outcome in _run_pool(((k, job(k, p, s)) for k, p, s, _ in todo), self.cfg.workers):
                    self.log_failures(step.name, outcome)
                    stats.invalid += sum(raw is not None for _, raw in outcome.failures)
                    if outcome.record is None:
                        stats.failed += 1
                    else:
                        _, extra = extras[outcome.key]
                        record = {"id": outcome.key, **extra, **outcome.record}
                        out.write(record)
                        have[outcome.key] = record
                        stats.done += 1
                    progress.update(bar, advance=1, done=stats.done, failed=stats.failed,
                                    retried=self.client.retried - retried0, invalid=stats.invalid)
        finally:
            out.close()
        return [have[k] for k, *_ in jobs if k in have]

    def dialogues(self, topics: list[str]) -> list[dict]:
        step = self.recipe.dialogues
        n = self.cfg.per_topic or step.per_topic
        jobs = [(f"t{i:02d}-{j:05d}", render(step.prompt, topic=t), None, {"topic": t})
                for j in range(n) for i, t in enumerate(topics)]  # round-robin: a partial run covers all topics
        return self.run_step(step, DIALOGUES_FILE, jobs)

    def rewrite(self, dialogues: list[dict]) -> list[dict]:
        step = self.recipe.rewrite
        jobs = []
        for d in dialogues:
            fields = {k: d[k] for k in self.recipe.dialogues.fields}
            prompt = render(step.prompt, dialogue=json.dumps(fields, ensure_ascii=False), topic=d["topic"], **fields)
            jobs.append((d["id"], prompt, fields, {"topic": d["topic"]}))
        return self.run_step(step, REWRITTEN_FILE, jobs)

    # -- step 4
    def final(self, records: list[dict]) -> dict:
        rows = [{k: r[v] if v else "" for k, v in self.recipe.final.items()}
                for r in sorted(records, key=lambda r: r["id"])]
        atomic_write_text(self.out / DATASET_FILE, json.dumps(rows, ensure_ascii=False, indent=4))
        result = {"alpaca": len(rows)}
        if self.cfg.parquet and rows:
            from utils.prepare import PrepareConfig, prepare_corpora
            stats = prepare_corpora([("alpaca", self.out / DATASET_FILE)], self.out / PARQUET_DIR,
                                    PrepareConfig(seed=self.cfg.seed, overwrite=True))
            result["parquet"] = stats["splits"]
        return result

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.errors = Appender(self.out / ERRORS_FILE)
        try:
            topics = self.topics()
            records = self.dialogues(topics)
            if self.recipe.rewrite is not None:
                records = self.rewrite(records)
            final = self.final(records)
        finally:
            self.errors.close()
            self.client.close()
        summary = {"recipe": self.recipe.name, "topics": len(topics), "final": final,
                   "retried": self.client.retried,
                   "steps": {k: vars(v) for k, v in self.stats.items()}}
        return summary


def run_synth(cfg: SynthConfig, console: Console | None = None) -> dict:
    """Run (or resume) the factory; returns per-step counts."""
    return Factory(cfg, console).run()


def failed_items(summary: dict) -> int:
    """Items of this run that failed every attempt (each is asked again by a rerun with the same --out)."""
    return sum(step["failed"] for step in summary["steps"].values())


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"synth: recipe {summary['recipe']}, {summary['topics']} topics")
    for col in ("step", "written now", "resumed", "failed", "invalid replies"):
        table.add_column(col, justify="left" if col == "step" else "right")
    for name, s in summary["steps"].items():
        table.add_row(name, str(s["done"]), str(s["resumed"]), str(s["failed"]), str(s["invalid"]))
    console.print(table)
    console.print(f"HTTP retries: {summary['retried']}; final: {summary['final']}")


# ---- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, command: str = "synth") -> None:
    d = SynthConfig(base_url="", model="", out_dir="")
    parser.add_argument("--base-url", default="https://api.openai.com/v1",
                        help="OpenAI-compatible API root (…/v1); the key is read from OPENAI_API_KEY")
    parser.add_argument("--model", required=True, help="model name sent with every request")
    parser.add_argument("--recipe", default=d.recipe, help=f"recipe name under {RECIPES} or a recipe folder path")
    parser.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    parser.add_argument("--topics", default=None, help="topics file (one per line) instead of step 1")
    parser.add_argument("--per-topic", type=int, default=None, help="dialogues per topic; unset = the recipe's")
    parser.add_argument("--workers", type=int, default=d.workers, help="concurrent requests")
    parser.add_argument("--attempts", type=int, default=d.attempts,
                        help="asks per item when a reply fails validation (each failure goes to errors.jsonl)")
    parser.add_argument("--max-retries", type=int, default=d.max_retries,
                        help="HTTP retries per ask on 429 / 5xx / timeouts, with exponential backoff")
    parser.add_argument("--timeout", type=float, default=d.timeout, help="seconds per HTTP request")
    parser.add_argument("--backoff", type=float, default=d.backoff, help="first retry delay in seconds (doubles)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="override every step's temperature; unset = the recipe's")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="override every step's max_tokens; unset = the recipe's")
    parser.add_argument("--parquet", action=argparse.BooleanOptionalAction, default=d.parquet,
                        help="also write our parquet splits (utils.prepare) under OUT/data")
    parser.add_argument("--seed", type=int, default=d.seed, help="shuffle seed of the parquet splits")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                        help="rich progress bars")


def main(args: argparse.Namespace) -> None:
    console = Console(stderr=True)
    cfg = SynthConfig(base_url=args.base_url, model=args.model, out_dir=args.out, recipe=args.recipe,
                      topics_file=args.topics, per_topic=args.per_topic, workers=args.workers,
                      attempts=args.attempts, max_retries=args.max_retries, timeout=args.timeout,
                      backoff=args.backoff, temperature=args.temperature, max_tokens=args.max_tokens,
                      parquet=args.parquet, seed=args.seed, progress=args.progress)
    try:
        summary = run_synth(cfg, console)
    except (FatalAPIError, RuntimeError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]synth stopped:[/] {e}\n(what was written is kept: rerun with the same --out to resume)")
        sys.exit(1)
    print_summary(summary, console)
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    failed = failed_items(summary)
    if failed:  # a partial dataset is not a success: schedulers and `synth && train` chains must see it
        console.print(f"{failed} item{'s' if failed != 1 else ''} failed, rerun to retry "
                      f"{'them' if failed != 1 else 'it'}", markup=False, highlight=False)
        raise SystemExit(EXIT_ITEMS_FAILED)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_parser)
    main(_parser.parse_args())
