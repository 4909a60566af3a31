"""The training loop: exact resume, 2-process DDP == 1 process with twice the accumulation, crash-safe checkpoints,
NaN stop, SIGTERM save, and loss going down on a real corpus."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import train
from model import ModelConfig, load_model
from trainer.config import PretrainConfig
from utils.errors import TrainingStopped
from utils.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]

QA = [("什么是机器学习？", "机器学习是让计算机从数据中学习规律的方法。"),
      ("感冒了应该注意什么？", "多喝水，注意休息，必要时去医院看医生。"),
      ("长城有多长？", "长城总长度超过两万公里，是世界上最长的城墙。"),
      ("如何学习编程？", "先选一门语言，多写代码，多读优秀的项目。"),
      ("北京是哪个国家的首都？", "北京是中华人民共和国的首都。"),
      ("为什么天空是蓝色的？", "因为空气分子对蓝光的散射比红光更强。")]


def write_split(path: Path, rows: list[tuple[str, str]]) -> None:
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "response": r, "source": "t"} for p, r in rows]), path)


@pytest.fixture(autouse=True)
def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """A small prepared directory (varied Chinese Q&A) and a tokenizer trained on it."""
    from utils.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("corpus")
    data = root / "data"
    data.mkdir()
    rows = [(f"{q}（第{i}问）", f"{a}补充说明{i}：{a[::-1]}") for i in range(40) for q, a in QA]
    write_split(data / "train-00000.parquet", rows)
    write_split(data / "valid-00000.parquet", [(q + "？", a) for q, a in QA])
    train_tokenizer(data, 600, root / "tok")
    return data, root / "tok"


def pretrain_args(corpus, out: Path, *extra: str) -> list[str]:
    data, tok = corpus
    return ["pretrain", "--data", str(data), "--tokenizer", str(tok), "--preset", "tiny", "--seq-len", "64",
            "--batch-size", "4", "--warmup-steps", "2", "--lr", "3e-3", "--log-every", "1", "--eval-batches", "2",
            "--mixed-precision", "no", "--cpu", "--out", str(out), *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "latest" / "model.safetensors")


def test_interrupted_and_resumed_run_equals_uninterrupted(corpus, tmp_path, monkeypatch):
    """SIGTERM during step 3 saves a checkpoint and stops cleanly; --resume finishes bitwise equal to a straight run
    (weights, and the data iterator position: the same rows follow). The host reads step 3's stop votes while step 4
    runs (one step behind the GPU), so the checkpoint is step 4's."""
    train.main(pretrain_args(corpus, tmp_path / "straight", "--max-steps", "6"))

    import trainer.data as datasets
    original_iter = datasets.PackedLoader.__iter__
    fetched = {"n": 0}

    def iter_with_sigterm(self):
        for batch in original_iter(self):
            fetched["n"] += 1
            if fetched["n"] == 3 and self.batches_per_epoch > 0:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 3
            yield batch
    monkeypatch.setattr(datasets.PackedLoader, "__iter__", iter_with_sigterm)
    with pytest.raises(TrainingStopped) as stopped:  # saved, and says so: later stages must not run
        train.main(pretrain_args(corpus, tmp_path / "resumed", "--max-steps", "6"))
    assert stopped.value.signum == signal.SIGTERM and stopped.value.checkpoint.name == "checkpoint-4"
    assert os.readlink(tmp_path / "resumed" / "latest") == "checkpoint-4"
    assert "received signal" in (tmp_path / "resumed" / "train.log").read_text()
    monkeypatch.setattr(datasets.PackedLoader, "__iter__", original_iter)

    train.main(pretrain_args(corpus, tmp_path / "resumed", "--max-steps", "6", "--resume"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads((tmp_path / "resumed" / "latest" / "training_state" / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_a_resumed_run_keeps_its_batch_plan_whatever_memory_it_finds(corpus, tmp_path, monkeypatch):
    """As on a GPU, the memory probe faked (its step run for real once): --tokens-per-batch 512 of 64-token rows
    with room for 6 rows plans 4 rows x 2. A run stopped at step 2 and resumed where the probe finds room for 3 rows
    (a fresh plan: 2 x 4) keeps the saved 4 x 2 and ends bitwise equal to a straight run."""
    import trainer.loop as loop
    from trainer.batching import MemoryProbe
    room = {"rows": 6}

    def probe_memory(step, device, extra_bytes):
        step(2)  # the real probe step: it must move neither the weights nor the data
        return MemoryProbe(2**20, 0, room["rows"] / 0.8 * 2**20)
    monkeypatch.setattr(loop, "can_probe", lambda device: True)
    monkeypatch.setattr(loop, "probe_memory", probe_memory)
    args = [a for a in pretrain_args(corpus, tmp_path / "straight") if a not in ("--batch-size", "4")]
    planned = ["--tokens-per-batch", "512", "--max-steps", "4"]
    train.main(args + planned)

    import trainer.data as datasets
    original_iter = datasets.PackedLoader.__iter__

    def iter_with_sigterm(self):
        for n, batch in enumerate(original_iter(self)):
            if n == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # during step 2
            yield batch
    monkeypatch.setattr(datasets.PackedLoader, "__iter__", iter_with_sigterm)
    resumed = tmp_path / "resumed"
    with pytest.raises(TrainingStopped):
        train.main([a if a != str(tmp_path / "straight") else str(resumed) for a in args] + planned)
    monkeypatch.setattr(datasets.PackedLoader, "__iter__", original_iter)
    room["rows"] = 3
    train.main([a if a != str(tmp_path / "straight") else str(resumed) for a in args] + planned + ["--resume"])
    for run in (tmp_path / "straight", resumed):
        state = json.loads((run / "latest" / "training_state" / "trainer_state.json").read_text())
        assert (state["step"], state["batch"]["rows"], state["batch"]["grad_accum"]) == (4, 4, 2)
        assert (state["config"]["batch_size"], state["config"]["grad_accum"]) == (4, 2)
    log = (resumed / "train.log").read_text()
    assert "= 4 rows x 64 tokens x 2 micro-batches (budget --tokens-per-batch" in log
    assert "4 rows x 64 tokens x 2 micro-batches (the plan saved with the checkpoint" in log
    a, b = weights(tmp_path / "straight"), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_evaluation_runs_the_same_rows_in_the_plans_micro_batches(corpus, tmp_path, monkeypatch):
    """--eval-batches counts batches of the starting rows (--batch-size, else the CPU default of 8): a planned run
    (the GPU probe faked: 16 rows a micro-batch) evaluates those same rows in its larger micro-batches, to the same
    loss as a run given --batch-size 8."""
    import trainer.data as datasets
    import trainer.loop as loop
    from trainer.batching import MemoryProbe
    served: list[int] = []
    original = datasets.PackedLoader.eval_batches

    def eval_batches(self, max_rows=None, rows_per_batch=None):
        for batch in original(self, max_rows, rows_per_batch):
            served.append(len(batch["input_ids"]))
            yield batch
    monkeypatch.setattr(datasets.PackedLoader, "eval_batches", eval_batches)

    data = tmp_path / "data"  # a valid split of more than 24 rows
    data.mkdir()
    shutil.copy(corpus[0] / "train-00000.parquet", data)
    write_split(data / "valid-00000.parquet", [(f"{q}（{i}）", a) for i in range(8) for q, a in QA])

    def run(name: str, *extra: str) -> float:
        args = pretrain_args((data, corpus[1]), tmp_path / name, "--seq-len", "16", "--eval-batches", "3",
                             "--eval-at-start", "--max-steps", "1")
        del args[args.index("--batch-size"):args.index("--batch-size") + 2]
        served.clear()
        train.main(args + list(extra))
        return float(re.search(r"eval step 0: loss (\S+)", (tmp_path / name / "train.log").read_text())[1])
    given = run("given", "--batch-size", "8")
    assert served == [8, 8, 8] * 2  # at the start and at the end
    monkeypatch.setattr(loop, "can_probe", lambda device: True)
    monkeypatch.setattr(loop, "probe_memory", lambda step, device, extra: MemoryProbe(2**20, 0, 20 / 0.8 * 2**20))
    planned = run("planned", "--tokens-per-batch", "256")
    assert "= 16 rows x 16 tokens x 1 micro-batch" in (tmp_path / "planned" / "train.log").read_text()
    assert served == [16, 8] * 2  # the CPU default's 3 x 8 rows
    assert planned == pytest.approx(given, abs=1e-4)


MUON = ("--optimizer", "muon", "--schedule", "wsd", "--decay-ratio", "0.5")


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                       eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (torch.optim._muon._zeropower_via_newtonschulz) in fp32, not bf16."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def test_a_resumed_muon_run_equals_an_uninterrupted_one(corpus, tmp_path, monkeypatch):
    """--optimizer muon: Muon's and AdamW's state go into one optimizer.pt keyed by parameter name (momentum buffers
    for the blocks' matrices); a run saved after 2 steps and resumed to 3 ends bitwise equal to a straight 3-step run
    (the same lrs: both warm up over those 2 steps). Muon orthogonalizes in fp32 here: its bf16 matmuls take seconds
    a step on a CPU (tests/test_optim.py steps torch's own, bf16)."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
    train.main(pretrain_args(corpus, tmp_path / "straight", "--max-steps", "3", *MUON))
    train.main(pretrain_args(corpus, tmp_path / "resumed", "--max-steps", "2", *MUON))
    saved = torch.load(tmp_path / "resumed" / "latest" / "training_state" / "optimizer.pt", weights_only=True)
    assert {k for k, v in saved["state"].items() if "momentum_buffer" in v} == {
        f"model.layers.{i}.{m}_proj.weight" for i in range(4)
        for m in ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "mlp.gate", "mlp.up", "mlp.down"]}
    train.main(pretrain_args(corpus, tmp_path / "resumed", "--max-steps", "3", "--resume", *MUON))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_an_untied_zero_init_model_trains_with_muon_and_loads_in_transformers(corpus, tmp_path, monkeypatch):
    """--untie-embeddings and --zero-init-residual (issue 31's levers): a new model's head is its own matrix and every
    block starts as the identity (o_proj and down_proj zero: the blocks' other matrices get no gradient at the first
    step, Muon's orthogonalized update of a zero gradient is zero, not NaN); the run trains, its config says untied
    and transformers loads it to the same logits. Refused with --init, whose model keeps its own."""
    from trainer.stages import new_model
    cfg = PretrainConfig(data="d", tokenizer="t", untie_embeddings=True, zero_init_residual=True)
    model = new_model(ModelConfig.preset("tiny", vocab_size=600), cfg)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std() > 0.01
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "8", "--untie-embeddings", "--zero-init-residual", *MUON))
    losses = [float(x) for x in re.findall(r"step \d+ loss (\S+)", (run / "train.log").read_text())]
    assert losses[-1] < losses[0] - 0.3, losses
    assert json.loads((run / "latest" / "config.json").read_text())["tie_word_embeddings"] is False
    ours = load_model(run / "latest")
    assert all(layer.self_attn.o_proj.weight.any() for layer in ours.model.layers)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "latest").eval()
    ids = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="shape a new model"):
        PretrainConfig(data="d", tokenizer="t", init=str(run / "latest"), untie_embeddings=True)


def test_z_loss_adds_to_the_training_loss_and_not_to_evaluations(corpus, tmp_path):
    """--z-loss c: the first step's logged loss exceeds a plain run's by c x the mean squared logsumexp (a new
    model's logits are near 0: logsumexp ~ log V); its evaluation at the start is the plain run's."""
    def run(name: str, *extra: str) -> tuple[float, float]:
        train.main(pretrain_args(corpus, tmp_path / name, "--max-steps", "1", "--eval-at-start", *extra))
        log = (tmp_path / name / "train.log").read_text()
        return float(re.search(r"step 1 loss (\S+)", log)[1]), float(re.search(r"eval step 0: loss (\S+)", log)[1])
    (plain, plain_eval), (z, z_eval) = run("plain"), run("z", "--z-loss", "0.01")
    vocab = Tokenizer.load(corpus[1]).vocab_size
    assert z - plain == pytest.approx(0.01 * math.log(vocab) ** 2, rel=0.1)
    assert z_eval == plain_eval
    with pytest.raises(ValueError, match="--z-loss must be >= 0"):
        PretrainConfig(data="d", tokenizer="t", z_loss=-1e-4)


def test_the_host_reads_each_step_one_step_behind(corpus, tmp_path, monkeypatch):
    """No device sync per step: step k's loss is read after step k+1 was queued, except at steps that save,
    evaluate or finish, which read everything at once (a checkpoint never holds a step whose loss was not checked)."""
    from trainer.loop import Trainer
    original, seen = Trainer._read_step, []

    def spy(self, record):
        seen.append((record.step, self.step))
        return original(self, record)
    monkeypatch.setattr(Trainer, "_read_step", spy)
    train.main(pretrain_args(corpus, tmp_path / "run", "--max-steps", "6", "--save-every", "3"))
    assert seen == [(1, 2), (2, 3), (3, 3), (4, 5), (5, 6), (6, 6)]
    log = (tmp_path / "run" / "train.log").read_text()
    assert [int(n) for n in re.findall(r"step (\d+) loss", log)] == [1, 2, 3, 4, 5, 6]  # --log-every 1



def test_every_log_line_times_its_own_steps(corpus, tmp_path, monkeypatch):
    """Each logged tokens/s divides a window's tokens by the time its steps took, on the CPU too: each step is made to
    take at least 50 ms, so no line may pass 4 x 64 tokens / 50 ms. Timed from when the host read the window's last
    step, the last line (step 4, read just after step 3 as the run ends) took microseconds (1,349,254,684 tokens/s).
    The first step is logged whatever --log-every says, the start names the device and the precision in words, the
    end says how long the steps took."""
    from trainer.loop import LanguageModeling
    original = LanguageModeling.__call__

    def slow(self, model, batch):
        time.sleep(0.05)
        return original(self, model, batch)
    monkeypatch.setattr(LanguageModeling, "__call__", slow)
    train.main(pretrain_args(corpus, tmp_path / "run", "--max-steps", "4", "--save-every", "2", "--log-every", "3"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "steps on 1 x cpu, float32" in log and "(no)" not in log
    assert re.search(r"steps 1-4 took \d+:\d\d:\d\d: loss \d+\.\d{4} -> \d+\.\d{4}", log)
    found = re.findall(r"step (\d+) loss .* ([\d,.]+) tok/s", log)
    speeds = {int(step): float(rate.replace(",", "")) for step, rate in found}
    assert sorted(speeds) == [1, 3, 4]
    assert all(0 < rate <= 4 * 64 / 0.05 for rate in speeds.values()), speeds


def test_warmup_and_step_shortfalls_are_said_with_their_numbers(corpus, tmp_path):
    """A warmup longer than, or most of, the run, and a fine-tune of too few steps: a line each, with the numbers and
    the flag to change, before the first step (a warmup of at most half the run, or enough steps, say nothing)."""
    from trainer.config import LoraConfig, PretrainConfig, SFTConfig
    from trainer.loop import shortfalls
    pretrain = PretrainConfig(data="d", tokenizer="t", max_steps=60)
    [line] = shortfalls(pretrain, 60)
    assert "--warmup-steps 200 is longer than the run's 60 steps" in line and "30% of its peak" in line
    assert "use --warmup-steps 6 (about a tenth" in line and "--max-steps" in line
    sft = SFTConfig(init="i", data="d")
    warmup, few = shortfalls(sft, 60)
    assert "--warmup-steps 50 takes 83% of the run's 60 steps" in warmup and "--epochs" in warmup
    assert "only 60 optimizer steps" in few and "--batch-size" in few
    assert shortfalls(sft, 100) == [] and shortfalls(pretrain, 400) == []
    assert shortfalls(LoraConfig(base="b", data="d"), 16)[-1].startswith("warning: only 16 optimizer steps")
    assert shortfalls(pretrain, 50)[0].startswith("warning: --warmup-steps 200")  # pretraining: no step minimum
    train.main(pretrain_args(corpus, tmp_path / "run", "--max-steps", "2", "--warmup-steps", "5"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.index("--warmup-steps 5 is longer than the run's 2 steps") < log.index("step 1 loss")


def test_an_fsdp_launch_that_would_not_shard_is_refused(corpus, tmp_path, monkeypatch):
    """`accelerate launch --config_file accelerate_fsdp.yaml ... --cpu`: accelerate ignores FSDP on the CPU and would
    run plain DDP; refused in one line before the data is read."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    refused = r"asks for FSDP .* does not shard on the CPU: this would run as one process.*accelerate\.yaml"
    with pytest.raises(ValueError, match=refused):
        train.main(["pretrain", "--data", str(tmp_path / "missing"), "--tokenizer", str(tmp_path / "missing"),
                    "--cpu", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()

def test_checkpoints_rotate_and_load_in_transformers(corpus, tmp_path):
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "5", "--save-every", "1", "--save-total-limit", "2"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert (run / "train.log").exists() and any((run / "tensorboard").rglob("events.out.tfevents.*"))
    ours = load_model(run / "latest")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "latest").eval()
    ids = torch.randint(0, 600, (1, 12))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() < 1e-4


def test_crash_during_checkpoint_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "2"))
    good = weights(run)
    import model.checkpoint as ckpt
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        train.main(pretrain_args(corpus, run, "--max-steps", "4", "--resume"))
    assert os.readlink(run / "latest") == "checkpoint-2"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))) == [
        "checkpoint-2"]
    for k, v in weights(run).items():
        assert torch.equal(v, good[k])
    load_model(run / "latest")


def test_resume_refuses_a_position_keyed_optimizer_state(corpus, tmp_path):
    """Optimizer state is keyed by parameter name (so it resumes under any sharding); a position-keyed file from an
    earlier format is refused naming the file, before any training step."""
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "2"))
    state_file = run / "latest" / "training_state" / "optimizer.pt"
    saved = torch.load(state_file, weights_only=True)
    assert "model.embed_tokens.weight" in saved["state"]  # parameter names
    torch.save({"state": {i: v for i, v in enumerate(saved["state"].values())},
                "param_groups": saved["param_groups"]}, state_file)
    with pytest.raises(ValueError, match="optimizer.pt: optimizer state keyed by position"):
        train.main(pretrain_args(corpus, run, "--max-steps", "4", "--resume"))


def test_non_finite_loss_stops_naming_the_step(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "2"))
    from model.transformer import Transformer
    original = Transformer.loss
    calls = {"n": 0}

    def nan_at_step_2(self, hidden, labels):
        calls["n"] += 1
        loss = original(self, hidden, labels)
        return loss * float("nan") if calls["n"] == 2 else loss
    monkeypatch.setattr(Transformer, "loss", nan_at_step_2)
    from trainer.loop import NonFiniteLoss
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        train.main(pretrain_args(corpus, run, "--max-steps", "6", "--resume"))
    assert os.readlink(run / "latest") == "checkpoint-2"


def torchrun(corpus, out: Path, *extra: str, script: Path = REPO / "train.py") -> None:
    """`train.py pretrain` in two CPU processes under torchrun (accelerate picks MULTI_CPU, gloo DDP), 2 rows each.
    (`accelerate launch --cpu --num_processes 2` starts a single process, hence torchrun.)"""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
              str(script), *pretrain_args(corpus, out, "--batch-size", "2", *extra)]
    result = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_ddp_equals_double_accumulation(corpus, tmp_path, *extra: str,
                                          script: Path = REPO / "train.py") -> dict[str, torch.Tensor]:
    """Two processes vs one with --grad-accum 2: the same rows per optimizer step, so the same weights after 3."""
    torchrun(corpus, tmp_path / "ddp", "--max-steps", "3", *extra, script=script)
    assert "on 2 x cpu" in (tmp_path / "ddp" / "train.log").read_text()
    train.main(pretrain_args(corpus, tmp_path / "one", "--max-steps", "3", "--batch-size", "2",
                             "--grad-accum", "2", *extra))
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # Adam updates are ~3e-3
    return a


MUON_FP32_TRAIN = """
import sys
import torch
from tests.test_trainer import newton_schulz_fp32
torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
import train
train.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [(), MUON], ids=["adamw", "muon"])
def test_two_processes_equal_one_process_with_double_accumulation(corpus, tmp_path, monkeypatch, optimizer):
    """DDP over two processes equals one process with twice the accumulation. A 2-process run stopped at step 2 and
    resumed (rank 0 reads the optimizer state and broadcasts it) ends bitwise equal to the straight one. Muon
    orthogonalizes in bf16, where the all-reduce's and the accumulation's fp32 rounding differences flip roundings
    (0.4% of the weights off by up to 1e-4 after 3 steps): here it does so in fp32, and the runs agree as AdamW's do."""
    script = REPO / "train.py"
    if optimizer:
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", newton_schulz_fp32)
        script = tmp_path / "muon_fp32_train.py"
        script.write_text(MUON_FP32_TRAIN)
    straight = assert_ddp_equals_double_accumulation(corpus, tmp_path, *optimizer, script=script)
    torchrun(corpus, tmp_path / "resumed", "--max-steps", "2", *optimizer, script=script)
    torchrun(corpus, tmp_path / "resumed", "--max-steps", "3", "--resume", *optimizer, script=script)
    assert all(torch.equal(v, weights(tmp_path / "resumed")[k]) for k, v in straight.items())


OFFLOADING_TRAIN = """
import sys
import trainer.activations as offload
offload.MIN_OFFLOAD_BYTES = 0  # the tiny model's block inputs lie far below the 8 MiB floor
offload.OFFLOAD_SKIP_LAST = 1  # 3 of its 4 blocks offloaded
moved = []
real = offload.Offloader._offload
offload.Offloader._offload = lambda self, t, nbytes: (moved.append(nbytes), real(self, t, nbytes))[1]
import train
train.main(sys.argv[1:])
assert moved, "no saved tensor was offloaded"
"""


@pytest.mark.slow
def test_offloaded_activations_under_ddp_equal_one_process(corpus, tmp_path, monkeypatch):
    """--offload-activations under DDP: the saved-tensor hooks that move blocks' inputs out and back (3 of the tiny
    preset's 4 blocks, the size floor lowered) run while DDP's gradient hooks reduce the buckets; the weights still
    equal one process's."""
    import trainer.activations as offload
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(offload, "OFFLOAD_SKIP_LAST", 1)
    script = tmp_path / "offloading_train.py"
    script.write_text(OFFLOADING_TRAIN)
    assert_ddp_equals_double_accumulation(corpus, tmp_path, "--gradient-checkpointing", "--offload-activations",
                                          script=script)


