"""Flax NNX xLSTM (the xLSTM 7B architecture): config presets, norms, mLSTM layer, SwiGLU
feed-forward, residual block, language model, recurrent state and generation.

Architecture (xLSTM 7B, arXiv 2503.13427), for x (B, T, d):

    block(x) = x' + FFN(RMSNorm(x')),   x' = x + mLSTMLayer(RMSNorm(x))
    mLSTMLayer(x) = out_proj( sigmoid(ogate(x)) * MultiHeadLayerNorm(mLSTM(q(x), k(x), v(x), i, f)) )
        i = cap * tanh(igate(x) / cap),  f = cap * tanh(fgate(x) / cap)   (float32, cap = gate_soft_cap)
    FFN(x) = proj_down( silu(proj_up_gate(x)) * proj_up(x) )               (SwiGLU)
    logits = cap * tanh(lm_head(RMSNorm(blocks(embed(tokens)))) / cap)     (float32, output_logit_soft_cap)

The mLSTM cell is `tfla_jax.mlstm` (sequences: the chunkwise/TFLA kernels) and `tfla_jax.mlstm_step`
(decoding). The recurrent state of the whole model is one `MLSTMState` whose arrays carry a leading
block axis: c (num_blocks, B, H, K, V), n (num_blocks, B, H, K), m (num_blocks, B, H), float32.
Parameter names follow the Hugging Face xLSTM checkpoint (see `tfla_jax.hf`); nnx.Linear kernels
are (in, out), the transpose of torch's (out, in).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from tfla_jax import api
from tfla_jax.state import MLSTMState

__all__ = ["xLSTMConfig", "RMSNorm", "MultiHeadLayerNorm", "mLSTMLayer", "FeedForward", "mLSTMBlock",
           "xLSTMLM", "generate", "inference_form", "sample_logits", "soft_cap", "small_init_std",
           "wang_init_std"]

_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


def _kernel_outputs(prim, *_, **__) -> bool:
    """Saveable: the outputs of Pallas kernels (in a block's forward, the mLSTM cell's: its
    output, normaliser and chunk states), so that the backward does not run the cell twice."""
    return prim.name == "pallas_call"


_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
REMAT_POLICIES = {"full": None, "dots": _DOTS,
                  "dots_cell": jax.checkpoint_policies.save_from_both_policies(
                      _DOTS, _kernel_outputs)}


def _round_up(x: float, multiple: int) -> int:
    """x rounded up to a multiple of `multiple` (as the HF xLSTM config does it: (x + m - 1) // m * m)."""
    return int((x + multiple - 1) // multiple) * multiple


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): a smooth clip to (-cap, cap); the identity when cap is None or <= 0."""
    if cap is None or cap <= 0:
        return x
    return cap * jnp.tanh(x / cap)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class xLSTMConfig:  # noqa: N801  (the paper's and Hugging Face's spelling)
    """xLSTM language-model hyper-parameters. Field names follow the Hugging Face xLSTM config.

    The defaults are xLSTM 7B's architecture; use a preset: `xLSTMConfig.xlstm_7b()`, `tiny()`
    (tests, CPU), `small()` / `medium()` / `large()` (GPU demos). Every preset takes field overrides, e.g.
    `xLSTMConfig.small(vocab_size=256, scan_blocks=True)`.

    Architecture (HF names):
      vocab_size, embedding_dim (d), num_heads (H), num_blocks.
      qk_dim_factor, v_dim_factor: q/k width = d * qk_dim_factor, v width = d * v_dim_factor, both
        rounded up to mlstm_round_up_to_multiple_of and split into H heads.
      ffn_proj_factor, ffn_round_up_to_multiple_of: SwiGLU width = round_up(d * ffn_proj_factor).
      gate_soft_cap: cap of the input/forget gate pre-activations; output_logit_soft_cap: of the
        logits (None disables a cap).
      igate_bias_init_range: the input-gate bias at init (-10).
      norm_eps: RMSNorm eps; cell_norm_eps: eps of the per-head norm of h; eps: the mLSTM cell's
        denominator eps.
    JAX options:
      dtype: compute dtype (activations, matmul operands), e.g. jnp.bfloat16; gate math, norms'
        reductions, the mLSTM state and the logits stay float32 whatever it is.
      param_dtype: parameter dtype (float32).
      mlstm_implementation: `tfla_jax.mlstm`'s implementation for sequences (None: the fastest
        available: "pallas" on GPU, "chunkwise" elsewhere); chunk_size: its chunk size (None: its
        default).
      interpret: run the kernel backends in Pallas interpret mode (`tfla_jax.mlstm`'s
        interpret=True: a "pallas" model on a CPU, for testing; slow). With mlstm_implementation
        None it makes the kernels the choice on a CPU too.
      remat: rematerialise each block in the backward pass (activation memory O(one block)).
      remat_policy: what a rematerialised block keeps: "full" nothing but its input, "dots" also
        the outputs of its matmuls (jax.checkpoint_policies.dots_with_no_batch_dims_saveable:
        the backward recomputes only the elementwise work and the mLSTM cell), "dots_cell" also
        the outputs of the mLSTM kernels (h, its normaliser, the chunk states: the cell's
        forward runs once; the chunkwise and scan implementations have none to keep).
      scan_blocks: keep the blocks' parameters stacked (leading axis num_blocks) and run them with
        `nnx.scan` (compile time independent of depth); otherwise an `nnx.List` of blocks.
    """

    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_heads: int = 8
    num_blocks: int = 32
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    mlstm_round_up_to_multiple_of: int = 64
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float | None = 15.0
    output_logit_soft_cap: float | None = 30.0
    igate_bias_init_range: float = -10.0
    norm_eps: float = 1e-6
    cell_norm_eps: float = 1e-6
    eps: float = 1e-6
    # JAX-side options (not part of the HF config).
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    mlstm_implementation: str | None = None
    chunk_size: int | None = None
    remat: bool = False
    remat_policy: str = "full"
    scan_blocks: bool = False
    interpret: bool = False

    def __post_init__(self):
        """Checks every field, then the derived dims; numbers are stored as Python int/float."""
        def field(name, value):
            object.__setattr__(self, name, value)

        def real(name, *, lo=None, lo_open=False, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            x = api._real_scalar(value)
            ok = x is not None and math.isfinite(x) and (
                lo is None or (x > lo if lo_open else x >= lo))
            if not ok:
                bound = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
                raise ValueError(f"xLSTMConfig.{name}: expected a finite number{bound}"
                                 f"{' or None' if optional else ''}, got {value!r}")
            field(name, x)

        for name in ("vocab_size", "embedding_dim", "num_heads", "num_blocks",
                     "mlstm_round_up_to_multiple_of", "ffn_round_up_to_multiple_of"):
            value = api._real_scalar(getattr(self, name), integer=True)
            if value is None or value < 1:
                raise ValueError(f"xLSTMConfig.{name}: expected an int >= 1, got "
                                 f"{getattr(self, name)!r}")
            field(name, value)
        for name in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor"):
            real(name, lo=0, lo_open=True)
        for name in ("gate_soft_cap", "output_logit_soft_cap"):
            real(name, lo=0, lo_open=True, optional=True)     # None: no cap
        real("igate_bias_init_range")
        for name in ("norm_eps", "cell_norm_eps"):
            real(name, lo=0, lo_open=True)                    # 0 would divide by 0 on a zero row
        real("eps", lo=0)
        for name in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"xLSTMConfig.{name}: not a dtype: {getattr(self, name)!r}") from e
            if dt not in _FLOAT_DTYPES:
                raise ValueError(f"xLSTMConfig.{name}: expected a float dtype, got {dt}")
            field(name, dt)
        impl = self.mlstm_implementation
        if impl is not None and (not isinstance(impl, str) or impl not in api.implementations()):
            raise ValueError(f"xLSTMConfig.mlstm_implementation: expected None or one of "
                             f"{api.implementations()}, got {impl!r}")
        try:
            field("chunk_size", api._check_chunk_size(self.chunk_size))
        except ValueError as e:
            raise ValueError(f"xLSTMConfig.{e}") from None
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"xLSTMConfig.remat_policy: expected one of "
                             f"{tuple(REMAT_POLICIES)}, got {self.remat_policy!r}")
        for name in ("remat", "scan_blocks", "interpret"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"xLSTMConfig.{name}: expected a bool, got {value!r}")
            field(name, bool(value))
        # Derived dims: each at least 1 per head, q/k and v widths split evenly into heads.
        for name, factor, multiple, per_head in (
                ("qk_dim", "qk_dim_factor", "mlstm_round_up_to_multiple_of", self.num_heads),
                ("v_dim", "v_dim_factor", "mlstm_round_up_to_multiple_of", self.num_heads),
                ("ffn_hidden_dim", "ffn_proj_factor", "ffn_round_up_to_multiple_of", 1)):
            width = self.embedding_dim * getattr(self, factor)
            dim = _round_up(width, getattr(self, multiple)) if math.isfinite(width) else 0
            if dim < per_head:
                shown = dim if math.isfinite(width) else "inf"
                raise ValueError(f"xLSTMConfig.{factor}: {getattr(self, factor)!r} gives {name} = "
                                 f"round_up(embedding_dim * {factor}, {multiple}) = {shown}; "
                                 f"expected a finite {name} >= {per_head} (every derived dim, "
                                 f"per head, >= 1)")
            if per_head > 1 and dim % per_head:
                raise ValueError(f"xLSTMConfig: {name} = {dim} is not divisible by num_heads = "
                                 f"{self.num_heads}")

    # Derived dims.
    @property
    def qk_dim(self) -> int:
        """Total q/k width: round_up(embedding_dim * qk_dim_factor) (2048 for 7B)."""
        return _round_up(self.embedding_dim * self.qk_dim_factor, self.mlstm_round_up_to_multiple_of)

    @property
    def v_dim(self) -> int:
        """Total v (and output gate) width: round_up(embedding_dim * v_dim_factor) (4096 for 7B)."""
        return _round_up(self.embedding_dim * self.v_dim_factor, self.mlstm_round_up_to_multiple_of)

    @property
    def qk_head_dim(self) -> int:
        """K, the per-head q/k dim (256 for 7B)."""
        return self.qk_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        """V, the per-head v dim (512 for 7B)."""
        return self.v_dim // self.num_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: round_up(embedding_dim * ffn_proj_factor) (10944 for 7B)."""
        return _round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    @property
    def num_params(self) -> int:
        """Exact parameter count: 2 V d + d + num_blocks * (per-block count), see `block_params`."""
        d, vocab = self.embedding_dim, self.vocab_size
        return 2 * vocab * d + d + self.num_blocks * self.block_params

    @property
    def block_params(self) -> int:
        """Parameters of one block: 2 d (RMSNorms) + 2 d qk (q, k) + 2 d v (v, ogate) + v d (out_proj)
        + 2 (d H + H) (gates with bias) + v (per-head norm) + 3 d ffn (SwiGLU)."""
        d, qk, v, h, ffn = (self.embedding_dim, self.qk_dim, self.v_dim, self.num_heads,
                            self.ffn_hidden_dim)
        return 2 * d + 2 * d * qk + 3 * d * v + 2 * (d * h + h) + v + 3 * d * ffn

    # Presets.
    @classmethod
    def xlstm_7b(cls, **overrides) -> xLSTMConfig:
        """xLSTM 7B (NX-AI/xLSTM-7b): 6,865,424,896 parameters; bf16 compute, fp32 params."""
        return cls(**{"dtype": jnp.bfloat16, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> xLSTMConfig:
        """A few-hundred-thousand-parameter model for tests and CPU training (byte vocabulary)."""
        kw = dict(vocab_size=256, embedding_dim=64, num_heads=2, num_blocks=2,
                  mlstm_round_up_to_multiple_of=16, ffn_round_up_to_multiple_of=16,
                  dtype=jnp.float32, chunk_size=16)
        return cls(**{**kw, **overrides})

    @classmethod
    def small(cls, **overrides) -> xLSTMConfig:
        """~77M parameters with the 50304 vocabulary (25.6M without embeddings): d 512, 8 blocks,
        4 heads (K 64, V 128); bf16 compute. A single-GPU demo."""
        kw = dict(embedding_dim=512, num_heads=4, num_blocks=8, dtype=jnp.bfloat16)
        return cls(**{**kw, **overrides})

    @classmethod
    def medium(cls, **overrides) -> xLSTMConfig:
        """~407M parameters with the 50304 vocabulary: d 1024, 24 blocks, 4 heads (K 128, V 256);
        bf16 compute, blocks scanned. A larger single-GPU demo."""
        kw = dict(embedding_dim=1024, num_heads=4, num_blocks=24, dtype=jnp.bfloat16,
                  scan_blocks=True)
        return cls(**{**kw, **overrides})

    @classmethod
    def large(cls, **overrides) -> xLSTMConfig:
        """~1.4B parameters with the 50304 vocabulary (1.21B without embeddings): d 2048, 24
        blocks, 4 heads (K 256, V 512, the 7B's head dims); bf16 compute, blocks scanned."""
        kw = dict(embedding_dim=2048, num_heads=4, num_blocks=24, dtype=jnp.bfloat16,
                  scan_blocks=True)
        return cls(**{**kw, **overrides})

    # Hugging Face config.json.
    _HF_FIELDS = ("vocab_size", "embedding_dim", "num_heads", "num_blocks", "qk_dim_factor",
                  "v_dim_factor", "mlstm_round_up_to_multiple_of", "ffn_proj_factor",
                  "ffn_round_up_to_multiple_of", "gate_soft_cap", "output_logit_soft_cap",
                  "igate_bias_init_range", "norm_eps", "cell_norm_eps", "eps")
    # The fields that fix parameter shapes: a config.json must state them (or the caller pass them),
    # a default would only surface later as a shape error, or not at all.
    _HF_REQUIRED = ("vocab_size", "embedding_dim", "num_heads", "num_blocks", "qk_dim_factor",
                    "v_dim_factor", "mlstm_round_up_to_multiple_of", "ffn_proj_factor",
                    "ffn_round_up_to_multiple_of")
    _HF_NULLABLE = ("gate_soft_cap", "output_logit_soft_cap")   # null: no cap
    _HF_ALIASES = {"embedding_dim": "hidden_size", "num_blocks": "num_hidden_layers"}
    # Variants this module does not implement: field -> the only supported value.
    _HF_UNSUPPORTED = {"use_bias": False, "tie_word_embeddings": False, "add_out_norm": True,
                       "add_post_blocks_norm": True, "add_qk_norm": False, "add_post_norm": False,
                       "weight_mode": "single"}
    # Read elsewhere (head_dim, checked) or ignored on purpose: kernel / backend / runtime options of
    # transformers' and the xlstm package's configs, tokenizer ids and PretrainedConfig bookkeeping.
    _HF_IGNORED = frozenset((
        "head_dim", "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
        "_name_or_path", "auto_map", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
        "sep_token_id", "decoder_start_token_id", "tokenizer_class", "chunkwise_kernel",
        "sequence_kernel", "step_kernel", "mode", "chunk_size", "return_last_states",
        "autocast_kernel_dtype", "inference_state_dtype", "norm_reduction_force_float32",
        "max_inference_chunksize", "add_embedding_dropout", "embedding_dropout",
        "add_forward_backend_padding", "force_bos_token_insert", "forward_backend_name",
        "step_backend_name", "init_distribution", "init_distribution_embed", "output_init_fn",
        "lm_head_dtype", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
        "use_bfloat16", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "tie_encoder_decoder", "id2label", "label2id", "problem_type", "finetuning_task",
        "pruned_heads", "chunk_size_feed_forward", "tf_legacy_loss", "task_specific_params",
        "prefix", "cross_attention_hidden_size", "max_length", "min_length"))

    @classmethod
    def from_hf_config(cls, hf: dict, *, source: str = "config.json", **overrides) -> xLSTMConfig:
        """Builds a config from a Hugging Face xLSTM `config.json` dict (plus JAX-side overrides).

        Every error names `source` (the file) and the field. Reads the architecture fields
        (`embedding_dim`/`hidden_size`, `num_blocks`/`num_hidden_layers` both accepted, a null alias
        counts as absent, two that disagree are an error). The shape fields (`_HF_REQUIRED`) must be
        present (in `hf` or `overrides`); a missing optional field takes its default (those of
        transformers' xLSTMConfig); an explicit null is None for the soft caps (no cap) and an error
        elsewhere. Kernel and tokenizer fields are ignored; other unknown fields (typos) warn.
        Raises a ValueError for a variant this module does not implement (biases, tied embeddings,
        no output norm, qk norm, post norm, fused weights).
        """
        import warnings
        from collections.abc import Mapping

        if not isinstance(hf, Mapping):
            raise ValueError(f"{source}: expected a JSON object of config fields, got "
                             f"{type(hf).__name__}")
        hf = dict(hf)
        kw = {}
        for name in cls._HF_FIELDS:
            alias = cls._HF_ALIASES.get(name)
            if alias is not None:
                given = {k: hf[k] for k in (name, alias) if hf.get(k) is not None}
                if len(given) == 2 and given[name] != given[alias]:
                    raise ValueError(f"{source}: {name}={given[name]!r} and {alias}="
                                     f"{given[alias]!r} disagree (they are the same field)")
                if given:
                    kw[name] = next(iter(given.values()))
                continue
            if name not in hf:
                continue
            value = hf[name]
            if value is None and name not in cls._HF_NULLABLE:
                raise ValueError(f"{source}: {name} is null; expected a number (only "
                                 f"{' and '.join(cls._HF_NULLABLE)} may be null)")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{source}: {name}={value!r} is not a number")
            kw[name] = value
        missing = [n for n in cls._HF_REQUIRED if n not in kw and n not in overrides]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(map(repr, missing))} "
                             f"(they fix the parameter shapes; pass them as overrides if the file "
                             f"lacks them, e.g. mlstm_round_up_to_multiple_of=64 for transformers' "
                             f"xLSTM)")
        for cap in cls._HF_NULLABLE:
            if kw.get(cap) is not None and not kw[cap] > 0:
                raise ValueError(f"{source}: {cap}={kw[cap]!r}: expected a positive number or null")
        known = set(cls._HF_FIELDS) | set(cls._HF_ALIASES.values()) | set(cls._HF_UNSUPPORTED)
        unknown = sorted(k for k in hf if k not in known and k not in cls._HF_IGNORED)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config field(s) "
                          f"{', '.join(map(repr, unknown))}", stacklevel=2)
        for name, want in cls._HF_UNSUPPORTED.items():
            if name in hf and hf[name] != want:
                raise ValueError(f"{source}: {name}={hf[name]!r} is not supported "
                                 f"(tfla_jax.layers implements {name}={want!r})")
        try:
            config = cls(**{**kw, **overrides})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e
        if hf.get("head_dim") not in (None, config.v_head_dim):
            raise ValueError(f"{source}: head_dim={hf['head_dim']} disagrees with the derived "
                             f"v head dim {config.v_head_dim}")
        return config

    def to_hf_config(self) -> dict:
        """The Hugging Face `config.json` fields of this architecture (every one written, a disabled
        soft cap as null), so that `from_hf_config(to_hf_config())` gives the architecture back."""
        hf = {name: getattr(self, name) for name in self._HF_FIELDS}
        hf.update(model_type="xlstm", architectures=["xLSTMForCausalLM"], use_bias=False,
                  tie_word_embeddings=False, add_out_norm=True, weight_mode="single",
                  head_dim=self.v_head_dim)
        return hf


