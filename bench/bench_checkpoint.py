"""What safe checkpoints cost: a full-fine-tuning checkpoint of the embedded SmolLM2-135M (fp32 weights,
AdamW moments), saved with rlvr_fast.grpo.checkpointing.save_checkpoint and verified as --resume does.

    python bench/bench_checkpoint.py [--reps 5] [--dir /path/on/the/disk/to/measure] [--no-write]

After one unmeasured save, per repetition, alternately: one save as shipped (files written and flushed with fsync, the manifest:
SHA-256 of every file, then the renames, each flushed) and one plain save (the same files and renames,
with fsync and the manifest switched off: what saving cost before), then the SHA-256 alone of the files
(page cache warm) and one verification (`verify_checkpoint`: re-read and hash every file). Medians. The
fsync share depends on the disk and on what else writes to it; the hashing share on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import rlvr_fast  # noqa: E402
from benchlib import add_no_write, publish, timed  # noqa: E402
from rlvr_fast.checkpoint import durable  # noqa: E402
from rlvr_fast.grpo import checkpointing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    add_no_write(parser)
    a = parser.parse_args()
    model, tok = rlvr_fast.load_pretrained()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # allocates the moments, as after the first training step
    state = {"step": 1, "optimizer": optimizer.state_dict(), "master_weights": None, "torch_rng": torch.get_rng_state(),
             "data_rng": [3, list(range(625)), None], "task": None, "config": {}, "bad_steps": 0}

    manifest_times: list[float] = []
    real_write_manifest = checkpointing.write_manifest

    def timed_manifest(directory: Path) -> dict:
        with timed(manifest_times):
            return real_write_manifest(directory)

    real_fsync = os.fsync

    def plain_save(out: Path, step: int) -> None:  # no fsync, no manifest
        os.fsync, checkpointing.write_manifest = (lambda fd: None), (lambda directory: {})
        try:
            checkpointing.save_checkpoint(out, step, model, tok, state, keep=1)
        finally:
            os.fsync, checkpointing.write_manifest = real_fsync, timed_manifest

    checkpointing.write_manifest = timed_manifest
    saves, plains, hashes, verifies, size = [], [], [], [], 0
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        out = Path(tmp)
        plain_save(out / "warm-up", 0)  # first-call costs (imports, allocator) out of the measured saves
        for rep in range(a.reps):
            with timed(plains):
                plain_save(out / "plain", rep + 1)
            with timed(saves):
                ckpt = checkpointing.save_checkpoint(out / "safe", rep + 1, model, tok, state, keep=1)
            files = [f for f in ckpt.iterdir() if f.name != durable.MANIFEST]
            size = sum(f.stat().st_size for f in files)
            with timed(hashes):
                for f in files:
                    durable.file_digest(f)
            with timed(verifies):
                checkpointing.verify_checkpoint(ckpt)
    med = statistics.median
    save, plain, manifest, sha, verify = med(saves), med(plains), med(manifest_times), med(hashes), med(verifies)
    body = (f"Full-fine-tuning checkpoint of SmolLM2-135M-Instruct (embedded), fp32 weights + AdamW moments: "
            f"{size / 1e9:.2f} GB in {len(files)} files; {a.reps} saves, medians; disk: "
            f"{'a temporary directory' if a.dir is None else a.dir}.\n\n"
            "| phase | seconds | vs plain save | GB/s |\n|---|---|---|---|\n"
            f"| plain save: same files and renames, no fsync, no manifest (before) | {plain:.2f} | 1.00x | "
            f"{size / plain / 1e9:.2f} |\n"
            f"| save_checkpoint as shipped: fsync + manifest | {save:.2f} | {save / plain:.2f}x | {size / save / 1e9:.2f} |\n"
            f"| of which the manifest (SHA-256 of every file, fsync of the already flushed files) | {manifest:.2f} | "
            f"{manifest / plain:.2f}x | {size / manifest / 1e9:.2f} |\n"
            f"| SHA-256 alone, page cache warm | {sha:.2f} | {sha / plain:.2f}x | {size / sha / 1e9:.2f} |\n"
            f"| verify_checkpoint (what --resume adds before loading) | {verify:.2f} | {verify / plain:.2f}x | "
            f"{size / verify / 1e9:.2f} |")
    publish("Checkpoint save and verify: the cost of manifests and fsync (cpu)", body, "cpu", not a.no_write,
            method="wall clock of each phase, medians over the saves; a shared machine: rough")


if __name__ == "__main__":
    main()
