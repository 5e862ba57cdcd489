"""Command line: `python -m rlvr_fast.train --task multiply [options]`.

Every option of TrainConfig is a flag (`--help` lists them with defaults); `--config FILE`
(TOML or YAML) supplies the same options, and flags given on the command line override it.
Everything that can be checked is checked before any work: options, the model directory, the
output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from rlvr_fast.grpo import distributed
from rlvr_fast.grpo.config import GROUPS, TrainConfig
from rlvr_fast.grpo.precision import pick_dtype
from rlvr_fast.grpo.safeguards import STOPPED_EXIT_CODE

log = logging.getLogger("rlvr_fast")


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The command line; with only_given, parsing yields just the options actually typed (no defaults)."""
    parser = argparse.ArgumentParser(prog="python -m rlvr_fast.train", description="GRPO training with verifiable rewards",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS if only_given else None)
    parser.add_argument("--config", type=Path, help="TOML or YAML file with options (flags override it)")
    for group in GROUPS:  # one help section per group of options
        section = parser.add_argument_group(group.__doc__.rstrip("."))
        for f in dataclasses.fields(group):
            _add_option(section, f, only_given)
    return parser


def _add_option(parser: argparse._ArgumentGroup, f: dataclasses.Field, only_given: bool) -> None:
    """One TrainConfig field as a flag: its name with dashes, its help, and its type, choices or action."""
    flag = "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
    if not only_given:
        kwargs["default"] = f.default
    if f.type in ("bool", bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.name == "digits":
        kwargs.update(nargs=2, type=int, metavar=("A", "B"))
    elif f.metadata.get("repeat"):
        kwargs.update(action="append", default=None if not only_given else argparse.SUPPRESS)
    else:
        kwargs["type"] = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
    parser.add_argument(flag, **kwargs)


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"error: --config {path}: no such file")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib
        raw = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml
        raw = yaml.safe_load(text) or {}
    else:
        raise SystemExit(f"error: --config {path}: use a .toml, .yaml or .yml file")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: --config {path}: unknown option(s) {', '.join(unknown)} (see --help)")
    return values


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[TrainConfig, set[str]]:
    """The config, and the names of the options given explicitly on the command line."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_file = read_config_file(pre.config) if pre.config is not None else {}
    parser.set_defaults(**from_file)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    typed = vars(build_parser(only_given=True).parse_args(argv))
    given = set(typed) - {"config"}
    # Repeatable flags replace a config file's list instead of appending to it.
    args.update({f.name: typed[f.name] for f in dataclasses.fields(TrainConfig) if f.metadata.get("repeat") and f.name in typed})
    # A task's suggested defaults (e.g. a longer --max-new-tokens) apply to options neither typed nor in the file.
    from rlvr_fast.tasks import task_defaults
    args.update({k: v for k, v in task_defaults(args["task"]).items() if k not in given and k not in from_file})
    try:
        return TrainConfig(**args), given
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda given but no CUDA device is available (use --device cpu)")
    return device


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines show as they are printed, through a pipe too
    cfg, given = _parse(argv)
    cfg, output, resume_from = _run_dir(cfg, given)
    # Under torchrun, join the other ranks (a rendezvous: every rank has checked the output directory before
    # rank 0 writes to it); a plain start is a single process.
    dist = distributed.init_distributed(cfg.dist_timeout, cfg.device)
    code = None
    try:
        code = run(cfg, output, resume_from, dist)
        return code
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and dist.fail(exc):
            return 1  # another rank failed first; rank 0 printed which and why
        raise
    finally:
        # Only a run that finished (exit 0, or 3: stopped by --stop-on) waits for its peers: after Ctrl-C (130)
        # one may be gone.
        distributed.close(dist, finished=code in (0, STOPPED_EXIT_CODE))


def _run_dir(cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, Path, Path | None]:
    """The run's options and output directory, and the checkpoint to resume from (--resume), verified."""
    if cfg.resume is None:
        output = Path(cfg.output)
        if output.exists() and any(output.iterdir()):
            raise SystemExit(f"error: output directory {output} already holds files (another run?). Continue it with "
                             f"--resume {output}, or choose a new --output.")
        return cfg, output, None
    from rlvr_fast.checkpoint import CheckpointError
    from rlvr_fast.grpo import checkpointing
    try:
        resume_from, skipped = checkpointing.find_checkpoint(Path(cfg.resume), fallback=cfg.resume_fallback)
        saved = checkpointing.load_state_json(resume_from)["config"]
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank verifies; one says so
        for line in skipped:
            print(f"warning: {line}", file=sys.stderr, flush=True)
    # The saved run's options, except those given again on this command line (e.g. more --steps).
    saved.update({name: getattr(cfg, name) for name in given})
    _refuse_saved_code(saved, given)
    cfg = TrainConfig(**{**saved, "digits": tuple(saved["digits"])})
    return cfg, resume_from.parent, resume_from


