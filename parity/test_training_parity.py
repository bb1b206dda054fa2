"""Training matches HF + torch.optim, not only the forward pass: our AdamW + cosine_lr against
torch.optim.AdamW + transformers' cosine schedule, the MLX AdamW on the same gradients, the
loss trajectory of 10 optimizer steps against HF BertForMaskedLM, gradient clipping against
torch.nn.utils.clip_grad_norm_, and AdamW state handed from one twin to the other mid-run.

(Named *_parity.py: tests/test_training.py already owns the module name `test_training`.)
"""

import numpy as np
import pytest
import torch
import transformers

from hf_reference import TOL, TWINS, hf_config, hf_model, random_batch, to_backend
from nanobert import engine_mlx, engine_torch, optim_mlx, optim_torch
from nanobert.training import cosine_lr, linear_lr

import mlx.core as mx  # noqa: E402  after nanobert (hf_reference): its BLAS preload must come first

ENGINES = {"torch": engine_torch, "mlx": engine_mlx}
LR, WEIGHT_DECAY, WARMUP = 5e-3, 0.01, 3
# The MLX AdamW on the *same* gradients as torch.optim.AdamW: only the element-wise fp32
# arithmetic differs (MLX has no lerp/addcmul kernels, so m, v and the update round in
# another order, an ulp or so each step). Nothing compounds, since the gradients are given:
# a parameter stays within a few ulps of torch's (rtol 1e-6 ~ 8 ulps), and one near 0 within
# 1e-7, a 50,000th of one update (~LR). Measured: at most 6e-8, half an ulp of 1.0.
MLX_ADAMW_RTOL, MLX_ADAMW_ATOL = 1e-6, 1e-7


def mlm_batches(n, config, seed=0):
    """n random MLM batches (4, 12): padding, [CLS]/[SEP], ~30% of the tokens as targets, rest -100."""
    rng = np.random.default_rng(seed)
    return [random_batch(rng, "BertForMaskedLM", config, B=4, T=12) for _ in range(n)]


def torch_adamw(model, lr):
    """The BERT recipe in plain torch: two param groups, decay only for ndim >= 2."""
    params = list(model.parameters())
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def hf_schedule(opt, steps, min_lr):
    return transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, WARMUP, steps, min_lr=min_lr)


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A random HF BertForMaskedLM (dropout 0) in the shared format: every model here starts from it."""
    hf_model("BertForMaskedLM", hf_config()).save_pretrained(tmp_path)
    return str(tmp_path)


def numpy_params(model):
    return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


# --- AdamW + schedule -----------------------------------------------------------------------------

@pytest.mark.parametrize("foreach", [True, False])
def test_torch_adamw_and_cosine_lr_equal_torch_optim_and_hf_schedule_bitwise(foreach, checkpoint_dir):
    """12 steps (3 warmup, cosine decay to min_lr) of the same model on the same batches, against
    torch.optim.AdamW as it runs on CPU (its per-tensor loop): the same learning rate at every
    step, and every parameter after the run bit-identical, with and without our foreach path."""
    steps, min_lr, T = 12, LR / 10, TWINS["torch"]
    ours, ref = T.BertForMaskedLM.from_pretrained(checkpoint_dir), T.BertForMaskedLM.from_pretrained(checkpoint_dir)
    start = numpy_params(ours)
    opt = optim_torch.AdamW(ours, weight_decay=WEIGHT_DECAY, foreach=foreach)
    ref_opt = torch_adamw(ref, LR)
    schedule = hf_schedule(ref_opt, steps, min_lr)
    for it, batch in enumerate(mlm_batches(steps, ours.config)):
        lr = cosine_lr(it, LR, WARMUP, steps, min_lr)
        # Equal formulas, rounded in another order in float64 (lr * it / warmup vs lr * (it / warmup)):
        # up to 1 ulp apart, which fp32 arithmetic never sees (the weights below are bit-identical).
        assert [g["lr"] for g in ref_opt.param_groups] == pytest.approx([lr, lr], rel=1e-15, abs=0), f"step {it}"
        for model in (ours, ref):
            model(**to_backend("torch", batch)).loss.backward()
        opt.step(lr)
        opt.zero_grad()
        ref_opt.step()
        schedule.step()
        ref_opt.zero_grad()
    expected = numpy_params(ref)
    for name, p in numpy_params(ours).items():
        np.testing.assert_array_equal(p, expected[name], err_msg=name)
    assert max(np.abs(expected[k] - start[k]).max() for k in start) > LR  # it did train


def test_linear_lr_equals_hf_linear_schedule_with_warmup():
    """linear_lr (the --decay linear of HF-recipe runs) against transformers'
    get_linear_schedule_with_warmup, which HF Trainer uses by default: every step of a run
    with warmup, and the straight line ending at 0 on the last step."""
    steps = 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(opt, WARMUP, steps)
    for it in range(steps):
        assert linear_lr(it, LR, WARMUP, steps) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), it
        opt.step()
        schedule.step()
    assert linear_lr(WARMUP, LR, WARMUP, steps) == LR and linear_lr(steps, LR, WARMUP, steps) == 0


def test_mlx_adamw_follows_torch_optim_on_the_same_gradients(checkpoint_dir):
    """The MLX AdamW, handed torch's gradients each step, tracks torch.optim.AdamW for 12 steps."""
    steps, T, M = 12, TWINS["torch"], TWINS["mlx"]
    ref, ours = T.BertForMaskedLM.from_pretrained(checkpoint_dir), M.BertForMaskedLM.from_pretrained(checkpoint_dir)
    ref_opt = torch_adamw(ref, LR)
    schedule = hf_schedule(ref_opt, steps, LR / 10)
    opt = optim_mlx.AdamW(ours, weight_decay=WEIGHT_DECAY)
    for it, batch in enumerate(mlm_batches(steps, ref.config)):
        ref(**to_backend("torch", batch)).loss.backward()
        grads = {k: mx.array(p.grad.numpy()) for k, p in ref.named_parameters()}
        opt.step(grads, cosine_lr(it, LR, WARMUP, steps, LR / 10))
        mx.eval(ours.parameters())
        ref_opt.step()
        schedule.step()
        ref_opt.zero_grad()
        expected = numpy_params(ref)
        for name, p in ours.state_numpy().items():
            np.testing.assert_allclose(p, expected[name], rtol=MLX_ADAMW_RTOL, atol=MLX_ADAMW_ATOL,
                                       err_msg=f"step {it}: {name}")


