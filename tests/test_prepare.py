"""`train.py prepare` end to end: outputs, stats, determinism, atomicity, and clear errors before any work."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train
from utils import prepare as prep
from utils.cleaning import CleanConfig
from utils.corpora import Record
from utils.dedup import DedupConfig
from utils.prepare import PrepareConfig, prepare_corpora, single_turns

REPO = Path(__file__).resolve().parents[1]


def load(out: Path, split: str | None = None) -> pd.DataFrame:
    files = sorted(out.glob(f"{split or '*'}-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("p") / "corpus"
    return out, prepare_corpora(None, out, PrepareConfig(split=(0.8, 0.1, 0.1)))


def test_bundled_samples_layout_and_schema(bundled):
    out, stats = bundled
    names = sorted(p.name for p in out.iterdir())
    assert names == ["stats.json", "test-00000.parquet", "train-00000.parquet", "valid-00000.parquet"]
    for f in out.glob("*.parquet"):
        meta = pq.ParquetFile(f)
        assert meta.schema_arrow.names == ["prompt", "response", "source"]
        assert meta.metadata.row_group(0).column(0).compression == "ZSTD"
    df = load(out)
    assert len(df) == stats["total"]["kept"] == sum(stats["splits"].values())
    assert set(df.source) == {"webtext", "baike", "medical", "zhihu", "belle", "wiki", "hc3", "instruct", "alpaca",
                              "sharegpt"}
    assert df.prompt.str.len().min() >= 1 and df.response.str.len().max() <= 512
    assert not df.duplicated(["prompt", "response"]).any()
    assert stats["splits"]["valid"] == round(len(df) * 0.1) and stats["splits"]["test"] == round(len(df) * 0.1)
    assert json.loads((out / "stats.json").read_text()) == stats


def test_bundled_stats_count_every_filter(bundled):
    _, stats = bundled
    c = stats["corpora"]
    assert c["webtext"]["dropped"]["low_star"] == 4
    assert c["belle"]["dropped"]["translation"] == 4 and c["belle"]["dropped"]["table"] == 2
    assert c["zhihu"]["dropped"]["near_duplicate"] == 2
    assert sum(v["dropped"].get("duplicate", 0) for v in c.values()) >= 4
    for name, v in c.items():
        if name != "hc3":  # one HC3 question yields one row per answer
            assert v["kept"] + sum(v["dropped"].values()) == v["read"], name
        assert v["seconds"] >= 0 and v["files"]


def test_same_seed_same_output_other_seed_other_order(tmp_path):
    cfg = dict(split=(0.9, 0.05, 0.05))
    a = prepare_corpora(None, tmp_path / "a", PrepareConfig(seed=7, **cfg))
    b = prepare_corpora(None, tmp_path / "b", PrepareConfig(seed=7, **cfg))
    c = prepare_corpora(None, tmp_path / "c", PrepareConfig(seed=8, **cfg))
    for split in ("train", "valid", "test"):
        fa, fb = tmp_path / "a" / f"{split}-00000.parquet", tmp_path / "b" / f"{split}-00000.parquet"
        assert fa.read_bytes() == fb.read_bytes()
    assert a["splits"] == b["splits"] == c["splits"]
    da, dc = load(tmp_path / "a"), load(tmp_path / "c")
    assert sorted(da.prompt) == sorted(dc.prompt) and list(da.prompt) != list(dc.prompt)


def test_shards_and_shuffle_cover_all_rows(tmp_path):
    stats = prepare_corpora(None, tmp_path / "o", PrepareConfig(shard_rows=64, chunk_rows=50))
    train_files = sorted((tmp_path / "o").glob("train-*.parquet"))
    assert len(train_files) == -(-stats["splits"]["train"] // 64)
    assert all(pq.ParquetFile(f).metadata.num_rows == 64 for f in train_files[:-1])
    ref = load(prepare_corpora(None, tmp_path / "r", PrepareConfig()) and tmp_path / "r")
    assert sorted(load(tmp_path / "o").prompt) == sorted(ref.prompt)  # chunking does not change the result


def test_multi_turn_policies():
    r = Record("q3", "a3", "sharegpt", [("q1", "a1"), ("q2", "a2")], "sys")
    assert [(x.prompt, x.response) for x in single_turns(r, "first")] == [("q1", "a1")]
    assert [(x.prompt, x.response) for x in single_turns(r, "turns")] == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    assert single_turns(r, "drop") == []
    assert single_turns(Record("q", "a"), "drop")[0].prompt == "q"


def test_bad_input_is_counted_not_fatal(tmp_path):
    d = tmp_path / "belle"
    d.mkdir()
    good = [json.dumps({"instruction": f"请介绍第{i}种常见的水果", "input": "",
                        "output": f"第{i}种水果很好吃，营养丰富，适合每天吃一些。"},
                       ensure_ascii=False) for i in range(30)]
    (d / "a.json").write_text("\n".join(good[:15] + ["{oops", '{"instruction": "缺少输出"}']) + "\n", encoding="utf-8")
    (d / "b.json").write_bytes(("\n".join(good[15:]) + "\n").encode() + b"\xc3\x28 bad\n")
    (d / "empty.json").write_text("")
    stats = prepare_corpora([("belle", d)], tmp_path / "o",
                            PrepareConfig(split=(1, 0, 0), dedup=DedupConfig(near=False)))
    c = stats["corpora"]["belle"]
    assert c["kept"] == 30
    assert c["dropped"]["bad_json"] == 1 and c["dropped"]["missing_field"] == 1
    assert c["dropped"]["undecodable"] == 1 and c["dropped"]["empty_file"] == 1
    wheres = {e["reason"]: e["where"] for e in c["examples"]}
    assert wheres["bad_json"] == f"{d / 'a.json'}:16" and wheres["undecodable"] == f"{d / 'b.json'}:16"
    assert stats["splits"] == {"train": 30, "valid": 0, "test": 0}
    assert pq.ParquetFile(tmp_path / "o" / "valid-00000.parquet").metadata.num_rows == 0


def test_errors_before_any_work(tmp_path, samples_dir):
    out = tmp_path / "o"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_corpora([("belle", samples_dir / "belle"), ("webtext", tmp_path / "missing.json")], out)
    with pytest.raises(ValueError, match="unknown corpus format"):
        prepare_corpora([("nope", samples_dir / "belle")], out)
    junk = tmp_path / "junk.json"
    junk.write_text("this is not json\nnor is this\n")
    with pytest.raises(ValueError, match=r"no readable belle record in .*junk.json \(bad_json at .*junk.json:1"):
        prepare_corpora([("belle", samples_dir / "belle"), ("belle", junk)], out)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.json").write_text("")
    with pytest.raises(ValueError, match="every file .* is empty"):
        prepare_corpora([("belle", tmp_path / "e")], out)
    assert not out.exists() and list(tmp_path.glob(".o.*")) == []
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        prepare_corpora([("belle", samples_dir / "belle")], out)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, samples_dir, monkeypatch):
    out = tmp_path / "o"
    prepare_corpora([("belle", samples_dir / "belle")], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpora(None, out, PrepareConfig(overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]        # no temporary left behind


def test_cli(tmp_path, samples_dir, capsys):
    out = tmp_path / "cli"
    train.main(["prepare", "--corpus", f"medical={samples_dir / 'medical'}", "--corpus", f"hc3={samples_dir / 'hc3'}",
                "--hc3-answers", "human", "--min-len", "medical=2,2", "--split", "0.5,0.25,0.25", "--seed", "3",
                "--out", str(out), "--no-near-dedup"])
    text = capsys.readouterr().out
    assert "medical" in text and "hc3" in text and "kept" in text
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["config"]["read"]["hc3_answers"] == "human"
            and stats["config"]["clean"]["min_lengths"]["medical"] == [2, 2])
    assert "near_duplicate" not in stats["corpora"]["medical"]["dropped"]
    assert stats["corpora"]["medical"]["dropped"].get("short_response", 0) == 0  # "多休息。" passes 2,2
    with pytest.raises(SystemExit):
        train.main(["prepare", "--corpus", "bogus=x", "--out", str(tmp_path / "x")])


def test_real_corpora_prepare(shared_corpora, tmp_path):
    stats = prepare_corpora([("medical", shared_corpora / "medical_dialogue"),
                             ("alpaca", shared_corpora / "translational_style" / "TslDial.json")], tmp_path / "o")
    med = stats["corpora"]["medical"]
    assert med["read"] == 7444 and med["kept"] > 6500 and med["dropped"]["duplicate"] > 0
    df = load(tmp_path / "o")
    assert len(df) == stats["total"]["kept"] and set(df.source) == {"medical", "alpaca"}


def test_worker_kinds_give_identical_output(tmp_path, samples_dir):
    src = [("zhihu", samples_dir / "zhihu"), ("medical", samples_dir / "medical")]
    outs = {}
    for worker in ("thread", "process", "inline"):
        prepare_corpora(src, tmp_path / worker, PrepareConfig(worker=worker, chunk_rows=30))
        outs[worker] = {p.name: p.read_bytes() for p in (tmp_path / worker).glob("*.parquet")}
    assert outs["thread"] == outs["process"] == outs["inline"]
    with pytest.raises(ValueError, match="worker"):
        PrepareConfig(worker="gpu")


@pytest.mark.parametrize("near", [True, False])
def test_nothing_survives_cleaning_gives_empty_splits(tmp_path, near):
    # a readable file whose only answer is too short: empty splits and the drop in stats, not a crash
    f = tmp_path / "web.json"
    f.write_text(json.dumps({"title": "为什么天空是蓝的", "content": "短", "star": 9}, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    out = tmp_path / "o"
    stats = prepare_corpora([("webtext", f)], out, PrepareConfig(dedup=DedupConfig(near=near)))
    assert stats["splits"] == {"train": 0, "valid": 0, "test": 0}
    assert stats["corpora"]["webtext"]["read"] == 1 and stats["corpora"]["webtext"]["kept"] == 0
    assert stats["corpora"]["webtext"]["dropped"] == {"short_response": 1}
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test-00000.parquet", "train-00000.parquet",
                                                     "valid-00000.parquet"]
    assert all(pq.ParquetFile(p).metadata.num_rows == 0 for p in out.glob("*.parquet"))


def test_same_format_twice_gets_unique_labels(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    for k in (1, 2):
        rows = [{"q": f"第{k}个文件的第{i}个问题是什么", "a": f"这是第{k}个文件第{i}个问题的回答"} for i in range(3)]
        (d / f"q{k}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    stats = prepare_corpora([("qa", d / "q1.json"), ("qa", d / "q2.json")], tmp_path / "o",
                            PrepareConfig(split=(1, 0, 0)))
    assert set(stats["corpora"]) == {"qa:q1.json", "qa:q2.json"}
    assert [c["kept"] for c in stats["corpora"].values()] == [3, 3]
    assert set(load(tmp_path / "o").source) == {"qa:q1.json", "qa:q2.json"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "q1.json").write_text("[]")
    assert prep.corpus_labels([("qa", d / "q1.json"), ("qa", tmp_path / "other" / "q1.json"), ("belle", d)]) == [
        "qa:q1.json#1", "qa:q1.json#2", "belle"]


def webtext_rows(n: int, tag: str = "") -> str:
    rows = [{"title": f"{tag}第{i}个问题：为什么天空是蓝色的",
             "content": f"{tag}第{i}个回答：因为瑞利散射，短波长的蓝光散射得更多。", "star": 9} for i in range(n)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_cli_refuses_an_output_directory_that_holds_its_input(tmp_path):
    """The reported case, end to end: `--out OUT --overwrite` with the raw corpus inside OUT used to delete it and
    exit 0. It is refused before any work, in one line, and the corpus is intact."""
    import subprocess
    import sys
    out = tmp_path / "OUT"
    (out / "raw").mkdir(parents=True)
    (out / "raw" / "web.json").write_text(webtext_rows(20), encoding="utf-8")
    before = (out / "raw" / "web.json").read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "prepare", "--corpus", f"webtext={out / 'raw'}",
                           "--out", str(out), "--overwrite"], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert f"--out {out} contains the input {out / 'raw'}" in proc.stderr
    assert (out / "raw" / "web.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"] and sorted(p.name for p in out.iterdir()) == ["raw"]


def test_output_directories_that_would_replace_inputs_or_homes_are_refused(tmp_path, monkeypatch, samples_dir):
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "web.json").write_text(webtext_rows(20), encoding="utf-8")
    home, work = tmp_path / "home", tmp_path / "home" / "work"
    work.mkdir(parents=True)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    web = [("webtext", data / "raw")]

    def validate_never(*a, **k):
        raise AssertionError("the output directory is checked before any input is read")

    monkeypatch.setattr(prep, "_validate", validate_never)
    cases = [(web, data, "contains the input"), (web, data / "raw", "is the input"),
             (web, tmp_path / "link", "contains the input"),          # the same directory through a link
             (web, data / "raw" / "out", "is inside the input"),
             ([("webtext", data / "raw" / "web.json")], data / "raw", "contains the input"),
             (None, samples_dir.parent, "contains the bundled samples"),
             (web, samples_dir.parent, "contains the bundled samples"),  # even when they are not an input (synth)
             (web, Path("."), "is the current directory"), (web, Path(".."), "is the home directory"),
             (web, tmp_path, "contains the home directory"), (web, REPO, "is the repository"),
             (web, REPO.parent, "contains the (repository|home directory)"),  # a clone in /tmp holds both
             (web, Path("/"), "is the filesystem root")]
    for sources, out, message in cases:
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=message) as e:
                prepare_corpora(sources, out, PrepareConfig(overwrite=overwrite))
            assert "\n" not in str(e.value), str(e.value)
    assert (data / "raw" / "web.json").read_text(encoding="utf-8") == webtext_rows(20)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere" / "deeper")
    with pytest.raises(ValueError, match="--out .. contains the current directory"):
        prepare_corpora(web, Path(".."), PrepareConfig(overwrite=True))
    monkeypatch.undo()
    stats = prepare_corpora(web, tmp_path / "prepared",  # beside the input: fine
                            PrepareConfig(split=(1, 0, 0), dedup=DedupConfig(near=False)))
    assert stats["total"]["kept"] == 20


def bad_file_dir(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A webtext directory: two good files and three bad ones (foreign text, binary, unreadable)."""
    d = tmp_path / "webtext"
    d.mkdir()
    (d / "a.json").write_text(webtext_rows(10, "甲"), encoding="utf-8")
    (d / "b.json").write_text(webtext_rows(10, "乙"), encoding="utf-8")
    bad = [d / "README.txt", d / "blob.json", d / "locked.json"]
    bad[0].write_text("This folder holds the webtext dump.\nSee the project page.\n", encoding="utf-8")
    bad[1].write_bytes(bytes(range(256)) * 8)
    if os.geteuid() == 0:  # root reads any file: a real file whose read fails instead
        bad[2].symlink_to("/proc/self/mem")
    else:
        bad[2].write_text(webtext_rows(3), encoding="utf-8")
        bad[2].chmod(0)
    return d, bad


