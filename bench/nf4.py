"""NF4 on the GPU: ours vs bitsandbytes (codes, dequantization, speed) and the QLoRA load path's peak memory.

    python bench/nf4.py                       # 7B layer shapes, bf16, CUDA
    python bench/nf4.py --layers 4            # also load a synthetic 4-layer Llama-7B-shaped checkpoint

Reports, per weight shape: identical 4-bit codes (fraction), 8-bit scale codes that differ (fraction; ours is the
exact nearest code), max |our dequantize - bnb's|, bits per parameter, dequantize time and forward+backward time of
a [tokens, in] activation through NF4Linear, bnb's matmul_4bit and a dense bf16 linear, and the memory a forward
leaves for backward (NF4Linear must leave no dequantized weight).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.nf4 import NF4Linear, NF4Weight, nf4_hook  # noqa: E402

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]


def timed(fn, iters: int) -> float:
    """Median milliseconds of `fn` over `iters` runs after 3 warm-ups."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_shape(shape, tokens: int, iters: int, bnb) -> dict:
    import bitsandbytes.functional as bnb_f
    w = (torch.randn(shape, device="cuda") * 0.02).bfloat16()
    ours = NF4Weight.quantize(w)
    q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    row = {"shape": f"{shape[0]}x{shape[1]}",
           "codes_equal": (q.view(-1) == ours.packed).float().mean().item(),
           "scales_differ": (state.absmax != ours.scales).float().mean().item(),
           "max_dequant_diff": (bnb_f.dequantize_4bit(q, state).float() - ours.dequantize().float()).abs().max().item(),
           "bits_per_param": 8 * ours.nbytes() / w.numel()}
    row["dequant_ms_ours"] = timed(lambda: ours.dequantize(), iters)
    row["dequant_ms_bnb"] = timed(lambda: bnb_f.dequantize_4bit(q, state), iters)

    layer = NF4Linear(ours)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, shape[0], device="cuda", dtype=torch.bfloat16)
    params4 = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
    dense = w.clone()

    def step(forward):
        x.grad = None
        forward(x).backward(g)

    row["fwd_bwd_ms_ours"] = timed(lambda: step(layer), iters)
    row["fwd_bwd_ms_bnb"] = timed(
        lambda: step(lambda t: bnb.matmul_4bit(t, params4.t(), quant_state=params4.quant_state)), iters)
    row["fwd_bwd_ms_dense"] = timed(lambda: step(lambda t: F.linear(t, dense)), iters)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    row["kept_for_backward_MiB"] = kept / 2**20  # the output aside; a dequantized copy would be ~shape * 2 bytes
    row["dense_weight_MiB"] = w.numel() * 2 / 2**20
    del y
    return row


def load_synthetic(layers: int) -> dict:
    """A Llama-7B-shaped checkpoint with `layers` blocks, loaded to CUDA with NF4 block linears."""
    from safetensors.torch import save_file

    from model import load_model
    from model.config import ModelConfig
    config = ModelConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    from model.transformer import Transformer
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: (torch.randn(s) * 0.02).bfloat16() for k, s in shapes.items()}
        bf16_bytes = sum(t.numel() * 2 for t in state.values())
        save_file(state, f"{tmp}/model.safetensors")
        config.save(f"{tmp}/config.json")
        del state
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load_model(tmp, dtype=torch.bfloat16, device="cuda", tensor_hook=nf4_hook())
        seconds = time.perf_counter() - start
    resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"layers": layers, "bf16_GiB": bf16_bytes / 2**30, "resident_GiB": resident / 2**30,
            "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "load_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="activation rows for the matmul timings")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (median reported)")
    parser.add_argument("--layers", type=int, default=0, help="also load a synthetic N-layer Llama-7B-shaped model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/nf4.py needs CUDA")
    try:
        import bitsandbytes as bnb
    except ImportError:
        sys.exit("bench/nf4.py needs bitsandbytes (pip install bitsandbytes)")
    console = Console()
    rows = [check_shape(s, args.tokens, args.iters, bnb) for s in SHAPES_7B]
    table = Table(title=f"NF4 vs bitsandbytes {bnb.__version__} on {torch.cuda.get_device_name()}")
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    result = {"device": torch.cuda.get_device_name(), "bnb": bnb.__version__, "torch": torch.__version__,
              "shapes": rows}
    if args.layers:
        result["load"] = load_synthetic(args.layers)
        console.print(result["load"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
