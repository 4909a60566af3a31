"""`train.py eval`: answer loss, perplexity, bits per character, BLEU-4 and ROUGE-L on a (prompt, response) split
(`--task qa`, the default); bits per character of the split as pretraining documents (`--task bpc`); and the
knowledge benchmarks CMMLU, C-Eval and GAOKAO-Bench (`--task cmmlu|ceval|gaokao`, utils/knowledge.py).

    python train.py eval --model DIR --data data/corpus --split test      # a prepared directory's test shards
    python train.py eval --model DIR --data test.parquet --max-samples 500 --out eval.json
    python train.py eval --model DIR --task bpc --data data/corpus --split valid
    python train.py eval --model DIR --task cmmlu --data ../shared/eval/cmmlu [--shots 5] [--method letter loglik]

Definitions (what the numbers mean, exactly):

- **loss**: the answer-only loss under the chat template, as SFT trains it: each record is rendered as one
  user/assistant exchange by `utils.templates.tokenize_sft`, and the labelled tokens are the answer plus its
  end-of-turn token (`<|im_end|>` for ChatML, the appended eos for wenda / human_assistant / raw). loss = total nats
  over those tokens / their count (a token-weighted mean over the split, not a mean of per-example means);
  perplexity = exp(loss). Examples longer than the model's context window are left out and counted, and so are
  examples with no answer token (an empty answer under a template without an end-of-turn marker has no answer piece).
- **bits per character** = total nats / ln 2 / characters, where characters are the Unicode code points of the
  labelled tokens decoded with special tokens skipped: the answer text exactly (plus any literal template text in the
  trainable piece, e.g. llama2's spaces); the end-of-turn special token adds its nats but no character, as the
  trainer's pretraining bits/char counts eos.
- **BLEU-4 / ROUGE-L** compare greedy (by default) generated answers with the references at the character level:
  every non-space character is a token, except that runs of ASCII letters and digits stay one token ("Python",
  "2024"), so an English word weighs as much as one Chinese character instead of one per letter (sacrebleu's "zh"
  tokenizer makes the same choice); whitespace only separates. BLEU-4 is corpus-level (sacrebleu: clipped n-gram
  counts summed over the split, one brevity penalty for the whole split, its default "exp" smoothing only matters
  when an n-gram order has no match at all). ROUGE-L is the mean over examples of the sentence-level LCS F1
  (rouge-score). Both are reported on a 0-100 scale.
- **--task bpc**: every record as the pretraining document `prompt + "\n" + response` followed by eos (as the
  trainer's token cache writes it), each document's tokens predicted after a bos (eos where the tokenizer has no bos:
  what precedes a document in packed pretraining rows), documents longer than the context window scored window by
  window. bits per character = total nats / ln 2 / the documents' characters; the closing eos adds nats but no
  character, as in the trainer's figure.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.attention import sdpa_kernel

from model.generation import DECODE_SDPA_BACKENDS, SamplingConfig, generate_answers, resolve_template
from model.loss import IGNORE_INDEX
from model.transformer import Transformer
from utils.cleaning import text_of
from utils.io import find_shards, iter_parquet
from utils.progress import progress_bar
from utils.templates import ChatTemplate, to_messages, tokenize_sft

_TOKEN = re.compile(r"[A-Za-z0-9]+|\S")


# ---- text metrics --------------------------------------------------------------------------------------------------
def char_tokens(text: str) -> list[str]:
    """Character-level tokens: every non-space character, runs of ASCII letters/digits kept whole."""
    return _TOKEN.findall(text)


class _CharTokenizer:
    """rouge-score's tokenizer interface (its default one drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU-4 (0-100) over character tokens, with its n-gram precisions (0-100) and brevity penalty."""
    import sacrebleu

    joined = lambda texts: [" ".join(char_tokens(t)) for t in texts]  # noqa: E731
    result = sacrebleu.corpus_bleu(joined(predictions), [joined(references)], tokenize="none")
    return {"bleu4": result.score, "bleu_precisions": list(result.precisions), "brevity_penalty": result.bp,
            "prediction_tokens": result.sys_len, "reference_tokens": result.ref_len}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean sentence-level ROUGE-L precision, recall and F1 (0-100) over character tokens."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references, strict=True)]
    mean = lambda xs: 100 * sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"rouge_l_f": mean([s.fmeasure for s in scores]), "rouge_l_p": mean([s.precision for s in scores]),
            "rouge_l_r": mean([s.recall for s in scores])}


# ---- data ----------------------------------------------------------------------------------------------------------
def data_files(data: Sequence[str | Path], split: str = "test") -> list[Path]:
    """Parquet files from --data: files as given, directories as their `{split}-NNNNN.parquet` shards."""
    files: list[Path] = []
    for item in map(Path, data):
        if item.is_dir():
            files += find_shards(item, split)
        elif item.is_file():
            if item.suffix.lower() != ".parquet":
                raise ValueError(f"{item}: eval reads parquet files with prompt/response columns")
            files.append(item)
        else:
            raise FileNotFoundError(f"evaluation data not found: {item}")
    if not files:
        raise ValueError("no evaluation data given")
    return files


