"""LoRA adapters on disk, in the layout PEFT reads (and writes).

A directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules as HF
module names, base_model_name_or_path) and `adapter_model.safetensors` with one pair of tensors
per adapted projection, named as PEFT's save_pretrained names them:

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)` loads what we
train (tests/test_lora.py checks this with peft itself). Written atomically and durably like
save_pretrained; read with safetensors and JSON only, so loading adapters runs no code.
For a merged HF-layout model, call save_pretrained on the adapted model: it writes W + s B A.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rlvr_fast.checkpoint.load import CheckpointError
from rlvr_fast.checkpoint.save import _replace_dir
from rlvr_fast.model.lora import TARGET_MODULES, LoRAConfig, adapter_state_dict, apply_lora, has_lora
from rlvr_fast.tokenizer import Tokenizer

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_HF_NAME = {short: path.rpartition(".")[2] for short, path in TARGET_MODULES.items()}  # "q" -> "q_proj"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapters(model: torch.nn.Module, path: str | Path, base_model: str | None = None,
                  tokenizer: Tokenizer | None = None) -> Path:
    """Write the model's adapters (and the tokenizer files, if given) as a PEFT LoRA directory;
    base_model defaults to the model's LoRAConfig.base_model."""
    if not has_lora(model):
        raise ValueError("save_adapters: the model has no LoRA adapters (apply_lora first, or use save_pretrained)")
    cfg: LoRAConfig = model.lora_config
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors = {PEFT_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in adapter_state_dict(model).items()}
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or cfg.base_model,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
            "target_modules": [_HF_NAME[t] for t in cfg.targets], "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None,
        }
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_adapter_config(path: str | Path) -> tuple[LoRAConfig, dict]:
    """The LoRAConfig of an adapter directory, and its raw adapter_config.json."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} has no {ADAPTER_CONFIG}: not a LoRA adapter directory")
    try:
        raw = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); save the adapters again") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{file}: peft_type {peft_type!r}; only LoRA adapters are supported")
    short = {hf: s for s, hf in _HF_NAME.items()}
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):
        raise CheckpointError(f"{file}: target_modules is a pattern ({targets!r}); only a list of module names "
                              f"({', '.join(short)}) is supported")
    unknown = [t for t in targets if t not in short]
    if unknown:
        raise CheckpointError(f"{file}: target_modules {unknown} are not Llama decoder projections "
                              f"({', '.join(short)})")
    for key, ok in (("bias", "none"), ("use_dora", False), ("use_rslora", False)):
        if raw.get(key, ok) != ok:
            raise CheckpointError(f"{file}: {key}={raw[key]!r} is not supported (only {key}={ok!r})")
    if raw.get("rank_pattern") or raw.get("alpha_pattern") or raw.get("layers_to_transform") is not None:
        raise CheckpointError(f"{file}: per-layer rank/alpha patterns and layer subsets are not supported")
    try:
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: r and lora_alpha must be numbers ({exc!r})") from None
    return LoRAConfig(rank=rank, alpha=alpha, targets=tuple(short[t] for t in targets),
                      base_model=raw.get("base_model_name_or_path")), raw


@torch.no_grad()
def load_adapters(model: torch.nn.Module, path: str | Path, seed: int = 0) -> torch.nn.Module:
    """Load an adapter directory into `model` (adding the adapters first when it has none)."""
    path = Path(path).expanduser()
    cfg, _ = read_adapter_config(path)
    if not has_lora(model):
        apply_lora(model, cfg, seed)
    ours: LoRAConfig = model.lora_config
    if (ours.rank, ours.alpha, set(ours.targets)) != (cfg.rank, cfg.alpha, set(cfg.targets)):
        raise CheckpointError(f"{path}: adapters with rank {cfg.rank}, alpha {cfg.alpha:g}, targets {','.join(cfg.targets)} "
                              f"do not match the model's (rank {ours.rank}, alpha {ours.alpha:g}, targets "
                              f"{','.join(ours.targets)}): resume with the same --lora-* options")
    expected = adapter_state_dict(model)
    file = path / ADAPTER_FILE
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names = {n.removeprefix(PEFT_PREFIX).replace(".default.", "."): n for n in f.keys()}
            missing = sorted(set(expected) - set(names))
            if missing:
                raise CheckpointError(f"{file} lacks {len(missing)} adapter tensor(s), e.g. {missing[0]}")
            for name, target in expected.items():
                t = f.get_tensor(names[name])
                if t.shape != target.shape:
                    raise CheckpointError(f"{file}: {name} has shape {list(t.shape)}, the model needs {list(target.shape)}")
                target.copy_(t)
    except (SafetensorError, FileNotFoundError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}); save the adapters again") from None
    return model
