"""Tests of the Flax NNX xLSTM modules (tfla_jax.layers) and the HF checkpoint loader (tfla_jax.hf).

The independent computations: `reference_lm_logits` is the xLSTM 7B forward written directly from
a Hugging Face-named tensor dict in torch layout (W x, W (out, in)) with `tfla_jax.ref.mlstm_recurrent`
as the cell; `random_hf_tensors` builds such a dict from the key list of issue 5 alone.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

import tfla_jax
from tfla_jax import layers, ref
from tfla_jax.hf import hf_param_names, hf_state_dict, load_hf_state_dict
from tfla_jax.layers import _embed_rows
from tfla_jax.layers import (FeedForward, MultiHeadLayerNorm, RMSNorm, generate, mLSTMBlock,
                             mLSTMLayer, xLSTMConfig, xLSTMLM)
from tfla_jax.state import MLSTMState
from tests.utils import assert_close, rel_err

B, T = 2, 13          # odd T: the chunkwise path pads
# Small caps so that both soft-caps bite (and are therefore tested).
CFG = xLSTMConfig.tiny(gate_soft_cap=4.0, output_logit_soft_cap=6.0, chunk_size=4,
                       mlstm_implementation="chunkwise")
# The same model on the recurrent cell: a third of the compile time on CPU. Used where the test is
# about the modules around the cell (the cell's paths are compared with each other separately).
FAST = dataclasses.replace(CFG, mlstm_implementation="recurrent")


@nnx.jit
def forward(model, tokens, state=None):
    """model(tokens, state, return_state=True), compiled once per config."""
    return model(tokens, state, return_state=True)


def unstabilised(state):
    """(e^m C, e^m n): the state's value independent of the stabiliser m (any leading dims)."""
    e = jnp.exp(state.m)
    return state.c * e[..., None, None], state.n * e[..., None]


def assert_states_close(a, b, what="state"):
    for x, y, name in zip(unstabilised(a), unstabilised(b), ("C", "n")):
        assert_close(x, y, 1e-5, f"{what} {name}")


