"""Dedup: our vectorized MinHash equals datasketch's, our banding equals datasketch's LSH, planted near-duplicates go,
distinct rows stay."""
from __future__ import annotations

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from utils.cleaning import CleanConfig, clean_record
from utils.corpora import read_corpus
from utils.dedup import (
    DedupConfig,
    exact_hashes,
    first_occurrence,
    lsh_params,
    minhash_signatures,
    near_duplicates,
    near_keys,
    shingle_hash,
    shingles,
)


def sample_docs(samples_dir, name: str) -> list[str]:
    out = []
    for r in read_corpus(name, samples_dir / name):
        if clean_record(r, name, CleanConfig()) is None:
            out.append(r.prompt + r.response)
    return out


def datasketch_minhash(doc: str, num_perm: int = 256, ngram: int = 3, seed: int = 1) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=shingle_hash)
    for g in shingles(doc, ngram):
        m.update(g)
    return m


@pytest.mark.parametrize("ngram, num_perm", [(3, 256), (1, 128), (5, 64)])
def test_signatures_equal_datasketch(samples_dir, ngram, num_perm):
    docs = sample_docs(samples_dir, "zhihu")[:20] + ["", "短", "ab", "Hello, World! 你好\x00世界"]
    sig, has = minhash_signatures(docs, num_perm=num_perm, ngram=ngram)
    for d, s, h in zip(docs, sig, has):
        ref = datasketch_minhash(d, num_perm, ngram)
        assert np.array_equal(ref.hashvalues, s)
        assert h == bool(shingles(d, ngram))


def test_jaccard_estimate_tracks_true_jaccard(shared_corpora):
    import csv
    with open(shared_corpora / "medical_dialogue" / "IM_neike_5000-6000_sample.csv", encoding="gb18030") as f:
        rows = list(csv.reader(f))[1:401]
    docs = [r[1] + r[2] + r[3] for r in rows]
    sig, _ = minhash_signatures(docs)
    rng = np.random.default_rng(0)
    errs = []
    for i, j in rng.integers(0, len(docs), size=(300, 2)):
        a, b = shingles(docs[i], 3), shingles(docs[j], 3)
        true = len(a & b) / len(a | b)
        est = float(np.mean(sig[i] == sig[j]))
        ref = datasketch_minhash(docs[i]).jaccard(datasketch_minhash(docs[j]))
        assert est == pytest.approx(ref)
        errs.append(abs(est - true))
    assert np.mean(errs) < 0.03 and max(errs) < 0.2


def test_near_duplicate_decisions_equal_datasketch_lsh(shared_corpora, samples_dir):
    """Feed the same rows to datasketch MinHashLSH (query, then insert; first occurrence kept) and compare."""
    import csv
    with open(shared_corpora / "medical_dialogue" / "IM_neike_5000-6000_sample.csv", encoding="gb18030") as f:
        docs = [r[1] + r[2] + r[3] for r in list(csv.reader(f))[1:1501]]
    docs += sample_docs(samples_dir, "webtext") + sample_docs(samples_dir, "zhihu")
    cfg = DedupConfig()
    bands, has = near_keys(docs, cfg)
    ours = near_duplicates(bands, has)
    sig, _ = minhash_signatures(docs, cfg.num_perm, cfg.seed, cfg.ngram)
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    ref = np.zeros(len(docs), dtype=bool)
    for i, s in enumerate(sig):
        m = LeanMinHash(seed=cfg.seed, hashvalues=s, scheme="affine32")
        ref[i] = bool(lsh.query(m))
        lsh.insert(i, m)
    assert ours.sum() > 10
    assert np.array_equal(ours, ref)
    assert lsh_params(0.85, 256) == (lsh.b, lsh.r)


@pytest.mark.parametrize("num_perm", [64, 128, 256, 512])
def test_lsh_layout_is_datasketchs(num_perm):
    for threshold in (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # scipy's adaptive quadrature
        assert lsh_params(threshold, num_perm) == (lsh.b, lsh.r), threshold


def test_planted_near_duplicates_removed_distinct_kept():
    base = ("糖尿病人能吃水果吗？血糖控制平稳的话可以吃水果，选择含糖量较低的苹果、梨、柚子，"
            "每天二百克左右，放在两餐之间吃。")
    docs = [
        base,
        base.replace("，放在两餐之间吃", "，放在两餐之间吃哦"),                       # near-duplicate of 0
        "高血压患者早上头晕怎么办？建议连续一周早晚各测一次血压并记录，带着记录去心内科复诊，起床时动作要慢。",
        # near-duplicate of 2
        "高血压患者早上头晕怎么办呢？建议连续一周早晚各测一次血压并记录，带着记录去心内科复诊，起床时动作要慢。",
        # distinct
        "糖尿病人能吃米饭吗？可以吃，但要控制量，每餐一小碗，最好和粗粮一起吃，吃饭时先吃蔬菜再吃主食。",
        # distinct
        "为什么天空是蓝色的？阳光被空气分子散射，蓝光波长短，散射最强，所以天空看起来是蓝色的。",
    ]
    bands, has = near_keys(docs, DedupConfig())
    assert near_duplicates(bands, has).tolist() == [False, True, False, True, False, False]


def test_near_dedup_on_bundled_samples(samples_dir):
    docs = sample_docs(samples_dir, "zhihu")
    bands, has = near_keys(docs, DedupConfig())
    dup = near_duplicates(bands, has)
    dropped = [d[:11] for d, x in zip(docs, dup) if x]
    assert sorted(dropped) == sorted(["如何看待《三体》这部小", "熬夜对身体有哪些影响？"])


def test_exact_hash_normalizes_and_keeps_first():
    h = exact_hashes(["你好！", "你好", "Hello World", "hello, world", "你好"], ["世界", "世界。", "x", "X", "地球"])
    keep = first_occurrence(h)
    assert keep.tolist() == [True, False, True, False, True]
    # the prompt/response boundary matters
    assert exact_hashes(["ab"], ["c"])[0] != exact_hashes(["a"], ["bc"])[0]


def test_empty_documents_never_match():
    bands, has = near_keys(["！！！", "……", "正常的一句话内容"], DedupConfig())
    assert has.tolist() == [False, False, True]
    assert not near_duplicates(bands, has).any()


def test_threshold_and_num_perm_are_configurable():
    a = "今天天气很好我们一起去公园散步然后去吃午饭下午回家看书晚上早点睡觉明天还要上班"
    b = a[:30] + "他们" + a[32:]
    loose = DedupConfig(threshold=0.5, num_perm=128)
    strict = DedupConfig(threshold=0.95, num_perm=128)
    assert near_duplicates(*near_keys([a, b], loose)).tolist() == [False, True]
    assert near_duplicates(*near_keys([a, b], strict)).tolist() == [False, False]
    assert near_keys([a], loose)[0].shape[1] == lsh_params(0.5, 128)[0]
