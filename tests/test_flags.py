"""Flags that mean one thing in every script: the same name has the same unit, an unset knob resolves to the value
it stands for (and config.json holds it), and every half-supported combination is refused at parse time naming
both flags. Parse only: nothing is trained here."""

import dataclasses

import pytest

import train_dpo  # noqa: E402  (conftest puts the repository on sys.path)
import train_grpo
import train_kto
import train_online_dpo
import train_ppo
import train_pretrain
import train_rm
import train_sft
from minialign.algorithms.losses import DEFAULT_BETA
from minialign.training.config import parse_config

SEQUENCE_SCRIPTS = (train_pretrain, train_sft, train_kto, train_ppo, train_grpo)
PAIR_SCRIPTS = (train_rm, train_dpo, train_online_dpo)


def refused(script, argv, capsys) -> str:
    """parse_config(script.Config, argv) must stop with an argparse error (exit 2); its stderr."""
    with pytest.raises(SystemExit) as e:
        parse_config(script.Config, argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def fields(script) -> set[str]:
    return {f.name for f in dataclasses.fields(script.Config)}


def test_a_micro_batch_is_counted_in_one_unit_per_flag_name(capsys):
    for script in SEQUENCE_SCRIPTS:  # sequences (prompt + one response)
        assert "micro_batch_size" in fields(script) and "micro_batch_pairs" not in fields(script), script.__name__
        cfg = parse_config(script.Config, ["--micro_batch_size", "5", "--init_from", "x"] if script is not train_pretrain
                           else ["--micro_batch_size", "5"])
        assert cfg.micro_batch == 5
    for script in PAIR_SCRIPTS:  # preference pairs: another unit, another name
        assert "micro_batch_pairs" in fields(script) and "micro_batch_size" not in fields(script), script.__name__
        extra = ["--reward_funcs", "gold"] if script is train_online_dpo else []
        assert parse_config(script.Config, ["--micro_batch_pairs", "3", "--init_from", "x", *extra]).micro_batch == 3
        err = refused(script, ["--micro_batch_size", "3", "--init_from", "x", *extra], capsys)
        assert "unrecognized arguments: --micro_batch_size" in err


@pytest.mark.parametrize("loss_type", sorted(DEFAULT_BETA))
def test_an_unset_beta_is_the_loss_types_default_and_zero_is_refused(loss_type, capsys):
    cfg = parse_config(train_dpo.Config, ["--loss_type", loss_type])
    assert cfg.beta == DEFAULT_BETA[loss_type] and dataclasses.asdict(cfg)["beta"] == DEFAULT_BETA[loss_type]
    assert parse_config(train_dpo.Config, ["--loss_type", loss_type, "--beta", "0.3"]).beta == 0.3
    assert train_dpo.Config(loss_type=loss_type).beta == DEFAULT_BETA[loss_type]  # built in code: resolved too
    assert "--beta=0.0 must be > 0" in refused(train_dpo, ["--loss_type", loss_type, "--beta", "0"], capsys)
    if loss_type in ("sigmoid", "robust", "hinge", "ipo"):  # online DPO's loss types: the same table
        cfg = parse_config(train_online_dpo.Config, ["--loss_type", loss_type, "--reward_funcs", "gold"])
        assert cfg.beta == DEFAULT_BETA[loss_type]
        assert "--beta=0.0 must be > 0" in refused(train_online_dpo, ["--loss_type", loss_type, "--beta", "0",
                                                                      "--reward_funcs", "gold"], capsys)


def test_grpo_beta_zero_is_a_kl_coefficient_of_zero():
    """In every script β multiplies a KL (or log-ratio) term; GRPO's 0 is that coefficient, not a stand-in."""
    assert parse_config(train_grpo.Config, ["--beta", "0"]).loss_kl()[0] == 0.0
    assert parse_config(train_grpo.Config, ["--beta", "0.04"]).loss_kl() == (0.04, "k3")


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "orpo"])
def test_label_smoothing_without_a_smoothed_loss_is_refused_at_parse_time(loss_type, capsys):
    err = refused(train_dpo, ["--loss_type", loss_type, "--label_smoothing", "0.1"], capsys)
    assert "--label_smoothing=0.1" in err and f"--loss_type {loss_type}" in err
    for smoothed in ("sigmoid", "robust", "simpo", "cpo"):
        assert parse_config(train_dpo.Config, ["--loss_type", smoothed, "--label_smoothing", "0.1"]).label_smoothing


def test_iterative_sizes_without_rounds_are_refused_and_resolved_with_them(capsys):
    base = ["--reward_funcs", "gold"]
    for flag in ("--pairs_per_step", "--prompts_per_round"):
        err = refused(train_online_dpo, [*base, flag, "32"], capsys)
        assert f"{flag}=32" in err and "--rounds" in err
    online = parse_config(train_online_dpo.Config, base)
    assert online.pairs_per_step is None and online.prompts_per_round is None  # not used: config.json says so
    it = parse_config(train_online_dpo.Config, [*base, "--rounds", "2", "--max_steps", "4"])
    assert (it.prompts_per_round, it.pairs_per_step) == (train_online_dpo.PROMPTS_PER_ROUND,
                                                         train_online_dpo.PAIRS_PER_STEP)
    it = parse_config(train_online_dpo.Config, [*base, "--rounds", "2", "--max_steps", "4", "--pairs_per_step", "8"])
    assert it.pairs_per_step == 8
