"""Peak host memory while loading a real-size 7B checkpoint (Llama-7B shape, bf16, sharded safetensors).

    python bench/load_7b.py --dir /tmp/llama7b [--device cuda]

Writes the checkpoint shard by shard (random bf16 tensors, never the whole model in memory), then loads it with
`load_model` in a fresh process per target (CPU bf16; CUDA bf16; CUDA with the NF4 hook) while a thread samples the
process's anonymous resident memory; the process's peak resident set (VmHWM, which includes the file pages the
mmap'd safetensors bring in) is read at the end. The goal: peak host memory near the weights' size for the CPU load
(no float32 copy, never two copies), far below it for GPU loads (one tensor at a time).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, Transformer  # noqa: E402

GiB = 2**30
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)

MEASURE = """
import threading, time, torch, sys, json
sys.path.insert(0, {repo!r})
from model import load_model
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
anon = lambda: status("RssAnon")  # noqa: E731
base = anon(); peak = [base]; done = [False]
def watch():
    while not done[0]:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
hook = None
if {nf4}:
    from model.nf4 import nf4_hook
    hook = nf4_hook()
t = time.perf_counter()
model = load_model({path!r}, dtype=torch.bfloat16, device={device!r}, tensor_hook=hook)
seconds = time.perf_counter() - t
done[0] = True; time.sleep(0.01); peak[0] = max(peak[0], anon())
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({{"peak_anon_gib": (peak[0] - base) / 2**30, "peak_rss_gib": status("VmHWM") / 2**30,
                  "seconds": seconds, "gpu_peak_gib": gpu / 2**30}}))
"""


def write_checkpoint(out: Path, shard_bytes: int = 4 * GiB) -> int:
    """Config + random bf16 shards + index, one tensor at a time (the model is built on the meta device)."""
    from safetensors.torch import save_file

    from utils.io import write_json
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(LLAMA_7B).state_dict().items()}
    write_json(out / "config.json", LLAMA_7B.to_hf_dict() | {"torch_dtype": "bfloat16"})
    shard, size, weight_map, names, total = {}, 0, {}, [], 0

    def flush():
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        names.append(name)

    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02)
        if shard and size + t.numel() * 2 > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key], size, total = t, size + t.numel() * 2, total + t.numel() * 2
    flush()
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="where to write the checkpoint")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    index = Path(args.dir) / "model.safetensors.index.json"
    total = (json.loads(index.read_text())["metadata"]["total_size"] if index.exists()
             else write_checkpoint(Path(args.dir)))
    results = {"weights_gib": total / GiB}
    targets = [("cpu", False)] + ([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else [])
    for device, nf4 in targets:
        code = MEASURE.format(repo=str(Path(__file__).resolve().parents[1]), path=args.dir, device=device, nf4=nf4)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[f"{device}{'_nf4' if nf4 else ''}"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(device, "nf4" if nf4 else "", results[f"{device}{'_nf4' if nf4 else ''}"], flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
