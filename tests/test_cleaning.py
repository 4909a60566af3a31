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
    normalize_text,
    split_document,
    text_fields,
    text_of,
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


# ----------------------------------------------------------------------------------------------- prose (text format)

def assert_pieces_cover(text: str, pieces: list[str]) -> None:
    """The round trip of split_document: the pieces are substrings of `text`, in order, and only white space lies
    between two of them (or before the first, or after the last)."""
    pos = 0
    for piece in pieces:
        at = text.index(piece, pos)
        assert not text[pos:at].strip(), (pos, at, text[pos:at])
        pos = at + len(piece)
    assert not text[pos:].strip()
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_normalize_text_cleans_breaks_and_controls_and_keeps_the_words():
    raw = ("\ufeff\n \n\u3000\u3000第一回\u3000宴桃园\r\n说\u3000明：他说： 好。。。  \r"
           "e\u0301t\u00e9，ＡＢＣ１２３\x00\x07\x1b[0m\x7f\x9f\u200b\u2060\ufeff\x0c"
           "第二段\u2028第三行\t\n\n\n\n\n末段 \u3000\n\n")
    want = ("\u3000\u3000第一回\u3000宴桃园\n说\u3000明：他说： 好。。。\n"
            "\u00e9t\u00e9，ＡＢＣ１２３[0m\n"
            "第二段\n第三行\n\n末段")
    assert normalize_text(raw) == want
    # the question/answer rules would have changed the words: a CJK space becomes ，, 。。。 one 。
    assert normalize_punctuation("说\u3000明：好。。。") == "说，明：好。"
    # without normalize: line breaks and control characters only (no NFC, spaces at line ends and blank lines kept)
    plain = normalize_text(raw, normalize=False)
    assert "e\u0301" in plain and "好。。。  \n" in plain and "\n\n\n\n\n末段" in plain
    assert "\r" not in plain and "\x00" not in plain and "\ufeff" not in plain and plain.endswith("末段")
    assert normalize_text(" \n\t\x00\u200b\n") == "" and normalize_text("") == ""


def prose(paragraphs: int, seed: int = 0) -> str:
    """A document of paragraphs of varied length, some with blank lines between them."""
    import random
    rnd = random.Random(seed)
    sentences = ["天下大势，分久必合，合久必分。", "玄德曰：“此天佑我也！”", "众皆大喜？", "遂引兵而去……",
                 "云长大怒，拍马舞刀！", "It was late. ", "正是：人情势利古犹今。"]
    paras = ["".join(rnd.choice(sentences) for _ in range(rnd.randint(1, 40))) for _ in range(paragraphs)]
    return "".join(p + rnd.choice(["\n", "\n", "\n\n"]) for p in paras).rstrip()


@pytest.mark.parametrize("max_chars", [60, 200, 1000, 4000])
def test_split_document_round_trip_and_limits(max_chars):
    text = prose(80)
    split = split_document(text, max_chars)
    assert all(0 < len(p) <= max_chars and p == p.strip("\n") for p in split.pieces)
    assert_pieces_cover(text, split.pieces)
    assert split.paragraph + split.sentence + split.hard == len(split.pieces) - 1
    if max_chars >= 1000:  # every paragraph fits: only paragraph cuts, and pieces of about even length
        assert split.sentence == split.hard == 0
        assert min(map(len, split.pieces[:-1])) > max_chars // 3
    assert split_document(text, len(text)).pieces == [text]
    assert split_document("", 10).pieces == []


def test_split_document_long_paragraph_cut_at_sentence_ends_then_anywhere():
    para = "甲乙丙丁戊。" * 30 + "己" * 250  # 180 characters of sentences, then a 250-character "sentence"
    text = "短段落一。\n" + para + "\n短段落二。"
    split = split_document(text, 100)
    assert_pieces_cover(text, split.pieces)
    assert split.pieces[0] == "短段落一。"  # a paragraph end comes first
    assert split.pieces[1] == "甲乙丙丁戊。" * 16 and split.pieces[2] == "甲乙丙丁戊。" * 14  # the last 。 that fits
    assert split.pieces[3] == "己" * 100 and split.pieces[4] == "己" * 100  # no sentence end: hard cuts
    assert split.pieces[5:] == ["己" * 50 + "\n短段落二。"]  # the rest fits: no more cuts
    assert (split.paragraph, split.sentence, split.hard) == (1, 2, 2)
    # closing quotes stay with their sentence; spaces at such a cut are left out
    split = split_document("他说：“走吧！”  然后他们走了很远很远的路" + "。" * 3, 12)
    assert split.pieces[0] == "他说：“走吧！”" and split.pieces[1].startswith("然后")


def test_text_fields_map_a_piece_onto_a_row_the_loader_joins_back():
    for piece in ("第一回\n话说天下大势。\n\n分久必合。", "只有一行。", "标题\n"[:-1] + "\n正文"):
        prompt, response = text_fields(piece)
        assert "\n" not in prompt and text_of(prompt, response) == piece
        if "\n" in piece:
            assert f"{prompt}\n{response}" == piece  # trainer/data.py's pretraining document, exactly
        else:
            assert (prompt, response) == (piece, "")