# --------------------------------------------------------------------------------------------
# Init (xLSTM 7B)
# --------------------------------------------------------------------------------------------


def small_init_std(dim: int) -> float:
    """sqrt(2 / (5 d)): q, k, v, output gate, up-projections, embedding and head."""
    return math.sqrt(2.0 / (5.0 * dim))


def wang_init_std(dim: int, num_blocks: int) -> float:
    """2 / (num_blocks sqrt(d)): the projections back into the residual stream."""
    return 2.0 / (num_blocks * math.sqrt(dim))


def _linspace_init(start: float, stop: float):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.linspace(start, stop, shape[-1], dtype=jnp.float32).astype(dtype)
    return init


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


# Up to this vocabulary the embedding's gradient is a one-hot matmul instead of a scatter-add: with
# few rows the scatter's atomic adds collide (the byte-vocabulary medium preset on an H200: 27 ms
# of a 222 ms train step for the scatter, well under 1 ms as a matmul), and the matmul sums in
# float32 where the scatter added in the compute dtype.
ONE_HOT_GRAD_VOCAB = 4096


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _embed_rows(table, tokens, dtype):
    """jnp.take(table.astype(dtype), tokens, axis=0), nnx.Embed's lookup (NaN rows for ids out of
    range, negative ids wrapping); the table's gradient is a one-hot matmul summed in float32."""
    return jnp.take(table.astype(dtype), tokens, axis=0)


