"""Every shipped TOML parses with the [tst]/[data] sections and passes the TST checks."""

from __future__ import annotations

import pytest

from conftest import ROOT
from tst_titan.checks import check_job_config, check_tst
from tst_titan.specs import register_specs
from tst_titan.train import parse_config

CONFIGS = sorted((ROOT / "train_configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_checks(path):
    from torchtitan.protocols.train_spec import get_train_spec

    register_specs()
    cfg = parse_config(["--job.config_file", str(path)])
    check_tst(cfg)
    spec = get_train_spec(cfg.model.name)
    assert cfg.model.flavor in spec.model_args
    if cfg.tst.enable:
        assert path.name.startswith("tst_")
    if "debug" in path.name:
        check_job_config(cfg, spec)  # embedded data + tokenizer: fully checkable offline


def test_cli_overrides_reach_the_tst_section():
    cfg = parse_config([
        "--job.config_file", str(ROOT / "train_configs" / "tst_debug_cpu.toml"),
        "--tst.bag_size", "6", "--tst.no-enable", "--training.steps", "10",
    ])
    assert cfg.tst.bag_size == 6 and cfg.tst.enable is False and cfg.training.steps == 10


def test_paper_twins_share_everything_but_tst():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    for twin in ROOT.glob("train_configs/tst_*.toml"):
        base = twin.with_name(twin.name[4:])
        a, b = tomllib.loads(twin.read_text()), tomllib.loads(base.read_text())
        for section in ("model", "optimizer", "lr_scheduler"):
            assert a[section] == b[section], (twin.name, section)
        assert a["training"]["seq_len"] == b["training"]["seq_len"]


def test_tokenizer_larger_than_the_model_vocab_is_refused():
    from tst_titan.checks import check_tokenizer_fits
    from tst_titan.errors import ConfigError
    from tst_titan.specs import tst_llama3_flavors

    class Tok:
        def get_vocab_size(self):
            return 4096

    with pytest.raises(ConfigError, match=r"^model.hf_assets_path: tokenizer has 4096 tokens but flavor 'tiny' has vocab_size 2048"):
        check_tokenizer_fits(Tok(), tst_llama3_flavors["tiny"], "tiny")


# -- tst.superposition_ratio vs tst.switch_step: the command line replaces the TOML -------
TST_CONFIGS = [p for p in CONFIGS if p.name.startswith("tst_")]


def _parse(path, *cli):
    return parse_config(["--job.config_file", str(path), *cli])


@pytest.mark.parametrize("flag", ["--tst.switch_step", "--tst.switch-step", "--tst.switch_step="])
def test_cli_switch_step_replaces_a_toml_ratio(flag):
    path = ROOT / "train_configs" / "tst_debug_cpu.toml"  # superposition_ratio = 0.3
    assert _parse(path).tst.superposition_ratio == 0.3
    cli = [flag + "120"] if flag.endswith("=") else [flag, "120"]
    cfg = _parse(path, *cli)
    assert cfg.tst.switch_step == 120 and cfg.tst.superposition_ratio is None
    check_tst(cfg)
    from tst_titan.schedule import plan_from_job_config

    assert plan_from_job_config(cfg).switch_step == 120


@pytest.mark.parametrize("flag", ["--tst.superposition_ratio", "--tst.superposition-ratio="])
def test_cli_ratio_replaces_a_toml_switch_step(flag):
    from tst_titan.schedule import plan_from_job_config

    path = ROOT / "train_configs" / "tst_qwen3_10b_a1b.toml"  # switch_step = 12483 of 49983
    assert _parse(path).tst.switch_step == 12483
    cli = [flag + "0.2"] if flag.endswith("=") else [flag, "0.2"]
    cfg = _parse(path, *cli, "--training.steps", "1000")
    assert cfg.tst.superposition_ratio == 0.2 and cfg.tst.switch_step is None
    check_tst(cfg)
    assert plan_from_job_config(cfg).switch_step == 200


def test_both_on_the_command_line_stay_an_error():
    from tst_titan.errors import ConfigError

    cfg = _parse(ROOT / "train_configs" / "tst_debug_cpu.toml",
                 "--tst.switch_step", "100", "--tst.superposition_ratio", "0.2")
    with pytest.raises(ConfigError, match=r"^tst.switch_step: give either tst.superposition_ratio or tst.switch_step, not both"):
        check_tst(cfg)


def test_both_in_the_toml_stay_an_error_even_with_one_on_the_command_line(tmp_path):
    from tst_titan.errors import ConfigError

    text = (ROOT / "train_configs" / "tst_debug_cpu.toml").read_text()
    both = tmp_path / "both.toml"
    both.write_text(text.replace("superposition_ratio = 0.3", "superposition_ratio = 0.3\nswitch_step = 90"))
    for cli in ([], ["--tst.switch_step", "100"], ["--tst.superposition_ratio", "0.2"]):
        with pytest.raises(ConfigError, match="not both"):
            check_tst(_parse(both, *cli))


@pytest.mark.parametrize("path", TST_CONFIGS, ids=[p.name for p in TST_CONFIGS])
def test_readme_overrides_work_with_every_shipped_tst_config(path):
    """The README's overrides (``--tst.switch_step``, ``--tst.bag_size``, ...) on every TST
    config; the debug one (embedded data) also passes the full startup checks offline."""
    from torchtitan.protocols.train_spec import get_train_spec

    register_specs()
    for cli in (["--tst.switch_step", "3"], ["--tst.superposition_ratio", "0.5"]):
        cfg = _parse(path, *cli, "--training.steps", "10", "--tst.bag_size", "6")
        check_tst(cfg)
        assert (cfg.tst.switch_step, cfg.tst.superposition_ratio) in ((3, None), (None, 0.5))
        if "debug" in path.name:
            check_job_config(cfg, get_train_spec(cfg.model.name))


def test_every_tst_override_in_the_readme_works_with_every_shipped_tst_config():
    import re

    readme = (ROOT / "README.md").read_text()
    overrides = sorted(set(re.findall(r"`(--tst\.[\w.-]+(?: [\w.]+)?)`", readme)))
    assert "--tst.switch_step 120" in overrides and "--tst.bag_size 6" in overrides
    for path in TST_CONFIGS:
        for override in overrides:
            cfg = _parse(path, *override.split())
            check_tst(cfg)  # no refusal, e.g. no "not both" for a TOML that sets a ratio
