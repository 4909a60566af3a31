"""Readers: bundled samples, the real corpora samples in ../shared/corpora, and every kind of bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from utils.corpora import (
    READERS,
    WIKI_TEMPLATES,
    ReaderOptions,
    Tally,
    _json_array,
    detect_encoding,
    list_files,
    read_corpus,
    read_file,
)

SAMPLE_FORMATS = ["webtext", "baike", "medical", "zhihu", "belle", "wiki", "hc3", "instruct", "alpaca", "sharegpt"]


def read_all(name: str, path: Path, **opts) -> tuple[list, Tally]:
    tally = Tally()
    return list(read_corpus(name, path, ReaderOptions(**opts), tally)), tally


@pytest.mark.parametrize("name", SAMPLE_FORMATS)
def test_bundled_sample_reads(samples_dir, name):
    recs, tally = read_all(name, samples_dir / name)
    assert 45 <= tally.read <= 300
    assert len(recs) >= 40
    assert all(isinstance(r.prompt, str) and r.prompt.strip() and r.response.strip() for r in recs)
    assert {r.source for r in recs} == {name}
    assert not {"undecodable", "bad_json", "malformed_row"} & set(tally.dropped)


def test_registry_has_every_format():
    assert set(SAMPLE_FORMATS) | {"parquet", "qa"} <= set(READERS)
    with pytest.raises(ValueError, match="unknown corpus format"):
        list_files("nope", ".")


def test_medical_sample_gb18030_multiline_and_stray_quote(samples_dir):
    path = samples_dir / "medical" / "neike_sample.csv"
    assert detect_encoding(path) == "gb18030"
    recs, tally = read_all("medical", path)
    multi = [r for r in recs if r.prompt.startswith("胃镜检查前")]
    assert len(multi) == 1 and multi[0].response.count("\n") == 2
    stray = [r for r in recs if "痛风" in r.prompt and '"' in r.prompt]
    assert len(stray) == 1 and stray[0].response.startswith("急性发作时")
    # an ask of "无" is no question: the title alone is the prompt
    assert any(r.prompt == "甲亢能吃海带吗？" for r in recs)
    # Dice-similar title and ask: only the ask is kept
    assert any(r.prompt == "头疼" for r in recs)


def test_webtext_star_filter_and_option(samples_dir):
    recs, tally = read_all("webtext", samples_dir / "webtext")
    assert tally.dropped["low_star"] == 4
    recs0, tally0 = read_all("webtext", samples_dir / "webtext", min_star=0)
    assert len(recs0) == len(recs) + 4 and "low_star" not in tally0.dropped


def test_baike_title_desc_rule(samples_dir):
    recs, _ = read_all("baike", samples_dir / "baike")
    same = [r for r in recs if r.prompt.startswith("感冒了能不能洗澡")]
    assert same[0].prompt == "感冒了能不能洗澡？"  # desc equal to the title is not repeated
    both = [r for r in recs if r.prompt.startswith("怎么去除衣服上的油渍")]
    assert both[0].prompt == "怎么去除衣服上的油渍？\n不小心把菜汤洒到衬衫上了，有什么办法吗？"
    assert "\r" in both[0].response  # raw: cleaning removes it


def test_alpaca_history_system_and_sharegpt_turns(samples_dir):
    recs, _ = read_all("alpaca", samples_dir / "alpaca")
    hist = [r for r in recs if r.prompt == "再简单一点。"][0]
    assert len(hist.history) == 2 and hist.history[0][0] == "给我出一道小学数学题。"
    assert any(r.system == "你是一个环保知识助手。" for r in recs)
    assert any(r.prompt == "计算一下。\n二十五乘以四等于多少？" for r in recs)  # instruction + input
    conv, tally = read_all("sharegpt", samples_dir / "sharegpt")
    joke = [r for r in conv if r.prompt == "哈哈，再来一个。"][0]
    assert joke.history[0][0] == "给我讲个笑话吧。"
    assert any(r.system == "你是一个专业的健身教练。" for r in conv)
    assert any(r.prompt == "你会做什么？" for r in conv)  # role/content form
    assert tally.dropped["bad_field"] == 1 and tally.dropped["missing_field"] == 1


def test_hc3_answer_choice(samples_dir):
    both, t = read_all("hc3", samples_dir / "hc3")
    human, _ = read_all("hc3", samples_dir / "hc3", hc3_answers="human")
    gpt, _ = read_all("hc3", samples_dir / "hc3", hc3_answers="chatgpt")
    assert len(both) == len(human) + len(gpt) and len(human) > 40 and len(gpt) > 40
    assert t.dropped["missing_field"] == 1


def test_wiki_sample_both_layouts(samples_dir):
    recs, tally = read_all("wiki", samples_dir / "wiki")
    assert tally.dropped["empty_article"] == 1
    titles = {r.prompt for r in recs}
    assert any("黄河" in p for p in titles) and not any("黃河" in r.prompt + r.response for r in recs)
    assert any("数学" in p for p in titles)  # JSON-lines layout
    templates = [t.split("{}") for t in WIKI_TEMPLATES]
    for r in recs:
        assert any(r.prompt.startswith(a) and r.prompt.endswith(b) for a, b in templates)
        assert len(r.response) <= 512 and not r.response.startswith(r.prompt)


def test_wiki_doc_without_its_closing_tag_is_kept(tmp_path):
    """A `<doc>` whose `</doc>` is missing ends where the next `<doc>` begins (it was dropped without a count);
    one still open at the end of the file is counted as truncated."""
    docs = [f'<doc id="{i}" url="u" title="条目{i}">\n条目{i}\n\n条目{i}是第{i}个测试条目。\n'
            + ("" if i in (1, 3) else "</doc>\n") for i in range(4)]
    (tmp_path / "wiki_00").write_text("".join(docs), encoding="utf-8")
    recs, tally = read_all("wiki", tmp_path / "wiki_00")
    assert [r.response for r in recs] == [f"条目{i}是第{i}个测试条目。" for i in range(3)]
    assert tally.read == 4 and tally.dropped == {"truncated_article": 1}


def test_wiki_template_independent_of_order(tmp_path, samples_dir):
    lines = (samples_dir / "wiki" / "AB" / "wiki_00").read_text(encoding="utf-8").splitlines()
    (tmp_path / "a").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "b").write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    a = {(r.prompt, r.response) for r in read_file("wiki", tmp_path / "a")}
    b = {(r.prompt, r.response) for r in read_file("wiki", tmp_path / "b")}
    assert a == b


def test_zhihu_and_own_parquet(tmp_path, samples_dir):
    recs, _ = read_all("zhihu", samples_dir / "zhihu")
    assert any(r.prompt == "如何评价《三体》这部小说？" for r in recs)
    pq.write_table(pa.table({"prompt": ["问", ""], "response": ["答", "x"], "source": ["a", "b"]}),
                   tmp_path / "p.parquet")
    own, tally = read_all("parquet", tmp_path / "p.parquet")
    assert [(r.prompt, r.response) for r in own] == [("问", "答")] and tally.dropped["missing_field"] == 1


# ----------------------------------------------------------------------------------------------- real samples

def test_real_medical_csv(shared_corpora):
    recs, tally = read_all("medical", shared_corpora / "medical_dialogue")
    assert tally.read == 7444 and "undecodable" not in tally.dropped
    assert len(recs) == 7444 - sum(tally.dropped.values())
    assert len(recs) > 7400
    assert any("\n" in r.response for r in recs) or any("\n" in r.prompt for r in recs)


def test_real_medical_csv_with_a_quote_that_never_closes(shared_corpora, tmp_path):
    """A title that opens a quote and never closes it: the rows below it must not vanish into that field. The real
    file's own multi-line quoted answers (one spans 35 lines) must read as before."""
    src = next((shared_corpora / "medical_dialogue").glob("*.csv"))
    before, _ = read_all("medical", src)
    lines = src.read_bytes().split(b"\n")
    first, sep, rest = lines[500].partition(b",")
    assert sep and b'"' not in lines[500]
    lines[500] = first + b',"' + rest
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\n".join(lines))
    after, tally = read_all("medical", bad)
    assert tally.read == 7444 and sum(tally.dropped.values()) == 0
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(after) == len(before) and len(changed) == 1
    assert changed[0][1].prompt.startswith('"')  # the stray quote is kept as a character
    assert sum("\n" in r.response for r in after) == sum("\n" in r.response for r in before) > 0