def _embed_rows_fwd(table, tokens, dtype):
    # The empty (V, 0) array carries the table's shape and dtype to the backward.
    return _embed_rows(table, tokens, dtype), (tokens, jnp.zeros((table.shape[0], 0), table.dtype))


def _embed_rows_bwd(dtype, saved, g):
    tokens, like = saved
    V = like.shape[0]
    rows = jnp.where(tokens < 0, tokens + V, tokens)          # out of range: an all-zero one-hot
    onehot = jax.nn.one_hot(rows, V, dtype=g.dtype)
    dtable = jnp.einsum("...v,...d->vd", onehot, g, preferred_element_type=jnp.float32)
    return dtable.astype(like.dtype), np.zeros(tokens.shape, jax.dtypes.float0)


_embed_rows.defvjp(_embed_rows_fwd, _embed_rows_bwd)


def embed(embeddings: nnx.Embed, tokens: jax.Array) -> jax.Array:
    """embeddings(tokens), with the matmul gradient for vocabularies <= ONE_HOT_GRAD_VOCAB."""
    if embeddings.num_embeddings > ONE_HOT_GRAD_VOCAB or embeddings.dtype is None:
        return embeddings(tokens)
    return _embed_rows(embeddings.embedding[...], tokens, jnp.dtype(embeddings.dtype))