def load_records(files: Sequence[Path], max_samples: int | None = None) -> tuple[list[dict[str, str]], int]:
    """(records, rows skipped for a null prompt or response), the first max_samples records in file order."""
    records: list[dict[str, str]] = []
    nulls = 0
    for cols in iter_parquet(files, ("prompt", "response")):
        for p, r in zip(cols["prompt"], cols["response"]):
            if p is None or r is None:
                nulls += 1
            else:
                records.append({"prompt": p, "response": r})
            if max_samples is not None and len(records) >= max_samples:
                return records, nulls
    return records, nulls




# ---- loss ----------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def answer_loss(model: Transformer, tokenizer, records: Sequence[dict[str, str]], template: ChatTemplate,
                batch_tokens: int = 8192, progress: bool = True) -> dict[str, Any]:
    """Answer-only loss, perplexity and bits per character (see the module docstring).

    Examples are sorted by length and right-padded into batches of at most batch_tokens positions (one example
    per row when it is longer); under causal attention the padding never affects a real position, so no mask is
    needed and the fast causal kernels apply.
    """
    conversations = [to_messages(r, f"record {i}") for i, r in enumerate(records)]
    examples = tokenize_sft(conversations, tokenizer, template, max_seq_len=2**62)
    window = model.config.max_position_embeddings
    kept, chars = [], 0
    for e in range(len(examples)):
        x, m = examples.example(e)
        if len(x) - 1 > window:
            continue
        kept.append(e)
        chars += len(tokenizer.decode(x[1:][m[1:]], skip_special_tokens=True))
    kept.sort(key=lambda e: -len(examples.example(e)[0]))
    device = model.model.embed_tokens.weight.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with progress_bar(progress) as bar, sdpa_kernel(DECODE_SDPA_BACKENDS):
        task = bar.add_task("answer loss", total=len(kept))
        start = 0
        while start < len(kept):
            longest = len(examples.example(kept[start])[0]) - 1
            rows = kept[start:start + max(1, batch_tokens // longest)]
            input_ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
            labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
            for b, e in enumerate(rows):
                x, m = examples.example(e)
                x = torch.from_numpy(x.astype("int64"))
                input_ids[b, :len(x) - 1] = x[:-1]
                labels[b, :len(x) - 1] = x[1:].masked_fill(~torch.from_numpy(m[1:]), IGNORE_INDEX)
            input_ids, labels = input_ids.to(device), labels.to(device)
            n = (labels != IGNORE_INDEX).sum()
            nats += model(input_ids, labels).double() * n
            count += n
            start += len(rows)
            bar.advance(task, len(rows))
    tokens, total = int(count), float(nats)
    loss = total / tokens if tokens else float("nan")
    return {"loss_examples": len(kept), "loss_skipped_overlength": len(examples) - len(kept),
            "loss_skipped_no_target": examples.stats["skipped_no_target"],
            "answer_tokens": tokens, "answer_chars": chars, "loss": loss,
            "perplexity": float("inf") if loss > 700 else math.exp(loss),
            "bits_per_char": total / math.log(2) / chars if chars else None}


@torch.inference_mode()
def document_bits_per_char(model: Transformer, tokenizer, records: Sequence[dict[str, str]],
                           batch_tokens: int = 8192, progress: bool = True) -> dict[str, Any]:
    """Loss, perplexity and bits per character of the records as pretraining documents (module docstring, --task bpc).

    Windows of at most the context length (a document longer than that is cut into consecutive windows, each
    target scored once) are sorted by length and right-padded into batches of at most batch_tokens positions."""
    if not records:
        raise ValueError("no records to evaluate")
    docs = [text_of(r["prompt"], r["response"]) for r in records]  # the document as pretraining reads it
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    window = model.config.max_position_embeddings
    rows: list[list[int]] = []  # each: inputs row[:-1], targets row[1:]
    split = 0
    for ids in tokenizer.encode_batch(docs, special=False):  # marker text in a document is plain text
        seq = [first, *ids, tokenizer.eos_id]
        split += len(seq) - 1 > window
        rows += [seq[s:s + window + 1] for s in range(0, len(seq) - 1, window)]
    rows.sort(key=len, reverse=True)
    device = model.model.embed_tokens.weight.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with progress_bar(progress) as bar, sdpa_kernel(DECODE_SDPA_BACKENDS):
        task = bar.add_task("document loss", total=len(rows))
        start = 0
        while start < len(rows):
            longest = len(rows[start]) - 1
            batch = rows[start:start + max(1, batch_tokens // longest)]
            input_ids = torch.full((len(batch), longest), tokenizer.pad_id, dtype=torch.long)
            labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
            for b, row in enumerate(batch):
                input_ids[b, :len(row) - 1] = torch.tensor(row[:-1])
                labels[b, :len(row) - 1] = torch.tensor(row[1:])
            n = sum(len(row) - 1 for row in batch)
            nats += model(input_ids.to(device), labels.to(device)).double() * n
            count += n
            start += len(batch)
            bar.advance(task, len(batch))
    total, chars = float(nats), sum(map(len, docs))
    loss = total / count
    return {"documents": len(docs), "documents_split": split, "document_tokens": count, "document_chars": chars,
            "loss": loss, "perplexity": float("inf") if loss > 700 else math.exp(loss),
            "bits_per_char": total / math.log(2) / chars if chars else None}


# ---- generation ----------------------------------------------------------------------------------------------------
# ---- everything ----------------------------------------------------------------------------------------------------
def evaluate(model: Transformer, tokenizer, records: Sequence[dict[str, str]],
             template: str | ChatTemplate | None = None, sampling: SamplingConfig | None = None,
             batch_size: int = 16, loss_batch_tokens: int = 8192, with_generation: bool = True,
             num_samples: int = 5, progress: bool = True) -> dict[str, Any]:
    """Loss metrics and (with_generation) BLEU-4 / ROUGE-L of generated answers, as one flat dict. The full list
    of predictions is under "predictions" (None for prompts too long for the context window)."""
    if not records:
        raise ValueError("no records to evaluate")
    tpl = resolve_template(template, tokenizer)
    result: dict[str, Any] = {"template": tpl.name, "examples": len(records)}
    result |= answer_loss(model, tokenizer, records, tpl, loss_batch_tokens, progress)
    if not with_generation:
        return result
    sampling = sampling or SamplingConfig()
    start = time.perf_counter()
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in records]
    predictions, n_tokens = generate_answers(model, tokenizer, conversations, tpl, sampling, batch_size, progress)
    seconds = time.perf_counter() - start
    done = [i for i, p in enumerate(predictions) if p is not None]
    preds, refs = [predictions[i] for i in done], [records[i]["response"] for i in done]
    result |= {"generated": len(done), "generation_skipped_overlength": len(records) - len(done),
               "generated_tokens": n_tokens, "generation_seconds": seconds,
               "generated_tokens_per_second": n_tokens / seconds if seconds > 0 else None}
    if done:
        result |= bleu4(preds, refs) | rouge_l(preds, refs)
    result["sampling"] = {k: v for k, v in vars(sampling).items() if k != "stop_ids"}
    result["samples"] = [{"prompt": records[i]["prompt"], "reference": records[i]["response"],
                          "prediction": predictions[i]} for i in done[:num_samples]]
    result["predictions"] = predictions
    return result


_ROWS = [("examples", "examples", "{:,}"), ("skipped_null", "skipped: null prompt or response", "{:,}"),
         ("loss_skipped_overlength", "skipped for loss: longer than the context", "{:,}"),
         ("loss_skipped_no_target", "skipped for loss: no answer token", "{:,}"),
         ("answer_tokens", "answer tokens", "{:,}"), ("answer_chars", "answer characters", "{:,}"),
         ("loss", "answer loss (nats/token)", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
         ("bits_per_char", "bits per character", "{:.4f}"), ("generated", "generated answers", "{:,}"),
         ("generation_skipped_overlength", "not generated: prompt too long", "{:,}"),
         ("bleu4", "BLEU-4 (corpus, chars, 0-100)", "{:.2f}"), ("brevity_penalty", "BLEU brevity penalty", "{:.3f}"),
         ("rouge_l_f", "ROUGE-L F (mean, chars, 0-100)", "{:.2f}"), ("rouge_l_p", "ROUGE-L precision", "{:.2f}"),
         ("rouge_l_r", "ROUGE-L recall", "{:.2f}"), ("generated_tokens_per_second", "generated tokens/s", "{:.1f}")]
_BPC_ROWS = [("documents", "documents", "{:,}"), ("skipped_null", "skipped: null prompt or response", "{:,}"),
             ("documents_split", "documents longer than the context (scored in windows)", "{:,}"),
             ("document_tokens", "tokens scored", "{:,}"), ("document_chars", "characters", "{:,}"),
             ("loss", "loss (nats/token)", "{:.4f}"), ("perplexity", "perplexity", "{:.3f}"),
             ("bits_per_char", "bits per character", "{:.4f}")]


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    bpc = result.get("task") == "bpc"
    table = Table(title=f"eval · {result.get('model', '')} · " + ("documents (bpc)" if bpc else
                                                                 f"template {result['template']}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in _BPC_ROWS if bpc else _ROWS:
        if result.get(key) is not None and (result[key] or "skipped" not in key):  # skip counts only when > 0
            table.add_row(label, fmt.format(result[key]))
    console.print(table)
    if result.get("samples"):
        samples = Table(title="samples", show_lines=True)
        for column in ("prompt", "reference", "prediction"):
            samples.add_column(column, overflow="fold")
        for s in result["samples"]:
            samples.add_row(*(_short(s[c]) for c in ("prompt", "reference", "prediction")))
        console.print(samples)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
