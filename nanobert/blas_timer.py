"""How fast MLX's matmuls are on one BLAS library, on one thread: `python -m nanobert.blas_timer
LIB` prints the seconds of the best of 5 runs of one shard's GEMMs (2 x 384 tokens, MiniLM's
sizes), as MLX calls them in QA inference and in training. mlx_cpu.py runs it once per
candidate library, each in a fresh process with NANOBERT_BLAS=LIB (a BLAS is chosen before MLX
loads, once per process), and gives MLX the fastest. One thread, as MLX calls its BLAS from one
stream per core."""

import os
import sys
import time

if __name__ == "__main__":
    os.environ.update(NANOBERT_BLAS=sys.argv[1], NANOBERT_MLX_STREAMS="1")
    from nanobert import mlx_cpu

    import mlx.core as mx

    if mlx_cpu.loaded_blas() != sys.argv[1]:
        sys.exit(f"{sys.argv[1]}: could not load it")
    mlx_cpu.set_blas_threads(1)
    normal = mx.random.normal
    x, dy, h = normal((768, 384)), normal((768, 1536)), normal((768, 1536))
    xt, w_qkv, w_up, w_down = normal((2, 384, 384)), normal((1152, 384)), normal((1536, 384)), normal((384, 1536))
    q, k = normal((2, 12, 32, 384)), normal((2, 12, 32, 384))
    mx.eval(x, dy, h, xt, w_qkv, w_up, w_down, q, k)

    def shard():
        return [w_qkv @ xt,  # Q, K, V from x transposed (inference, model_mlx.linear_t)
                k.transpose(0, 1, 3, 2) @ q,  # attention scores, 24 heads
                x @ w_up.T, h @ w_down.T,  # the FFN
                dy.T @ x]  # a weight gradient (training)

    mx.eval(shard())  # warm-up: threads, packing buffers, page faults
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(shard())
        best = min(best, time.perf_counter() - start)
    print(best)