def tokens_for(cfg, shape=(B, T), seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# The independent reference: HF tensor dict (torch layout) -> logits
# ---------------------------------------------------------------------------------------------


def random_hf_tensors(cfg: xLSTMConfig, seed: int = 0) -> dict:
    """Random weights in the HF xLSTM-7B naming and torch shapes, scaled so every part is active."""
    rng = np.random.default_rng(seed)
    d, qk, v, h, ffn, vocab = (cfg.embedding_dim, cfg.qk_dim, cfg.v_dim, cfg.num_heads,
                               cfg.ffn_hidden_dim, cfg.vocab_size)

    def lin(d_out, d_in, gain=1.0):
        return (gain * rng.standard_normal((d_out, d_in)) / math.sqrt(d_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    t = {"backbone.embeddings.weight": rng.standard_normal((vocab, d)).astype(np.float32),
         "backbone.out_norm.weight": norm(d),
         "lm_head.weight": lin(vocab, d, 4.0)}
    for b in range(cfg.num_blocks):
        p = f"backbone.blocks.{b}."
        t |= {p + "norm_mlstm.weight": norm(d),
              p + "mlstm_layer.q.weight": lin(qk, d), p + "mlstm_layer.k.weight": lin(qk, d),
              p + "mlstm_layer.v.weight": lin(v, d), p + "mlstm_layer.ogate_preact.weight": lin(v, d),
              p + "mlstm_layer.igate_preact.weight": lin(h, d, 3.0),
              p + "mlstm_layer.igate_preact.bias": rng.standard_normal(h).astype(np.float32),
              p + "mlstm_layer.fgate_preact.weight": lin(h, d, 3.0),
              p + "mlstm_layer.fgate_preact.bias": (2.0 + rng.standard_normal(h)).astype(np.float32),
              p + "mlstm_layer.multihead_norm.weight": norm(v),
              p + "mlstm_layer.out_proj.weight": lin(d, v, 0.5),
              p + "norm_ffn.weight": norm(d),
              p + "ffn.proj_up_gate.weight": lin(ffn, d), p + "ffn.proj_up.weight": lin(ffn, d),
              p + "ffn.proj_down.weight": lin(d, ffn, 0.5)}
    return t


def _rms(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _head_layer_norm(h, w, eps):  # h (..., H, V)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return ((h - mu) / jnp.sqrt(var + eps)).reshape(*h.shape[:-2], -1) * w


def _cap(x, c):
    return c * jnp.tanh(x / c)


def reference_mlstm_layer(x, w, cfg, initial_state=None):
    """x (B, T, d); w: dict of torch-layout (out, in) weights of one layer -> (y, final state)."""
    Bx, Tx, _ = x.shape
    H = cfg.num_heads
    q = (x @ w["q"].T).reshape(Bx, Tx, H, -1)
    k = (x @ w["k"].T).reshape(Bx, Tx, H, -1)
    v = (x @ w["v"].T).reshape(Bx, Tx, H, -1)
    i = _cap(x @ w["igate_w"].T + w["igate_b"], cfg.gate_soft_cap)
    f = _cap(x @ w["fgate_w"].T + w["fgate_b"], cfg.gate_soft_cap)
    h, state = ref.mlstm_recurrent(q, k, v, i, f, initial_state=initial_state, eps=cfg.eps)
    y = jax.nn.sigmoid(x @ w["ogate"].T) * _head_layer_norm(h, w["norm"], cfg.cell_norm_eps)
    return y @ w["out_proj"].T, state


def reference_lm_logits(t, cfg, tokens):
    """The whole LM from the HF tensors; returns (logits (B, T, V), per-block final states)."""
    x = jnp.asarray(t["backbone.embeddings.weight"])[tokens]
    states = []
    for b in range(cfg.num_blocks):
        g = lambda name: jnp.asarray(t[f"backbone.blocks.{b}.{name}"])  # noqa: E731
        lw = {"q": g("mlstm_layer.q.weight"), "k": g("mlstm_layer.k.weight"),
              "v": g("mlstm_layer.v.weight"), "ogate": g("mlstm_layer.ogate_preact.weight"),
              "igate_w": g("mlstm_layer.igate_preact.weight"),
              "igate_b": g("mlstm_layer.igate_preact.bias"),
              "fgate_w": g("mlstm_layer.fgate_preact.weight"),
              "fgate_b": g("mlstm_layer.fgate_preact.bias"),
              "norm": g("mlstm_layer.multihead_norm.weight"), "out_proj": g("mlstm_layer.out_proj.weight")}
        y, s = reference_mlstm_layer(_rms(x, g("norm_mlstm.weight"), cfg.norm_eps), lw, cfg)
        states.append(s)
        x = x + y
        z = _rms(x, g("norm_ffn.weight"), cfg.norm_eps)
        x = x + (jax.nn.silu(z @ g("ffn.proj_up_gate.weight").T) * (z @ g("ffn.proj_up.weight").T)
                 ) @ g("ffn.proj_down.weight").T
    x = _rms(x, jnp.asarray(t["backbone.out_norm.weight"]), cfg.norm_eps)
    return _cap(x @ jnp.asarray(t["lm_head.weight"]).T, cfg.output_logit_soft_cap), states


def write_checkpoint(directory, cfg, tensors, num_shards=2):
    with open(directory / "config.json", "w") as fh:
        json.dump(cfg.to_hf_config(), fh)
    names = list(tensors)
    for s in range(num_shards):
        part = names[s::num_shards]
        save_file({n: tensors[n] for n in part},
                  str(directory / f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"))


def model_from_tensors(cfg, tensors):
    return load_hf_state_dict(xLSTMLM(cfg, rngs=nnx.Rngs(0)), tensors)


@pytest.fixture(scope="module")
def tensors():
    return random_hf_tensors(CFG)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_7b_dims_and_hf_config():
    cfg = xLSTMConfig.xlstm_7b()
    assert (cfg.vocab_size, cfg.embedding_dim, cfg.num_blocks, cfg.num_heads) == (50304, 4096, 32, 8)
    assert (cfg.qk_dim, cfg.v_dim, cfg.qk_head_dim, cfg.v_head_dim) == (2048, 4096, 256, 512)
    assert cfg.ffn_hidden_dim == 10944            # 2.667 * 4096 = 10924.03 -> next multiple of 64
    assert (cfg.gate_soft_cap, cfg.output_logit_soft_cap, cfg.norm_eps) == (15.0, 30.0, 1e-6)
    assert cfg.dtype == jnp.bfloat16 and cfg.param_dtype == jnp.float32
    # The published NX-AI/xLSTM-7b config.json (architecture fields and the kernel fields we ignore).
    published = {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "add_out_norm": True,
                 "add_post_blocks_norm": True, "add_post_norm": False, "add_qk_norm": False,
                 "cell_norm_eps": 1e-06, "embedding_dim": 4096, "ffn_proj_factor": 2.667,
                 "ffn_round_up_to_multiple_of": 64, "gate_soft_cap": 15.0, "head_dim": 512,
                 "igate_bias_init_range": -10.0, "mlstm_round_up_to_multiple_of": 64,
                 "norm_eps": 1e-06, "num_blocks": 32, "num_heads": 8, "output_logit_soft_cap": 30.0,
                 "qk_dim_factor": 0.5, "tie_word_embeddings": False, "use_bias": False,
                 "v_dim_factor": 1.0, "vocab_size": 50304, "chunkwise_kernel": "x", "bos_token_id": 0}
    assert xLSTMConfig.from_hf_config(published, dtype=jnp.bfloat16) == cfg
    assert xLSTMConfig.from_hf_config(cfg.to_hf_config(), dtype=jnp.bfloat16) == cfg
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        xLSTMConfig.from_hf_config({**published, "tie_word_embeddings": True})
    with pytest.raises(ValueError, match="num_heads"):
        xLSTMConfig.from_hf_config({k: v for k, v in published.items() if k != "num_heads"})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        xLSTMConfig.tiny(num_heads=3)
    with pytest.raises(ValueError, match="mlstm_implementation"):
        xLSTMConfig.tiny(mlstm_implementation="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        xLSTMConfig.tiny(chunk_size=12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_blocks = 2


@pytest.mark.parametrize("field,bad", [
    ("norm_eps", -1.0), ("norm_eps", 0.0), ("cell_norm_eps", float("nan")), ("eps", -1.0),
    ("eps", float("inf")), ("output_logit_soft_cap", float("nan")), ("gate_soft_cap", 0.0),
    ("gate_soft_cap", float("inf")), ("igate_bias_init_range", float("nan")),
    ("v_dim_factor", 1e-9), ("qk_dim_factor", 1e-9), ("ffn_proj_factor", 1e-9),
    ("ffn_proj_factor", float("inf")), ("qk_dim_factor", 1e308), ("v_dim_factor", "1"),
    ("remat", "yes"), ("remat_policy", "some"), ("scan_blocks", 1), ("interpret", None), ("vocab_size", True),
    ("embedding_dim", 64.0), ("num_heads", 0), ("chunk_size", np.float32(16)),
    ("mlstm_implementation", ["chunkwise"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_bad_fields_are_named(field, bad):
    """Every field is checked at construction; the error names it (values that would give NaN,
    zero-width heads or a crash while building the model)."""
    with pytest.raises(ValueError, match=rf"xLSTMConfig\.{field}"):
        xLSTMConfig.tiny(**{field: bad})


def test_config_accepts_numpy_scalars_and_null_caps():
    cfg = xLSTMConfig.tiny(eps=np.float32(1e-6), norm_eps=np.float64(1e-5), embedding_dim=np.int64(64),
                           chunk_size=np.int64(8), qk_dim_factor=np.float32(0.5),
                           remat=np.bool_(True), output_logit_soft_cap=None)
    assert cfg == xLSTMConfig.tiny(eps=float(np.float32(1e-6)), norm_eps=1e-5, chunk_size=8,
                                   remat=True, output_logit_soft_cap=None)
    assert type(cfg.embedding_dim) is int and type(cfg.eps) is float and type(cfg.remat) is bool
    json.dumps(cfg.to_hf_config())                   # plain Python numbers
    # A null cap in config.json is no cap (HF's soft_cap(x, None) is the identity), not the default.
    hf = {**cfg.to_hf_config(), "gate_soft_cap": None}
    assert xLSTMConfig.from_hf_config(hf).gate_soft_cap is None
    assert xLSTMConfig.from_hf_config(hf).output_logit_soft_cap is None


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["list", "scan"])
def test_7b_parameter_count_via_eval_shape(scan_blocks):
    # d = 4096, V = 50304, H = 8, qk = d/2 = 2048, v = d = 4096, ffn = 10944, 32 blocks.
    # per block = 2d (norm_mlstm, norm_ffn) + 2*d*qk (q, k) + 3*d*v (v, ogate, out_proj)
    #             + 2*(d*H + H) (igate, fgate with bias) + v (multihead_norm) + 3*d*ffn (SwiGLU)
    #           = 8192 + 16,777,216 + 50,331,648 + 65,552 + 4096 + 134,479,872 = 201,666,576
    # total     = 2*V*d (embeddings, lm_head) + d (out_norm) + 32 * per block
    #           = 412,090,368 + 4096 + 6,453,330,432 = 6,865,424,896
    d, V, H, qk, v, ffn, nb = 4096, 50304, 8, 2048, 4096, 10944, 32
    per_block = 2 * d + 2 * d * qk + 3 * d * v + 2 * (d * H + H) + v + 3 * d * ffn
    assert per_block == 201_666_576
    assert 2 * V * d + d + nb * per_block == 6_865_424_896
    cfg = xLSTMConfig.xlstm_7b(scan_blocks=scan_blocks)
    model = nnx.eval_shape(lambda: xLSTMLM(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)   # nothing materialised
    assert sum(p.size for p in params) == 6_865_424_896 == cfg.num_params
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Init, shapes, dtypes
# ---------------------------------------------------------------------------------------------


def test_init_follows_xlstm_7b_recipe():
    cfg = xLSTMConfig.tiny(embedding_dim=256, num_heads=4, num_blocks=3, vocab_size=512)
    d = cfg.embedding_dim
    m = xLSTMLM(cfg, rngs=nnx.Rngs(0))
    small, wang = math.sqrt(2 / (5 * d)), 2 / (cfg.num_blocks * math.sqrt(d))

    def std_ok(x, want):
        x = np.asarray(x)
        assert abs(x.mean()) < 4 * want / math.sqrt(x.size)
        assert abs(x.std() / want - 1) < 0.05, (x.std(), want)

    std_ok(m.embeddings.embedding[...], small)
    std_ok(m.lm_head.kernel[...], small)
    np.testing.assert_array_equal(m.out_norm.weight[...], np.ones(d))
    for blk in m.blocks:
        lay = blk.mlstm_layer
        for lin in (lay.q, lay.k, lay.v, lay.ogate_preact, blk.ffn.proj_up_gate, blk.ffn.proj_up):
            std_ok(lin.kernel[...], small)
        for lin in (lay.out_proj, blk.ffn.proj_down):
            std_ok(lin.kernel[...], wang)
        for gate in (lay.igate_preact, lay.fgate_preact):
            np.testing.assert_array_equal(gate.kernel[...], 0)
        np.testing.assert_array_equal(lay.igate_preact.bias[...], np.full(cfg.num_heads, -10.0))
        np.testing.assert_allclose(lay.fgate_preact.bias[...], [3.0, 4.0, 5.0, 6.0], rtol=1e-6)
        for norm in (blk.norm_mlstm, blk.norm_ffn, lay.multihead_norm):
            np.testing.assert_array_equal(norm.weight[...], 1)


def test_shapes_and_dtypes_bf16_compute():
    """bf16 compute, fp32 params: traced abstractly (nnx.eval_shape), nothing compiled."""
    cfg = dataclasses.replace(CFG, dtype=jnp.bfloat16)
    m = xLSTMLM(cfg, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.float32)}
    tok = tokens_for(cfg)
    logits, state = nnx.eval_shape(lambda m, t: m(t, return_state=True), m, tok)
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == jnp.float32
    nb, H, K, V = cfg.num_blocks, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
    assert isinstance(state, MLSTMState)
    assert (state.c.shape, state.n.shape, state.m.shape) == ((nb, B, H, K, V), (nb, B, H, K), (nb, B, H))
    assert {x.dtype for x in state} == {jnp.dtype(jnp.float32)}
    assert nnx.eval_shape(lambda m, t: m(t), m, tok)[1] is None
    init = m.init_state(B)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), init) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state)
    step_logits, step_state = nnx.eval_shape(lambda m, t, s: m.step(t, s), m, tok[:, 0], init)
    assert step_logits.shape == (B, cfg.vocab_size) and step_logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), step_state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), init)
    x = jnp.ones((B, T, cfg.embedding_dim), jnp.bfloat16)
    assert isinstance(m.blocks[0], mLSTMBlock) and len(m.blocks) == cfg.num_blocks
    y, s = nnx.eval_shape(lambda b, x: b(x, return_state=True), m.blocks[0], x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16 and s.c.dtype == jnp.float32
    assert nnx.eval_shape(lambda l, x: l(x)[0], m.blocks[0].mlstm_layer, x).dtype == jnp.bfloat16
    assert nnx.eval_shape(lambda f, x: f(x), FeedForward(cfg, rngs=nnx.Rngs(0)), x).dtype == jnp.bfloat16
    assert RMSNorm(8, dtype=jnp.bfloat16)(jnp.ones((3, 8))).dtype == jnp.bfloat16
    hn = MultiHeadLayerNorm(2, 4)(jnp.ones((3, 2, 4), jnp.bfloat16))
    assert hn.shape == (3, 8) and hn.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="tokens"):
        m(tok.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"state\.c"):
        m(tok, MLSTMState(init.c[:, :1], init.n, init.m))


def test_bf16_compute_tracks_float32(tensors):
    """bf16 activations/matmuls (fp32 gates, norms, state, logits) stay close to the fp32 model."""
    tok = tokens_for(FAST)
    want, want_state = forward(model_from_tensors(FAST, tensors), tok)
    got, got_state = forward(model_from_tensors(dataclasses.replace(FAST, dtype=jnp.bfloat16),
                                                tensors), tok)
    assert got.dtype == jnp.float32 and got_state.c.dtype == jnp.float32
    # Relative error per position. The per-head layer norm is scale invariant, so where a head's h is
    # tiny (q.k near 0, e.g. at t = 0) bf16 rounding of q, k can flip its sign: allow a few such rows.
    err = np.array([[rel_err(got[b, t], want[b, t]) for t in range(T)] for b in range(B)])
    assert np.median(err) < 1e-2 and np.mean(err < 2e-2) >= 0.9, err


def test_norms_match_formulas():
    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 8)) * 3 + 1
    rms = RMSNorm(8, eps=1e-6)
    rms.weight[...] = jnp.arange(8.0)
    want = x / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-6) * np.arange(8)
    assert_close(rms(x), want, 1e-6, "RMSNorm")
    mh = MultiHeadLayerNorm(2, 8, eps=1e-6)
    mh.weight[...] = jnp.arange(16.0)
    xn = np.asarray(x)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
    assert_close(mh(x), want.reshape(3, 5, 16) * np.arange(16), 1e-6, "MultiHeadLayerNorm")


# ---------------------------------------------------------------------------------------------
# The layer and the model against the direct formulas
# ---------------------------------------------------------------------------------------------


def randomize(module, seed=0):
    """Replaces every parameter: kernels normal / sqrt(fan_in), vectors 1 + 0.3 normal."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape) / math.sqrt(x.shape[-2]) if x.ndim >= 2
           else 1 + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def test_mlstm_layer_equals_reference_formula():
    layer = randomize(mLSTMLayer(CFG, rngs=nnx.Rngs(0)))
    H, K, V = CFG.num_heads, CFG.qk_head_dim, CFG.v_head_dim
    ks = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(ks[0], (B, T, CFG.embedding_dim))
    s0 = MLSTMState(jax.random.normal(ks[1], (B, H, K, V)), jax.random.normal(ks[2], (B, H, K)),
                    jax.random.normal(ks[3], (B, H)))

    @nnx.jit
    def run(layer, x, s0):
        kt = lambda lin: lin.kernel[...].T  # noqa: E731  (torch layout (out, in))
        w = {"q": kt(layer.q), "k": kt(layer.k), "v": kt(layer.v), "ogate": kt(layer.ogate_preact),
             "igate_w": kt(layer.igate_preact), "igate_b": layer.igate_preact.bias[...],
             "fgate_w": kt(layer.fgate_preact), "fgate_b": layer.fgate_preact.bias[...],
             "norm": layer.multihead_norm.weight[...], "out_proj": kt(layer.out_proj)}
        return (layer(x, s0, return_state=True), reference_mlstm_layer(x, w, CFG, s0),
                layer.step(x[:, 0], s0)[0], reference_mlstm_layer(x[:, :1], w, CFG, s0)[0][:, 0])

    (got, got_state), (want, want_state), got_step, want_step = run(layer, x, s0)
    assert_close(got, want, 1e-5, "layer output")
    assert_states_close(got_state, want_state)   # the stabiliser m itself may differ
    assert_close(got_step, want_step, 1e-5, "layer step (T = 1)")


@pytest.mark.parametrize("scan_blocks", [False, True], ids=["list", "scan"])
def test_hf_checkpoint_round_trip_matches_reference(tmp_path, tensors, scan_blocks):
    write_checkpoint(tmp_path, CFG, tensors)
    model = tfla_jax.load_hf_checkpoint(tmp_path, scan_blocks=scan_blocks, chunk_size=4,
                                        mlstm_implementation="chunkwise")
    assert model.config == dataclasses.replace(CFG, scan_blocks=scan_blocks)
    exported = hf_state_dict(model)
    assert list(exported) == hf_param_names(CFG) and set(exported) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    tok = tokens_for(CFG)
    want, _ = reference_lm_logits(tensors, CFG, tok)
    got, _ = forward(model, tok)
    assert_close(got, want, 1e-5, "logits vs the HF-layout reference")


def test_hf_checkpoint_bad_keys_are_named(tmp_path, tensors):
    model = xLSTMLM(CFG, rngs=nnx.Rngs(0))
    key = "backbone.blocks.1.mlstm_layer.q.weight"
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        load_hf_state_dict(model, {n: v for n, v in tensors.items() if n != key})
    with pytest.raises(ValueError, match="unexpected key 'backbone.blocks.2.norm_ffn.weight'"):
        load_hf_state_dict(model, {**tensors, "backbone.blocks.2.norm_ffn.weight": np.ones(64)})
    with pytest.raises(ValueError, match=rf"key '{key}' has shape \(64, 32\), expected \(32, 64\)"):
        load_hf_state_dict(model, {**tensors, key: tensors[key].T})   # an untransposed kernel
    bias = "backbone.blocks.0.mlstm_layer.fgate_preact.bias"
    with pytest.raises(ValueError, match=f"key '{bias}' has shape"):
        load_hf_state_dict(model, {**tensors, bias: np.zeros(3, np.float32)})
    # The directory loader: the same checks, plus files.
    with pytest.raises(FileNotFoundError, match="config.json"):
        tfla_jax.load_hf_checkpoint(tmp_path)
    write_checkpoint(tmp_path, CFG, {n: v for n, v in tensors.items() if n != key})
    with pytest.raises(ValueError, match=f"missing key '{key}'"):
        tfla_jax.load_hf_checkpoint(tmp_path)
    save_file({key: tensors[key], bias: tensors[bias]}, str(tmp_path / "dup.safetensors"))
    with pytest.raises(ValueError, match=f"key '({key}|{bias})' is in two shards"):
        tfla_jax.load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("impl", ["recurrent", "parallel"])
def test_model_chunkwise_equals_other_paths(tensors, impl):
    tok = tokens_for(CFG)
    chunk = model_from_tensors(CFG, tensors)
    other = model_from_tensors(dataclasses.replace(CFG, mlstm_implementation=impl), tensors)
    (lc, sc), (lo, so) = forward(chunk, tok), forward(other, tok)
    assert_close(lc, lo, 1e-5, f"logits chunkwise vs {impl}")
    assert_states_close(sc, so)


# ---------------------------------------------------------------------------------------------
# Block layouts, remat, gradients, jit
# ---------------------------------------------------------------------------------------------


def loss_fn(model, tok):
    logits, state = model(tok[:, :-1], return_state=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean(), (logits, state)


@nnx.jit
def loss_and_grads(model, tok):
    return nnx.value_and_grad(loss_fn, has_aux=True)(model, tok)


def grads_in_hf_naming(model, tok):
    """((loss, (logits, state)), gradients as a dict in HF naming)."""
    out, grads = loss_and_grads(model, tok)
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return out, hf_state_dict(holder)


def test_scan_blocks_and_remat_match_block_list(tensors):
    """Same weights: the nnx.List layout and the stacked nnx.scan layout with remat give the same
    logits, states and gradients (scan without remat: the forward tests below)."""
    tok = tokens_for(FAST)
    (loss0, (l0, s0)), g0 = grads_in_hf_naming(model_from_tensors(FAST, tensors), tok)
    for opts in (dict(scan_blocks=True, remat=True),
                 dict(scan_blocks=True, remat=True, remat_policy="dots"),
                 dict(scan_blocks=True, remat=True, remat_policy="dots_cell")):
        m = model_from_tensors(dataclasses.replace(FAST, **opts), tensors)
        (loss1, (l1, s1)), g1 = grads_in_hf_naming(m, tok)
        assert_close(l1, l0, 1e-5, f"logits {opts}")
        jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, f"state {opts}"),
                     s1, s0)
        assert_close(loss1, loss0, 1e-6)
        for name in g0:
            assert_close(g1[name], g0[name], 1e-5, f"grad {name} {opts}")


def test_dots_cell_policy_keeps_the_kernel_outputs():
    """remat_policy "dots_cell": the backward of a rematerialised block takes the mLSTM
    kernels' forward outputs as saved residuals ("dots" runs the forward kernels again), with
    the same loss and gradients (the kept values are the ones a second forward recomputes)."""
    cfg = dataclasses.replace(CFG, mlstm_implementation="pallas_triton", interpret=True,
                              chunk_size=16, remat=True)
    tok = tokens_for(cfg)
    params = nnx.state(layers.xLSTMLM(cfg, rngs=nnx.Rngs(0)))
    results = {}
    for policy in ("dots", "dots_cell"):
        graphdef = nnx.graphdef(layers.xLSTMLM(dataclasses.replace(cfg, remat_policy=policy),
                                               rngs=nnx.Rngs(0)))

        def loss(params, graphdef=graphdef):
            return nnx.merge(graphdef, params).loss(tok[:, :-1], tok[:, 1:])

        value, backward = jax.vjp(loss, params)
        text = str(jax.make_jaxpr(backward)(jnp.float32(1.0)))
        assert ("mlstm_fwd_output" in text) == (policy == "dots"), policy
        assert "mlstm_bwd_dq" in text
        results[policy] = (value, jax.jit(backward)(jnp.float32(1.0)))
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, "dots_cell vs dots"),
                 results["dots_cell"], results["dots"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_gradient_is_the_lookups(dtype):
    """The one-hot matmul gradient of the embedding (vocabularies <= ONE_HOT_GRAD_VOCAB) equals
    the scatter-add of jnp.take's, ids out of range and negative ids included; in bf16 compute
    it is the float32 sum of the bf16 cotangents (the scatter adds in bf16)."""
    from tfla_jax.layers import embed
    emb = nnx.Embed(300, 16, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    tok = jnp.array([[1, 5, 5, 299, -1, -300, 300, 7], [5, 5, 5, 5, 0, 1, 2, 3]])
    g = jax.random.normal(jax.random.key(1), (2, 8, 16)).astype(dtype)
    table = emb.embedding[...]
    rows = jnp.take(table.astype(dtype), tok, axis=0)
    got = embed(emb, tok)
    assert jnp.array_equal(jnp.isnan(got), jnp.isnan(rows))
    assert jnp.array_equal(jnp.nan_to_num(got), jnp.nan_to_num(rows))
    dot = lambda x: jnp.sum(jnp.nan_to_num(x).astype(jnp.float32) * g)  # noqa: E731
    want = jax.grad(lambda t: dot(jnp.take(t.astype(jnp.float32), tok, axis=0)))(table)
    have = jax.grad(lambda t: dot(_embed_rows(t, tok, jnp.dtype(dtype))))(table)
    np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [FAST, dataclasses.replace(FAST, scan_blocks=True, remat=True)],
                         ids=["list", "scan-remat"])
def test_gradients_finite_and_reach_every_parameter(cfg):
    """At the xLSTM 7B init (gate kernels zero, input-gate bias -10) every parameter gets a
    finite, nonzero gradient."""
    model = xLSTMLM(cfg, rngs=nnx.Rngs(0))
    _, grads = grads_in_hf_naming(model, tokens_for(cfg))
    assert set(grads) == set(hf_param_names(cfg))
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), f"zero gradient for {name}"


def test_jit_train_step_learns(tensors):
    """The CPU training path (chunkwise cell) as one nnx.jit train step: finite, and it learns.
    (Every forward above is jitted and compared with the eager reference.)"""
    model = model_from_tensors(CFG, tensors)
    tok = tokens_for(CFG)
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tok):
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tok)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, tok)) for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_chunked_loss_equals_full_logits_loss(tensors):
    """xLSTMLM.loss with chunk (logits formed a chunk at a time, rematerialised) trains exactly
    as optax's cross-entropy of the full logits did: losses and gradients over 2 Adam steps
    (the chunk=None form is train_lm's default, checked by its reference losses)."""
    tok = tokens_for(FAST, (B, 13))
    inputs, targets = tok[:, :-1], tok[:, 1:]                # T = 12

    def full(model):
        logits, _ = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def run(loss_of):
        model = model_from_tensors(FAST, tensors)
        optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer):
            loss, grads = nnx.value_and_grad(loss_of)(model)
            optimizer.update(model, grads)
            return loss, grads

        return [step(model, optimizer) for _ in range(2)]

    want = run(full)
    got = run(lambda m: m.loss(inputs, targets, chunk=4))
    for (loss, grads), (want_loss, want_grads) in zip(got, want):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            assert_close(g, w, 1e-4, "gradient (chunk 4)")
    with pytest.raises(ValueError, match="divide"):
        model_from_tensors(FAST, tensors).loss(inputs, targets, chunk=5)


# ---------------------------------------------------------------------------------------------
# State and generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(FAST, scan_blocks=True)],
                         ids=["list-chunkwise", "scan-recurrent"])