def test_every_bad_file_of_a_directory_is_named_in_one_error(tmp_path):
    d, bad = bad_file_dir(tmp_path)
    with pytest.raises(ValueError) as e:
        prepare_corpora([("webtext", d)], tmp_path / "o")
    text = str(e.value)
    assert text.startswith("3 problems with the corpora (pass --skip-bad-files") and "--skip-bad-files" in text
    for f in bad:
        assert str(f) in text
    assert f"cannot read {bad[2]}:" in text and f"no readable webtext record in {bad[0]}" in text
    assert str(d / "a.json") not in text and not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webtext"]


def test_skip_bad_files_counts_them_in_stats_and_the_report(tmp_path, capsys):
    d, bad = bad_file_dir(tmp_path)
    out = tmp_path / "o"
    train.main(["prepare", "--corpus", f"webtext={d}", "--out", str(out), "--skip-bad-files", "--split", "1,0,0",
                "--no-near-dedup"])
    report = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    c = stats["corpora"]["webtext"]
    assert c["kept"] == 20 and c["files"] == [str(d / "a.json"), str(d / "b.json")]
    assert sorted(s["file"] for s in c["skipped_files"]) == sorted(map(str, bad))
    assert stats["total"]["skipped_files"] == 3 and stats["config"]["skip_bad_files"] is True
    assert "skipped 3 bad files (--skip-bad-files" in report
    lines = [line for line in report.splitlines() if line.startswith("  webtext: ")]
    assert len(lines) == 3 and all(any(str(f) in line for line in lines) for f in bad)
    # a corpus with nothing readable is still an error: skipping its files would leave nothing of it
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "README.txt").write_text("not a corpus\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no readable webtext record in .*README.txt") as e:
        prepare_corpora([("webtext", d), ("webtext", only_bad)], tmp_path / "o2", PrepareConfig(skip_bad_files=True))
    assert "pass --skip-bad-files" not in str(e.value)