@pytest.mark.slow
def test_loss_goes_down_on_a_real_corpus(shared_corpora, tmp_path):
    """Pretrain the tiny preset on the real medical-dialogue sample (GB18030 CSV): the held-out loss falls well below
    the first training losses and below a unigram model of the same tokens (fitted on the train split, add-one
    smoothed), so the model has learned context, not just token frequencies."""
    import pandas as pd

    from utils.tokenizer import train_tokenizer
    df = pd.read_csv(shared_corpora / "medical_dialogue" / "IM_neike_5000-6000_sample.csv", encoding="gb18030")
    df = df.dropna(subset=["ask", "answer"]).head(1200)
    data = tmp_path / "data"
    data.mkdir()
    rows = list(zip(df["ask"].astype(str), df["answer"].astype(str)))
    write_split(data / "train-00000.parquet", rows[:1100])
    write_split(data / "valid-00000.parquet", rows[1100:])
    train_tokenizer(data, 800, tmp_path / "tok")
    run = tmp_path / "run"
    train.main(["pretrain", "--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--preset", "tiny",
                "--seq-len", "64", "--batch-size", "16", "--max-steps", "150", "--warmup-steps", "10", "--lr", "5e-3",
                "--log-every", "5", "--eval-batches", "8", "--mixed-precision", "no", "--cpu", "--out", str(run)])
    log = (run / "train.log").read_text()
    losses = [float(line.split("loss ")[1].split()[0]) for line in log.splitlines() if " step " in f" {line}"
              and "loss " in line and "eval" not in line]
    eval_loss = float(log.split("eval step 150: loss ")[1].split()[0])
    assert losses[0] > losses[-1] + 1.0
    assert eval_loss < unigram_cross_entropy(data, tmp_path / "tok") - 0.5  # ~6.0 nats here; a bigram model gets ~3.9


