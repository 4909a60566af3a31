"""The instruction-data factory against the real server (serve.py on loopback, real HTTP, no mocked client).

Two tiny models share one tokenizer: a random one answers garbage (the failure path: every reply lands in
errors.jsonl), and one fine-tuned here, in a few hundred CPU steps, to answer the style recipe's own prompts in the
recipe's JSON format for three topics (the success path: real generations pass validation). The tuned server has a
queue of 2, so the factory's concurrent workers get real 429s and must back off and retry.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_serve import Server, build_tokenizer, tiny_config

from model import Transformer, save_model
from trainer.config import TrainConfig
from trainer.data import sft_loader
from trainer.loop import Trainer
from trainer.stages import FullModelIO
from utils.synth import (
    Appender,
    ChatClient,
    FatalAPIError,
    InvalidReply,
    Outcome,
    _run_pool,
    load_recipe,
    parse_json_reply,
    read_jsonl,
    render,
    validate_record,
    validate_topics,
)

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-synth-secret-4242"
CONTEXT = 768
TOPICS = ["天气", "电影", "音乐"]
DIALOGUES = {  # hand-written in the seed's style: topic -> (plain dialogue, the answer restyled)
    "天气": ({"问": "今天天气怎么样？", "答": "今天晴天，适合出去走走。"},
             "噢，我亲爱的朋友，今天可是个大晴天，我敢发誓，再适合散步不过了！"),
    "电影": ({"问": "你最近看过什么好电影吗？", "答": "看了一部科幻片，很精彩。"},
             "天啊，宝贝儿，我最近看了一部科幻片，我的上帝！简直精彩极了！"),
    "音乐": ({"问": "你喜欢什么音乐？", "答": "我喜欢古典音乐。"},
             "嘿，老伙计，我最爱古典音乐了，耶稣保佑，那旋律真是迷人！"),
}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def recipe_examples() -> list[dict]:
    """(prompt, response): the exact prompts the factory sends with the style recipe, and answers in its format."""
    r = load_recipe("style")
    examples = [{"prompt": render(r.topics.prompt, count=str(r.topics.count)), "response": dumps(TOPICS)}]
    for topic, (dialogue, styled) in DIALOGUES.items():
        examples.append({"prompt": render(r.dialogues.prompt, topic=topic), "response": dumps(dialogue)})
        examples.append({"prompt": render(r.rewrite.prompt, dialogue=dumps(dialogue)),
                         "response": dumps({"问": dialogue["问"], "答": styled})})
    return examples


# ---- fixtures: the two models and their servers --------------------------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(garbage model dir, tuned model dir). The tuning is deterministic: fixed seeds, 7 examples, greedy checks."""
    path = tmp_path_factory.mktemp("synth-models")
    examples = recipe_examples()
    tok = build_tokenizer(path, "\n".join(e["prompt"] + e["response"] for e in examples) * 4, 1200)
    torch.manual_seed(0)
    model = Transformer(tiny_config(tok, CONTEXT, hidden=96, layers=2))
    garbage = save_model(model, path / "garbage", tokenizer=tok)
    cfg = TrainConfig(out_dir=str(path / "run"), max_steps=100, batch_size=2, lr=5e-3, warmup_steps=10,
                      weight_decay=0.0, mixed_precision="no", cpu=True, log_every=50, save_total_limit=1)
    loader = sft_loader(examples, tok, "chatml", max_seq_len=CONTEXT, batch_size=cfg.batch_size)
    model.config.eos_token_id = sorted({tok.eos_id, tok.token_to_id("<|im_end|>")})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains fastest on one thread (no contention on a busy 2-core box)
    try:
        Trainer(model, loader, cfg, FullModelIO(tok)).train()
    finally:
        torch.set_num_threads(threads)
    return garbage, path / "run" / "latest"


@pytest.fixture(scope="session")
def garbage_server(models):
    s = Server(models[0], "--api-key", KEY)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tuned_server(models):
    s = Server(models[1], "--api-key", KEY, "--max-queue", "2")
    yield s
    s.close()