def _refuse_saved_code(saved: dict[str, Any], given: set[str]) -> None:
    """Resuming never imports code a run directory names: a user reward (`--reward module:function` or
    `file.py:function`) in the saved options must be given again on the command line."""
    if "reward" in given:
        return
    from rlvr_fast.tasks.rewards import parse_reward_spec
    try:
        code = [spec for spec in saved.get("reward") or () if not parse_reward_spec(spec).builtin]
    except ValueError as exc:
        raise SystemExit(f"error: the saved options hold a --reward that does not parse ({exc})")
    if code:
        flags = " ".join(f"--reward {spec}" for spec in saved["reward"])
        raise SystemExit(f"error: the run to resume scores with code it names ({', '.join(code)}); resuming does not "
                         f"import code named in a run directory. If you trust it, repeat the rewards: {flags}")


def run(cfg: TrainConfig, output: Path, resume_from: Path | None, dist: distributed.Dist) -> int:
    if cfg.prompts_per_step % dist.world_size:
        raise SystemExit(f"error: --prompts-per-step {cfg.prompts_per_step} does not split over {dist.world_size} "
                         f"ranks: use a multiple of {dist.world_size} (every rank generates as many groups)")
    torch.manual_seed(cfg.seed)
    device = distributed.device_for(dist, pick_device(cfg.device))
    dtype = pick_dtype(cfg.dtype, device)
    fsdp = None
    if cfg.shard == "fsdp" and not dist.enabled:
        log.warning("--shard fsdp: a single process has nothing to shard over (start with torchrun); ignored")
    elif cfg.shard == "fsdp":  # FSDP2 keeps fp32 sharded weights and computes in --dtype (fsdp.py)
        from rlvr_fast.grpo.fsdp import FSDP
        fsdp, dtype = FSDP(dist, compute_dtype=dtype), torch.float32

    import rlvr_fast
    from rlvr_fast.grpo.checkpointing import CheckpointSaveError
    from rlvr_fast.grpo.trainer import GRPOTrainer, TrainingError, check_cold_start
    from rlvr_fast.model.config import ConfigError
    from rlvr_fast.tasks import make_task
    from rlvr_fast.tasks.scoring import RewardError
    try:
        task = make_task(cfg)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    try:
        # A resumed run trains the checkpoint's weights; the initial model is loaded only as the reference.
        # With LoRA the base model is --model itself (frozen, and the reference): the trainer adds
        # the adapters and, on resume, loads them from the checkpoint.
        # After a cold start the reference is the model it left, kept in OUTPUT/cold-start.
        ref_model = None
        if resume_from is not None and cfg.beta > 0 and not cfg.lora_rank:
            from rlvr_fast.grpo.trainer import COLD_START_DIR
            cold = output / COLD_START_DIR
            ref_model, _ = rlvr_fast.load_pretrained(cold if cold.is_dir() else cfg.model, device=device, dtype=dtype)
        weights = cfg.model if cfg.lora_rank else (resume_from or cfg.model)
        model, tokenizer = rlvr_fast.load_pretrained(weights, device=device, dtype=dtype)
    except (rlvr_fast.CheckpointError, rlvr_fast.TokenizerError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}")
    try:
        check_cold_start(cfg, task, tokenizer)  # before any output is written
        # A sliding window no completion fits in: refused now. Longer prompts are refused at their rollout.
        model.config.check_length(cfg.max_new_tokens + 1, f"--max-new-tokens {cfg.max_new_tokens} plus a prompt")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps({**cfg.to_dict(), "resume": None}, indent=2))
    ranks = f", {dist.world_size} ranks (shard {cfg.shard})" if dist.enabled else ""
    print(f"rlvr_fast: task {cfg.task}, model {cfg.model or 'SmolLM2-135M-Instruct (embedded)'}, {device}, "
          f"{fsdp.compute_dtype if fsdp else dtype}, {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
          f"{cfg.group_size} completions{ranks}, output {output}")
    trainer = GRPOTrainer(cfg, model, tokenizer, task, output, device, ref_model=ref_model, dist=dist, fsdp=fsdp)
    if resume_from is not None:
        try:
            trainer.load(resume_from)
        except (ValueError, FileNotFoundError) as exc:  # e.g. sharded over another number of ranks
            raise SystemExit(f"error: {exc}")
        print(f"resumed from {resume_from} at step {trainer.step}")
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return 130
    except (TrainingError, RewardError, CheckpointSaveError, ConfigError) as exc:  # ConfigError: a sliding window
        if not dist.enabled:
            print(f"error: {exc}", file=sys.stderr)
        dist.fail(exc)  # rank 0 prints it, naming the rank; the others stop too (a reward error may hit one rank)
        return 1
    if trainer.stop_reason:
        return STOPPED_EXIT_CODE  # ended by --stop-on: finished cleanly, but not as asked
    return 0


if __name__ == "__main__":
    sys.exit(main())