# ----------------------------------------------------------------------------------------------- text (prose)

def zh_books_slice(shared: Path, per_source: int) -> list[dict]:
    """The first documents of each source (novel, classics_modern, law) of the real corpus, from three of its row
    groups only."""
    f = pq.ParquetFile(shared / "zh_books" / "zh_books_laws.parquet")
    rows = []
    for group in (0, 3, f.num_row_groups - 1):
        rows += f.read_row_group(group).slice(0, per_source).to_pylist()
    return rows


def assert_pieces_cover(text: str, pieces: list[str]) -> None:
    """The pieces are substrings of `text`, in order, with only white space between them."""
    pos = 0
    for piece in pieces:
        at = text.index(piece, pos)
        assert not text[pos:at].strip()
        pos = at + len(piece)
    assert not text[pos:].strip()


@pytest.fixture(scope="module")
def zh_books_prepared(shared_corpora, tmp_path_factory) -> tuple[list[dict], Path, dict]:
    """150 real documents through `train.py prepare --corpus text=...` with dedup off (so every piece is kept)."""
    rows = zh_books_slice(shared_corpora, 50)
    tmp = tmp_path_factory.mktemp("zh")
    pq.write_table(pa.Table.from_pylist(rows), tmp / "slice.parquet")
    out = tmp / "corpus"
    train.main(["prepare", "--corpus", f"text={tmp / 'slice.parquet'}", "--out", str(out), "--max-doc-chars", "1500",
                "--split", "0.8,0.1,0.1", "--no-dedup", "--no-near-dedup"])
    return rows, out, json.loads((out / "stats.json").read_text())


