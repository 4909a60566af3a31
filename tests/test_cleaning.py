"""Cleaning rules: the seed's defaults, its quirks fixed, every filter configurable."""
from __future__ import annotations

import pytest

from utils.cleaning import (
    CleanConfig,
    clean_record,
    dice,
    en_to_zh_punctuation,
    has_table,
    is_translation_task,
    merge_title,
    normalize_punctuation,
)
from utils.corpora import Record


def test_dice_matches_the_seed_formula():
    assert dice("高血压", "高血压") == 1.0
    assert dice("abc", "abd") == pytest.approx(2 * 2 / 6)
    assert dice("", "") == 0.0  # the seed divided by zero here
    assert dice("你好", "") == 0.0


def test_merge_title_rule():
    assert merge_title("感冒能洗澡吗", "感冒能洗澡吗？", 0.9) == "感冒能洗澡吗"
    assert merge_title("感冒能洗澡吗", "感冒能洗澡吗？", 0.9, keep="body") == "感冒能洗澡吗？"
    assert merge_title("头疼", "最近经常头疼怎么办", 0.9) == "头疼\n最近经常头疼怎么办"
    assert merge_title("标题", "", 0.9) == "标题" and merge_title("", "问题", 0.9) == "问题"
    assert merge_title("头疼", "最近经常头疼怎么办", 0.3) == "头疼"  # threshold is configurable


@pytest.mark.parametrize("raw, want", [
    ("太好了！！！", "太好了！"),
    ("真的吗？？！", "真的吗？"),
    ("你好，，，世界。。", "你好，世界。"),
    ("等等......", "等等……"),
    ("他说：“好的。”", "他说：“好的。”"),           # closing quote survives (the seed dropped it)
    ("class 和 pass", "class 和 pass"),             # spaces next to ASCII stay, "ss" stays
    ("今天 天气 很好", "今天，天气，很好"),           # space between CJK -> ，
    ("第一段。\r\n\r\n\r\n第二段", "第一段。\n\n第二段"),  # paragraph break kept, 3+ newlines -> 2, \r removed
    ("第一行\n第二行\n\n第二段", "第一行\n第二行\n\n第二段"),  # single newlines and one blank line kept
    ("def f(x):\n    if x:\n\n        return 1  \n", "def f(x):\n    if x:\n\n        return 1"),  # indentation
    ("a  =   1", "a = 1"),                           # space runs collapse inside a line
    ("　　第一段。\n　　第二段。", "　　第一段。\n　　第二段。"),  # full-width paragraph indentation kept
    ("std::vector", "std::vector"),                 # ASCII runs are left alone
    ("Wait... what?! Really?.", "Wait... what?! Really?."),
    ("好的,，谢谢?？", "好的，谢谢？"),                 # a run with a full-width separator -> that one
    ("  前后空白  ", "前后空白"),
    ("Python 3.11 发布了", "Python 3.11 发布了"),
])
def test_normalize_punctuation(raw, want):
    assert normalize_punctuation(raw) == want


def test_en_to_zh_punctuation_keeps_numbers():
    assert en_to_zh_punctuation("圆周率约为3.14,是无理数.") == "圆周率约为3.14，是无理数。"
    assert en_to_zh_punctuation("人口约1,000万(2020年)") == "人口约1,000万（2020年）"
    assert en_to_zh_punctuation("see e.g. Python") == "see e.g. Python"


def test_translation_and_table_detection():
    assert is_translation_task("把这句话翻译成英文") and is_translation_task("Translate into Chinese")
    assert is_translation_task("英译中：hello") and not is_translation_task("写一首诗")
    assert has_table("用表格列出", "") and has_table("整理", "| a | b |\n| --- | --- |")
    assert has_table("画图", "A\n-----\nB") and not has_table("减法", "10 - 3 = 7")


def rec(p: str, r: str) -> Record:
    return Record(p, r, "t")


def test_clean_record_per_corpus_minimums():
    cfg = CleanConfig()
    assert clean_record(rec("问题", "这是一个足够长的回答内容啊啊啊啊"), "webtext", cfg) == "short_prompt"
    assert clean_record(rec("什么问题", "太短了"), "webtext", cfg) == "short_response"
    assert clean_record(rec("什么问题", "回答五个字"), "belle", cfg) is None        # belle: response >= 5
    assert clean_record(rec("问题啊", "回答了十个字的内容"), "zhihu", cfg) == "short_prompt"  # zhihu: prompt >= 4
    assert clean_record(rec("问", "没有"), "instruct", cfg) is None               # instruction data: non-empty
    cfg.min_lengths["instruct"] = (2, 3)
    assert clean_record(rec("问题", "没有"), "instruct", cfg) == "short_response"


def test_clean_record_belle_filters_only_where_configured():
    cfg = CleanConfig()
    assert clean_record(rec("请翻译这句话", "好的，译文如下"), "belle", cfg) == "translation"
    assert clean_record(rec("请翻译这句话", "好的，译文如下"), "alpaca", cfg) is None
    assert clean_record(rec("用表格总结", "总结如下内容"), "belle", cfg) == "table"
    cfg = CleanConfig(drop_translation=(), drop_tables=())
    assert clean_record(rec("请翻译这句话", "好的，译文如下"), "belle", cfg) is None


def test_clean_record_normalizes_and_caps_length():
    r = rec("为什么？？", "因为。。。\r\r所以" + "长" * 600)
    assert clean_record(r, "baike", CleanConfig()) is None
    assert r.prompt == "为什么？" and r.response.startswith("因为。\n\n所以") and len(r.response) == 512
    assert clean_record(rec("为什么", "长" * 600), "baike", CleanConfig(overlong="drop")) == "too_long"
    raw = rec("为什么？？", "回答。。。")
    clean_record(raw, "qa", CleanConfig(normalize=False))
    assert raw.prompt == "为什么？？"
    with pytest.raises(ValueError):
        CleanConfig(overlong="wrap")
