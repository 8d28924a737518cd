"""ModelConfig: record defaults, validation errors, CLI/env documentation."""
import argparse
import dataclasses

import pytest

from pgolf.config import add_arguments, resolve
from pgolf.model import ModelConfig
from pgolf.model.layout import parse_layers

RECORD = dict(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4.0,
              mlp_negative_slope=0.5, tie_embeddings=True, logit_softcap=30.0, ln_scale=True, qk_norm=True,
              rope_dims=16, rope_base=10000.0, qk_gain_init=5.0, xsa_layers="all", attn_out_gate="sparse",
              gate_window=12, value_residual=False, value_embed_layers="", value_embed_dim=128, smear_gate=True,
              smear_bos_mask=True, bigram_buckets=0, bigram_dim=112, unet_skips=True, skip_gates=True,
              parallel_from_layer=8, parallel_final_lane="mean", loop_start=3, loop_end=5, loop_count=3,
              loop_enable_frac=0.35, resid_mix=True, doc_mask=True, seq_len=2048, embed_init_std=0.005)


def test_defaults_are_the_record():
    cfg = ModelConfig()
    for name, value in RECORD.items():
        assert getattr(cfg, name) == value, name
    assert cfg.head_dim == 64 and cfg.kv_dim == 256 and cfg.mlp_hidden == 2048
    cfg.validate()


def test_every_field_documented_and_settable_from_cli_and_env():
    parser = argparse.ArgumentParser()
    add_arguments(parser, ModelConfig)
    text = parser.format_help()
    for f in dataclasses.fields(ModelConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert "--" + f.name.replace("_", "-") in text
    args = parser.parse_args(["--xsa-layers", "last:4", "--logit-softcap", "15", "--value-residual", "1"])
    cfg = resolve(ModelConfig, args, env={"BIGRAM_BUCKETS": "2048", "LOGIT_SOFTCAP": "20"})
    assert (cfg.xsa_layers, cfg.logit_softcap, cfg.value_residual, cfg.bigram_buckets) == ("last:4", 15.0, True, 2048)


@pytest.mark.parametrize("spec,expect", [("all", (0, 1, 2, 3)), ("none", ()), ("", ()), ("last:2", (2, 3)),
                                         ("3, 1", (1, 3)), ("last:0", ())])
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 4) == expect


@pytest.mark.parametrize("spec", ["last:9", "4", "x", "last:two"])
def test_parse_layers_rejects(spec):
    with pytest.raises(ValueError, match="bad layer spec"):
        parse_layers(spec, 4)


@pytest.mark.parametrize("changes,needle", [
    (dict(num_heads=6), "not divisible by num_heads"),
    (dict(num_kv_heads=3), "not divisible by num_kv_heads"),
    (dict(attn_out_gate="full"), "attn_out_gate"),
    (dict(xsa_layers="last:20"), "xsa_layers"),
    (dict(value_embed_layers="11"), "value_embed_layers"),
    (dict(parallel_from_layer=5), "must end before parallel_from_layer"),
    (dict(loop_end=11), "loop segment"),
    (dict(value_residual=True, loop_start=0), "value_residual"),
    (dict(rope_dims=15), "rope_dims"),
    (dict(rope_dims=2, yarn_scale=2.0), "yarn_scale needs"),
    (dict(yarn_scale=0.5), "yarn_scale must be"),
    (dict(loop_count=0), "loop_count"),
    (dict(parallel_final_lane="sum"), "parallel_final_lane"),
    (dict(bigram_buckets=1), "bigram_buckets"),
])
def test_validate_names_the_problem(changes, needle):
    cfg = dataclasses.replace(ModelConfig(), **changes)
    with pytest.raises(ValueError, match=needle):
        cfg.validate()


def test_loop_may_overlap_lanes_when_either_is_off():
    dataclasses.replace(ModelConfig(), parallel_from_layer=5, loop_count=1).validate()
    dataclasses.replace(ModelConfig(), parallel_from_layer=-1).validate()
