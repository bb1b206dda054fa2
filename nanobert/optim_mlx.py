"""AdamW and gradient clipping by hand, in MLX: the MLX twin of optim_torch.py.

AdamW (Loshchilov & Hutter, 2019) is Adam whose weight decay shrinks the weights
directly ("decoupled") instead of being added to the gradient, where Adam's per-weight
scaling would weaken it for weights with large gradients. The update, per parameter p
with gradient g at step t (1-based):

    p   <- p * (1 - lr * weight_decay)              (only for matrices, see below)
    m   <- beta1 * m + (1 - beta1) * g              first moment (momentum)
    v   <- beta2 * v + (1 - beta2) * g^2            second moment
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

The (1 - beta^t) terms undo the bias of m and v towards their zero start ("bias
correction"; MLX's own optim.AdamW leaves it off by default). MLX arrays are values,
not buffers: the step computes new arrays and hands them to the model with `update`.
Each parameter's update is one mx.compile'd function, so its ~10 elementwise ops run as one
pass over memory (MLX's own elementwise ops are not vectorised on x86 CPUs; its fused
kernels are: a step over 22.6M parameters took 100 ms op by op, 63 ms fused, 34 ms with the
parameters shared out over two CPU streams).
"""

import math

import numpy as np

from nanobert.mlx_cpu import STREAMS  # first: a fast BLAS for MLX on Linux (see mlx_cpu.py)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402


@mx.compile
def adamw_update(p, g, m, v, decay, step_size, bias_correction2_sqrt, beta1, beta2, eps):
    """One parameter's AdamW update (the formulas above) -> new (p, m, v). The Python floats
    (betas, eps) are constants of the compiled function; what changes each step comes as arrays,
    so the function is traced once per parameter shape, not once per step. Each array keeps
    its dtype (the fp32 step sizes would otherwise promote a bf16 model to fp32)."""
    new_p = p * decay
    new_m = m + (1 - beta1) * (g - m)  # torch's lerp
    new_v = beta2 * v + (1 - beta2) * g * g
    new_p = new_p - step_size * new_m / (mx.sqrt(new_v) / bias_correction2_sqrt + eps)
    return new_p.astype(p.dtype), new_m.astype(m.dtype), new_v.astype(v.dtype)


class AdamW:
    def __init__(self, model, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8):
        """model: its trainable (not frozen) parameters are optimized, by name.

        Two groups, as in BERT and nanoGPT: weight matrices and embeddings (ndim >= 2) decay;
        biases and LayerNorm weights (ndim 1) do not: shrinking a LayerNorm gain or a bias
        towards 0 is no regulariser, it just fights the normalisation.
        """
        self.model = model
        params = dict(tree_flatten(model.trainable_parameters()))
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        self.decay = {n: p.ndim >= 2 for n, p in params.items()}
        self.exp_avg = {n: mx.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: mx.zeros_like(p) for n, p in params.items()}
        self.step_count = 0
        # Each parameter's update runs on one of the CPU streams (one per core, mlx_cpu.py's
        # fix 4): largest first, each to the stream with the fewest weights so far.
        load = [0] * len(STREAMS)
        self.stream = {}
        for n in sorted(params, key=lambda n: -params[n].size):
            i = load.index(min(load))
            self.stream[n], load[i] = STREAMS[i], load[i] + params[n].size

    def step(self, grads, lr):
        """One update of every parameter from `grads` ({name: array}), at learning rate `lr`."""
        self.step_count += 1
        beta1, beta2 = self.betas
        step_size = mx.array(lr / (1 - beta1 ** self.step_count))
        bias_correction2_sqrt = mx.array(math.sqrt(1 - beta2 ** self.step_count))
        decay, no_decay = mx.array(1 - lr * self.weight_decay), mx.array(1.0)
        params = dict(tree_flatten(self.model.trainable_parameters()))
        new = {}
        for n, g in grads.items():
            with mx.stream(self.stream[n]):
                new[n], self.exp_avg[n], self.exp_avg_sq[n] = adamw_update(
                    params[n], g, self.exp_avg[n], self.exp_avg_sq[n], decay if self.decay[n] else no_decay,
                    step_size, bias_correction2_sqrt, beta1, beta2, self.eps)
        self.model.update(tree_unflatten(list(new.items())))

    def state_numpy(self):
        """{"exp_avg.<param>": array, "exp_avg_sq.<param>": array, "step": [t]}: the torch twin reads it too."""
        state = {f"exp_avg.{n}": np.array(t) for n, t in self.exp_avg.items()}
        state.update({f"exp_avg_sq.{n}": np.array(t) for n, t in self.exp_avg_sq.items()})
        state["step"] = np.array([self.step_count], np.int64)
        return state

    def load_numpy(self, state):
        for n in self.exp_avg:
            for kind, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                if f"{kind}.{n}" not in state:
                    raise ValueError(f"optimizer state has no '{kind}.{n}' (was it saved for another model?)")
                moments[n] = mx.array(state[f"{kind}.{n}"])
        self.step_count = int(state["step"][0])


def clip_grad_norm(grads, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm (0: only measure).

    grads: {name: array}. Returns (clipped grads, the norm before clipping).
    """
    norm = mx.sqrt(sum((g * g).sum() for g in grads.values()))
    if max_norm > 0:
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
        grads = {n: g * scale for n, g in grads.items()}
    return grads, norm