def test_prefill_then_decode_equals_one_forward(tensors, cfg):
    model = model_from_tensors(cfg, tensors)
    prefill_len, steps = 8, T - 8
    tok = tokens_for(cfg, (B, prefill_len + steps))
    full, full_state = forward(model, tok)

    @nnx.jit
    def decode(model, tok, state):
        return model.step(tok, state)

    logits, state = forward(model, tok[:, :prefill_len])
    got = [logits[:, -1]]
    for t in range(prefill_len, prefill_len + steps):
        step_logits, state = decode(model, tok[:, t], state)
        got.append(step_logits)
    assert_close(jnp.stack(got[:-1], 1), full[:, prefill_len - 1:-1], 1e-5,
                 "prefill + decode logits vs one forward")
    assert_states_close(state, full_state)
    # A second sequence call continuing from the state is the same as well.
    cont, _ = forward(model, tok[:, prefill_len:], forward(model, tok[:, :prefill_len])[1])
    assert_close(cont, full[:, prefill_len:], 1e-5, "chained sequence calls")


def test_generate_greedy_and_sampling(tensors):
    model = model_from_tensors(FAST, tensors)
    prompt = tokens_for(FAST, (B, 7))
    n = T - 7
    greedy = generate(model, prompt, n)
    assert greedy.shape == (B, n) and greedy.dtype == jnp.int32
    logits, _ = forward(model, jnp.concatenate([prompt, greedy], 1))
    np.testing.assert_array_equal(np.argmax(logits[:, 6:6 + n], -1), greedy)
    # top_k = 1 is greedy at any temperature; the same key gives the same sample.
    key = jax.random.key(7)
    np.testing.assert_array_equal(generate(model, prompt, n, temperature=2.0, top_k=1, rng=key),
                                  greedy)
    sampled = generate(model, prompt, n, temperature=1.5, top_k=3, rng=key)
    np.testing.assert_array_equal(generate(model, prompt, n, temperature=1.5, top_k=3, rng=key),
                                  sampled)
    logits, _ = forward(model, jnp.concatenate([prompt, sampled], 1))
    top3 = np.argsort(-np.asarray(logits[:, 6:6 + n]), -1)[..., :3]
    assert np.all(np.any(top3 == np.asarray(sampled)[..., None], -1)), "sample outside the top 3"
    wide = generate(model, prompt, n, temperature=50.0, rng=key)
    assert len(np.unique(np.asarray(wide))) > 6        # hot sampling is not greedy
    # The returned state is after the prompt and all generated tokens but the last.
    _, state = generate(model, prompt, n, return_state=True)
    _, want_state = forward(model, jnp.concatenate([prompt, greedy[:, :-1]], 1))
    assert_states_close(state, want_state)
    # eos: a row is the greedy row up to its first eos, then only eos.
    eos = int(greedy[0, 2])
    with_eos = np.asarray(generate(model, prompt, n, eos_token_id=eos))
    for b in range(B):
        hits = np.flatnonzero(np.asarray(greedy[b]) == eos)
        j = hits[0] if hits.size else n
        np.testing.assert_array_equal(with_eos[b, :j], greedy[b, :j])
        assert np.all(with_eos[b, j:] == eos)
    for bad, match in ((dict(temperature=1.0), "rng"), (dict(top_k=0), "top_k"),
                       (dict(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, n, **bad)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, True)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt, n, temperature=float("nan"), rng=key)
    # NumPy scalars are numbers too (and hit the same compiled program).
    np.testing.assert_array_equal(
        generate(model, np.asarray(prompt).tolist(), np.int64(n), temperature=np.float32(1.5),
                 top_k=np.int64(3), rng=key), sampled)