def test_real_gbk_strict_decoding_counts_bad_bytes(shared_corpora):
    """gb2312 (the seed's encoding) cannot decode the file: bad lines are counted, good ones still read."""
    recs, tally = read_all("medical", shared_corpora / "medical_dialogue", encoding="gb2312")
    assert tally.dropped["undecodable"] > 0 and len(recs) > 1000
    assert tally.examples[0]["where"].startswith(str(shared_corpora / "medical_dialogue"))


def test_real_belle_instruct_alpaca_qa(shared_corpora):
    belle, t = read_all("belle", shared_corpora / "belle" / "dev1K.first800.json")
    assert len(belle) == 800 and t.read == 800
    ner, _ = read_all("instruct", shared_corpora / "msra_ner_instruct")
    assert len(ner) == 800 and ner[0].prompt.endswith(
        "文本：因有关日寇在京掠夺文物详情，藏界较为重视，也是我们收藏北京史料中的要件之一。")
    tsl, _ = read_all("alpaca", shared_corpora / "translational_style" / "TslDial.json")
    assert len(tsl) == 11543 and tsl[0].prompt == "你有最近看过什么好电影吗？"
    qa, _ = read_all("qa", shared_corpora / "translational_style" / "2_Dialogues.first6000.jsonl")
    assert len(qa) == 6000
    ev, t = read_all("qa", shared_corpora / "belle" / "eval_set.json")  # question / std_answer
    assert len(ev) + t.dropped["missing_field"] == 1000 and len(ev) > 500


