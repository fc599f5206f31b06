"""Robustness of the Hugging Face checkpoint loader (tfla_jax.hf) and the config conversion
(xLSTMConfig.to_hf_config / from_hf_config): real tiny checkpoints written to tmp_path, then damaged."""

import dataclasses
import json
import re
import warnings

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import save_file

import tfla_jax
from tfla_jax.hf import hf_state_dict, load_hf_state_dict
from tfla_jax.layers import xLSTMConfig, xLSTMLM
from tests.test_layers import (forward, model_from_tensors, random_hf_tensors, tokens_for,
                               write_checkpoint)
from tests.utils import assert_close

CFG = xLSTMConfig.tiny(num_blocks=1, mlstm_implementation="recurrent", chunk_size=None)
JAX_OPTIONS = dict(mlstm_implementation="recurrent")   # CFG's non-default JAX-side fields
KEY = "backbone.blocks.0.mlstm_layer.q.weight"


@pytest.fixture(scope="module")
def tensors():
    return random_hf_tensors(CFG)


def hf_dict(cfg=CFG, **changes):
    """cfg.to_hf_config() through JSON, with fields changed (None: written as null) or dropped."""
    hf = json.loads(json.dumps(cfg.to_hf_config()))
    for name, value in changes.items():
        if value is _DROP:
            del hf[name]
        else:
            hf[name] = value
    return hf


_DROP = object()


def write_config(directory, text):
    (directory / "config.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return str(directory / "config.json")


def arch(cfg):
    return {name: getattr(cfg, name) for name in xLSTMConfig._HF_FIELDS}


# ---------------------------------------------------------------------------------------------
# Defect 1: every field round-trips, a null soft cap included
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    dict(gate_soft_cap=None, output_logit_soft_cap=None),
    dict(gate_soft_cap=None),
    dict(output_logit_soft_cap=None, qk_dim_factor=1.0, v_dim_factor=0.5, ffn_proj_factor=2.0,
         igate_bias_init_range=-4.0, norm_eps=1e-5, cell_norm_eps=1e-4, eps=1e-8,
         mlstm_round_up_to_multiple_of=8, ffn_round_up_to_multiple_of=32),
], ids=["no-caps", "no-gate-cap", "non-default"])
def test_from_hf_config_round_trips_every_field(changes):
    cfg = dataclasses.replace(CFG, **changes)
    got = xLSTMConfig.from_hf_config(hf_dict(cfg), **JAX_OPTIONS)
    assert got == cfg and arch(got) == arch(cfg)


def test_soft_caps_none_survive_the_checkpoint(tmp_path, tensors):
    """A model without soft caps saved and loaded gives its own logits, not capped ones."""
    cfg = dataclasses.replace(CFG, gate_soft_cap=None, output_logit_soft_cap=None)
    tensors = {**tensors, "backbone.out_norm.weight":   # a bf16 tensor loads too
               tensors["backbone.out_norm.weight"].astype(ml_dtypes.bfloat16)}
    write_checkpoint(tmp_path, cfg, tensors)
    assert json.loads((tmp_path / "config.json").read_text())["gate_soft_cap"] is None
    model = tfla_jax.load_hf_checkpoint(tmp_path, **JAX_OPTIONS)
    assert model.config == cfg
    tok = tokens_for(cfg, (1, 5))
    want, _ = forward(model_from_tensors(cfg, tensors), tok)
    got, _ = forward(model, tok)
    assert_close(got, want, 1e-6, "logits after the round trip")


def test_missing_optional_field_is_the_default_and_null_elsewhere_is_an_error():
    got = xLSTMConfig.from_hf_config(hf_dict(gate_soft_cap=_DROP, eps=_DROP), **JAX_OPTIONS)
    assert (got.gate_soft_cap, got.eps) == (15.0, 1e-6)
    with pytest.raises(ValueError, match="config.json: norm_eps is null"):
        xLSTMConfig.from_hf_config(hf_dict(norm_eps=None))
    with pytest.raises(ValueError, match="gate_soft_cap='15' is not a number"):
        xLSTMConfig.from_hf_config(hf_dict(gate_soft_cap="15"))
    with pytest.raises(ValueError, match="output_logit_soft_cap=0"):
        xLSTMConfig.from_hf_config(hf_dict(output_logit_soft_cap=0))


# ---------------------------------------------------------------------------------------------
# Defect 2: config.json questioned (required fields, aliases, unknown fields, bad files)
# ---------------------------------------------------------------------------------------------


def test_missing_required_fields_are_named(tmp_path, tensors):
    write_checkpoint(tmp_path, CFG, tensors, num_shards=1)
    path = write_config(tmp_path, hf_dict(mlstm_round_up_to_multiple_of=_DROP,
                                          ffn_proj_factor=_DROP))
    with pytest.raises(ValueError, match=re.escape(path) + r": missing required field\(s\) "
                       "'mlstm_round_up_to_multiple_of', 'ffn_proj_factor'"):
        tfla_jax.load_hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="config.json: missing required field.*'num_heads'"):
        xLSTMConfig.from_hf_config(hf_dict(num_heads=_DROP))
    # The caller may supply what the file lacks.
    model = tfla_jax.load_hf_checkpoint(tmp_path, mlstm_round_up_to_multiple_of=16,
                                        ffn_proj_factor=CFG.ffn_proj_factor, **JAX_OPTIONS)
    assert model.config == CFG


