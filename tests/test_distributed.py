"""torchrun with 2 processes on the CPU (gloo) against one process: same losses, same weights, resume, failures.

Each 2-rank run is a real `python -m torch.distributed.run --nproc-per-node 2 -m tests.dist_launch ...`
subprocess (dist_launch registers the test tasks in the ranks' processes), on the tiny random
Llama in fp32. The one-process reference runs in this process, with the same options.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rlvr_fast
from rlvr_fast.grpo.distributed import Dist
from rlvr_fast.train import main, parse_config, run
from tests import dist_launch  # noqa: F401  (registers digits-uneven here too, for the one-process runs)
from tests.test_train import args
from tests.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# Batch-scaled advantages need the std of the whole batch, the reference and old log-probs are used,
# 4 prompts put two groups on each rank, and digits-uneven makes dynamic sampling draw several rounds and
# leaves the ranks unequal work (none at all on rank 1 in step 2).
COMMON = ("--task", "digits-uneven", "--prompts-per-step", "4", "--scale-rewards", "batch", "--beta", "0.05",
          "--num-iterations", "2", "--max-oversample", "3")
DROP = ("time", "tokens_per_s", "peak_memory", "step_time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--tee", "3", "-m", "tests.dist_launch", *argv]
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT) prints every thread's Python stack into the output.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_ok(argv: list[str]) -> None:
    proc = torchrun(argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def metrics(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not any(d in k for d in DROP)}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (g["step"], k)
            else:
                assert g[k] == w[k], (g["step"], k)


def assert_same_weights(a: Path, b: Path) -> None:
    ma, _ = rlvr_fast.load_pretrained(a)
    mb, _ = rlvr_fast.load_pretrained(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """The reference: 3 steps in one process, checkpoints after steps 2 and 3."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(args(tiny, out, *COMMON, "--steps", "3", "--save-every", "2")) == 0
    return out