def test_real_wiki_both_layouts(shared_corpora):
    j, _ = read_all("wiki", shared_corpora / "wiki_zh" / "wiki_zh_2019")
    d, _ = read_all("wiki", shared_corpora / "wiki_zh" / "zhwiki_doc")
    assert len(j) >= 60 and len(d) >= 14
    math = [r for r in d if "数学" in r.prompt][0]
    assert "數" not in math.response and "数学是利用符号语言研究数量" in math.response


def test_real_hc3_plus_has_no_question(shared_corpora):
    """HC3-Plus ({text,label}) has answers without questions: every line is counted, none becomes a Q/A pair."""
    recs, tally = read_all("hc3", shared_corpora / "hc3_plus_zh" / "val_hc3_QA.main.jsonl")
    assert recs == [] and tally.dropped["no_question_hc3plus"] == 1580


def test_real_readme_examples_field_layout(shared_corpora):
    web, t = read_all("webtext", shared_corpora / "webtext2019zh")
    assert web == [] and t.dropped["low_star"] == 1  # star 3 < 5
    web, _ = read_all("webtext", shared_corpora / "webtext2019zh", min_star=0)
    assert web[0].prompt == "AlphaGo只会下围棋吗？阿法狗能写小说吗？"
    baike, _ = read_all("baike", shared_corpora / "baike_qa2019")
    assert baike[0].prompt.startswith("冬天进补好一些呢") and "\r" in baike[0].response


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_json_lines_are_counted_with_location(tmp_path):
    p = tmp_path / "b.json"
    p.write_bytes("\n".join([
        json.dumps({"instruction": "问题一", "input": "", "output": "回答一"}, ensure_ascii=False),
        '{"instruction": "broken", ',
        "[1, 2]",
        json.dumps({"instruction": "问题二"}, ensure_ascii=False),
        "",
        json.dumps({"instruction": "问题三", "output": "回答三"}, ensure_ascii=False),
    ]).encode() + b"\n\xff\xfe{bad bytes}\n")
    recs, tally = read_all("belle", p)
    assert [r.prompt for r in recs] == ["问题一", "问题三"]
    assert tally.dropped == {"bad_json": 1, "not_an_object": 1, "missing_field": 1, "undecodable": 1}
    assert {e["where"] for e in tally.examples} >= {f"{p}:2", f"{p}:3", f"{p}:4", f"{p}:7"}
    assert tally.read == 6


