"""A small end-to-end demo: every implementation on the same inputs, errors vs the scan, timings."""

import time

import jax
import jax.numpy as jnp

import tfla_jax


def main(B=2, T=1024, H=4, K=64, V=128):
    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (B, T, H, K))
    k = jax.random.normal(keys[1], (B, T, H, K))
    v = jax.random.normal(keys[2], (B, T, H, V))
    i = jax.random.normal(keys[3], (B, T, H))
    f = jax.random.normal(keys[4], (B, T, H)) + 3.0
    print(f"backend {jax.default_backend()}, B={B} T={T} H={H} K={K} V={V}")
    h_ref = None
    kernels = tfla_jax.available_backends() if jax.default_backend() == "gpu" else []
    impls = ["recurrent", "parallel", "chunkwise", *kernels]
    for impl in impls:
        fn = jax.jit(lambda *a, impl=impl: tfla_jax.mlstm(*a, implementation=impl)[0])
        h = jax.block_until_ready(fn(q, k, v, i, f))
        t0 = time.perf_counter()
        for _ in range(5):
            h = jax.block_until_ready(fn(q, k, v, i, f))
        ms = (time.perf_counter() - t0) / 5 * 1e3
        h_ref = h if h_ref is None else h_ref
        err = float(jnp.linalg.norm(h - h_ref) / jnp.linalg.norm(h_ref))
        print(f"{impl:>10}: {ms:8.2f} ms   rel. error vs scan {err:.1e}")


if __name__ == "__main__":
    main()