@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_two_ranks_equal_one_process_and_resume(tiny, one_process, tmp_path, shard):
    # the uneven steps happened
    assert [(m["groups_drawn"], m["groups_kept"], m["zero_std_groups"]) for m in metrics(one_process)] == \
        [(12, 3, 9), (12, 1, 11), (4, 4, 0)]
    out = tmp_path / "run"
    run_ok(args(tiny, out, *COMMON, "--steps", "2", "--shard", shard, "--dist-timeout", "60"))
    # Rank 0 alone wrote the outputs: one record per step, one evaluation per set and time.
    assert_same_metrics(metrics(out), metrics(one_process)[:2])
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 2]
    samples = lambda path: [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
    assert samples(out) == [s for s in samples(one_process) if s["step"] <= 2]
    # The 2-rank checkpoint is an ordinary HF directory: it loads in this process, with the weights of one process.
    assert_same_weights(one_process / "checkpoint-2", out / "checkpoint-2")

    # Resume on 2 ranks: step 3 is the one-process run's step 3.
    run_ok(["--resume", str(out), "--steps", "3", "--dist-timeout", "60"])
    assert_same_metrics(metrics(out), metrics(one_process))
    assert_same_weights(one_process / "checkpoint-3", out / "checkpoint-3")

    if shard == "none":  # the trainer state is the same on every rank: one process can go on from it
        assert main(["--resume", str(out), "--steps", "4"]) == 0
        assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    else:  # optimizer shards: only 2 ranks can go on
        with pytest.raises(SystemExit, match="sharded over 2 ranks .* on 2 ranks in all, not 1"):
            main(["--resume", str(out), "--steps", "4"])


def test_two_ranks_equal_one_process_with_dapo_gspo_tis(tiny, tmp_path):
    """dapo divides by the step's token count over all ranks; GSPO, TIS and the entropy bonus are per rank's
    completions: 2 ranks must still train exactly what one process trains."""
    variant = (*COMMON, "--steps", "2", "--loss-type", "dapo", "--ratio-level", "sequence", "--tis-cap", "1.5",
               "--entropy-coef", "0.01")
    assert main(args(tiny, tmp_path / "one", *variant)) == 0
    run_ok(args(tiny, tmp_path / "two", *variant, "--dist-timeout", "60"))
    assert_same_metrics(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2")


@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_two_ranks_cold_start_equals_one_process(tiny, tmp_path, shard):
    """Each rank trains its share of the demonstrations; the KL reference and OUTPUT/cold-start are the model
    the cold start leaves, gathered from the shards with FSDP."""
    variant = ("--task", "demo-test", "--prompts-per-step", "4", "--cold-start-steps", "2", "--cold-start-lr", "1e-2",
               "--beta", "0.05", "--steps", "2")
    assert main(args(tiny, tmp_path / "one", *variant)) == 0
    run_ok(args(tiny, tmp_path / "two", *variant, "--shard", shard, "--dist-timeout", "60"))
    cold = lambda path: [json.loads(line) for line in (path / "cold_start.jsonl").read_text().splitlines()]
    for got, want in zip(cold(tmp_path / "two"), cold(tmp_path / "one"), strict=True):
        assert got["demonstrations"] == want["demonstrations"] == 8
        assert got["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert_same_weights(tmp_path / "one" / "cold-start", tmp_path / "two" / "cold-start")
    assert_same_metrics(metrics(tmp_path / "two"), metrics(tmp_path / "one"))
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2")


def test_each_rank_takes_a_contiguous_share(tiny, tmp_path):
    assert [Dist(rank=r, world_size=2).local_slice(8) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    # Evaluation problems and kept groups need not split evenly: the first ranks take one more.
    assert [Dist(rank=r, world_size=3).local_slice(7) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    # The training prompts must: refused before any work.
    cfg = parse_config(args(tiny, tmp_path / "run", "--prompts-per-step", "3"))
    with pytest.raises(SystemExit, match="--prompts-per-step 3 does not split over 2 ranks: use a multiple of 2"):
        run(cfg, tmp_path / "run", None, Dist(rank=1, world_size=2))
    assert not (tmp_path / "run").exists()


def test_a_slice_of_the_prompts_samples_what_the_whole_list_would(tiny):
    """A rank generates prompts[a:b] with first_prompt_index=a and gets the completions of one process."""
    model, tok = rlvr_fast.load_pretrained(tiny)
    engine = rlvr_fast.RolloutEngine(model.eval(), tok, num_blocks=64)
    prompts = [tok.encode(f"{i} * 7 =") for i in range(4)]
    params = rlvr_fast.SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    whole = engine.generate(prompts, params, n=3)
    part = engine.generate(prompts[2:], params, n=3, first_prompt_index=2)
    assert [[c.token_ids for c in g] for g in part] == [[c.token_ids for c in g] for g in whole[2:]]
    # Without the offset the slice would draw prompt 0's and 1's random streams: other completions.
    assert engine.generate(prompts[2:], params, n=3) != part


@pytest.mark.parametrize("task,message", [
    ("fail-on-rank-1", "[default0]:error: rank 1 at step 2: RuntimeError: injected failure -- stopping all ranks"),
    ("hang-on-rank-1", "--dist-timeout passed"),
])
def test_a_failed_or_hung_rank_stops_the_run_with_a_message(tiny, tmp_path, task, message):
    """Rank 1 raises (or hangs) while drawing step 2's problems; rank 0 waits in a collective. A raise must
    end the run at once, a hang after --dist-timeout: non-zero, with rank 0 saying what happened."""
    timeout = 5 if task.startswith("hang") else 120
    start = time.monotonic()
    proc = torchrun(args(tiny, tmp_path / "run", "--task", task, "--steps", "3", "--dist-timeout", str(timeout)))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    if task.startswith("hang"):
        assert "[default0]:error: rank 0 at step 2: " in proc.stderr
    assert elapsed < 60
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("code,waits", [(0, True), (130, False), (1, False)])
def test_only_a_finished_run_waits_for_its_peers_before_leaving(tiny, tmp_path, monkeypatch, code, waits):
    """close() meets the other ranks at a barrier only after a run that finished; after Ctrl-C (130) or a
    handled failure (1) a peer may be gone, and a barrier would hang until --dist-timeout."""
    import rlvr_fast.train as train
    seen = []
    monkeypatch.setattr(train, "run", lambda *a: code)
    monkeypatch.setattr(train.distributed, "close", lambda d, finished=False: seen.append(finished))
    assert main(args(tiny, tmp_path / "run", "--task", "digits-uneven")) == code
    assert seen == [waits]