def test_empty_file_counted(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    tally = Tally()
    assert list(read_file("belle", tmp_path / "e.jsonl", tally=tally)) == []
    assert tally.dropped["empty_file"] == 1


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_files("belle", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .*csv"):
        list_files("medical", tmp_path)


def test_json_array_streams_across_chunk_boundaries(tmp_path):
    items = [{"instruction": f"问题{i}", "input": "", "output": "答案" * (i % 7 + 1)} for i in range(50)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    tally = Tally()
    got = [obj for _, obj in _json_array(p, "utf-8", tally, chunk_chars=7)]
    assert got == items and tally.read == 50


def test_json_array_truncated_keeps_good_items(tmp_path):
    text = json.dumps([{"instruction": "一", "output": "甲"}, {"instruction": "二", "output": "乙"}],
                      ensure_ascii=False)
    p = tmp_path / "t.json"
    p.write_text(text[:-12], encoding="utf-8")
    recs, tally = read_all("alpaca", p)
    assert [r.prompt for r in recs] == ["一"] and tally.dropped["bad_json"] == 1


@pytest.mark.parametrize("n", [300, 8000])  # 8000: the runaway field outgrows csv's field size limit (an error)
def test_medical_quote_that_never_closes_swallows_no_rows(tmp_path, n):
    rows = [f"内科,头疼{i}怎么办,最近经常头疼{i},注意休息{i}" for i in range(n)]
    rows[10] = '内科,"头疼10怎么办,最近经常头疼10,注意休息10'  # the quote runs on to the next one, far below
    rows[n - 10] = '内科,多行回答,无,"第一行\n第二行"'
    p = tmp_path / "m.csv"
    p.write_text("department,title,ask,answer\n" + "\n".join(rows) + "\n", encoding="utf-8")
    recs, tally = read_all("medical", p)
    assert len(recs) == n and tally.read == n and not tally.dropped
    assert recs[10].prompt.startswith('"头疼10') and recs[11].prompt == "头疼11怎么办\n最近经常头疼11"
    assert recs[n - 10].response == "第一行\n第二行"


def test_medical_short_rows_and_utf8(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("department,title,ask,answer\n内科,头疼怎么办,最近经常头疼,注意休息，必要时就医\n内科,只有标题\n",
                 encoding="utf-8")
    recs, tally = read_all("medical", p)
    assert len(recs) == 1 and tally.dropped["missing_field"] == 1 and detect_encoding(p) == "utf-8"


def test_bad_parquet_counted(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not a parquet file")
    recs, tally = read_all("zhihu", tmp_path / "x.parquet")
    assert recs == [] and tally.dropped["bad_parquet"] == 1


def test_json_array_skips_a_malformed_item_and_keeps_the_rest(tmp_path):
    import tracemalloc
    items = [json.dumps({"instruction": f"问题{i}", "output": f"答案{i}"}, ensure_ascii=False) for i in range(20_000)]
    items[3] = '{"instruction": "坏" "output": [1, {"x": "}, ]"}]}'  # missing comma; brackets inside a string
    p = tmp_path / "big.json"
    p.write_text("[\n" + ",\n".join(items) + "\n]", encoding="utf-8")
    tally = Tally()
    tracemalloc.start()
    got = [(w, obj["instruction"]) for w, obj in _json_array(p, "utf-8", tally, chunk_chars=4096)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(got) == 19_999 and got[3] == (f"{p}:6", "问题4") and got[-1][1] == "问题19999"
    assert tally.read == 20_000 and tally.dropped["bad_json"] == 1 and tally.examples[0]["where"] == f"{p}:5"
    assert peak < 8 * 1024 * 1024 and p.stat().st_size > 500_000  # the buffer stays near the chunk size


def test_json_array_bad_item_spanning_chunks_and_at_the_end(tmp_path):
    good = [{"instruction": f"问题{i}", "output": "答" * 30} for i in range(6)]
    text = json.dumps(good[:3], ensure_ascii=False)[:-1] + ', {"instruction": "坏", "output": "' + "长" * 100 + \
        '" oops},\n' + json.dumps(good[3:], ensure_ascii=False)[1:]
    p = tmp_path / "a.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (5, 17, 1 << 20):
        tally = Tally()
        assert [o for _, o in _json_array(p, "utf-8", tally, chunk_chars=chunk)] == good, chunk
        assert tally.dropped["bad_json"] == 1 and tally.read == 7
    p.write_text(json.dumps(good[:2], ensure_ascii=False)[:-1] + ", {oops}]", encoding="utf-8")
    tally = Tally()
    assert [o for _, o in _json_array(p, "utf-8", tally, chunk_chars=7)] == good[:2]
    assert tally.dropped["bad_json"] == 1


@pytest.mark.parametrize("indent", [None, 2])  # one item per line, and pretty-printed
def test_json_array_stray_quote_loses_only_its_item(tmp_path, indent):
    """A value missing its opening quote leaves its closing quote unpaired: a scanner that pairs quotes across lines
    would then see every later item's braces inside "strings" and drop the rest of the file as one bad item."""
    items = [{"instruction": f"问题{i}", "output": f"答案{i}"} for i in range(300)]
    lines = [json.dumps(it, ensure_ascii=False, indent=indent) for it in items]
    lines[10] = lines[10].replace('"output": "', '"output": ', 1)
    p = tmp_path / "a.json"
    p.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    for chunk in (64, 1 << 20):
        tally = Tally()
        got = [obj for _, obj in _json_array(p, "utf-8", tally, chunk_chars=chunk)]
        assert got == items[:10] + items[11:], chunk
        assert tally.read == 300 and tally.dropped == {"bad_json": 1}
        assert tally.examples[0]["detail"].endswith("skipped to the next item")


ONE_LINE_BREAKS = {  # how item 20 of a single-line array is broken -> the items lost with it
    "stray quote": ('"output": "答案20"', '"output": 答案20"', {20}),
    "key missing its quote": ('{"instruction": "问题20"', '{instruction": "问题20"', {20}),
    "extra quote": ('"output": "答案20"', '"output": "答"案20"', {20}),
    "unclosed brace": ('"答案20"}', '"答案20"', {20, 21}),  # the next item is read into it
    "bracket for brace": ('"答案20"}', '"答案20"]', {20}),
    "unclosed list": ('"output": "答案20"', '"output": ["答案20"', {20}),
    "missing comma": ('"问题20", "output"', '"问题20" "output"', {20}),
    "extra closing brace": ('"答案20"}', '"答案20"}}', set()),  # the stray brace alone is the bad item
    "stray ]": ('"答案20"}', '"答案20"}]', set()),
}


@pytest.mark.parametrize("case", ONE_LINE_BREAKS)
def test_json_array_on_one_line_a_broken_item_costs_only_itself(tmp_path, case):
    """A single-line array (json.dumps of a list) picks up again at the next `}, {` after a broken item, as an
    array spread over lines does at the next line: one bad_json, with the item's number and character offset."""
    old, new, lost = ONE_LINE_BREAKS[case]
    items = [{"instruction": f"问题{i}", "output": f"答案{i}"} for i in range(50)]
    text = json.dumps(items, ensure_ascii=False)
    assert text.count(old) == 1
    text = text.replace(old, new)
    p = tmp_path / "a.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (7, 100, 1 << 20):
        tally = Tally()
        got = [obj for _, obj in _json_array(p, "utf-8", tally, chunk_chars=chunk)]
        assert got == [it for i, it in enumerate(items) if i not in lost], (case, chunk)
        assert tally.dropped == {"bad_json": 1}, (case, chunk)
        assert tally.read == len(got) + 1  # every item read, the broken one once
        (example,) = tally.examples
        assert example["where"] == f"{p}:1" and example["detail"].endswith("skipped to the next item")
        if lost:
            assert example["detail"].startswith("item 21 of the array: ")
            at = int(example["detail"].rsplit(" at character ", 1)[1].split(";")[0].replace(",", ""))
            assert text.index('"答案19"}') < at <= text.index('{"instruction": "问题21"'), example


def test_json_array_on_one_line_through_a_reader(tmp_path):
    items = [{"instruction": f"第{i}个问题", "input": "", "output": f"第{i}个回答"} for i in range(30)]
    text = json.dumps(items, ensure_ascii=False).replace('"output": "第7个回答"', '"output": 第7个回答"')
    p = tmp_path / "one_line.json"
    p.write_text(text, encoding="utf-8")
    recs, tally = read_all("alpaca", p)
    assert [r.prompt for r in recs] == [f"第{i}个问题" for i in range(30) if i != 7]
    assert tally.dropped == {"bad_json": 1} and tally.read == 30


def test_json_array_broken_brackets_over_many_lines_cost_only_their_item(tmp_path):
    items = [{"instruction": f"问题{i}", "output": [f"答案{i}"]} for i in range(40)]
    text = json.dumps(items, ensure_ascii=False, indent=2)
    text = text.replace('"答案9"\n    ]', '"答案9"', 1)  # a list never closed: every later `,` looks nested
    p = tmp_path / "a.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (7, 1 << 20):
        tally = Tally()
        got = [obj for _, obj in _json_array(p, "utf-8", tally, chunk_chars=chunk)]
        assert got == items[:9] + items[10:] and tally.dropped == {"bad_json": 1}, chunk


def test_json_array_unbalanced_item_resyncs_in_bounded_memory(tmp_path):
    """An item whose bracket never closes makes every later `,` look nested: the scan gives up `resync_chars`
    after the next `}, {` boundary and resumes there, so the buffer stays bounded on a big single-line file."""
    import tracemalloc
    items = [{"instruction": f"问题{i}", "output": f"答案{i}"} for i in range(20_000)]
    text = json.dumps(items, ensure_ascii=False).replace('"output": "答案3"', '"output": ["答案3"', 1)
    p = tmp_path / "big.json"
    p.write_text(text, encoding="utf-8")
    tally = Tally()
    tracemalloc.start()
    got = [obj["instruction"] for _, obj in _json_array(p, "utf-8", tally, chunk_chars=4096, resync_chars=20_000)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [f"问题{i}" for i in range(20_000) if i != 3] and tally.dropped == {"bad_json": 1}
    assert peak < 4 * 1024 * 1024 and p.stat().st_size > 500_000


def test_json_array_broken_last_item_and_unrecoverable_rest_say_so(tmp_path):
    good = [{"instruction": f"问题{i}", "output": f"答案{i}"} for i in range(3)]
    p = tmp_path / "a.json"
    p.write_text(json.dumps(good, ensure_ascii=False)[:-1] + ', {"instruction": "坏" oops}]\n', encoding="utf-8")
    for chunk in (5, 1 << 20):
        tally = Tally()
        assert [o for _, o in _json_array(p, "utf-8", tally, chunk_chars=chunk)] == good
        assert tally.dropped == {"bad_json": 1} and tally.examples[0]["detail"].endswith("it was the last item")
    text = json.dumps(good, ensure_ascii=False)[:-1] + ', {"instruction": "坏", "output": ["没有结尾'
    p.write_text(text, encoding="utf-8")
    tally = Tally()
    assert [o for _, o in _json_array(p, "utf-8", tally, chunk_chars=8)] == good
    skipped = len(text) - text.index('{"instruction": "坏"')
    assert tally.examples[0]["detail"].endswith(f"the rest of the array ({skipped:,} characters) skipped")


# ----------------------------------------------------------------------------------------------- text (prose)

ZH_BOOKS = "zh_books/zh_books_laws.parquet"


def zh_books_slice(shared: Path, per_source: int = 40) -> list[dict]:
    """The first `per_source` documents of each source (novel, classics_modern, law), read from three row groups
    of the real corpus only (it holds 150 MB of text)."""
    f = pq.ParquetFile(shared / ZH_BOOKS)
    rows = []
    for group in (0, 3, f.num_row_groups - 1):  # novels first, the classics in the middle, laws last
        table = f.read_row_group(group)
        rows += [r for r in table.slice(0, 400).to_pylist()][:per_source]
    assert {r["source"] for r in rows} == {"novel", "classics_modern", "law"}
    return rows


def test_text_sample_reads(samples_dir):
    files = list_files("text", samples_dir / "text")
    assert [f.name for f in files] == ["sanguo_yanyi_01.txt", "sanguo_yanyi_02.txt"]  # README.md is left out
    recs, tally = read_all("text", samples_dir / "text")
    assert tally.read == 2 and not tally.dropped and {r.source for r in recs} == {"text"}
    assert [r.response for r in recs] == [f.read_text(encoding="utf-8") for f in files]
    assert all(r.prompt == "" and not r.continued for r in recs) and recs[0].response.startswith("滚滚长江东逝水")
    assert READERS["text"].prose and not READERS["belle"].prose


def test_text_plain_files_one_document_or_separated(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("# 第一篇\n\n正文一。\n第二行。\n\n\n第二篇\n正文二。\n<|endoftext|>\n第三篇\n", encoding="utf-8")
    one, tally = read_all("text", p)
    assert [r.response for r in one] == [p.read_text(encoding="utf-8")] and tally.read == 1
    blank, tally = read_all("text", p, doc_sep="blank")
    assert [r.response for r in blank] == ["# 第一篇\n", "正文一。\n第二行。\n",
                                           "第二篇\n正文二。\n<|endoftext|>\n第三篇\n"]
    assert tally.read == 3
    marked, tally = read_all("text", p, doc_sep="<|endoftext|>")
    assert [r.response for r in marked] == ["# 第一篇\n\n正文一。\n第二行。\n\n\n第二篇\n正文二。\n", "第三篇\n"]
    with pytest.raises(ValueError, match="doc_sep"):
        ReaderOptions(doc_sep=" ")


def test_text_json_lines_array_and_parquet_with_text_field(tmp_path):
    docs = ["第一篇：天下大势。\n分久必合。", "第二篇", "第三篇：合久必分。"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": d}, ensure_ascii=False) + "\n"
                                              for i, d in enumerate(docs)), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "c.txt").write_text((tmp_path / "a.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    pq.write_table(pa.table({"title": ["t1", "t2", "t3"], "body": docs}), tmp_path / "d.parquet")
    for name, opts in (("a.jsonl", {}), ("c.txt", {}), ("b.json", {"text_field": "body"}),
                       ("d.parquet", {"text_field": "body"})):
        recs, tally = read_all("text", tmp_path / name, **opts)
        assert [r.response for r in recs] == docs and tally.read == 3 and not tally.dropped, name
    # the default field is absent: every row is counted, with the fields it has
    recs, tally = read_all("text", tmp_path / "b.json")
    assert recs == [] and tally.dropped["missing_field"] == 3 and "['body']" in tally.examples[0]["detail"]
    recs, tally = read_all("text", tmp_path / "d.parquet")
    assert recs == [] and tally.dropped["missing_field"] == 3
    assert tally.examples[0]["detail"] == "no column ['text']; its columns: ['body', 'title']"


def test_text_broken_files_are_counted_and_named(tmp_path):
    good = "第一段。\n第二段。\n"
    p = tmp_path / "bad_bytes.txt"
    p.write_bytes(good.encode() + b"\xff\xfe\xfd broken\n" + "第三段。\n".encode())
    recs, tally = read_all("text", p)  # UTF-8 (the head decodes), one line that does not: counted, the rest kept
    assert [r.response for r in recs] == [good + "第三段。\n"] and tally.read == 1
    assert tally.dropped == {"undecodable": 1} and tally.examples[0]["where"] == f"{p}:3"
    for name, data, why in (("nul.txt", "正文".encode() + b"\x00\x01\x00" * 50, "NUL bytes"),
                            ("utf16.md", "正文第一段。\n".encode("utf-16"), "UTF-16"),
                            ("book.txt", b"%PDF-1.7\n" + bytes(range(256)), "PDF"),
                            ("junk.jsonl", bytes(range(1, 32)) * 40, "control")):
        (tmp_path / name).write_bytes(data)
        recs, tally = read_all("text", tmp_path / name)
        assert recs == [] and tally.dropped == {"binary_file": 1}, name
        assert tally.examples[0]["where"] == str(tmp_path / name) and why in tally.examples[0]["detail"]
    (tmp_path / "rows.jsonl").write_text('{"text": "好"}\n{"text": 3}\n{"text": null}\n{oops\n["a"]\n',
                                         encoding="utf-8")
    recs, tally = read_all("text", tmp_path / "rows.jsonl")
    assert [r.response for r in recs] == ["好"] and tally.read == 5
    assert tally.dropped == {"bad_field": 1, "missing_field": 1, "bad_json": 1, "not_an_object": 1}
    (tmp_path / "empty.txt").write_text("\n \n")
    tally = Tally()
    assert list(read_file("text", tmp_path / "empty.txt", tally=tally)) == [] and tally.dropped == {"empty_file": 1}
    (tmp_path / "x.parquet").write_bytes(b"not a parquet file")
    recs, tally = read_all("text", tmp_path / "x.parquet")
    assert recs == [] and tally.dropped == {"bad_parquet": 1}


def test_text_gb18030_and_bom_files(tmp_path):
    text = "第一回　宴桃园豪杰三结义\n话说天下大势，分久必合，合久必分。\n" * 3
    (tmp_path / "gbk.txt").write_bytes(text.encode("gb18030"))
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    for name, enc in (("gbk.txt", "gb18030"), ("bom.txt", "utf-8-sig")):
        assert detect_encoding(tmp_path / name) == enc
        recs, tally = read_all("text", tmp_path / name)
        assert [r.response for r in recs] == [text] and not tally.dropped


def test_text_long_plain_document_goes_on_in_blocks(tmp_path, monkeypatch):
    import utils.corpora as corpora
    monkeypatch.setattr(corpora, "TEXT_BLOCK_CHARS", 100)
    lines = [f"第{i}段：天下大势，分久必合，合久必分。\n" for i in range(40)]
    (tmp_path / "long.txt").write_text("".join(lines) + "\n" + "".join(lines[:3]), encoding="utf-8")
    recs, tally = read_all("text", tmp_path / "long.txt")
    assert tally.read == 1 and len(recs) > 5 and not recs[0].continued and all(r.continued for r in recs[1:])
    assert "".join(r.response for r in recs) == (tmp_path / "long.txt").read_text(encoding="utf-8")
    assert all(r.response.endswith("\n") for r in recs[:-1])  # cut at line ends only
    recs, tally = read_all("text", tmp_path / "long.txt", doc_sep="blank")
    assert tally.read == 2 and [r.continued for r in recs].count(False) == 2


def test_real_zh_books_text_reader(shared_corpora, tmp_path):
    rows = zh_books_slice(shared_corpora, 30)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "slice.parquet")
    recs, tally = read_all("text", tmp_path / "slice.parquet")
    assert [r.response for r in recs] == [r["text"] for r in rows] and tally.read == 90 and not tally.dropped
    # the whole file, streamed: its first documents come without reading the rest
    first = list(zip(range(5), read_file("text", shared_corpora / ZH_BOOKS)))
    assert [r.response for _, r in first] == [r["text"] for r in rows[:5]]
    recs, tally = read_all("text", tmp_path / "slice.parquet", text_field="content")
    assert recs == [] and "its columns: ['source', 'text', 'title']" in tally.examples[0]["detail"]