def test_token_ids_are_checked():
    """Concrete ids outside [0, vocab_size) are named (eagerly they would give NaN logits, -1
    would read the last row); under jit the documented behaviour: NaN from that position on."""
    model = xLSTMLM(FAST, rngs=nnx.Rngs(0))
    vocab = FAST.vocab_size
    for bad in (vocab, -1, 10 * vocab):
        tokens = tokens_for(FAST).at[1, 5].set(bad)
        with pytest.raises(ValueError, match=rf"tokens: ids must be in \[0, vocab_size\).*got {bad}"):
            model(tokens)
        with pytest.raises(ValueError, match=rf"tokens: .*got {bad}"):
            model.step(tokens[:, 5], None)
        with pytest.raises(ValueError, match=rf"prompt: ids must be in \[0, vocab_size\).*got {bad}"):
            generate(model, tokens[:, :7], 2)
    with pytest.raises(ValueError, match=r"tokens: .*T >= 1"):
        model(jnp.zeros((B, 0), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        model([[1, 2], [3]])                         # ragged
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((B, 3)))                     # float ids
    # Under jit nothing can be checked: out-of-range ids embed as NaN (jnp.take's fill mode).
    tokens = tokens_for(FAST).at[1, 5].set(vocab)
    logits = np.asarray(forward(model, tokens)[0])
    assert np.isnan(logits[1, 5:]).all() and np.isfinite(logits[1, :5]).all()
    assert np.isfinite(logits[0]).all()


def test_tokens_as_nested_lists(tensors):
    model = model_from_tensors(FAST, tensors)
    tokens = tokens_for(FAST, (1, 4))
    want, _ = model(tokens)
    got, _ = model(np.asarray(tokens).tolist())
    assert_close(got, want, 0.0, "nested-list tokens")


def test_pallas_model_runs_interpreted_on_cpu():
    """config.interpret reaches tfla_jax.mlstm: a kernel-backend model runs on a CPU (one small
    block: the interpreter is slow)."""
    cfg = xLSTMConfig.tiny(vocab_size=32, embedding_dim=32, num_heads=1, num_blocks=1,
                           chunk_size=None, mlstm_implementation="pallas_triton", interpret=True)
    tokens = tokens_for(cfg, (1, 8))
    got, _ = xLSTMLM(cfg, rngs=nnx.Rngs(0))(tokens)
    ref_cfg = dataclasses.replace(cfg, mlstm_implementation="recurrent", interpret=False)
    want, _ = xLSTMLM(ref_cfg, rngs=nnx.Rngs(0))(tokens)
    assert_close(got, want, 1e-5, "pallas_triton interpreted")
    with pytest.raises(ValueError, match="xLSTMConfig.interpret"):
        dataclasses.replace(cfg, interpret="yes")


# ---------------------------------------------------------------------------------------------
# Packed documents (segment_ids) and prompts of different lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, scan_blocks=True)],
                         ids=["blocks", "scan_blocks"])
