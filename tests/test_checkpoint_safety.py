"""Checkpoints cannot run code, a damaged one costs one checkpoint, saves are durable and a full disk
leaves the previous checkpoint alone (rlvr_fast/grpo/checkpointing.py, rlvr_fast/checkpoint/durable.py)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlvr_fast.checkpoint import CheckpointError
from rlvr_fast.checkpoint.durable import verify_manifest, write_manifest
from rlvr_fast.grpo import checkpointing
from rlvr_fast.grpo.distributed import Dist
from rlvr_fast.train import main
from tests.test_train import args
from tests.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DROP = ("time", "tokens_per_s", "peak_memory", "step_time")


class Payload:
    """What an attacker plants: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(d in k for d in DROP)}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 3-step run with checkpoints after steps 2 and 3 (the older ones pruned)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "3", "--save-every", "1")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "latest").read_text().strip() == "checkpoint-3"
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run for one test to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_malicious_pickle_is_refused_and_its_payload_does_not_run(run, tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = run / "checkpoint-3"
    torch.save({"optimizer": Payload(marker)}, ckpt / checkpointing.STATE_TENSORS)
    write_manifest(ckpt)  # an attacker rewrites the manifest too: verification passes, the reader must refuse
    for target in (ckpt, run):  # the checkpoint named, or the run's latest
        with pytest.raises(SystemExit, match="trainer_state.pt was refused: it holds Python objects other than "
                                             "tensors and plain values, and loading it could run code"):
            main(["--resume", str(target)])
        assert not marker.exists()
    # The planted file is live: an unsafe reader would have run it (so this test can fail).
    torch.load(ckpt / checkpointing.STATE_TENSORS, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_in_a_rank_file_is_refused(run, tmp_path):
    """--shard fsdp checkpoints add rank-R.pt, one optimizer shard per rank: read the same way."""
    marker = tmp_path / "MARKER"
    ckpt = run / "checkpoint-3"
    meta = json.loads((ckpt / checkpointing.STATE_JSON).read_text())
    meta.update(shard="fsdp", world_size=2)
    (ckpt / checkpointing.STATE_JSON).write_text(json.dumps(meta))
    torch.save({"optimizer": Payload(marker), "world_size": 2}, ckpt / "rank-0.pt")
    write_manifest(ckpt)
    checkpointing.verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="rank-0.pt was refused: .* could run code"):
        checkpointing.load_state(ckpt, Dist(rank=0, world_size=2), sharded=True)
    assert not marker.exists()


def test_a_planted_payload_without_a_new_manifest_costs_one_checkpoint(run, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    torch.save({"optimizer": Payload(marker)}, run / "checkpoint-3" / checkpointing.STATE_TENSORS)
    assert main(["--resume", str(run), "--steps", "3"]) == 0
    assert "skipped checkpoint-3: " in capsys.readouterr().err
    assert not marker.exists()


def test_fallback_to_the_last_good_checkpoint(run, capsys):
    """The newest checkpoint's weights are cut in half: --resume RUN says so, resumes from the one before, and
    trains what the uninterrupted run trained; a named checkpoint or --no-resume-fallback stops instead."""
    before = metrics(run)
    weights = run / "checkpoint-3" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()

    with pytest.raises(SystemExit, match=rf"model.safetensors is {size // 2} bytes, manifest.json says {size}: "
                                         r"truncated after saving. --no-resume-fallback is set"):
        main(["--resume", str(run), "--no-resume-fallback"])
    with pytest.raises(SystemExit, match=r"model.safetensors is .* truncated after saving. This checkpoint was named "
                                         r"explicitly, so no other is tried; .* --resume .*run"):
        main(["--resume", str(run / "checkpoint-3")])

    assert main(["--resume", str(run), "--steps", "3"]) == 0
    out = capsys.readouterr()
    skipped = f"warning: skipped checkpoint-3: {weights} is {size // 2} bytes, manifest.json says {size}: truncated"
    assert skipped in out.err
    assert f"resumed from {run / 'checkpoint-2'} at step 2" in out.out
    assert metrics(run) == before  # step 3 again, as the first time
    checkpointing.verify_checkpoint(run / "checkpoint-3")  # written anew over the damaged one
    assert (run / "latest").read_text().strip() == "checkpoint-3"


@pytest.mark.parametrize("damage,message", [
    ("manifest", "has no manifest.json: the save did not finish"),
    ("state", "trainer_state.pt does not match its SHA-256 in manifest.json: the file is corrupt"),
    ("missing", "trainer_state.json is missing"),
    ("latest", "checkpoint-9 does not exist"),
])
def test_each_kind_of_damage_is_named(run, capsys, damage, message):
    ckpt = run / "checkpoint-3"
    if damage == "manifest":  # a crash before the manifest: the rename cannot have happened, but a copy can lose it
        (ckpt / "manifest.json").unlink()
    elif damage == "state":
        data = bytearray((ckpt / "trainer_state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
        (ckpt / "trainer_state.pt").write_bytes(bytes(data))
    elif damage == "missing":
        (ckpt / "trainer_state.json").unlink()
    else:
        (run / "latest").write_text("checkpoint-9\n")
    found, skipped = checkpointing.find_checkpoint(run)
    assert found == run / ("checkpoint-3" if damage == "latest" else "checkpoint-2")
    assert len(skipped) == 1 and message in skipped[0]
    if damage != "latest":
        with pytest.raises(CheckpointError, match=message):
            checkpointing.find_checkpoint(ckpt)


def test_python_and_torch_rng_states_round_trip(tmp_path):
    rng = random.Random(5)
    rng.random()
    torch.manual_seed(3)
    torch.rand(2)
    state = {"data_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "step": 7, "task": {"level": 1}}
    checkpointing.write_state(tmp_path, state)
    loaded = checkpointing.load_state_json(tmp_path) | checkpointing.load_tensors(tmp_path / "trainer_state.pt")
    again = random.Random()
    again.setstate(checkpointing.python_rng_state(loaded["data_rng"]))
    assert [again.random() for _ in range(5)] == [rng.random() for _ in range(5)]
    want = torch.rand(4)
    torch.set_rng_state(loaded["torch_rng"])
    assert torch.equal(torch.rand(4), want)
    assert (loaded["step"], loaded["task"]) == (7, {"level": 1})
    with pytest.raises(TypeError, match="state_dict\\(\\) must return numbers, strings, lists and dicts"):
        checkpointing.write_state(tmp_path, {"task": {1, 2}})


def test_every_file_is_flushed_before_the_rename_that_publishes_it(run, monkeypatch):
    """Durability: the data of every checkpoint file, and the directory entries, reach the disk before
    the renames that make them visible (os.fsync recorded by path, in order with the renames)."""
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(a), str(b))) or real_rename(a, b))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(a), str(b))) or real_replace(a, b))
    (run / ".checkpoint-7.partial").mkdir()  # a crashed save's leftovers: never resumed from, removed by the next save
    (run / ".checkpoint-7.partial" / "model.safetensors").write_bytes(b"partial")
    assert main(["--resume", str(run), "--steps", "4"]) == 0
    assert not (run / ".checkpoint-7.partial").exists()
    staging, final = str(run / ".checkpoint-4.partial"), str(run / "checkpoint-4")
    publish = events.index(("rename", staging, final))
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    for file in Path(final).iterdir():
        assert f"{staging}/{file.name}" in synced_before, file.name
    assert staging in synced_before  # the staging directory's entries
    latest = events.index(("rename", str(run / "latest.tmp"), str(run / "latest")))
    assert publish < latest
    assert ("fsync", str(run)) in events[publish:latest]  # the rename of the checkpoint is on disk before latest moves
    assert ("fsync", str(run / "latest.tmp")) in events[publish:latest]
    assert ("fsync", str(run)) in events[latest:]


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {root!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from tests.test_train import DigitsTask  # registers digits-test
from rlvr_fast.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_fails_clearly_and_leaves_the_previous_checkpoint(run):
    """Saving checkpoint-4 into a process that may write no file above 200 kB (the weights are 380 kB): the run
    stops with an error that says so, and checkpoint-3 and `latest` are as they were; resuming later works."""
    script = FULL_DISK.format(root=str(ROOT), limit=200_000)
    before = {p.name: p.read_bytes() for p in (run / "checkpoint-3").iterdir()}
    proc = subprocess.run([sys.executable, "-c", script, "--resume", str(run), "--steps", "4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("error: could not write checkpoint-4: " in proc.stderr and "File too large" in proc.stderr
            and "Is the disk full, or a file-size limit reached? Nothing older was changed "
                f"({run / 'latest'} still points to checkpoint-3)" in proc.stderr), proc.stderr[-2000:]
    assert (run / "latest").read_text() == "checkpoint-3\n"
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
    assert {p.name: p.read_bytes() for p in (run / "checkpoint-3").iterdir()} == before
    verify_manifest(run / "checkpoint-3")
    assert main(["--resume", str(run), "--steps", "4"]) == 0
    checkpointing.verify_checkpoint(run / "checkpoint-4")


def test_resume_does_not_import_reward_code_named_in_the_run_directory(tiny, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + {i}", "answer": str(2 * i)}) for i in range(6)) + "\n")
    out = tmp_path / "run"
    code = "tests.reward_fixtures:parts:0.5"
    assert main(args(tiny, out, "--task", "jsonl", "--data", str(data), "--eval-size", "1", "--steps", "1",
                     "--reward", "number:1", "--reward", code)) == 0
    with pytest.raises(SystemExit, match=f"scores with code it names \\({code}\\); resuming does not import code "
                                         f"named in a run directory. If you trust it, repeat the rewards: "
                                         f"--reward number:1 --reward {code}"):
        main(["--resume", str(out), "--steps", "2"])
    assert main(["--resume", str(out), "--steps", "2", "--reward", "number:1", "--reward", code]) == 0