def _as_token_array(tokens, layout):
    """An array-like of ids (a list, a NumPy array) as a JAX array; ValueError naming `tokens`."""
    if isinstance(tokens, jax.Array):
        return tokens
    try:
        return jnp.asarray(tokens)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tokens: expected integer ids of shape {layout} (an array or nested "
                         f"lists), got {type(tokens).__name__}: {e}") from None


def _check_token_range(name, tokens, vocab_size):
    """Raises a ValueError naming the first id outside [0, vocab_size); a traced array is skipped
    (its values are not known outside jit)."""
    if isinstance(tokens, jax.core.Tracer) or tokens.size == 0:
        return
    ids = np.asarray(tokens)
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = tuple(int(j) for j in np.argwhere(bad)[0])
        raise ValueError(f"{name}: ids must be in [0, vocab_size) = [0, {vocab_size}), got "
                         f"{int(ids[where])} at index {where} ({int(bad.sum())} out of range)")



class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis; float32 reduction, no bias.

    Input (..., dim) any float dtype; output in `dtype` (default: the input's).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * self.weight[...].astype(jnp.float32)
        return y.astype(x.dtype if self.dtype is None else self.dtype)


class MultiHeadLayerNorm(nnx.Module):
    """Layer norm per head over V (mean subtracted, biased variance), weight only, float32 maths.

    Input (..., H, V); output (..., H * V) in `dtype` (default: the input's); weight (H * V,).
    """

    def __init__(self, num_heads: int, head_dim: int, *, eps: float = 1e-6, dtype=None,
                 param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((num_heads * head_dim,), param_dtype))
        self.num_heads, self.head_dim = num_heads, head_dim
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(f"MultiHeadLayerNorm: expected (..., {self.num_heads}, {self.head_dim}), "
                             f"got shape {x.shape}")
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
        y = y.reshape(*x.shape[:-2], self.num_heads * self.head_dim)
        y = y * self.weight[...].astype(jnp.float32)
        return y.astype(x.dtype if self.dtype is None else self.dtype)


def _linear(cfg: xLSTMConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _gate_linear(cfg: xLSTMConfig, bias_init, rngs: nnx.Rngs) -> nnx.Linear:
    # Gate pre-activations are computed in float32 at full precision (no TF32 / bf16 rounding).
    return nnx.Linear(cfg.embedding_dim, cfg.num_heads, use_bias=True, dtype=jnp.float32,
                      param_dtype=cfg.param_dtype, precision=lax.Precision.HIGHEST,
                      kernel_init=nnx.initializers.zeros_init(), bias_init=bias_init, rngs=rngs)


class mLSTMLayer(nnx.Module):  # noqa: N801
    """The xLSTM 7B mLSTM layer (no convolution, no up-projection): (B, T, d) -> (B, T, d).

    Parameters (HF names): q, k (d -> qk_dim), v, ogate_preact (d -> v_dim), igate_preact,
    fgate_preact (d -> H, with bias), multihead_norm (v_dim,), out_proj (v_dim -> d).
    """

    def __init__(self, config: xLSTMConfig, *, rngs: nnx.Rngs):
        cfg = config
        d = cfg.embedding_dim
        small = small_init_std(d)
        self.config = cfg
        self.q = _linear(cfg, d, cfg.qk_dim, small, rngs)
        self.k = _linear(cfg, d, cfg.qk_dim, small, rngs)
        self.v = _linear(cfg, d, cfg.v_dim, small, rngs)
        self.ogate_preact = _linear(cfg, d, cfg.v_dim, small, rngs)
        self.igate_preact = _gate_linear(
            cfg, nnx.initializers.constant(cfg.igate_bias_init_range), rngs)
        self.fgate_preact = _gate_linear(cfg, _linspace_init(3.0, 6.0), rngs)
        self.multihead_norm = MultiHeadLayerNorm(cfg.num_heads, cfg.v_head_dim,
                                                 eps=cfg.cell_norm_eps, dtype=cfg.dtype,
                                                 param_dtype=cfg.param_dtype)
        self.out_proj = _linear(cfg, cfg.v_dim, d, wang_init_std(d, cfg.num_blocks), rngs)

    def _project(self, x):
        """x (..., d) -> q, k (..., H, K); v (..., H, V); o (..., v_dim); i, f (..., H) float32."""
        cfg = self.config
        heads = x.shape[:-1] + (cfg.num_heads,)
        q = self.q(x).reshape(*heads, cfg.qk_head_dim)
        k = self.k(x).reshape(*heads, cfg.qk_head_dim)
        v = self.v(x).reshape(*heads, cfg.v_head_dim)
        o = self.ogate_preact(x)
        i = soft_cap(self.igate_preact(x), cfg.gate_soft_cap)
        f = soft_cap(self.fgate_preact(x), cfg.gate_soft_cap)
        return q, k, v, o, i, f

    def _output(self, h, o):
        """h (..., H, V) cell output, o (..., v_dim) output-gate pre-activation -> (..., d)."""
        return self.out_proj(jax.nn.sigmoid(o) * self.multihead_norm(h))

    def __call__(self, x: jax.Array, state: MLSTMState | None = None, *,
                 return_state: bool = False, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> tuple[jax.Array, MLSTMState | None]:
        """x (B, T, d); state: optional initial MLSTMState (c (B,H,K,V), n (B,H,K), m (B,H));
        segment_ids: optional (B, T) integers of packed sequences (`tfla_jax.mlstm`);
        context_axis: inside shard_map, the mesh axis T is split over (`tfla_jax.mlstm`).

        Returns (y (B, T, d) in config.dtype, final MLSTMState float32 if return_state else None).
        """
        cfg = self.config
        q, k, v, o, i, f = self._project(x)
        h, state = api.mlstm(q, k, v, i, f, initial_state=state, return_state=return_state,
                             eps=cfg.eps, chunk_size=cfg.chunk_size,
                             implementation=cfg.mlstm_implementation, segment_ids=segment_ids,
                             interpret=cfg.interpret or None, context_axis=context_axis)
        return self._output(h, o), state

    def step(self, x: jax.Array, state: MLSTMState | None) -> tuple[jax.Array, MLSTMState]:
        """One decoding step: x (B, d) -> (y (B, d), new MLSTMState); state None means zeros."""
        q, k, v, o, i, f = self._project(x)
        h, state = api.mlstm_step(q, k, v, i, f, state, eps=self.config.eps)
        return self._output(h, o), state


class FeedForward(nnx.Module):
    """SwiGLU: proj_down(silu(proj_up_gate(x)) * proj_up(x)), d -> ffn_hidden_dim -> d, no biases."""

    def __init__(self, config: xLSTMConfig, *, rngs: nnx.Rngs):
        cfg = config
        d, hidden = cfg.embedding_dim, cfg.ffn_hidden_dim
        self.proj_up_gate = _linear(cfg, d, hidden, small_init_std(d), rngs)
        self.proj_up = _linear(cfg, d, hidden, small_init_std(d), rngs)
        self.proj_down = _linear(cfg, hidden, d, wang_init_std(d, cfg.num_blocks), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_down(jax.nn.silu(self.proj_up_gate(x)) * self.proj_up(x))


class mLSTMBlock(nnx.Module):  # noqa: N801
    """Pre-norm residual block: x = x + mLSTM(RMSNorm(x)); x = x + FFN(RMSNorm(x))."""

    def __init__(self, config: xLSTMConfig, *, rngs: nnx.Rngs):
        cfg = config
        norm = functools.partial(RMSNorm, cfg.embedding_dim, eps=cfg.norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype)
        self.norm_mlstm = norm()
        self.mlstm_layer = mLSTMLayer(cfg, rngs=rngs)
        self.norm_ffn = norm()
        self.ffn = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, state: MLSTMState | None = None, *,
                 return_state: bool = False, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> tuple[jax.Array, MLSTMState | None]:
        """x (B, T, d) -> (x (B, T, d), final MLSTMState or None); as `mLSTMLayer.__call__`.
        Only the mLSTM mixes positions (norms and the FFN act per position)."""
        h, state = self.mlstm_layer(self.norm_mlstm(x), state, return_state=return_state,
                                    segment_ids=segment_ids, context_axis=context_axis)
        x = x + h
        return x + self.ffn(self.norm_ffn(x)), state

    def step(self, x: jax.Array, state: MLSTMState | None) -> tuple[jax.Array, MLSTMState]:
        """One decoding step: x (B, d) -> (x (B, d), new MLSTMState)."""
        h, state = self.mlstm_layer.step(self.norm_mlstm(x), state)
        x = x + h
        return x + self.ffn(self.norm_ffn(x)), state


class xLSTMLM(nnx.Module):  # noqa: N801
    """The xLSTM language model: embeddings, num_blocks mLSTMBlocks, out_norm, lm_head.

    Build: `model = xLSTMLM(xLSTMConfig.tiny(), rngs=nnx.Rngs(0))` (xLSTM 7B init), or abstractly
    with `nnx.eval_shape(lambda: xLSTMLM(cfg, rngs=nnx.Rngs(0)))`. Parameters: `nnx.state(model,
    nnx.Param)`; put them back with `nnx.update(model, params)`. With `config.scan_blocks` the
    blocks' parameters are stacked (`model.blocks` is one mLSTMBlock whose arrays have a leading
    num_blocks axis); otherwise `model.blocks[i]`.
    """

    def __init__(self, config: xLSTMConfig, *, rngs: nnx.Rngs):
        cfg = config
        d = cfg.embedding_dim
        self.config = cfg
        self.embeddings = nnx.Embed(cfg.vocab_size, d, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                    embedding_init=nnx.initializers.normal(small_init_std(d)),
                                    rngs=rngs)
        if cfg.scan_blocks:
            @nnx.split_rngs(splits=cfg.num_blocks)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs):
                return mLSTMBlock(cfg, rngs=rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([mLSTMBlock(cfg, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.out_norm = RMSNorm(d, eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        # float32 logits from the dtype matmul (fp32 accumulation).
        self.lm_head = nnx.Linear(d, cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                                  param_dtype=cfg.param_dtype, preferred_element_type=jnp.float32,
                                  kernel_init=nnx.initializers.normal(small_init_std(d)), rngs=rngs)

    def init_state(self, batch: int) -> MLSTMState:
        """The zero state for `batch` sequences: c (NB, B, H, K, V), n (NB, B, H, K), m (NB, B, H)."""
        cfg = self.config
        lead = (cfg.num_blocks, batch, cfg.num_heads)
        return MLSTMState(c=jnp.zeros(lead + (cfg.qk_head_dim, cfg.v_head_dim), jnp.float32),
                          n=jnp.zeros(lead + (cfg.qk_head_dim,), jnp.float32),
                          m=jnp.zeros(lead, jnp.float32))

    def _check_state(self, state, batch):
        if state is None:
            return
        cfg = self.config
        lead = (cfg.num_blocks, batch, cfg.num_heads)
        shapes = {"c": lead + (cfg.qk_head_dim, cfg.v_head_dim), "n": lead + (cfg.qk_head_dim,),
                  "m": lead}
        if not isinstance(state, MLSTMState):
            raise ValueError(f"state: expected an MLSTMState (see xLSTMLM.init_state), got "
                             f"{type(state).__name__}")
        for name, shape in shapes.items():
            got = getattr(state, name)
            if tuple(got.shape) != shape:
                raise ValueError(f"state.{name}: expected shape {shape} (num_blocks, B, H, ...), "
                                 f"got {tuple(got.shape)}")

    def _check_tokens(self, tokens, rank):
        """tokens as a JAX integer array of the given rank (T >= 1); concrete ids must be in
        [0, vocab_size) (traced ones cannot be checked, see `__call__`)."""
        layout = "(B, T)" if rank == 2 else "(B,)"
        tokens = _as_token_array(tokens, layout)
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != rank:
            raise ValueError(f"tokens: expected integer ids of shape {layout}, got shape "
                             f"{tuple(tokens.shape)} dtype {tokens.dtype}")
        if rank == 2 and tokens.shape[1] < 1:
            raise ValueError(f"tokens: expected shape (B, T) with T >= 1, got shape "
                             f"{tuple(tokens.shape)}")
        _check_token_range("tokens", tokens, self.config.vocab_size)
        return tokens

    def _run_blocks(self, x, state, *, step: bool, return_state: bool, segment_ids=None,
                    context_axis=None):
        cfg = self.config

        def apply(block, x, s):
            if step:
                return block.step(x, s)
            return block(x, s, return_state=return_state, segment_ids=segment_ids,
                         context_axis=context_axis)

        if cfg.remat and not step:
            apply = nnx.remat(apply, prevent_cse=not cfg.scan_blocks,
                              policy=REMAT_POLICIES[cfg.remat_policy])
        if cfg.scan_blocks:
            def body(x, block, s):
                return apply(block, x, s)

            return nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(
                x, self.blocks, state)
        states = []
        for idx, block in enumerate(self.blocks):
            s = None if state is None else jax.tree.map(lambda a, idx=idx: a[idx], state)
            x, s = apply(block, x, s)
            states.append(s)
        if states[0] is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *states)

    def _step_per_block(self, tokens, states):
        """`step` on a model with a list of blocks (`_decode_form`) and a list of per-block states:
        no slicing or stacking of stacked arrays. tokens (B,) -> (logits (B, vocab), states)."""
        x = embed(self.embeddings, tokens)
        new = []
        for block, s in zip(self.blocks, states, strict=True):
            x, s = block.step(x, s)
            new.append(s)
        return self._logits(x), new

    def _logits(self, x):
        logits = self.lm_head(self.out_norm(x)).astype(jnp.float32)
        return soft_cap(logits, self.config.output_logit_soft_cap)

    def loss(self, tokens: jax.Array, targets: jax.Array, *, chunk: int | None = None,
             segment_ids: jax.Array | None = None,
             context_axis: str | None = None) -> jax.Array:
        """Mean next-token cross-entropy (nats) of targets (B, T) given tokens (B, T); the
        arguments as in `__call__`. With `chunk` (a divisor of T) the logits are formed and
        reduced chunk positions at a time in a rematerialised `lax.scan`: (B, chunk, vocab)
        float32 at once, never (B, T, vocab); equal to the full form up to float32 rounding."""
        tokens = self._check_tokens(tokens, 2)
        x = embed(self.embeddings, tokens)
        x, _ = self._run_blocks(x, None, step=False, return_state=False,
                                segment_ids=segment_ids, context_axis=context_axis)
        B, T = targets.shape
        if chunk is None or chunk >= T:
            return _cross_entropy(self._logits(x), targets).sum() / (B * T)
        if T % chunk:
            raise ValueError(f"loss: chunk {chunk} does not divide T = {T}")

        @jax.checkpoint
        def chunk_loss(x, y):                                    # (B, chunk, d), (B, chunk)
            return _cross_entropy(self._logits(x), y).sum()

        def body(total, xy):
            return total + chunk_loss(*xy), None

        split = lambda a: jnp.moveaxis(a.reshape(B, T // chunk, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
        total, _ = lax.scan(body, jnp.zeros((), jnp.float32), (split(x), split(targets)))
        return total / (B * T)

    def __call__(self, tokens: jax.Array, state: MLSTMState | None = None, *,
                 return_state: bool = False, segment_ids: jax.Array | None = None,
                 context_axis: str | None = None) -> tuple[jax.Array, MLSTMState | None]:
        """Forward over a sequence (training, scoring, prefill).

        Args:
          tokens: (B, T) integer ids in [0, vocab_size), any T >= 1 (an array or nested lists).
            Concrete ids are checked (ValueError naming the first bad one). Under jit they cannot
            be: an id >= vocab_size or < -vocab_size embeds as NaN (`jnp.take`'s fill mode), so
            its logits and those of every later position of its row are NaN (the state carries
            the NaN); an id in [-vocab_size, 0) wraps around (-1 reads row vocab_size - 1).
          state: optional initial state (see `init_state`); None means zeros.
          return_state: also return the final state (to continue with `step` or another call).
          segment_ids: optional (B, T) integers of packed documents: where the id changes, every
            block's state restarts from zero (`tfla_jax.mlstm`); `state` applies to each row's
            first document, the returned state is that of its last.
          context_axis: context parallelism: inside `jax.shard_map`, the mesh axis that T (of
            tokens, segment_ids) is split over, device d holding the d-th block of positions
            (`tfla_jax.mlstm`); logits are those of the local block.
        Returns:
          (logits (B, T, vocab_size) float32 soft-capped, final MLSTMState or None).
        """
        tokens = self._check_tokens(tokens, 2)
        self._check_state(state, tokens.shape[0])
        x = embed(self.embeddings, tokens)
        x, state = self._run_blocks(x, state, step=False, return_state=return_state,
                                    segment_ids=segment_ids, context_axis=context_axis)
        return self._logits(x), state

    def step(self, tokens: jax.Array, state: MLSTMState | None) -> tuple[jax.Array, MLSTMState]:
        """One decoding step with `tfla_jax.mlstm_step`: tokens (B,) -> (logits (B, vocab) float32,
        new state). `step` after `__call__(..., return_state=True)` equals one longer `__call__`.
        Token ids are checked as in `__call__` (under jit a bad id gives NaN logits and state)."""
        tokens = self._check_tokens(tokens, 1)
        if state is None:
            state = self.init_state(tokens.shape[0])
        self._check_state(state, tokens.shape[0])
        x = embed(self.embeddings, tokens)
        x, state = self._run_blocks(x, state, step=True, return_state=True)
        return self._logits(x), state


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _cross_entropy(logits, targets):
    """-log softmax(logits)[target] per position: logits (..., vocab) float32, targets (...)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float | jax.Array = 1.0,
                  top_k: int | None = None, greedy: bool | jax.Array = False) -> jax.Array:
    """Next tokens from logits (B, vocab): argmax where greedy, else a sample of
    softmax(logits / temperature) restricted to the top_k largest (all when top_k is None).
    temperature and greedy may be traced (no recompilation); top_k is static. Returns (B,) int32."""
    logits = logits.astype(jnp.float32)
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(greedy, bool) and greedy:
        return best
    scaled = logits / temperature
    if top_k is not None:
        kth = lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(greedy, best, drawn)


def _matmul(x, kernel, **kw):
    """x (..., d_in) @ kernel (d_in, d_out), as nnx.Linear contracts."""
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kw)


def _concat_kernels(linears, dtype):
    """The (d_in, sum of d_out) kernel of nnx.Linears on one input, in `dtype`."""
    return jnp.concatenate([lin.kernel[...].astype(dtype) for lin in linears], axis=-1)


class _DecodeMLSTMLayer(nnx.Module):  # noqa: N801
    """`mLSTMLayer` with the four wide input projections in one matmul (the inference form's
    layer): kernel (d, 2 qk_dim + 2 v_dim) = [q | k | v | ogate_preact] in the compute dtype, and
    the two gates in a second, gate_kernel (d, 2 H) = [igate | fgate].

    The gates are float32 dots at HIGHEST of x and kernel cast to float32. Where x and the gate
    kernels are exact in a 16-bit compute dtype (parameters in it) that is the arithmetic of a
    16-bit dot with float32 accumulation, and gate_kernel is kept in that dtype. The wide dot has
    its own (16-bit) output: at batch 1 a float32-out dot of this width reads its weight at ~2.2
    TB/s against ~3.2 TB/s for the 16-bit one (H200), and decode reads every weight once a step.
    """

    def __init__(self, layer: mLSTMLayer):
        cfg = layer.config
        self.config = cfg
        self.multihead_norm, self.out_proj = layer.multihead_norm, layer.out_proj
        self.kernel = nnx.Param(_concat_kernels(
            [layer.q, layer.k, layer.v, layer.ogate_preact], cfg.dtype))
        gates = [layer.igate_preact, layer.fgate_preact]
        self.exact_gates = cfg.dtype.itemsize == 2 and cfg.param_dtype == cfg.dtype
        self.gate_kernel = nnx.Param(_concat_kernels(
            gates, cfg.dtype if self.exact_gates else jnp.float32))
        self.gate_bias = nnx.Param(jnp.concatenate([g.bias[...].astype(jnp.float32)
                                                    for g in gates]))

    def _project(self, x):
        """As `mLSTMLayer._project`, from two matmuls."""
        cfg = self.config
        qk, v_dim, H = cfg.qk_dim, cfg.v_dim, cfg.num_heads
        x = x.astype(cfg.dtype)
        # One rounding of q, k, v, o to dtype, as their Linears' dtype-out dots.
        q, k, v, o = jnp.split(_matmul(x, self.kernel[...]), [qk, 2 * qk, 2 * qk + v_dim],
                               axis=-1)
        if self.exact_gates:
            g = _matmul(x, self.gate_kernel[...], preferred_element_type=jnp.float32)
        else:
            g = _matmul(x.astype(jnp.float32), self.gate_kernel[...],
                        precision=lax.Precision.HIGHEST)
        g = soft_cap(g + self.gate_bias[...], cfg.gate_soft_cap)
        heads = x.shape[:-1] + (H,)
        return (q.reshape(*heads, cfg.qk_head_dim), k.reshape(*heads, cfg.qk_head_dim),
                v.reshape(*heads, cfg.v_head_dim), o, g[..., :H], g[..., H:])

    # The sequence call and the step of mLSTMLayer, on the fused projections.
    __call__ = mLSTMLayer.__call__
    step = mLSTMLayer.step
    _output = mLSTMLayer._output     # the same out_proj and multihead_norm, by the same names


class _DecodeFeedForward(nnx.Module):
    """`FeedForward` with proj_up_gate and proj_up in one matmul (the decode form's FFN):
    kernel (d, 2 ffn_hidden_dim) = [proj_up_gate | proj_up] in the compute dtype."""

    def __init__(self, ffn: FeedForward):
        self.dtype = ffn.proj_up.dtype
        self.kernel = nnx.Param(_concat_kernels([ffn.proj_up_gate, ffn.proj_up], self.dtype))
        self.proj_down = ffn.proj_down

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(_matmul(x.astype(self.dtype), self.kernel[...]), 2, axis=-1)
        return self.proj_down(jax.nn.silu(gate) * up)


def inference_form(model: xLSTMLM) -> xLSTMLM:
    """The model as `generate` runs it, for serving: convert once, then prefill (`model(tokens)`),
    `step` and `generate` on it run without copying a weight. The blocks are a list (no slice of
    stacked parameters: each is a copy of the weight it reads), every matmul weight is in its
    layer's compute dtype, and the matmuls on one input are one (the four wide input projections
    of an mLSTM layer, with its two gates in a second; the two up-projections of an FFN). The
    same results as `model` up to float32 rounding (the fused dots); its parameters are no
    longer the checkpoint layout, so train and save the original. The caller's model is unchanged; a converted model is returned as is."""
    return _decode_form(model, fuse=True)


def _is_inference_form(model: xLSTMLM) -> bool:
    return (not model.config.scan_blocks
            and isinstance(model.blocks[0].mlstm_layer, _DecodeMLSTMLayer))


def _decode_form(model: xLSTMLM, *, fuse: bool = False) -> xLSTMLM:
    """The model as the decode loop runs it (inside jit; the same values, the same results):
    the blocks as a list (stacked parameters sliced once here, not by every step: inside the
    token loop a slice of a stacked weight is a copy of it, 3x the weight bytes per step), every
    matmul weight already in its layer's compute dtype (not cast by every step), and, with
    `fuse` or where these copy the weights anyway (`scan_blocks` or a cast), the matmuls on one
    input concatenated (`_DecodeMLSTMLayer`, `_DecodeFeedForward`: fewer kernels per step):
    inside `generate` at most one copy of the blocks' matmul weights, none for a list of blocks
    whose parameters are in the compute dtype (its layers run unfused on their own arrays) or
    for a model already in `inference_form`."""
    if _is_inference_form(model):
        return model
    model = nnx.merge(*nnx.split(model))                      # a copy: the caller's is unchanged
    cfg = model.config
    if cfg.scan_blocks:
        graphdef, stacked = nnx.split(model.blocks)
        model.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
                                 for i in range(cfg.num_blocks)])
        model.config = dataclasses.replace(cfg, scan_blocks=False)
    for _, module in nnx.iter_graph(model):
        # Both modules cast these to `dtype` at every call (promote_dtype): casting once is equal.
        if isinstance(module, nnx.Linear) and module.dtype is not None:
            module.kernel.value = module.kernel.value.astype(module.dtype)
        elif isinstance(module, nnx.Embed) and module.dtype is not None:
            module.embedding.value = module.embedding.value.astype(module.dtype)
    if fuse or cfg.scan_blocks or cfg.param_dtype != cfg.dtype:
        for block in model.blocks:
            block.mlstm_layer = _DecodeMLSTMLayer(block.mlstm_layer)
            block.ffn = _DecodeFeedForward(block.ffn)
    return model


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "max_new_tokens", "top_k"))
def _generate(graphdef, variables, prompt, segment_ids, key, temperature, greedy, eos, *,
              max_new_tokens, top_k):
    """eos < 0 means no end-of-sequence token; greedy a Python bool (a traced one would draw a
    sample, a loop of random bits over the vocabulary, at every step only to drop it).
    Returns (tokens (B, max_new_tokens), state)."""
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, greedy=greedy)
    keys = None if greedy else jax.random.split(key, max_new_tokens)
    # Prefill and decode on the decode form: one copy of weights per call at most (none when
    # the model is in inference_form), where slicing stacked blocks copies them in the prefill.
    model = _decode_form(nnx.merge(graphdef, variables))
    logits, state = model(prompt, return_state=True, segment_ids=segment_ids)   # prefill
    first = sample(logits[:, -1], None if greedy else keys[0])
    done = (eos >= 0) & (first == eos)
    decode_graphdef, decode_variables = nnx.split(model)
    states = [jax.tree.map(lambda a, b=b: a[b], state) for b in range(model.config.num_blocks)]

    def decode(carry, key):
        # The variables ride in the carry (unchanged) so that the module is merged from values of
        # this trace level; the state rides as one MLSTMState per block (updated in place).
        variables, token, states, done = carry
        logits, states = nnx.merge(decode_graphdef, variables)._step_per_block(token, states)
        token = jnp.where(done, eos, sample(logits, key))
        done = done | ((eos >= 0) & (token == eos))
        return (variables, token, states, done), token

    (_, _, states, _), rest = lax.scan(decode, (decode_variables, first, states, done),
                                       None if greedy else keys[1:], length=max_new_tokens - 1)
    state = jax.tree.map(lambda *a: jnp.stack(a), *states)
    return jnp.concatenate([first[:, None], rest.T], axis=1), state


def generate(model: xLSTMLM, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, rng: jax.Array | None = None,
             eos_token_id: int | None = None, return_state: bool = False,
             prompt_lengths: jax.Array | None = None):
    """Autoregressive generation: prefill the prompt through the sequence path (the TFLA kernels),
    then a `lax.scan` of `mlstm_step` decode steps, all in one compiled program. The decode loop
    runs the blocks unrolled on per-block weights already in the compute dtype (`_decode_form`):
    a model with `scan_blocks` or parameters in another dtype than the compute dtype holds a
    second copy of its block weights meanwhile, in which the matmuls on one input are one matmul.

    Args:
      model: an xLSTMLM.
      prompt: (B, T0) integer ids in [0, vocab_size), T0 >= 1 (checked; ValueError naming a
        bad id).
      prompt_lengths: optional (B,) ints in [1, T0]: row b's prompt is prompt[b, :len_b] (the
        rest is padding). Each row then equals generating its prompt alone: the prompt is moved
        to the end of the row and the padding before it is a separate packed sequence.
      max_new_tokens: number of tokens to generate (an int >= 1; NumPy ints too, not bools).
      temperature: a finite float >= 0; 0.0 is greedy (argmax); > 0 samples from
        softmax(logits / temperature).
      top_k: sample only among the k most likely tokens (None: all). top_k=1 is greedy.
      rng: a jax.random key; required when temperature > 0.
      eos_token_id: once a row emits it, the rest of that row is filled with it.
      return_state: also return the state after the prompt and all generated tokens but the last
        (so `model.step(tokens[:, -1], state)` continues the generation).
    Returns:
      tokens (B, max_new_tokens) int32 (the prompt not included), and the state if return_state.
    """
    try:
        prompt = jnp.asarray(prompt)
    except (TypeError, ValueError) as e:
        raise ValueError(f"prompt: expected integer ids of shape (B, T0), got "
                         f"{type(prompt).__name__}: {e}") from None
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt: expected integer ids of shape (B, T0) with T0 >= 1, got shape "
                         f"{tuple(prompt.shape)} dtype {prompt.dtype}")
    vocab = model.config.vocab_size
    _check_token_range("prompt", prompt, vocab)
    n = api._real_scalar(max_new_tokens, integer=True)
    if n is None or n < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    max_new_tokens = n
    t = api._real_scalar(temperature)
    if t is None or not (math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature: expected a finite float >= 0, got {temperature!r}")
    temperature = t
    if top_k is not None:
        k = api._real_scalar(top_k, integer=True)
        if k is None or not 1 <= k <= vocab:
            raise ValueError(f"top_k: expected None or an int in [1, {vocab}], got {top_k!r}")
        top_k = k
    greedy = temperature == 0 or top_k == 1
    if greedy:
        top_k = None                      # one compiled program serves every greedy call
    if rng is None:
        if not greedy:
            raise ValueError("rng: a jax.random key is needed when temperature > 0")
        rng = jax.random.key(0)
    if eos_token_id is not None:
        e = api._real_scalar(eos_token_id, integer=True)
        if e is None or not 0 <= e < vocab:
            raise ValueError(f"eos_token_id: expected None or an int in [0, {vocab}), got "
                             f"{eos_token_id!r}")
        eos_token_id = e
    prompt, segment_ids = _align_prompts(prompt.astype(jnp.int32), prompt_lengths)
    graphdef, variables = nnx.split(model)
    tokens, state = _generate(graphdef, variables, prompt, segment_ids, rng,
                              jnp.float32(temperature if temperature > 0 else 1.0),
                              greedy, jnp.int32(-1 if eos_token_id is None else eos_token_id),
                              max_new_tokens=max_new_tokens, top_k=top_k)
    return (tokens, state) if return_state else tokens


def _align_prompts(prompt, prompt_lengths):
    """Right-aligns prompts of different lengths; segment ids put the padding in its own sequence."""
    if prompt_lengths is None:
        return prompt, None
    B, T0 = prompt.shape
    lengths = np.asarray(prompt_lengths)
    if (lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer)
            or lengths.min() < 1 or lengths.max() > T0):
        raise ValueError(f"prompt_lengths: expected {B} ints in [1, {T0}], got "
                         f"{np.asarray(prompt_lengths)!r}")
    shift = jnp.asarray(T0 - lengths, jnp.int32)
    t = jnp.arange(T0)
    aligned = jnp.take_along_axis(prompt, (t[None, :] - shift[:, None]) % T0, axis=1)
    return aligned, (t[None, :] >= shift[:, None]).astype(jnp.int32)