# --- 10 optimizer steps against HF ----------------------------------------------------------------

def hf_trajectory(hf, batches, grad_clip, min_lr):
    """(losses, grad norms) of HF BertForMaskedLM trained with torch.optim.AdamW + HF's schedule + clip_grad_norm_."""
    opt = torch_adamw(hf.train(), LR)
    schedule = hf_schedule(opt, len(batches), min_lr)
    losses, norms = [], []
    for batch in batches:
        loss = hf(**{k: torch.from_numpy(v).long() for k, v in batch.items()}).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(hf.parameters(), grad_clip).item())
        losses.append(loss.item())
        opt.step()
        schedule.step()
        opt.zero_grad()
    return np.array(losses), np.array(norms)


def test_ten_steps_of_training_match_hf(backend, tmp_path):
    """Same initial weights (through the shared format), same batches, dropout 0: the twin's
    engine.train_step (our AdamW, cosine_lr, clipping at 1.0) gives HF's loss and gradient
    norm at each of 10 steps. The norms are ~3, so clipping acts in every step."""
    steps, grad_clip, min_lr = 10, 1.0, LR / 10
    config = hf_config()
    hf = hf_model("BertForMaskedLM", config)
    hf.save_pretrained(tmp_path)
    batches = mlm_batches(steps, config, seed=1)
    ref_losses, ref_norms = hf_trajectory(hf, batches, grad_clip, min_lr)

    E = ENGINES[backend]
    model = TWINS[backend].BertForMaskedLM.from_pretrained(str(tmp_path))
    opt = E.AdamW(model, weight_decay=WEIGHT_DECAY)
    losses, norms = np.array([E.train_step(model, opt, [batch], cosine_lr(it, LR, WARMUP, steps, min_lr),
                                           grad_clip, seed=it) for it, batch in enumerate(batches)]).T
    tol = TOL[backend]
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=tol, err_msg=f"{backend} losses")
    np.testing.assert_allclose(norms, ref_norms, rtol=0, atol=tol, err_msg=f"{backend} grad norms")
    assert ref_norms.min() > grad_clip
    # The weights do move, far beyond the tolerance: a wrong update would show in the losses.
    assert ref_losses[0] - ref_losses[-1] > 500 * tol


# --- gradient clipping ----------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips / leaves the gradients alone
def test_clip_grad_norm_matches_torch(max_norm, checkpoint_dir):
    """Same norm and same clipped gradients as torch.nn.utils.clip_grad_norm_: the torch twin's
    bit for bit, the MLX twin's (given the same gradients) up to fp32 summation order."""
    T = TWINS["torch"]
    batch = to_backend("torch", mlm_batches(1, hf_config())[0])
    ours, ref = T.BertForMaskedLM.from_pretrained(checkpoint_dir), T.BertForMaskedLM.from_pretrained(checkpoint_dir)
    for model in (ours, ref):
        model(**batch).loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in ref.named_parameters()}
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    clipped = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    assert (ref_norm > max_norm) == (max_norm == 0.5)

    assert optim_torch.clip_grad_norm(ours, max_norm) == ref_norm
    for k, p in ours.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), clipped[k], err_msg=k)

    mlx_clipped, mlx_norm = optim_mlx.clip_grad_norm({k: mx.array(g) for k, g in grads.items()}, max_norm)
    np.testing.assert_allclose(mlx_norm.item(), ref_norm, rtol=1e-6)
    for k, g in mlx_clipped.items():
        np.testing.assert_allclose(np.array(g), clipped[k], rtol=1e-6, atol=1e-12, err_msg=k)


def test_clip_grad_norm_zero_only_measures(checkpoint_dir):
    """max_norm 0: the norm is returned and the gradients are left as they are (both twins)."""
    T = TWINS["torch"]
    model = T.BertForMaskedLM.from_pretrained(checkpoint_dir)
    model(**to_backend("torch", mlm_batches(1, hf_config())[0])).loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    expected = torch.nn.utils.get_total_norm(list(grads.values())).item()  # what clip_grad_norm_ measures
    assert optim_torch.clip_grad_norm(model, 0) == expected
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    same, norm = optim_mlx.clip_grad_norm({k: mx.array(g.numpy()) for k, g in grads.items()}, 0)
    assert norm.item() == pytest.approx(expected, rel=1e-6)
    for k, g in same.items():
        np.testing.assert_array_equal(np.array(g), grads[k].numpy(), err_msg=k)


# --- optimizer state across the twins -------------------------------------------------------------

@pytest.mark.parametrize("first, second", [("torch", "mlx"), ("mlx", "torch")])
def test_adamw_state_moves_between_twins(first, second, checkpoint_dir):
    """Train 3 steps in `first`, hand weights + AdamW state (state_numpy -> load_numpy) to
    `second`, take step 4 there: same weights and moments as taking step 4 in `first`. A
    fresh optimizer (moments 0, step 1: no momentum, full bias correction) is far off."""
    steps = 6
    batches = mlm_batches(4, hf_config(), seed=2)
    E1, E2 = ENGINES[first], ENGINES[second]
    model = TWINS[first].BertForMaskedLM.from_pretrained(checkpoint_dir)
    opt = E1.AdamW(model, weight_decay=WEIGHT_DECAY)
    for it, batch in enumerate(batches[:3]):
        E1.train_step(model, opt, [batch], cosine_lr(it, LR, WARMUP, steps), 1.0, seed=it)
    weights, state = model.state_numpy(), opt.state_numpy()
    lr = cosine_lr(3, LR, WARMUP, steps)

    def step_four(E, models, optimizer_state):
        m = models.BertForMaskedLM.from_pretrained(checkpoint_dir)
        m.load_numpy(weights)
        o = E.AdamW(m, weight_decay=WEIGHT_DECAY)
        if optimizer_state is not None:
            o.load_numpy(optimizer_state)
        E.train_step(m, o, [batches[3]], lr, 1.0, seed=3)
        return m.state_numpy(), o.state_numpy()

    expected, expected_state = step_four(E1, TWINS[first], state)
    moved, moved_state = step_four(E2, TWINS[second], state)
    fresh, _ = step_four(E2, TWINS[second], None)
    assert moved_state["step"][0] == expected_state["step"][0] == 4
    # Both sides take step 4 from the same weights and moments; only the gradients of that one
    # step differ (by <= TOL["mlx"] = 1e-4 where they are largest), and they enter m with
    # weight 0.1 and the weights through lr * m / sqrt(v), lr = 5e-3. Measured: 2e-7.
    tol = 1e-6
    for name, w in expected.items():
        np.testing.assert_allclose(moved[name], w, rtol=0, atol=tol, err_msg=name)
    for name, v in expected_state.items():
        np.testing.assert_allclose(moved_state[name], v, rtol=0, atol=tol, err_msg=name)
    assert max(np.abs(fresh[k] - expected[k]).max() for k in expected) > 1000 * tol
