"""Every command in the README and docs/ parses with the real argument parsers (no stale or invented flags); the
README's small LoRA example runs."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#")[0].strip()
            line = re.sub(r"^(accelerate launch( --config_file \S+)?( --\S+ \S+)*|torchrun --nproc_per_node \d+)\s+",
                          "python ", line)
            if line.startswith(("python train.py", "python cli_demo.py", "python serve.py")) and "..." not in line:
                commands.append(line.replace("[", "").replace("]", ""))
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    script, args = argv[0], argv[1:]
    if script == "train.py":
        import train
        train.build_parser(args).parse_args(args)
    elif script == "cli_demo.py":
        import cli_demo
        cli_demo.build_parser().parse_args(args)
    else:
        import serve
        serve.build_parser().parse_args(args)


def test_readme_has_the_commands():
    assert len(readme_commands()) >= 15


def readme_python_imports() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith(("from ", "import "))]


def test_readme_python_api_imports():
    """Every name the README's Python API section imports exists (the commands above are checked by the parsers)."""
    lines = readme_python_imports()
    assert any("trainer.stages" in line for line in lines) and any("model.chat" in line for line in lines)
    for line in lines:
        exec(line, {})


def test_readme_stage_configs_build():
    """The README's stage calls take the documented config fields (built, not run)."""
    from trainer.stages import PretrainConfig, SFTConfig
    assert PretrainConfig(data="d", tokenizer="t", preset="small", out_dir="o").lr == 6e-4
    assert SFTConfig(init="i", data="d", out_dir="o").epochs == 2.0


def test_readme_lora_example_on_the_demo_model_runs(tiny_chat_base, tmp_path):
    """The README's LoRA example for the demo's model runs as written (for 2 of its steps, a tiny model of ours with
    the samples' tokenizer in place of runs/demo/sft/latest), and its chat line answers with the adapter."""
    from accelerate.state import AcceleratorState, GradientState

    import train
    here = {"runs/demo/sft/latest": str(tiny_chat_base), "runs/demo/lora": str(tmp_path / "lora"),
            "runs/demo/lora/latest": str(tmp_path / "lora" / "latest")}
    [lora] = [c for c in readme_commands() if c.startswith("python train.py lora --base runs/demo/sft/latest")]
    [chat] = [c for c in readme_commands() if "--lora runs/demo/lora/latest" in c]
    try:
        train.main([here.get(a, a) for a in shlex.split(lora)[2:]] + ["--max-steps", "2"])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert (tmp_path / "lora" / "latest" / "adapter_config.json").is_file()
    answer = subprocess.run([sys.executable, *(here.get(a, a) for a in shlex.split(chat)[1:]), "--device", "cpu",
                             "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
