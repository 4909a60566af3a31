"""`train.py lora | merge` and `cli_demo.py --lora` end to end, with the real tokenizers of the 7B checkpoints on tiny
random weights in those architectures (Qwen2 + ChatML on the translational-style alpaca data, LLaMA + Human/Assistant
on the MSRA NER instruct data, QLoRA, the seed's unmasked 问/答 recipe)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import load_model
from model.lora import load_adapter

REPO = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_base(tmp: Path, kind: str, tokenizer_dir: Path, vocab: int) -> Path:
    """A random tiny Qwen2 / Llama checkpoint (save_pretrained) with the real tokenizer files beside it."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6, eos_token_id=151643))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, bos_token_id=1, eos_token_id=2))
    out = tmp / f"base-{kind}"
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def lora_args(base: Path, data: Path, fmt: str, template: str, out: Path, *extra: str) -> list[str]:
    return ["lora", "--base", str(base), "--data", str(data), "--format", fmt, "--template", template,
            "--r", "4", "--alpha", "8", "--max-seq-length", "128", "--batch-size", "2", "--max-steps", "3",
            "--warmup-steps", "1", "--lr", "1e-2", "--log-every", "1", "--cpu", "--mixed-precision", "no",
            "--out", str(out), *extra]


def run_cli_demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli_demo.py"), "--device", "cpu", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)



def test_a_batch_larger_than_tiny_data_takes_the_rows_there_are(tiny_chat_base, samples_dir, tmp_path, capsys):
    """The README's 7B flags (rows of 2048 tokens, --batch-size 4) on the bundled alpaca sample pack a couple of rows:
    the batch takes them, said in one line before any work (it failed at the first step with a traceback), and the
    saved config holds the batch that ran. A run of a few steps is told it is too short to learn."""
    data = samples_dir / "alpaca" / "alpaca_zh_sample.json"
    train.main(["lora", "--base", str(tiny_chat_base), "--data", str(data), "--format", "alpaca", "--template",
                "chatml", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--cpu", "--out",
                str(tmp_path / "run")])
    [note] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --data")]
    rows = int(re.search(r"packs into (\d+) rows? of 2048 tokens per epoch, too few for --batch-size 4", note)[1])
    assert rows < 4 and f"batches of {rows} rows instead" in note and "--max-seq-length" in note
    state = json.loads((tmp_path / "run" / "latest" / "training_state" / "trainer_state.json").read_text())
    assert state["config"]["batch_size"] == rows and state["step"] == 2
    assert "warning: only 2 optimizer steps" in (tmp_path / "run" / "train.log").read_text()

@pytest.mark.slow
def test_qwen2_chatml_alpaca_lora_then_chat_merge_and_peft(shared_corpora, tmp_path):
    peft = pytest.importorskip("peft")
    records = json.loads((shared_corpora / "translational_style" / "TslDial.json").read_text())[:40]
    data = tmp_path / "tsl.json"
    data.write_text(json.dumps(records, ensure_ascii=False))
    base = tiny_base(tmp_path, "qwen2", shared_corpora / "tokenizers" / "qwen2", 151646)
    run = tmp_path / "run"
    train.main(lora_args(base, data, "alpaca", "chatml", run, "--targets", "q_proj,v_proj"))

    adapter = run / "latest"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4 and config["peft_type"] == "LORA"
    assert not (adapter / "model.safetensors").exists()  # checkpoints hold the adapter, not the base
    assert (adapter / "training_state" / "optimizer.pt").exists()

    ours = load_model(base)
    load_adapter(ours, adapter)
    ids = torch.randint(0, 151646, (1, 10))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        adapted = ours(ids)
        assert (adapted - hf(input_ids=ids).logits).abs().max() < 1e-4  # PEFT reads our adapter
        assert (adapted - load_model(base)(ids)).abs().max() > 1e-6  # and the adapter changed something

    train.main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
                "--dtype", "float32"])
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(ids) - adapted).abs().max() < 1e-4

    chat = run_cli_demo("--model", str(base), "--lora", str(adapter), "--prompt", "你好", "--max-new-tokens", "5",
                        "--temperature", "0", "--verbose")
    assert "tokens/s" in chat.stderr
    preds = tmp_path / "preds.jsonl"
    run_cli_demo("--model", str(base), "--lora", str(adapter), "--data", str(data), "--format", "alpaca",
                 "--predictions", str(preds), "--max-new-tokens", "4", "--temperature", "0")
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == 40 and lines[0]["prompt"] == records[0]["input"]
    assert lines[0]["reference"] == records[0]["output"] and isinstance(lines[0]["prediction"], str)


@pytest.mark.slow
def test_llama_human_assistant_qlora_on_msra_instruct(shared_corpora, tmp_path):
    base = tiny_base(tmp_path, "llama", shared_corpora / "tokenizers" / "llama", 32000)
    data = shared_corpora / "msra_ner_instruct" / "eval.first800.txt"
    run = tmp_path / "run"
    train.main(lora_args(base, data, "instruct", "human_assistant", run, "--qlora", "--targets", "all-linear",
                         "--dropout", "0.1"))
    config = json.loads((run / "latest" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    log = (run / "train.log").read_text()
    assert "step 3" in log
    out = run_cli_demo("--model", str(base), "--lora", str(run / "latest"), "--qlora", "--template",
                       "human_assistant", "--prompt", "文本：张三在北京工作。", "--max-new-tokens", "4")
    assert out.returncode == 0


@pytest.mark.slow
def test_resume_lora_run_is_exact(shared_corpora, tmp_path):
    """Adapter-only checkpoints still resume exactly: 4 straight steps == 2 steps + resume to 4 (the seed's 问/答
    recipe, --train-on-prompt)."""
    from safetensors.torch import load_file
    base = tiny_base(tmp_path, "llama", shared_corpora / "tokenizers" / "llama", 32000)
    data = shared_corpora / "msra_ner_instruct" / "eval.first800.txt"
    extra = ("--train-on-prompt", "--dropout", "0.1")
    train.main(lora_args(base, data, "instruct", "wenda", tmp_path / "a", *extra) + ["--max-steps", "4"])
    train.main(lora_args(base, data, "instruct", "wenda", tmp_path / "b", *extra) + ["--max-steps", "2"])
    train.main(lora_args(base, data, "instruct", "wenda", tmp_path / "b", *extra) + ["--max-steps", "4",
                                                                                      "--resume"])
    a = load_file(tmp_path / "a" / "latest" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "latest" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