def test_packed_documents_equal_each_document_alone(tensors, cfg):
    """Nothing in the model mixes positions across a document boundary: logits and the final
    state of one packed call equal those of each document run on its own."""
    model = model_from_tensors(cfg, tensors)
    tokens = tokens_for(cfg)
    bounds = [(0, 4), (4, 5), (5, 13)]                        # inside a chunk, length 1, across
    ids = jnp.asarray(np.repeat([3, 8, 3], [b - a for a, b in bounds])[None].repeat(B, 0))
    logits, state = nnx.jit(lambda m, t, s: m(t, return_state=True, segment_ids=s))(
        model, tokens, ids)
    parts = [forward(model, tokens[:, a:b]) for a, b in bounds]
    assert_close(logits, jnp.concatenate([p[0] for p in parts], 1), 1e-5, "logits")
    assert_states_close(state, parts[-1][1], "final state")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_generate_with_scanned_blocks_equals_step_by_step(tensors, dtype):
    """The decode loop's per-block, pre-cast weights (`_decode_form`) give exactly the tokens of
    `model.step` on the stacked float32 parameters, and the same state (to the dtype's rounding)."""
    cfg = dataclasses.replace(FAST, scan_blocks=True, dtype=dtype)
    model = model_from_tensors(cfg, tensors)
    prompt, n = tokens_for(cfg, (B, 5)), 4
    tokens, state = generate(model, prompt, n, return_state=True)

    @nnx.jit
    def decode(model, tok, state):
        return model.step(tok, state)

    logits, want_state = forward(model, prompt)
    want = [jnp.argmax(logits[:, -1], -1)]
    for _ in range(n - 1):
        logits, want_state = decode(model, want[-1], want_state)
        want.append(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(tokens, jnp.stack(want, 1))
    # bf16: two compiled programs may round intermediates differently (XLA's fusion choices).
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for x, y, name in zip(unstabilised(state), unstabilised(want_state), ("C", "n")):
        assert_close(x, y, tol, f"generate state {name}")


@pytest.mark.parametrize("dtype,param_dtype", [(jnp.float32, jnp.float32),
                                               (jnp.bfloat16, jnp.float32),
                                               (jnp.bfloat16, jnp.bfloat16)],
                         ids=["f32", "bf16-f32-params", "bf16-gates-fused"])
@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scan_blocks"])
def test_decode_form_step_equals_step(tensors, scan, dtype, param_dtype):
    """`_decode_form`'s step (with scan_blocks or a cast: the input projections concatenated,
    the gates in the same matmul only for bf16 parameters) gives the logits and state of
    `model.step` on the blocks as a list, to float32 rounding. Not bit for bit: XLA's CPU dot
    tiles by the output width, so a (B, 2H) gate column can differ by an ulp from the (B, H)
    dot's. The reference is the list of blocks for `scan_blocks` too: the `nnx.scan` step rounds
    bf16 differently (XLA's excess precision in other fusions, as before the decode form)."""
    cfg = dataclasses.replace(FAST, scan_blocks=scan, dtype=dtype, param_dtype=param_dtype)
    model = model_from_tensors(cfg, tensors)
    listed = model_from_tensors(dataclasses.replace(cfg, scan_blocks=False), tensors)
    tok = tokens_for(cfg, (B, 6))
    _, state = forward(listed, tok[:, :5])

    @nnx.jit
    def decode_step(model, tok, state):
        states = [jax.tree.map(lambda a, b=b: a[b], state) for b in range(cfg.num_blocks)]
        logits, states = layers._decode_form(model)._step_per_block(tok, states)
        return logits, jax.tree.map(lambda *a: jnp.stack(a), *states)

    got = decode_step(model, tok[:, 5], state)
    want = nnx.jit(lambda m, t, s: m.step(t, s))(listed, tok[:, 5], state)
    for x, y, name in zip(jax.tree.leaves(got), jax.tree.leaves(want), ("logits", "c", "n", "m")):
        assert_close(x, y, 1e-6, f"decode form {name}")
    blocks = layers._decode_form(model).blocks
    fused = isinstance(blocks[0].mlstm_layer, layers._DecodeMLSTMLayer)
    assert fused == (scan or dtype != param_dtype)
    assert not fused or blocks[0].mlstm_layer.exact_gates == (param_dtype == jnp.bfloat16)


@pytest.mark.parametrize("scan", [False, True], ids=["blocks", "scan_blocks"])
def test_inference_form_runs_like_the_model(tensors, scan):
    """`inference_form`: a sequence call (packed documents, an initial state), step and generate
    equal the model's (bf16: to its rounding; the fused dots), without touching the model; a
    converted model converts to itself (`generate` runs it as it is)."""
    cfg = dataclasses.replace(FAST, scan_blocks=scan, dtype=jnp.bfloat16,
                              param_dtype=jnp.bfloat16)
    model = model_from_tensors(cfg, tensors)
    before = jax.tree.map(np.asarray, nnx.state(model))
    fast = layers.inference_form(model)
    assert layers.inference_form(fast) is fast
    assert isinstance(fast.blocks[0].mlstm_layer, layers._DecodeMLSTMLayer)
    tok = tokens_for(cfg)
    ids = jnp.asarray(np.repeat([1, 2], [5, T - 5])[None].repeat(B, 0))
    _, s0 = forward(model, tok[:, :3])
    run = nnx.jit(lambda m, t, s, i: m(t, s, return_state=True, segment_ids=i))
    for x, y, name in zip(jax.tree.leaves(run(fast, tok, s0, ids)),
                          jax.tree.leaves(run(model, tok, s0, ids)),
                          ("logits", "c", "n", "m")):
        assert_close(x.astype(jnp.float32), y.astype(jnp.float32), 2e-2, f"sequence {name}")
    step = nnx.jit(lambda m, t, s: m.step(t, s))
    for x, y in zip(jax.tree.leaves(step(fast, tok[:, 0], s0)),
                    jax.tree.leaves(step(model, tok[:, 0], s0))):
        assert_close(x, y, 2e-2, "step")
    np.testing.assert_array_equal(generate(fast, tok[:, :5], 3), generate(model, tok[:, :5], 3))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)),
                 before)


def test_generate_prompts_of_different_lengths(tensors):
    model = model_from_tensors(FAST, tensors)
    prompt = tokens_for(FAST, (B, 7))
    lengths = [7, 3]
    padded = prompt.at[1, 3:].set(0)
    together = generate(model, padded, 4, prompt_lengths=lengths)
    for b, n in enumerate(lengths):
        alone = generate(model, prompt[b:b + 1, :n], 4)
        np.testing.assert_array_equal(together[b:b + 1], alone)
    with pytest.raises(ValueError, match="prompt_lengths"):
        generate(model, padded, 4, prompt_lengths=[8, 3])
