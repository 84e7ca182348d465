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
    from tst_titan.checks import ConfigError, check_tokenizer_fits
    from tst_titan.specs import tst_llama3_flavors

    class Tok:
        def get_vocab_size(self):
            return 4096

    with pytest.raises(ConfigError, match=r"^model.hf_assets_path: tokenizer has 4096 tokens but flavor 'tiny' has vocab_size 2048"):
        check_tokenizer_fits(Tok(), tst_llama3_flavors["tiny"], "tiny")
