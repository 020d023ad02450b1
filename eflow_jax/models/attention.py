"""The one attention dispatch function: cuDNN on GPU, Pallas splash on TPU, XLA on CPU.

Every attention in the model (local tiles, pooled global keys, full attention, cross
attention) calls `attend`. Tiles are folded into the batch dimension by the caller, so this
function only ever sees dense [B, L, H, D] problems.

Why cuDNN is the GPU default: on an H100 (jax 0.11.2, bf16, B2 L8192 H12 D64) the XLA path ran
forward+backward at 72 TFLOP/s against cuDNN's 453, ~7x slower, and runs out of memory at larger
sizes. cuDNN needs bf16/fp16 inputs and head_dim <= 128 divisible by 8; `check_supported` raises
before any compile when the config cannot meet that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "splash")
KV_ALIGN = 16  # Padded text keys are rounded up to this many (cuDNN wants an even count; 16 aligns tiles).


def default_implementation(backend: str | None = None) -> str:
    """The fast path for the current backend: cudnn on GPU, splash on TPU, xla elsewhere."""
    backend = backend or jax.default_backend()
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend, "xla")


def resolve(implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention_impl={implementation!r}; choose one of {IMPLEMENTATIONS}.")
    return default_implementation() if implementation == "auto" else implementation


def check_supported(implementation: str, head_dim: int, dtype) -> None:
    """Raises a config error for combinations the chosen kernel cannot run."""
    impl = resolve(implementation)
    if impl == "cudnn":
        if head_dim > 128 or head_dim % 8:
            raise ValueError(
                f"cuDNN attention needs head_dim <= 128 and divisible by 8, got {head_dim}; change "
                f"model.width / model.heads, or set model.attention_impl='xla' (7x slower on H100)."
            )
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"cuDNN attention needs bf16/fp16 compute, got model.dtype={jnp.dtype(dtype).name}; "
                f"set model.dtype='bfloat16' or model.attention_impl='xla'."
            )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    mask: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention softmax(q k^T / sqrt(d)) v.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
      implementation: 'auto' | 'cudnn' | 'xla' | 'splash'.
      mask: optional boolean [B, 1, Lq, Lk] (True = attend); used by the unstructured-drop
        fallback only.
      kv_lengths: optional int32 [B]: attend to the first kv_lengths[b] keys only (padded text).
    Returns:
      [B, Lq, H, D] in q's dtype.
    """
    impl = resolve(implementation)
    if kv_lengths is not None and k.shape[1] % KV_ALIGN:
        # cuDNN's masked (padded-length) kernel needs an even key count, so 77-token captions stop it
        # ("Unsupported sequence length Q 2048, KV 77" on an H200); keys past the lengths are never
        # attended to, so padding them changes nothing, on any backend.
        pad = ((0, 0), (0, KV_ALIGN - k.shape[1] % KV_ALIGN), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    if impl == "splash":
        if mask is None and kv_lengths is None and _splash_fits(q.shape[1], k.shape[1]):
            return splash_attention(q, k, v, interpret=jax.default_backend() != "tpu")
        impl = "xla"  # Splash wants 128-multiples; tiles, pooled keys and text are smaller.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation=impl)


def _splash_fits(lq: int, lk: int) -> bool:
    return lq % 128 == 0 and lk % 128 == 0


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """Non-causal Pallas splash attention, vmapped over the batch ([B, L, H, D] layout)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # TPU-only import, kept lazy.
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, lq, heads, d = q.shape
    lk = k.shape[1]
    block = min(512, lq, lk)
    kernel = _splash_kernel(sk, sm, heads, lq, lk, block, interpret)
    scale = d**-0.5
    qt, kt, vt = (a.transpose(0, 2, 1, 3) for a in (q * scale, k, v))  # -> [B, H, L, D]
    return jax.vmap(kernel)(qt, kt, vt).transpose(0, 2, 1, 3).astype(q.dtype)


@functools.lru_cache(maxsize=32)
def _splash_kernel(sk, sm, heads, lq, lk, block, interpret):
    mask = sm.MultiHeadMask([sm.FullMask((lq, lk)) for _ in range(heads)])
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return sk.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )
