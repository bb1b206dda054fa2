"""AdamW and gradient clipping by hand, in PyTorch: the torch twin of optim_mlx.py.

AdamW (Loshchilov & Hutter, 2019) is Adam whose weight decay shrinks the weights
directly ("decoupled") instead of being added to the gradient, where Adam's per-weight
scaling would weaken it for weights with large gradients. The update, per parameter p
with gradient g at step t (1-based):

    p   <- p * (1 - lr * weight_decay)              (only for matrices, see below)
    m   <- beta1 * m + (1 - beta1) * g              first moment (momentum)
    v   <- beta2 * v + (1 - beta2) * g^2            second moment
    p   <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

The (1 - beta^t) terms undo the bias of m and v towards their zero start ("bias
correction"; MLX's own optim.AdamW leaves it off by default). The operations are those
of torch.optim.AdamW in the same order, so the result is bit-identical (parity/).
"""

import math

import numpy as np
import torch


class AdamW:
    def __init__(self, model, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8, foreach=True):
        """model: its trainable parameters (requires_grad) are optimized, by name.

        Two groups, as in BERT and nanoGPT: weight matrices and embeddings (ndim >= 2) decay;
        biases and LayerNorm weights (ndim 1) do not: shrinking a LayerNorm gain or a bias
        towards 0 is no regulariser, it just fights the normalisation.
        foreach: update each group with a few multi-tensor kernels (torch._foreach_*)
        instead of a loop over ~100 parameters; same arithmetic, fewer kernel launches.
        """
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.weight_decay, self.betas, self.eps, self.foreach = weight_decay, betas, eps, foreach
        self.decay = {n: p.ndim >= 2 for n, p in self.params.items()}
        self.exp_avg = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.step_count = 0

    @torch.no_grad()
    def step(self, lr):
        """One update of every parameter from its .grad, at learning rate `lr`."""
        self.step_count += 1
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1 ** self.step_count)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.step_count)
        for decay in (True, False):
            names = [n for n in self.params if self.decay[n] == decay and self.params[n].grad is not None]
            p, g = [self.params[n] for n in names], [self.params[n].grad for n in names]
            m, v = [self.exp_avg[n] for n in names], [self.exp_avg_sq[n] for n in names]
            if not names:
                continue
            if self.foreach:
                if decay:
                    torch._foreach_mul_(p, 1 - lr * self.weight_decay)
                torch._foreach_lerp_(m, g, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, g, g, value=1 - beta2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, self.eps)
                torch._foreach_addcdiv_(p, m, denom, value=-step_size)
                continue
            for p_, g_, m_, v_ in zip(p, g, m, v):
                if decay:
                    p_.mul_(1 - lr * self.weight_decay)
                m_.lerp_(g_, 1 - beta1)
                v_.mul_(beta2).addcmul_(g_, g_, value=1 - beta2)
                denom = (v_.sqrt() / bias_correction2_sqrt).add_(self.eps)
                p_.addcdiv_(m_, denom, value=-step_size)

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None  # cheaper than filling zeros, and the next backward allocates fresh

    def state_numpy(self):
        """{"exp_avg.<param>": array, "exp_avg_sq.<param>": array, "step": [t]}: the MLX twin reads it too."""
        state = {f"exp_avg.{n}": t.detach().cpu().numpy() for n, t in self.exp_avg.items()}
        state.update({f"exp_avg_sq.{n}": t.detach().cpu().numpy() for n, t in self.exp_avg_sq.items()})
        state["step"] = np.array([self.step_count], np.int64)
        return state

    def load_numpy(self, state):
        for n in self.params:
            for kind, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                if f"{kind}.{n}" not in state:
                    raise ValueError(f"optimizer state has no '{kind}.{n}' (was it saved for another model?)")
                moments[n].copy_(torch.from_numpy(state[f"{kind}.{n}"]))
        self.step_count = int(state["step"][0])


@torch.no_grad()
def clip_grad_norm(model, max_norm):
    """Scale all gradients so their global L2 norm is at most max_norm (0: only measure).

    Returns the norm before clipping (a 0-d tensor, as torch.nn.utils.clip_grad_norm_ does:
    reading it is the caller's choice, since on a GPU that waits for the queued kernels).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return norm
