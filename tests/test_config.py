"""TrainConfig's groups: every option belongs to one group, shows in that group's --help section, and is
checked by it; the flat names (attributes, flags, config files, saved runs) are the groups' fields."""

import dataclasses

import pytest

from rlvr_fast.grpo.config import GROUPS, TrainConfig
from rlvr_fast.train import build_parser


def test_the_groups_partition_the_options():
    names = [f.name for group in GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)), "an option is declared in two groups"
    assert names == [f.name for f in dataclasses.fields(TrainConfig)]
    assert set(TrainConfig().to_dict()) == set(names)


def test_help_has_one_section_per_group_with_its_flags():
    sections = {g.title: {a.dest for a in g._group_actions} for g in build_parser()._action_groups}
    for group in GROUPS:
        assert sections[group.__doc__.rstrip(".")] == {f.name for f in dataclasses.fields(group)}


@pytest.mark.parametrize("option,value,words", [
    ("reward_workers", 0, "--reward-workers must be >= 1"),               # task
    ("top_p", 0.0, "--top-p must be in (0, 1]"),                           # rollout
    ("cold_start_batch", 0, "--cold-start-batch must be >= 1"),            # cold start
    ("micro_batch_tokens", 0, "--micro-batch-tokens must be >= 1"),        # policy update
    ("clip_low", -0.1, "--clip-low"),                                      # loss
    ("lora_rank", -1, "--lora-rank must be >= 0"),                         # LoRA
    ("dist_timeout", 0, "--dist-timeout must be >= 1"),                    # machine
    ("sample_every", -1, "--sample-every must be >= 0"),                   # run
    ("schedule", "step", "--schedule must be one of constant, cosine, linear"),
])
def test_each_group_checks_its_options(option, value, words):
    with pytest.raises(ValueError) as exc:
        TrainConfig(**{option: value})
    assert words in str(exc.value)


def test_a_check_across_groups():
    TrainConfig(lora_rank=8, cold_start_steps=5, beta=0.0)
    with pytest.raises(ValueError, match="--cold-start-steps with --lora-rank and --beta > 0"):
        TrainConfig(lora_rank=8, cold_start_steps=5, beta=0.04)