def test_text_corpus_round_trips_through_prepare(zh_books_prepared):
    from utils.cleaning import normalize_text, split_document, text_of
    rows, out, stats = zh_books_prepared
    df = load(out)
    got = [text_of(p, r) for p, r in zip(df.prompt, df.response)]
    assert set(df.source) == {"text"} and max(map(len, got)) <= 1500
    expected = {}
    for i, row in enumerate(rows):
        text = normalize_text(row["text"])
        assert "".join(text.split()) == "".join(row["text"].split())  # normalization moved white space only
        pieces = split_document(text, 1500).pieces
        assert_pieces_cover(text, pieces)
        for p in pieces:
            expected.setdefault(p, set()).add(i)
    assert Counter(got) == Counter({p: len(docs) for p, docs in expected.items()})
    # the pretraining document (trainer/data.py: prompt + "\n" + response) is the piece itself when it has a line
    multi = [(p, r, g) for p, r, g in zip(df.prompt, df.response, got) if r]
    assert all(f"{p}\n{r}" == g for p, r, g in multi) and len(multi) > 0.8 * len(got)
    # every document's pieces sit in one split
    split_of = {}
    for split in ("train", "valid", "test"):
        for p, r in zip(load(out, split).prompt, load(out, split).response):
            for doc in expected[text_of(p, r)]:
                split_of.setdefault(doc, set()).add(split)
    assert len(split_of) == len(rows) and all(len(s) == 1 for s in split_of.values())
    assert stats["splits"]["valid"] > 0 and stats["splits"]["test"] > 0