def test_aliases_agree_or_are_an_error():
    hf = hf_dict(hidden_size=CFG.embedding_dim, num_hidden_layers=CFG.num_blocks)
    assert xLSTMConfig.from_hf_config(hf, **JAX_OPTIONS) == CFG                # both, agreeing
    hf = hf_dict(embedding_dim=None, hidden_size=CFG.embedding_dim, num_blocks=_DROP,
                 num_hidden_layers=CFG.num_blocks)
    assert xLSTMConfig.from_hf_config(hf, **JAX_OPTIONS) == CFG                # null alias: absent
    with pytest.raises(ValueError, match="embedding_dim=64 and hidden_size=128 disagree"):
        xLSTMConfig.from_hf_config(hf_dict(hidden_size=128))
    with pytest.raises(ValueError, match="num_blocks=1 and num_hidden_layers=2 disagree"):
        xLSTMConfig.from_hf_config(hf_dict(num_hidden_layers=2))


def test_unknown_fields_warn_known_ones_do_not():
    with pytest.warns(UserWarning, match="unknown config field.*'qk_dim_factr'"):
        xLSTMConfig.from_hf_config(hf_dict(qk_dim_factr=0.25), **JAX_OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xLSTMConfig.from_hf_config(hf_dict(chunkwise_kernel="chunkwise--triton_xl_chunk",
                                           bos_token_id=0, torch_dtype="bfloat16",
                                           transformers_version="4.57.0", hidden_size=64))


def test_config_file_errors_name_the_file(tmp_path, tensors):
    write_checkpoint(tmp_path, CFG, tensors, num_shards=1)
    text = json.dumps(hf_dict())
    path = write_config(tmp_path, text[:-5])
    with pytest.raises(ValueError, match=re.escape(path) + ": not valid JSON") as err:
        tfla_jax.load_hf_checkpoint(tmp_path)
    assert isinstance(err.value.__cause__, json.JSONDecodeError)
    path = write_config(tmp_path, "[1, 2]")
    with pytest.raises(ValueError, match=re.escape(path) + ": expected a JSON object"):
        tfla_jax.load_hf_checkpoint(tmp_path)
    path = write_config(tmp_path, hf_dict(num_heads=3))    # xLSTMConfig's own check, file named
    with pytest.raises(ValueError, match=re.escape(path) + ": xLSTMConfig: .*not divisible"):
        tfla_jax.load_hf_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------
# Defect 2: tensors questioned (dtype, non-finite values, unreadable shards)
# ---------------------------------------------------------------------------------------------


def test_truncated_shard_is_named(tmp_path, tensors):
    write_checkpoint(tmp_path, CFG, tensors, num_shards=2)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(shard)) + ": not a readable safetensors"
                       ) as err:
        tfla_jax.load_hf_checkpoint(tmp_path)
    assert isinstance(err.value.__cause__, SafetensorError)


def test_integer_tensor_is_refused(tmp_path, tensors):
    bad = {**tensors, KEY: tensors[KEY].astype(np.int32)}
    write_checkpoint(tmp_path, CFG, bad, num_shards=1)
    shard = re.escape(str(tmp_path / "model-00001-of-00001.safetensors"))
    with pytest.raises(ValueError, match=f"{shard}: key '{KEY}' has dtype I32, expected a floating"):
        tfla_jax.load_hf_checkpoint(tmp_path, **JAX_OPTIONS)
    with pytest.raises(ValueError, match=f"key '{KEY}' has dtype int32"):
        load_hf_state_dict(xLSTMLM(CFG, rngs=nnx.Rngs(0)), bad)


def test_nonfinite_tensor_is_refused_unless_allowed(tmp_path, tensors):
    value = tensors[KEY].copy()
    value[0, 0], value[1, 2] = np.nan, np.inf
    bad = {**tensors, KEY: value}
    write_checkpoint(tmp_path, CFG, bad, num_shards=1)
    shard = re.escape(str(tmp_path / "model-00001-of-00001.safetensors"))
    with pytest.raises(ValueError, match=f"{shard}: key '{KEY}' holds 2 non-finite value"):
        tfla_jax.load_hf_checkpoint(tmp_path, **JAX_OPTIONS)
    model = tfla_jax.load_hf_checkpoint(tmp_path, allow_nonfinite=True, **JAX_OPTIONS)
    np.testing.assert_array_equal(hf_state_dict(model)[KEY], value)
    # The in-memory loader: refused before anything is assigned.
    model = xLSTMLM(CFG, rngs=nnx.Rngs(0))
    before = hf_state_dict(model)
    with pytest.raises(ValueError, match=f"key '{KEY}' holds 2 non-finite"):
        load_hf_state_dict(model, bad)
    after = hf_state_dict(model)
    assert all(np.array_equal(after[n], before[n]) for n in before)
    load_hf_state_dict(model, bad, allow_nonfinite=True)
    np.testing.assert_array_equal(hf_state_dict(model)[KEY], value)


def test_missing_key_names_the_directory(tmp_path, tensors):
    write_checkpoint(tmp_path, CFG, {n: v for n, v in tensors.items() if n != KEY})
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + f": missing key '{KEY}'"):
        tfla_jax.load_hf_checkpoint(tmp_path, **JAX_OPTIONS)
    save_file({KEY: tensors[KEY]}, str(tmp_path / "extra.safetensors"))
    save_file({KEY: tensors[KEY]}, str(tmp_path / "more.safetensors"))
    with pytest.raises(ValueError, match=f"key '{KEY}' is in two shards"):
        tfla_jax.load_hf_checkpoint(tmp_path, **JAX_OPTIONS)