def synth_cmd(server: Server, out: Path, *flags: str) -> list[str]:
    train = (REPO / "train.py").read_text()
    entry = [str(REPO / "train.py"), "synth"] if '"synth"' in train else ["-m", "utils.synth"]
    return [sys.executable, *entry, "--base-url", server.url + "/v1", "--model", "tiny", "--out", str(out),
            "--temperature", "0", "--max-tokens", "120", "--backoff", "0.1", "--no-progress", *flags]


def synth(server: Server, out: Path, *flags: str, key: str = KEY) -> subprocess.CompletedProcess:
    return subprocess.run(synth_cmd(server, out, *flags), cwd=str(REPO), capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OPENAI_API_KEY=key))


def summary(proc: subprocess.CompletedProcess, code: int = 0) -> dict:
    """The run's JSON summary (its last stdout line), after checking its exit status: 0 when every item is done."""
    assert proc.returncode == code, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- replies and recipes (no server) -------------------------------------------------------------------------------
def test_json_replies_are_found_in_chatter_and_never_evaluated():
    assert parse_json_reply('Sure! Here it is:\n```json\n{"问": "a", "答": "b"}\n```', dict) == {"问": "a", "答": "b"}
    assert parse_json_reply("话题：[1, 2] 以及 [\"美食\", \"旅游\"]", list) == [1, 2]
    assert validate_topics('["美食", " 旅游 ", "美食", 3, ""]', 20) == ["美食", "旅游"]
    for bad in ("{'问': '单引号', '答': 'Python'}", "__import__('os').system('echo hi')", "{broken", ""):
        with pytest.raises(InvalidReply):
            parse_json_reply(bad, dict)
    step = load_recipe("style").rewrite
    with pytest.raises(InvalidReply, match="changed"):
        validate_record(dumps({"问": "另一个问题", "答": "噢"}), step, {"问": "原问题", "答": "x"})
    with pytest.raises(InvalidReply, match="'答'"):
        validate_record(dumps({"问": "原问题", "答": 3}), step, {"问": "原问题", "答": "x"})


def test_seed_outputs_pass_the_style_recipe_validation(shared_corpora):
    """Every record of the seed's real step-2 and step-3 outputs is a valid reply for our recipe."""
    recipe, folder = load_recipe("style"), shared_corpora / "translational_style"
    for file, step in (("Sample/2_Dialogues.jsonl", recipe.dialogues),
                       ("Sample/3_TranslationeseDialogues.jsonl", recipe.rewrite),
                       ("3_TranslationalDialogues.first6000.jsonl", recipe.rewrite)):
        lines = (folder / file).read_text(encoding="utf-8").splitlines()
        for line in lines:
            rec = json.loads(line)
            assert validate_record(line, step, {"问": rec["问"].strip()}) == {k: rec[k].strip() for k in step.fields}
    topics = (folder / "1_Topics.txt").read_text(encoding="utf-8").split()
    assert validate_topics(dumps(topics), recipe.topics.count) == topics


def test_a_new_recipe_needs_no_code_and_bad_recipes_name_the_key(tmp_path):
    (tmp_path / "p.txt").write_text("主题：{topic} {\"q\": \"x\"}", encoding="utf-8")
    spec = {"topics": {"prompt": "p.txt", "count": 3},
            "dialogues": {"prompt": "p.txt", "per_topic": 2, "fields": ["q", "a"]}}
    (tmp_path / "recipe.json").write_text(dumps(spec), encoding="utf-8")
    r = load_recipe(tmp_path)
    assert r.rewrite is None and r.final == {"instruction": "", "input": "q", "output": "a"}
    assert render(r.dialogues.prompt, topic="美食") == "主题：美食 {\"q\": \"x\"}"
    assert render("{dialogue} / {topic}", dialogue='{"问": "写{topic}"}', topic="美食") == '{"问": "写{topic}"} / 美食'
    spec["dialogues"]["keep"] = ["z"]
    (tmp_path / "recipe.json").write_text(dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match=r"recipe.json: dialogues.keep"):
        load_recipe(tmp_path)
    spec["dialogues"]["keep"] = []
    cases = ((["q", "topic"], None, r"recipe.json: dialogues.fields \['topic'\] collide"),
             (["q", "a"], {"input": "q", "output": "answer"}, r"recipe.json: final.output = 'answer' names no field"),
             (["q", "a"], {"input": "topic", "output": "a", "instruction": ""}, None))
    for fields, final, match in cases:
        spec["dialogues"]["fields"] = fields
        spec.pop("final", None) if final is None else spec.update(final=final)
        (tmp_path / "recipe.json").write_text(dumps(spec), encoding="utf-8")
        if match is None:
            assert load_recipe(tmp_path).final == final
        else:
            with pytest.raises(ValueError, match=match):
                load_recipe(tmp_path)


def test_a_torn_last_line_is_cut_off(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c', encoding="utf-8")
    assert [r["id"] for r in read_jsonl(f)] == ["a", "b"]
    assert f.read_text(encoding="utf-8") == '{"id": "a"}\n{"id": "b"}\n'


def test_unicode_line_separators_inside_a_record_do_not_split_it(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 raw; only "\\n" ends a JSON line."""
    f = tmp_path / "x.jsonl"
    records = [{"id": "a", "答": "第一行\u2028第二行\u2029第三段\x85第四行"},
               {"id": "b", "答": "\r\n内\v\f"}]
    out = Appender(f)
    for r in records:
        out.write(r)
    out.close()
    assert read_jsonl(f) == records


def test_a_base_url_without_scheme_stops_at_once_instead_of_retrying():
    for url in ("127.0.0.1:8000/v1", "localhost:8000/v1", "http://[::1/v1"):
        with pytest.raises(FatalAPIError, match="bad --base-url"):  # 6 retries with 60 s backoff would hang here
            ChatClient(url, "tiny", None, max_retries=6, backoff=60).complete([{"role": "user", "content": "hi"}], {})


def test_a_fatal_error_stops_the_pool_at_once_and_keeps_what_finished():
    """What finished before the failure is yielded; jobs still in flight are not waited for (they block until after
    the stop, which would deadlock a pool that drains on exit); jobs not yet submitted never start."""
    release, started = threading.Event(), []

    def job(name: str, action):
        def run():
            started.append(name)
            return action()
        return name, run

    def fatal():
        time.sleep(0.1)  # let "fine" finish first or together
        raise FatalAPIError("HTTP 401")

    jobs = [job("fine", lambda: Outcome("fine", {}, [])), job("fatal", fatal), job("stuck", release.wait),
            *(job(f"later{i}", lambda: release.wait() and Outcome("later", {}, [])) for i in range(20))]
    got = []
    with pytest.raises(FatalAPIError):
        for outcome in _run_pool(jobs, workers=3):
            got.append(outcome.key)
    release.set()
    assert got == ["fine"] and "stuck" in started and len(started) <= 6  # at most 2 * workers submitted


def test_main_exits_3_when_items_failed_and_returns_when_all_are_done(monkeypatch, capsys):
    import argparse

    from utils import synth as synth_module
    parser = argparse.ArgumentParser()
    synth_module.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--out", "unused", "--no-progress"])
    steps = {"topics": {"done": 3, "resumed": 0, "failed": 0, "invalid": 0},
             "dialogues": {"done": 5, "resumed": 0, "failed": 1, "invalid": 2},
             "rewrite": {"done": 4, "resumed": 0, "failed": 1, "invalid": 1}}
    result = {"recipe": "style", "topics": 3, "final": {"alpaca": 4}, "retried": 0, "steps": steps}
    monkeypatch.setattr(synth_module, "run_synth", lambda cfg, console: result)
    with pytest.raises(SystemExit) as e:
        synth_module.main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 3 and err.strip().splitlines()[-1] == "2 items failed, rerun to retry them"
    assert json.loads(out.strip().splitlines()[-1]) == result  # the summary is still printed
    steps["dialogues"]["failed"] = steps["rewrite"]["failed"] = 0
    assert synth_module.main(args) is None
    assert "failed, rerun" not in capsys.readouterr().err


# ---- against the server --------------------------------------------------------------------------------------------
def test_garbage_replies_are_captured_in_the_errors_file(garbage_server, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("天气\n电影\n", encoding="utf-8")
    out = tmp_path / "run"
    proc = synth(garbage_server, out, "--topics", str(topics), "--per-topic", "2", "--attempts", "2",
                 "--max-tokens", "24")
    s = summary(proc, code=3)  # failed items are not a success: exit 3, and the last line says what to do
    assert proc.stderr.strip().splitlines()[-1] == "4 items failed, rerun to retry them"
    assert s["steps"]["dialogues"] == {"done": 0, "resumed": 0, "failed": 4, "invalid": 8}
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) == 8 and {e["step"] for e in errors} == {"dialogues"}
    assert sorted({e["id"] for e in errors}) == ["t00-00000", "t00-00001", "t01-00000", "t01-00001"]
    assert all(e["raw"] and e["error"] for e in errors)
    assert read_jsonl(out / "2_dialogues.jsonl") == [] and json.loads((out / "dataset.json").read_text()) == []

    # step 1 with garbage stops the run with a clear message; an unknown model or a wrong key stops it too,
    # and the key is never printed or written
    cases = [((), KEY, "no valid topic list"), (("--model", "nope"), KEY, "HTTP 404"),
             ((), "sk-wrong-secret-1", "HTTP 401")]
    for flags, key, expect in cases:
        proc = synth(garbage_server, tmp_path / f"stop-{expect[-3:]}", "--max-tokens", "24", *flags, key=key)
        assert proc.returncode == 1 and expect in proc.stderr, proc.stderr
        written = "".join(p.read_text(errors="replace") for p in (tmp_path / f"stop-{expect[-3:]}").rglob("*")
                          if p.is_file())
        assert key not in proc.stdout + proc.stderr + written


def test_full_run_with_the_tuned_model(tuned_server, tmp_path):
    out = tmp_path / "run"
    s = summary(synth(tuned_server, out, "--per-topic", "2", "--workers", "4"))
    assert (out / "1_topics.txt").read_text(encoding="utf-8").split() == TOPICS
    assert s["steps"]["dialogues"]["done"] == 6 and s["steps"]["rewrite"]["done"] == 6
    assert s["retried"] > 0  # 4 workers against a queue of 2: real 429s, retried with backoff
    rewritten = {r["id"]: r for r in read_jsonl(out / "3_rewritten.jsonl")}
    for i, topic in enumerate(TOPICS):
        dialogue, styled = DIALOGUES[topic]
        for j in range(2):
            assert rewritten[f"t{i:02d}-{j:05d}"] == {"id": f"t{i:02d}-{j:05d}", "topic": topic,
                                                     "问": dialogue["问"], "答": styled}
    alpaca = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert len(alpaca) == 6 and alpaca[0] == {"instruction": "", "input": "今天天气怎么样？",
                                             "output": DIALOGUES["天气"][1]}
    # our parquet, through utils.prepare: the repeated greedy answers are deduplicated
    import pyarrow.parquet as pq
    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["prompt"] for r in rows) == sorted(d["问"] for d, _ in DIALOGUES.values())

    # a finished run, run again, does nothing twice
    again = summary(synth(tuned_server, out, "--per-topic", "2"))
    assert again["steps"]["dialogues"] == {"done": 0, "resumed": 6, "failed": 0, "invalid": 0}
    assert len(read_jsonl(out / "3_rewritten.jsonl")) == 6


def test_a_killed_run_resumes_without_duplicates_or_loss(tuned_server, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(synth_cmd(tuned_server, out, "--per-topic", "6", "--workers", "3"), cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OPENAI_API_KEY=KEY))
    dialogues = out / "2_dialogues.jsonl"
    deadline = time.monotonic() + 120
    while not (dialogues.exists() and len(dialogues.read_bytes().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, "synth ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_jsonl(dialogues)
    assert 5 <= len(before) < 18

    s = summary(synth(tuned_server, out, "--per-topic", "6", "--workers", "3"))
    assert s["steps"]["dialogues"]["resumed"] == len(before)
    assert s["steps"]["dialogues"]["done"] == 18 - len(before)
    for file in ("2_dialogues.jsonl", "3_rewritten.jsonl"):
        ids = [r["id"] for r in read_jsonl(out / file)]
        assert len(ids) == len(set(ids)) == 18, file  # no duplicates, nothing lost
    assert read_jsonl(dialogues)[:len(before)] == before  # earlier lines untouched
    assert len(json.loads((out / "dataset.json").read_text(encoding="utf-8"))) == 18