def unigram_cross_entropy(data: Path, tokenizer_dir: Path) -> float:
    """Nats per token of the valid split's documents under the train split's add-one smoothed token frequencies."""
    from tokenizers import Tokenizer

    from utils.tokenizer import iter_documents
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def tokens(split: str) -> list[int]:
        return [t for doc in iter_documents(data / f"{split}-00000.parquet") for t in tok.encode(doc).ids]
    counts, valid = Counter(tokens("train")), tokens("valid")
    total, vocab = sum(counts.values()), tok.get_vocab_size()
    return -sum(math.log((counts[t] + 1) / (total + vocab)) for t in valid) / len(valid)


def test_sft_accumulation_weights_tokens_not_micro_batches(corpus, tmp_path):
    """Packed SFT rows carry different numbers of answer tokens: batch 1 x accumulation 2 must equal batch 2 x
    accumulation 1 (one token-weighted mean over the window), not a mean of per-micro-batch means."""
    from model import ModelConfig, Transformer, save_model
    from utils.tokenizer import Tokenizer
    _, tok_dir = corpus
    tok = Tokenizer.load(tok_dir)
    data = tmp_path / "sft"
    data.mkdir()
    rows = [(q, a[: 2 + (i * 7) % len(a)]) for i, (q, a) in enumerate(QA * 8)]  # answers of many lengths
    write_split(data / "train-00000.parquet", rows)
    write_split(data / "valid-00000.parquet", rows[:4])
    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)),
               tmp_path / "init", tokenizer=tok)
    runs = {}
    for name, batch, accum in (("b2", "2", "1"), ("b1", "1", "2")):
        runs[name] = tmp_path / name
        train.main(["sft", "--init", str(tmp_path / "init"), "--data", str(data), "--max-seq-length", "48",
                    "--batch-size", batch, "--grad-accum", accum, "--max-steps", "2", "--warmup-steps", "1",
                    "--lr", "1e-2", "--cpu", "--mixed-precision", "no", "--eval-batches", "1", "--out",
                    str(runs[name])])
    from trainer.data import sft_loader
    rows = next(iter(sft_loader(data, tok, "chatml", max_seq_len=48, batch_size=2, seed=42)))
    per_row = (rows["labels"] != -100).sum(1)
    assert per_row[0] != per_row[1]  # the comparison is meaningful: the two rows weigh differently
    a, b, init = weights(runs["b2"]), weights(runs["b1"]), load_file(tmp_path / "init" / "model.safetensors")
    # Relative to how far the weights moved: ~4e-6 (float rounding, which Adam amplifies at a few elements whose
    # gradients nearly cancel); weighting each micro-batch's mean equally instead gives ~0.6.
    moved = sum((a[k] - init[k]).abs().sum() for k in a)
    assert sum((a[k] - b[k]).abs().sum() for k in a) / moved < 1e-4