def test_text_corpus_stats_count_documents_pieces_and_cuts(zh_books_prepared):
    rows, out, stats = zh_books_prepared
    c = stats["corpora"]["text"]
    assert c["format"] == "text" and c["read"] == c["documents"] == len(rows) == 150
    assert c["kept"] == c["pieces"] == stats["total"]["kept"] == sum(stats["splits"].values())
    assert c["dropped"] == {} and c["characters"] == sum(len(p) + len(r) + (r != "") for p, r in
                                                       zip(load(out).prompt, load(out).response))
    assert 0 < c["split_documents"] < len(rows) and c["cuts"]["paragraph"] > c["cuts"]["sentence"]
    assert sum(c["cuts"].values()) == c["pieces"] - c["documents"]
    assert stats["config"]["clean"]["max_doc_chars"] == 1500 and stats["config"]["read"]["text_field"] == "text"


def test_text_corpus_tokenizes_as_pretraining_documents(zh_books_prepared, tmp_path):
    """The prepared text corpus feeds the tokenizer and the pretraining token cache as they are."""
    from trainer.data import build_token_cache
    from utils.tokenizer import Tokenizer, train_tokenizer
    _, out, stats = zh_books_prepared
    train_tokenizer(out, 600, tmp_path / "tok", sample_bytes=300_000)
    tok = Tokenizer.load(tmp_path / "tok")
    cache = build_token_cache(sorted(out.glob("train-*.parquet")), tok, tmp_path / "cache", "train")
    assert cache.n_docs == stats["splits"]["train"]
    df = load(out, "train")
    first = tok.decode(cache.document(0).tolist()[:-1])
    assert first == f"{df.prompt[0]}\n{df.response[0]}" and cache.document(0)[-1] == tok.eos_id


