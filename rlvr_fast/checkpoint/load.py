"""Load an HF-layout Llama-family checkpoint directory (Llama, Mistral, Qwen2, Qwen3) into the project's own model.

A checkpoint directory holds `config.json`, the weights as `model.safetensors` or as shards
listed in `model.safetensors.index.json`, and tokenizer files. The model is first built on the
`meta` device (no memory), then each tensor is read from the memory-mapped safetensors file
straight onto the target device and dtype and put in place: the weights are never held twice.

Every problem a user can cause (wrong path, an unsupported architecture, truncated or mismatched files) is
reported as a CheckpointError that names the file and what to do, before any deep traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rlvr_fast.model.config import ConfigError, LlamaConfig
from rlvr_fast.model.llama import LlamaForCausalLM

log = logging.getLogger("rlvr_fast")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Old checkpoints store rotary tables; they are derived from the config here.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason and the fix."""


def read_config(path: Path) -> LlamaConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: point to a Hugging Face-layout model directory "
                              "(config.json + model.safetensors + tokenizer files)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc})") from None
    try:
        return LlamaConfig.from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or every shard the index names."""
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / SAFETENSORS_FILE).is_file():
        files = [path / SAFETENSORS_FILE]
    else:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f" It holds {found}: convert them to safetensors first (e.g. load with transformers and "
                "save_pretrained(safe_serialization=True))." if found else "")
        raise CheckpointError(f"{path} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}.{hint}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f} is listed in {SAFETENSORS_INDEX} but missing: the download is incomplete")
    return files


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Build the model from config.json and load its weights in `dtype` on `device`."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model directory {path} does not exist")
    if not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point type, got {dtype}")
    cfg = read_config(path)
    files = weight_files(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    params = dict(model.named_parameters())  # tied weights appear once, under embed_tokens
    loaded: set[str] = set()
    unexpected: list[str] = []
    device = torch.device(device)
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in params:
                        if not name.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and name == "lm_head.weight"):
                            unexpected.append(name)
                        continue
                    _load_tensor(model, name, params[name], f, file, device, dtype)
                    loaded.add(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{file} cannot be read as safetensors ({exc}); the file is truncated or "
                                  "corrupt: download or save it again") from None
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the config needs: {shown}")
    if unexpected:
        log.warning("%s: ignoring %d tensor(s) a Llama model does not use, e.g. %s", path, len(unexpected), unexpected[0])
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model._inv_freq = cfg.rope_inv_freq().to(device)  # was built on the meta device above
    return model.eval()


def _load_tensor(model: torch.nn.Module, name: str, param: torch.nn.Parameter, f, file: Path,
                 device: torch.device, dtype: torch.dtype) -> None:
    shape = tuple(f.get_slice(name).get_shape())
    if shape != tuple(param.shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)} but config.json implies "
                              f"{list(param.shape)}: the weights and config.json do not belong together")
    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=param.requires_grad))
