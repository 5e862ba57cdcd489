"""What tests/test_distributed.py launches on every rank: `torchrun ... -m tests.dist_launch ARGS`.

A task registered in the test process is unknown to the processes torchrun starts, so this module
registers the test tasks in each rank's process, then runs the command line.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

from rlvr_fast.tasks import Problem, register_task
from rlvr_fast.train import main
from tests.test_train import DigitsTask  # registers digits-test
from tests import test_cold_start  # noqa: F401  (registers demo-test)


class FailingRankTask(DigitsTask):
    """digits-test, except that rank 1 raises (or hangs) when it draws the problems of step 2."""

    def __init__(self, hang: bool = False):
        super().__init__()
        self.hang, self.draws = hang, 0

    def eval_problems(self) -> list[Problem]:
        return DigitsTask.sample(self, random.Random(7), 3)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        self.draws += 1
        if self.draws == 2 and os.environ.get("RANK") == "1":
            if self.hang:
                time.sleep(600)
            raise RuntimeError("injected failure")
        return super().sample(rng, n)


class UnevenTask(DigitsTask):
    """digits-test, except that some groups score all alike (no signal, not trained), so that with 4 prompts on
    2 ranks dynamic sampling (--max-oversample 3) draws several rounds and the ranks train unequal numbers of
    micro-batches: step 1 keeps 1 + 1 + 1 groups of its three rounds (rank 0 trains two, rank 1 one), step 2
    keeps 0 + 0 + 1 (rank 1 trains nothing), step 3 draws one round of 4."""

    FLAT = {1: {1, 2, 3}, 2: {0, 1, 2}, 3: {0, 1, 2}, 4: {0, 1, 2, 3}, 5: {0, 1, 2, 3}, 6: {1, 2, 3}}

    def __init__(self):
        super().__init__()
        self.draws = 0

    def eval_problems(self) -> list[Problem]:
        return DigitsTask.sample(self, random.Random(7), 3)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        self.draws += 1
        problems = super().sample(rng, n)
        for i in self.FLAT.get(self.draws, ()):
            problems[i].meta["flat"] = True
        return problems

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        scores = super().score(problem, completion)
        return {k: 0.5 for k in scores} if problem.meta.get("flat") else scores

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]


class KilledRankTask(UnevenTask):
    """digits-uneven, except that with RLVR_TEST_KILL_RANK=R in the environment, rank R kills itself (SIGKILL: no
    exception, no message, no cleanup) while scoring its first completion of step 2, in the middle of the step
    (its first round is draw 4: step 1 draws three rounds)."""

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        victim = os.environ.get("RLVR_TEST_KILL_RANK")
        if self.draws == 4 and victim is not None and os.environ.get("RANK") == victim:
            with open(os.environ["RLVR_TEST_KILL_FILE"], "w") as f:
                f.write(str(time.time()))  # when it died, for the test to time the survivors
            os.kill(os.getpid(), signal.SIGKILL)
        return super().score(problem, completion)


register_task("digits-uneven", lambda cfg: UnevenTask())
register_task("kill-a-rank", lambda cfg: KilledRankTask())
register_task("fail-on-rank-1", lambda cfg: FailingRankTask())
register_task("hang-on-rank-1", lambda cfg: FailingRankTask(hang=True))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