def test_text_prose_passes_the_question_answer_filters(tmp_path):
    docs = {"short.txt": "好。",                                    # shorter than every minimum length
            "translate.txt": "请翻译这段话。\nTranslate it.",          # a translation task, to belle's filter
            "table.md": "| 年 | 事 |\n|---|---|\n| 184 | 黄巾起义 |",  # a markdown table
            "long.txt": "天下大势，分久必合，合久必分。" * 60,           # 900 characters: over --max-len 512
            "spaces.txt": "说\u3000明\n他说： 好。。。"}                 # the Q&A normalization would change these
    (tmp_path / "in").mkdir()
    for name, text in docs.items():
        (tmp_path / "in" / name).write_text(text, encoding="utf-8")
    stats = prepare_corpora([("text", tmp_path / "in")], tmp_path / "o",
                            PrepareConfig(split=(1, 0, 0), dedup=DedupConfig(near=False)))
    c = stats["corpora"]["text"]
    assert c["read"] == 5 and c["kept"] == 5 and c["dropped"] == {} and c["split_documents"] == 0
    from utils.cleaning import text_of
    df = load(tmp_path / "o")
    assert sorted(text_of(p, r) for p, r in zip(df.prompt, df.response)) == sorted(docs.values())


def test_text_duplicates_and_empty_documents_are_dropped_by_reason(tmp_path):
    base = [f"第{i}回：" + "天下大势，分久必合，合久必分。" * 20 + f"\n此回说的是第{i}件事，" + "玄德引兵而去。" * 20
            for i in range(6)]
    docs = base + [base[0], base[1].replace("玄德", "玄德公", 1), "\x00\u200b \n\t", base[2] + "\n" + base[3]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs),
                                      encoding="utf-8")
    stats = prepare_corpora([("text", tmp_path / "d.jsonl")], tmp_path / "o",
                            PrepareConfig(split=(1, 0, 0), clean=CleanConfig(max_doc_chars=400)))
    c = stats["corpora"]["text"]
    # base[0] again: its pieces are exact duplicates; base[1] with one word more: near duplicates; the control
    # characters: an empty document; base[2] + base[3]: pieces equal to theirs
    assert c["documents"] == 10 and c["dropped"]["empty_text"] == 1
    assert c["dropped"]["duplicate"] >= 2 and c["dropped"]["near_duplicate"] >= 1
    assert c["kept"] + c["dropped"]["duplicate"] + c["dropped"]["near_duplicate"] == c["pieces"]


