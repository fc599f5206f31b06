"""Hugging Face xLSTM checkpoints (NX-AI/xLSTM-7b naming) <-> `tfla_jax.layers.xLSTMLM`.

Every parameter maps one to one: a rename, and a transpose for Linear weights (torch stores
(out, in), nnx.Linear kernels are (in, out)). Files are read with the numpy side of `safetensors`
(no torch), one tensor at a time.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors returns bf16 tensors)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from tfla_jax.layers import xLSTMConfig, xLSTMLM

__all__ = ["load_hf_checkpoint", "load_hf_state_dict", "hf_state_dict", "hf_param_names",
           "BLOCK_PARAMS", "TOP_PARAMS"]

# (HF name under "backbone.blocks.{i}.", attribute path in mLSTMBlock, torch Linear weight?)
BLOCK_PARAMS = (
    ("norm_mlstm.weight", ("norm_mlstm", "weight"), False),
    ("mlstm_layer.q.weight", ("mlstm_layer", "q", "kernel"), True),
    ("mlstm_layer.k.weight", ("mlstm_layer", "k", "kernel"), True),
    ("mlstm_layer.v.weight", ("mlstm_layer", "v", "kernel"), True),
    ("mlstm_layer.ogate_preact.weight", ("mlstm_layer", "ogate_preact", "kernel"), True),
    ("mlstm_layer.igate_preact.weight", ("mlstm_layer", "igate_preact", "kernel"), True),
    ("mlstm_layer.igate_preact.bias", ("mlstm_layer", "igate_preact", "bias"), False),
    ("mlstm_layer.fgate_preact.weight", ("mlstm_layer", "fgate_preact", "kernel"), True),
    ("mlstm_layer.fgate_preact.bias", ("mlstm_layer", "fgate_preact", "bias"), False),
    ("mlstm_layer.multihead_norm.weight", ("mlstm_layer", "multihead_norm", "weight"), False),
    ("mlstm_layer.out_proj.weight", ("mlstm_layer", "out_proj", "kernel"), True),
    ("norm_ffn.weight", ("norm_ffn", "weight"), False),
    ("ffn.proj_up_gate.weight", ("ffn", "proj_up_gate", "kernel"), True),
    ("ffn.proj_up.weight", ("ffn", "proj_up", "kernel"), True),
    ("ffn.proj_down.weight", ("ffn", "proj_down", "kernel"), True),
)
# (HF name, attribute path in xLSTMLM, torch Linear weight?)
TOP_PARAMS = (
    ("backbone.embeddings.weight", ("embeddings", "embedding"), False),
    ("backbone.out_norm.weight", ("out_norm", "weight"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),
)


def _variable(module, path):
    for name in path:
        module = getattr(module, name)
    return module


def _param_slots(model: xLSTMLM):
    """Yields (hf_name, variable, block index or None for unstacked, transpose) for every param."""
    cfg = model.config
    for name, path, transpose in TOP_PARAMS:
        yield name, _variable(model, path), None, transpose
    for i in range(cfg.num_blocks):
        for name, path, transpose in BLOCK_PARAMS:
            if cfg.scan_blocks:   # stacked: one variable with a leading num_blocks axis
                yield f"backbone.blocks.{i}.{name}", _variable(model.blocks, path), i, transpose
            else:
                yield f"backbone.blocks.{i}.{name}", _variable(model.blocks[i], path), None, transpose


def hf_param_names(config: xLSTMConfig) -> list[str]:
    """The Hugging Face checkpoint's parameter names for this config, in model order."""
    names = [name for name, _, _ in TOP_PARAMS]
    names += [f"backbone.blocks.{i}.{name}" for i in range(config.num_blocks)
              for name, _, _ in BLOCK_PARAMS]
    return names


def _hf_shape(variable, stacked: bool, transpose: bool) -> tuple[int, ...]:
    shape = tuple(variable.shape)[1:] if stacked else tuple(variable.shape)
    return shape[::-1] if transpose else shape


def hf_state_dict(model: xLSTMLM) -> dict[str, np.ndarray]:
    """The model's parameters in Hugging Face naming and layout (numpy, parameter dtype)."""
    out = {}
    for name, var, idx, transpose in _param_slots(model):
        value = np.asarray(var[...])
        if idx is not None:
            value = value[idx]
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def _is_float(dtype) -> bool:
    """A floating dtype: a numpy one, or a safetensors code (F16, BF16, F32, F64, F8_*)."""
    if isinstance(dtype, str) and dtype.isupper():
        return dtype == "BF16" or dtype.startswith("F")
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _check_finite(value, name: str, origin: str):
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    if bad:
        raise ValueError(f"{origin}: key {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                         f"pass allow_nonfinite=True to load it anyway")


def _check(model: xLSTMLM, names, shape_of: Callable[[str], tuple],
           dtype_of: Callable[[str], object], *, label: str, origin: Callable[[str], str]):
    """Checks names, shapes and dtypes against the model. Errors about the key set start with
    `label`, those about one tensor with `origin(name)`."""
    slots = list(_param_slots(model))
    expected = {name: _hf_shape(var, idx is not None, transpose) for name, var, idx, transpose in slots}
    linear = {name for name, _, _, transpose in slots if transpose}
    names = set(names)
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{label}: missing key {missing[0]!r}{more}; expected "
                         f"{len(expected)} parameters for {model.config.num_blocks} blocks")
    extra = sorted(n for n in names if n not in expected)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{label}: unexpected key {extra[0]!r}{more}; it has no parameter in "
                         f"xLSTMLM (wrong num_blocks, or a variant this model does not implement?)")
    for name, shape in expected.items():
        got = tuple(shape_of(name))
        if got != shape:
            raise ValueError(f"{origin(name)}: key {name!r} has shape {got}, expected {shape}"
                             f"{' (torch Linear layout (out, in))' if name in linear else ''}")
        dtype = dtype_of(name)
        if not _is_float(dtype):
            raise ValueError(f"{origin(name)}: key {name!r} has dtype {dtype}, expected a floating "
                             f"dtype (parameters are not cast from integers or booleans)")


