"""`train.py pretrain | sft | lora | dpo | merge | demo`: command-line options generated from the dataclass configs
(trainer/config.py), then the stage function called with the config they make."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Any

from . import config as configs

# command -> (config class, "module:function" that runs it)
STAGES: dict[str, tuple[type, str]] = {
    "pretrain": (configs.PretrainConfig, "trainer.stages:pretrain"),
    "sft": (configs.SFTConfig, "trainer.stages:sft"),
    "lora": (configs.LoraConfig, "trainer.stages:lora"),
    "dpo": (configs.DPOConfig, "trainer.stages:dpo"),
    "merge": (configs.MergeConfig, "trainer.stages:merge"),
    "demo": (configs.DemoConfig, "trainer.demo:demo"),
}
_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "int | None": int}


def _metadata(cls: type, name: str) -> dict[str, Any]:
    """A field's option metadata: from the nearest class that declared it as an option (a stage that only changes
    a default declares the field again without it)."""
    for base in cls.__mro__:
        found = base.__dict__.get("__dataclass_fields__", {}).get(name)
        if found is not None and "help" in found.metadata:
            return dict(found.metadata)
    return {}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field with help metadata; the loop's settings (TrainConfig's fields) in their own group."""
    training = parser.add_argument_group("training") if issubclass(cls, configs.TrainConfig) else None
    loop_fields = {f.name for f in dataclasses.fields(configs.TrainConfig)}
    for f in dataclasses.fields(cls):
        meta = _metadata(cls, f.name)
        if not meta:
            continue
        target = training if training is not None and f.name in loop_fields else parser
        flags = meta.pop("flags", None) or ["--" + f.name.replace("_", "-")]
        help_text = meta.pop("help")
        if meta.pop("required", False):
            target.add_argument(*flags, dest=f.name, required=True, help=help_text, **meta)
        elif f.type in ("bool", bool, "bool | None"):  # None: auto (--compile / --no-compile decide)
            target.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        elif "nargs" in meta:
            target.add_argument(*flags, dest=f.name, default=f.default, help=help_text, **meta)
        else:
            kind = meta.pop("type", None) or _TYPES[str(f.type)]
            target.add_argument(*flags, dest=f.name, type=kind, default=f.default, help=help_text, **meta)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    add_config_arguments(parser, STAGES[command][0])


def main(args: argparse.Namespace) -> Any:
    cls, target = STAGES[args.command]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(config_from_args(cls, args))