def test_text_bad_files_are_named_or_skipped(tmp_path, capsys):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("第一回\n话说天下大势。\n", encoding="utf-8")
    (d / "README.md").write_text("not part of the corpus\n", encoding="utf-8")  # left out of the listing
    (d / "empty.md").write_text("")
    bad = {"nul.txt": b"\x00\x01" * 100, "undecodable.txt": b"\xff\xfe\xfa\xfb\n" * 20}
    for name, data in bad.items():
        (d / name).write_bytes(data)
    pq.write_table(pa.table({"content": ["第二回"]}), d / "nocol.parquet")
    names = [d / "nul.txt", d / "undecodable.txt", d / "nocol.parquet"]
    with pytest.raises(ValueError) as e:
        prepare_corpora([("text", d)], tmp_path / "o")
    text = str(e.value)
    assert text.startswith("3 problems with the corpora (pass --skip-bad-files") and "README" not in text
    for f in names:
        assert f"no readable text record in {f}" in text
    assert "binary_file" in text and "undecodable" in text and "no column ['text']; its columns: ['content']" in text
    train.main(["prepare", "--corpus", f"text={d}", "--out", str(tmp_path / "o"), "--skip-bad-files",
                "--split", "1,0,0"])
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    c = stats["corpora"]["text"]
    assert c["files"] == [str(d / "a.txt"), str(d / "empty.md")] and c["dropped"] == {"empty_file": 1}
    assert sorted(s["file"] for s in c["skipped_files"]) == sorted(map(str, names)) and c["kept"] == 1
    report = capsys.readouterr().out
    assert "skipped 3 bad files" in report and "text: 2 documents -> 1 pieces" not in report
    assert "text: 1 documents -> 1 pieces" in report


def test_text_options_on_the_command_line(tmp_path, samples_dir):
    out = tmp_path / "o"
    (tmp_path / "docs.txt").write_text("第一篇。\n\n第二篇。\n\n第三篇。\n", encoding="utf-8")
    train.main(["prepare", "--corpus", f"text={tmp_path / 'docs.txt'}", "--corpus", f"text={samples_dir / 'text'}",
                "--doc-sep", "blank", "--max-doc-chars", "800", "--out", str(out), "--split", "1,0,0"])
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["corpora"]) == {"text:docs.txt", "text:text"}
    assert stats["corpora"]["text:docs.txt"]["documents"] == 3 and stats["corpora"]["text:text"]["documents"] == 2
    assert stats["corpora"]["text:text"]["split_documents"] == 2 and stats["config"]["read"]["doc_sep"] == "blank"
    assert max(len(p) + len(r) + 1 for p, r in zip(load(out).prompt, load(out).response)) <= 801
    for bad in (["--max-doc-chars", "0"], ["--doc-sep", ""], ["--text-field", ""]):
        with pytest.raises(ValueError):
            train.main(["prepare", "--corpus", f"text={tmp_path / 'docs.txt'}", "--out", str(tmp_path / "x"), *bad])


def test_bundled_sources_leave_the_text_sample_out(samples_dir):
    assert (samples_dir / "text").is_dir()
    assert "text" not in {name for name, _ in prep.bundled_sources()}


def test_split_keeps_documents_whole():
    cfg = PrepareConfig(split=(0.8, 0.1, 0.1), seed=5)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 400)
    groups = np.repeat(np.arange(400) * 3, sizes)  # ids need not be dense
    n = len(groups)
    rank, bounds = prep._assign(n, cfg, groups)
    assert sorted(rank) == list(range(n))
    split_of_row = np.searchsorted([b[1] for b in bounds[1:]], rank, side="right")
    for g in np.unique(groups):
        assert len(set(split_of_row[groups == g])) == 1
    assert [b[2] for b in bounds] == [int((split_of_row == k).sum()) for k in range(3)]
    assert abs(bounds[1][2] - round(n * 0.1)) <= 5 and abs(bounds[2][2] - round(n * 0.1)) <= 5
    again, _ = prep._assign(n, cfg, groups)
    assert (again == rank).all()
    # one row per document: the plain permutation, as before documents were tracked
    plain, _ = prep._assign(n, cfg)
    assert (prep._assign(n, cfg, np.arange(n))[0] == plain).all()