def _assign(model: xLSTMLM, read: Callable[[str], np.ndarray]) -> xLSTMLM:
    """Assigns every parameter from `read(hf_name)` (checked by `_check` before)."""
    slots = list(_param_slots(model))
    # One variable at a time (a stacked one gathers its num_blocks slices into one buffer), so that
    # host memory peaks at one parameter, not the whole checkpoint.
    groups: dict[int, tuple] = {}
    for name, var, idx, transpose in slots:
        groups.setdefault(id(var), (var, transpose, []))[2].append((name, idx))
    for var, transpose, entries in groups.values():
        if entries[0][1] is None:
            value = np.asarray(read(entries[0][0]))
            var.set_value(jnp.asarray(value.T if transpose else value, dtype=var.dtype))
            continue
        buf = None
        for name, idx in entries:
            value = np.asarray(read(name))
            value = value.T if transpose else value
            if buf is None:
                buf = np.empty((len(entries),) + value.shape, value.dtype)
            buf[idx] = value
        var.set_value(jnp.asarray(buf, dtype=var.dtype))
    return model


def load_hf_state_dict(model: xLSTMLM, tensors: Mapping[str, np.ndarray], *,
                       allow_nonfinite: bool = False) -> xLSTMLM:
    """Assigns Hugging Face-named tensors (e.g. `safetensors.numpy.load_file(...)`) to `model`'s
    parameters in place (either block layout) and returns it. A missing, extra, mis-shaped or
    non-float key, or (unless `allow_nonfinite`) one holding NaN / inf, is a ValueError naming the
    key; the model is left untouched then."""
    origin = "load_hf_state_dict"
    _check(model, tensors.keys(), lambda n: np.shape(tensors[n]),
           lambda n: np.asarray(tensors[n]).dtype, label=origin, origin=lambda n: origin)
    if not allow_nonfinite:   # before assigning anything
        for name in tensors:
            _check_finite(np.asarray(tensors[name]), name, origin)
    return _assign(model, lambda n: tensors[n])


def _safetensors_error(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}")


def load_hf_checkpoint(directory: str | os.PathLike, *, allow_nonfinite: bool = False,
                       **config_overrides) -> xLSTMLM:
    """Loads a Hugging Face xLSTM checkpoint directory (e.g. a download of NX-AI/xLSTM-7b).

    Reads `config.json` and every `*.safetensors` shard (safetensors' numpy side, one tensor at a
    time) into an xLSTMLM built abstractly (no random init is materialised).

    Args:
      directory: holds config.json and the *.safetensors shard(s).
      allow_nonfinite: load tensors holding NaN / inf instead of refusing them.
      **config_overrides: xLSTMConfig fields to set, typically the JAX options: dtype,
        param_dtype, mlstm_implementation, chunk_size, remat, scan_blocks (or an architecture
        field that config.json lacks).
    Returns:
      the xLSTMLM, parameters in config.param_dtype.
    Raises:
      FileNotFoundError without config.json or shards; ValueError, naming the file, for invalid
      JSON, an unsupported, incomplete or self-contradictory config (see
      `xLSTMConfig.from_hf_config`; unknown fields only warn), an unreadable (truncated) shard, a
      key found in two shards, or a missing / unexpected / mis-shaped / non-float / non-finite
      tensor (named).
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_hf_checkpoint: no config.json in {directory!r}")
    try:
        with open(config_path, encoding="utf-8") as fh:
            hf_config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    config = xLSTMConfig.from_hf_config(hf_config, source=config_path, **config_overrides)
    shards = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"load_hf_checkpoint: no *.safetensors files in {directory!r}")
    where: dict[str, str] = {}
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, str] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="np") as f:
                for name in f.keys():
                    if name in where:
                        raise ValueError(f"{directory}: key {name!r} is in two shards: "
                                         f"{os.path.basename(where[name])} and "
                                         f"{os.path.basename(shard)}")
                    where[name] = shard
                    tensor = f.get_slice(name)
                    shapes[name] = tuple(tensor.get_shape())
                    dtypes[name] = tensor.get_dtype()
        except SafetensorError as e:
            raise _safetensors_error(shard, e) from e

    def read(name):
        try:
            with safe_open(where[name], framework="np") as f:
                value = f.get_tensor(name)
        except SafetensorError as e:
            raise _safetensors_error(where[name], e) from e
        if not allow_nonfinite:
            _check_finite(value, name, where[name])
        return value

    model = nnx.eval_shape(lambda: xLSTMLM(config, rngs=nnx.Rngs(0)))
    _check(model, where.keys(), shapes.__getitem__, dtypes.__getitem__, label=directory,
           origin=where.__getitem__)
    return _assign(model, read)