def test_fsdp_launch_computes_in_half_precision_but_reduces_in_fp32(monkeypatch):
    """Under `accelerate launch --config_file accelerate_fsdp.yaml` (which sets these variables) gradients are reduced
    and the loss returned in fp32; without an FSDP launch, or in full precision, accelerate's defaults stay."""
    from trainer.loop import fsdp_plugin
    assert fsdp_plugin("bf16") is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    policy = fsdp_plugin("bf16").mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32,
                                                                              torch.float32)
    monkeypatch.setenv("FSDP_VERSION", "1")
    policy = fsdp_plugin("fp16").mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.buffer_dtype) == (torch.float16, torch.float32,
                                                                              torch.float32)
    assert fsdp_plugin("no") is None


def test_activation_settings_are_checked_before_any_work():
    """Offloading needs checkpointing (as an option and as a policy); layer counts are >= 0."""
    from trainer.activations import ActivationPolicy
    with pytest.raises(ValueError, match="--gradient-checkpointing"):  # before the (missing) data is looked at
        train.main(["pretrain", "--data", "missing", "--tokenizer", "missing", "--offload-activations"])
    with pytest.raises(ValueError, match="--gradient-checkpointing"):
        ActivationPolicy(offload=True)
    with pytest.raises(ValueError, match=">= 0"):
        ActivationPolicy(checkpointing=True, keep_last=-1)
    with pytest.raises(ValueError, match=">= 0"):
        ActivationPolicy(checkpointing=True, offload=True, offload_skip_last=-1)


def test_offloaded_training_equals_checkpointed_training(corpus, tmp_path, monkeypatch):
    """--offload-activations (every recomputed block's saved tensors to host memory, the floor lowered so that the tiny
    model's move): the weights of a plain checkpointed run, bit for bit, and a warning that so narrow a model gets
    slower. With --compile the blocks are compiled one by one, not the whole model."""
    import trainer.activations as offload
    monkeypatch.setattr(offload, "MIN_OFFLOAD_BYTES", 0)
    monkeypatch.setattr(offload, "OFFLOAD_SKIP_LAST", 0)
    moved = []
    real_offload = offload.Offloader._offload
    monkeypatch.setattr(offload.Offloader, "_offload",
                        lambda self, t, n: (moved.append(n), real_offload(self, t, n))[1])
    ckpt = ["--max-steps", "3", "--gradient-checkpointing"]
    train.main(pretrain_args(corpus, tmp_path / "plain", *ckpt))
    assert not moved
    train.main(pretrain_args(corpus, tmp_path / "offloaded", *ckpt, "--offload-activations"))
    assert moved
    assert "warning: --offload-activations on a 128-wide model" in (tmp_path / "offloaded" / "train.log").read_text()
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "offloaded")
    for k in a:
        assert torch.equal(a[k], b[k]), k

    compiled = []

    def compile_functions_only(fn, *args, **kwargs):  # records what would be compiled, runs it eager
        if isinstance(fn, torch.nn.Module):
            pytest.fail("the whole model was compiled")
        compiled.append(fn)
        return fn
    monkeypatch.setattr(torch, "compile", compile_functions_only)
    train.main(pretrain_args(corpus, tmp_path / "compiled", "--max-steps", "1", "--gradient-checkpointing",
                             "--offload-activations", "--compile"))
    assert offload.run_block in compiled and offload.run_checkpointed_block in compiled


def test_ddp_bucket_size_and_bucket_views_reach_the_ddp_wrapper(tmp_path):
    from trainer.config import TrainConfig
    from trainer.loop import DDP_BUCKET_MB, make_accelerator
    cfg = TrainConfig(cpu=True, out_dir=str(tmp_path))
    handler = make_accelerator(cfg).ddp_handler
    assert handler.bucket_cap_mb == DDP_BUCKET_MB and handler.gradient_as_bucket_view
    assert make_accelerator(cfg, bucket_mb=50).ddp_handler.bucket_cap_mb == 50


def test_a_base_loads_to_the_cpu_under_fsdp():
    """Under FSDP the base loads to the CPU and fully_shard moves one layer at a time to the GPU (no GPU holds the
    whole model); NF4 bases are quantized on the accelerator while loading; any other topology loads to the GPU."""
    from types import SimpleNamespace

    from accelerate import DistributedType

    from trainer.loop import weights_device
    gpu = torch.device("cuda", 0)
    assert weights_device(SimpleNamespace(distributed_type=DistributedType.FSDP, device=gpu)) == torch.device("cpu")
    assert weights_device(SimpleNamespace(distributed_type=DistributedType.FSDP, device=gpu), quantized=True) == gpu
    assert weights_device(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, device=gpu)) == gpu
    assert weights_device(SimpleNamespace(distributed_type=DistributedType.NO, device=gpu)) == gpu


def test_compile_goes_per_block_when_offloading_or_for_nf4_weights():
    """--compile compiles a graph per block for offloading and for QLoRA (a whole compiled QLoRA model kept its
    dequantized weights), one graph for the whole model otherwise."""
    from model import ModelConfig, Transformer
    from model.nf4 import NF4Linear
    from trainer.activations import compiles_per_block
    model = Transformer(ModelConfig.preset("tiny"))
    assert not compiles_per_block(model, offload=False)
    assert compiles_per_block(model, offload=True)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = NF4Linear.from_linear(mlp.up_proj)
    assert compiles_per_block(model, offload=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_throughput_windows_are_timed_on_the_gpu():
    """A log line's tokens/s divides by the GPU's time between the window's start and the step's end: the host
    reading the step late (as it does one step behind, and not at all after the last step) does not shorten or
    lengthen the window."""
    import time

    from trainer.loop import seconds_between, to_host, window_start
    start = window_start(torch.device("cuda"))
    torch.cuda._sleep(10**8)  # ~50-70 ms of GPU work at 1.4-2 GHz
    _, end = to_host(torch.zeros(2, device="cuda"))
    time.sleep(0.5)  # the host comes to read it late
    end.synchronize()
    gpu_seconds = seconds_between(start, end)
    assert 0.02 < gpu_seconds < 0.3


# ---- reliability: what a stopped, broken or mismatched run does ----------------------------------------------------
def test_exploded_weights_are_never_saved(corpus, tmp_path):
    """A step's loss is read before its update: at a save step the weights are checked, so a checkpoint never holds
    weights that were not finite, and with none saved the message does not point at one."""
    from trainer.loop import NonFiniteLoss
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="No checkpoint was saved"):
        train.main(pretrain_args(corpus, run, "--max-steps", "4", "--save-every", "1", "--warmup-steps", "0",
                                 "--lr", "1e12", "--grad-clip", "0"))
    assert not list(run.glob("checkpoint-*")) and not (run / "latest").exists()


def test_resume_reports_a_damaged_checkpoint_and_can_fall_back(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "4", "--save-every", "2"))
    optimizer = run / "checkpoint-4" / "training_state" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="optimizer.pt: missing or truncated: the checkpoint is damaged"):
        train.main(pretrain_args(corpus, run, "--max-steps", "6", "--resume"))
    train.main(pretrain_args(corpus, run, "--max-steps", "6", "--resume", "--resume-fallback"))
    assert "resumed from " + str((run / "checkpoint-2").resolve()) in (run / "train.log").read_text()
    assert "falling back to" in capsys.readouterr().out
    state = run / "checkpoint-6" / "training_state" / "trainer_state.json"
    state.write_text("{broken")
    with pytest.raises(ValueError, match="trainer_state.json: cannot be read"):
        train.main(pretrain_args(corpus, run, "--max-steps", "8", "--resume"))


def test_resume_with_latest_gone_takes_the_newest_complete_checkpoint(corpus, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "4", "--save-every", "2"))
    shutil.rmtree(run / "checkpoint-4")  # latest now points at nothing
    train.main(pretrain_args(corpus, run, "--max-steps", "5", "--resume"))
    assert "resuming from the newest complete one" in capsys.readouterr().err
    assert "at step 2" in (run / "train.log").read_text()


def test_a_new_run_never_writes_over_checkpoints_unasked(corpus, tmp_path):
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "2"))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume.*--overwrite"):
        train.main(pretrain_args(corpus, run, "--max-steps", "2"))
    train.main(pretrain_args(corpus, run, "--max-steps", "3", "--overwrite"))
    assert os.readlink(run / "latest") == "checkpoint-3"


def test_tokenizer_and_rows_must_fit_the_model(corpus, tmp_path):
    """A tokenizer that is not the model's, one larger than its embedding, or rows longer than its positions are
    refused before any work; --resize-embeddings grows the embedding for a tokenizer with added tokens."""
    from tokenizers import AddedToken

    from utils.tokenizer import Tokenizer, train_tokenizer
    data, tok = corpus
    base = tmp_path / "base"
    train.main(pretrain_args(corpus, base, "--max-steps", "1"))
    init = str(base / "latest")
    sft = ["sft", "--init", init, "--data", str(data), "--max-seq-length", "48", "--batch-size", "2", "--max-steps",
           "1", "--cpu", "--mixed-precision", "no", "--eval-batches", "1"]
    small = tmp_path / "small_tok"
    train_tokenizer(data, 300, small)
    with pytest.raises(ValueError, match="is not the tokenizer .* was trained with"):
        train.main([*sft, "--tokenizer", str(small), "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train.main(pretrain_args(corpus, tmp_path / "b", "--init", init, "--seq-len", "4096", "--max-steps", "1"))

    grown = Tokenizer.load(tok)
    added = grown.backend.add_special_tokens([AddedToken(f"<|tool_{i}|>", special=True) for i in range(3)])
    assert added == 3
    bigger = tmp_path / "bigger_tok"
    grown.save(bigger)
    with pytest.raises(ValueError, match="--resize-embeddings"):
        train.main([*sft, "--tokenizer", str(bigger), "--out", str(tmp_path / "c")])
    train.main([*sft, "--tokenizer", str(bigger), "--resize-embeddings", "--out", str(tmp_path / "d")])
    resized = load_model(tmp_path / "d" / "latest")
    assert resized.config.vocab_size == grown.vocab_size == Tokenizer.load(tok).vocab_size + 3
    assert resized.model.embed_tokens.weight.shape[0] == grown.vocab_size


@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_says_so(corpus, tmp_path):
    """A real full filesystem (a 1 MiB tmpfs): one line naming the cause and the checkpoint, exit 2, no traceback."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = subprocess.run([sys.executable, "train.py", *pretrain_args(corpus, mount / "run", "--max-steps", "1")],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(mount)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: no space left on device writing " + str(mount / "run" / "checkpoint-1") in result.stderr
    assert "Traceback" not in result.stderr


def test_user_errors_are_one_line_and_exit_2(corpus, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "sft", "--init", str(tmp_path / "missing"), "--data",
                             str(tmp_path), "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and str(tmp_path / "missing") in result.stderr
    debug = subprocess.run([sys.executable, "train.py", "sft", "--init", str(tmp_path / "missing"), "--data",
                            str(tmp_path), "--cpu", "--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_stops_and_exits_128_plus_the_signal(corpus, tmp_path, signum):
    """A real signal to a real run: it saves, says how to go on, and exits 130 / 143, so `&&` chains and schedulers
    see that the run did not finish."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *pretrain_args(corpus, run, "--max-steps", "100000")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train.log"
    deadline = time.time() + 120
    while not (log.exists() and " step 3 " in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    assert (run / "latest" / "training_state").is_dir()


def test_knowledge_benchmarks_are_scored_at_each_evaluation(corpus, tmp_path):
    """--eval-tasks cmmlu: centered accuracy beside the loss in the log and TensorBoard at every --eval-every; a
    wrong benchmark folder fails before any training."""
    bench = tmp_path / "eval" / "cmmlu"
    rows = "".join(f"{i},问题{i}是什么？,选项甲{i},选项乙{i},选项丙{i},选项丁{i},{'ABCD'[i % 4]}\n" for i in range(12))
    for split in ("dev", "test"):
        (bench / split).mkdir(parents=True)
        (bench / split / "agronomy.csv").write_text(",Question,A,B,C,D,Answer\n" + rows, encoding="utf-8")
    run = tmp_path / "run"
    train.main(pretrain_args(corpus, run, "--max-steps", "4", "--eval-every", "2", "--eval-tasks", "cmmlu",
                             "--eval-tasks-data", str(tmp_path / "eval"), "--eval-tasks-limit", "8"))
    log = (run / "train.log").read_text()
    assert len(re.findall(r"eval step \d+: .*cmmlu_centered -?\d", log)) == 2
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.main(pretrain_args(corpus, tmp_path / "run2", "--max-steps", "1", "--eval-tasks", "cmmlu",
                                 "--eval-tasks-data", str(tmp_path / "nowhere")))
    assert not (tmp_path / "run2").exists()