# ------------------------------------------------------------------ units of the table; instructions left out of dedup
def test_stats_count_records_and_the_rows_they_became(bundled, capsys):
    """`hc3 read 50 kept 93` did not add up: an HC3 question becomes one row per answer. stats.json and the table
    count records read, the rows they became and the rows kept, and each identity holds per corpus."""
    _, stats = bundled
    for name, c in stats["corpora"].items():
        row_drops = sum(n for r, n in c["dropped"].items() if r in prep.ROW_REASONS)
        record_drops = sum(c["dropped"].values()) - row_drops
        assert c["kept"] + row_drops == c["rows"], name
        assert c["near_duplicates"] == c["dropped"].get("near_duplicate", 0)
        if name == "hc3":
            assert c["rows"] > c["read"] - record_drops  # 49 questions, 94 answers
        else:
            assert c["rows"] == c["read"] - record_drops, name
    t = stats["total"]
    assert t["rows"] == sum(c["rows"] for c in stats["corpora"].values())
    assert t["near_duplicates"] == sum(c["near_duplicates"] for c in stats["corpora"].values())
    prep.print_stats(stats)
    out = capsys.readouterr().out
    assert "records" in out and "rows" in out and "near-" in out
    hc3 = stats["corpora"]["hc3"]
    used = hc3["read"] - hc3["dropped"]["missing_field"]
    assert f"hc3: {used} records became {hc3['rows']} rows (one row per answer, --hc3-answers both)" in out
    assert "hc3 dropped: records missing_field 1; rows near_duplicate 1" in out


def ner_rows(shared_corpora: Path) -> list[dict]:
    path = shared_corpora / "msra_ner_instruct" / "eval.first800.txt"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_shared_instruction_is_left_out_of_dedup(shared_corpora, tmp_path):
    """MSRA NER: one 76-character instruction before each short query, answers often `没有`. Compared whole, 23 of the
    800 distinct examples were dropped as near-duplicates; without the shared instruction all stay, and a record whose
    query differs from another's by one character (same answer) is still dropped, as is an exact copy."""
    rows = ner_rows(shared_corpora)
    assert len({(r["query"], r["answer"]) for r in rows}) == 800 and len({r["instruct"] for r in rows}) == 1
    src = tmp_path / "ner.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    stats = prepare_corpora([("instruct", src)], tmp_path / "o", PrepareConfig())
    c = stats["corpora"]["instruct"]
    assert c["kept"] == 800 and c["near_duplicates"] == 0 and c["dedup_without_instruction"] == 800
    old = prepare_corpora([("instruct", src)], tmp_path / "whole", PrepareConfig(dedup=DedupConfig(
        instruction_repeats=0)))["corpora"]["instruct"]
    assert old["near_duplicates"] == 23 and old["dedup_without_instruction"] == 0  # the figure

    long = max(rows, key=lambda r: len(r["query"]))  # a near-duplicate: one character of the query changed
    q = long["query"]
    near = dict(long, query=q[:len(q) // 2] + ("的" if q[len(q) // 2] != "的" else "了") + q[len(q) // 2 + 1:])
    other = dict(rows[0], instruct="请找出下面文本里的人名、地名和机构名。")  # another instruction, its own rows
    extra = [near, dict(rows[5]), other, dict(other)]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + extra), encoding="utf-8")
    stats = prepare_corpora([("instruct", src)], tmp_path / "o2", PrepareConfig())
    c = stats["corpora"]["instruct"]
    assert (c["kept"], c["near_duplicates"], c["dropped"]["duplicate"]) == (801, 1, 2)
    assert c["dedup_without_instruction"] == 804
    kept = load(tmp_path / "o2")
    assert int(kept.prompt.str.startswith("请找出下面文本里").sum()) == 1  # rows[0]'s query under another instruction


def test_an_instruction_is_kept_when_it_is_the_whole_question(tmp_path):
    """alpaca without an input: the instruction is the question and stays in what dedup compares (three questions
    with one answer are three rows); an instruction with an input that rows share is left out."""
    rows = [{"instruction": "把下面的句子翻译成英文。", "input": f"今天第{i}次去公园。", "output": f"Park {i}."}
            for i in range(6)]
    rows += [{"instruction": q, "input": "", "output": "好的，我来试试。"}
             for q in ("写一首关于春天的诗", "用三句话介绍长城的历史", "解释一下什么是光合作用")]
    src = tmp_path / "a.json"
    src.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    c = prepare_corpora([("alpaca", src)], tmp_path / "o", PrepareConfig())["corpora"]["alpaca"]
    assert (c["kept"], c["dedup_without_instruction"], c["dropped"]) == (9, 6, {})
    with pytest.raises(ValueError, match="instruction_repeats"):
        DedupConfig(instruction_repeats=-1)
