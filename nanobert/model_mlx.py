"""BERT in pure MLX: the MLX twin of model_torch.py.

Read the two files side by side (`diff nanobert/model_torch.py nanobert/model_mlx.py`):
they hold the same classes in the same order, and every difference is one between the
frameworks. Attribute paths equal HuggingFace's state-dict names
(`bert.encoder.layer.0.attention.self.query.weight`), so loading a checkpoint needs no
rename table. Semantics follow HF `transformers` BERT exactly (checked by parity/):
post-LayerNorm blocks, exact erf GELU, LayerNorm eps from the config, an additive
attention mask holding the dtype's minimum, and HF's loss conventions.

Shapes: B batch, T sequence length, H hidden size, V vocabulary, N decoded MLM positions.
"""

import math
from typing import NamedTuple

import numpy as np

from nanobert import mlx_cpu  # first: on Linux it gives MLX a fast BLAS before mlx.core loads

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from nanobert import weights  # noqa: E402

ACT2FN = {"gelu": mlx_cpu.gelu, "gelu_new": nn.gelu_approx, "relu": nn.relu}


def cross_entropy(logits, targets, ignore_index=-100):
    """torch's F.cross_entropy: the mean over targets != ignore_index (MLX's has no ignore_index)."""
    keep = targets != ignore_index
    picked = mx.take_along_axis(logits, mx.where(keep, targets, 0)[..., None], axis=-1).squeeze(-1)
    return ((mlx_cpu.logsumexp(logits) - picked) * keep).sum() / keep.sum()


def linear_t(layer, xt):
    """A Linear (or LoRALinear) applied to x, transposed: xt = x^T (B, in, T) -> (B, out, T),
    W xt + b (+ the LoRA update (alpha/r) B A xt). The MLX attention on Linux CPUs."""
    y = mx.addmm(layer.bias[:, None], layer.weight, xt)
    if isinstance(layer, LoRALinear):
        y = y + (layer.lora_B @ (layer.lora_A @ xt)) * layer.scale
    return y


class Output(NamedTuple):
    """What a head returns; fields it does not compute are None (HF's ModelOutput names)."""
    loss: mx.array | None = None
    logits: mx.array | None = None
    start_logits: mx.array | None = None
    end_logits: mx.array | None = None
    hidden_states: list | None = None  # output_hidden_states=True: L+1 (B, T, H), embeddings then each layer
    pooler_output: mx.array | None = None


class Dropout(nn.Module):
    """Dropout with cheaper random bits, as the torch twin's. mx.random.bernoulli draws 32
    random bits per unit, and MLX's Python API has no raw bits (its randint goes through
    floats); but mx.random.split(key, n) returns n new keys, each 64 bits of threefry output:
    four 16-bit uniform integers per key here, half the hashing of bernoulli. The key itself
    comes from MLX's global random sequence (mx.random.seed fixes it; mx.compile tracks it as
    state). A unit is dropped when its integer is among the lowest `cut` of the 65536, with
    probability cut / 65536, within 2^-17 of p (p < 0.99999), and the kept ones are scaled
    by `scale`, so that the expected output is exactly x, as nn.Dropout's."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def __call__(self, x):
        if not self.training or self.p == 0:
            return x
        return self.zero_some(x) * self.scale

    @property
    def cut(self):
        return min(round(self.p * 65536), 65535)

    @property
    def scale(self):
        return 65536 / (65536 - self.cut)

    def zero_some(self, x):
        """x with units dropped but the kept ones not yet scaled (training): attention
        scales v instead, a T/head_dim times smaller array than the probabilities."""
        n = x.size
        key = mx.random.randint(0, 1 << 24, (2,), dtype=mx.uint32)  # a fresh key from the global sequence
        bits = mx.random.split(key, (n + 3) // 4)  # (n/4, 2) uint32: 64 random bits per row
        u16 = bits.view(mx.int16).reshape(-1)[:n].reshape(x.shape)  # uniform on -32768 .. 32767
        return mx.where(u16 < self.cut - 32768, 0.0, x)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pad_token_id = config.pad_token_id
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids):
        """(B, T) ids -> (B, T, H)"""
        positions = mx.arange(input_ids.shape[1])
        words = self.word_embeddings(input_ids)
        # torch's padding_idx: the [PAD] row gets no gradient from the lookup (as HF)
        words = mx.where((input_ids == self.pad_token_id)[..., None], mx.stop_gradient(words), words)
        # Token types as one-hot rows @ the table, not a lookup (same values): a lookup's gradient
        # adds each token's gradient into its row, here one of 2, and on a GPU those colliding bf16
        # atomic adds are slow (H200: this layer's forward + backward 61 -> 0.8 ms); a GEMM's aren't.
        n_types = self.token_type_embeddings.weight.shape[0]
        types = (token_type_ids[..., None] == mx.arange(n_types)).astype(words.dtype)
        x = words + types @ self.token_type_embeddings.weight
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.attention_probs_dropout_prob)

    def __call__(self, x, mask):
        """x (B, T, H), mask (B, 1, 1, T) additive or None -> (B, T, H)"""
        B, T, _ = x.shape
        if not self.training and mlx_cpu.on_fused_attention(x):  # inference on an x86 CPU: one primitive
            return mlx_cpu.attention(self.query(x), self.key(x), self.value(x), mask, self.num_heads)
        scale = self.head_dim ** -0.5
        if mlx_cpu.FAST:
            # Linux CPU: spelled out (mx.fast's fused attention is slower there), heads first as
            # (B, heads, head_dim, T). Scores are keys first, (B, heads, T keys, T queries),
            # softmax over axis -2, because MLX's CPU reductions (the softmax's max and sum)
            # vectorise over a middle axis, not the last; the weighted sum v^T @ probs comes out
            # (B, heads, head_dim, T) = (B, H, T), which the output Linear reads transposed.
            if self.training:
                qt, kt, vt = (proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 3, 1)
                              for proj in (self.query, self.key, self.value))
            else:  # inference without the fused primitive (not x86-64, or turned off)
                # Each projection as W x^T, (B, H, T): heads first with no copy, where x W^T's
                # heads must be copied out (2 x 384 tokens, attention 18.8 -> 16.3 ms). Not in
                # training: its weight gradients would be one GEMM per row, then summed.
                xt = x.transpose(0, 2, 1)
                qt, kt, vt = (linear_t(proj, xt).reshape(B, self.num_heads, self.head_dim, T)
                              for proj in (self.query, self.key, self.value))
            scores = kt.transpose(0, 1, 3, 2) @ (qt * scale)
            scores = scores if mask is None else scores + mask.transpose(0, 1, 3, 2)
            if self.training:
                probs = mlx_cpu.softmax(scores, axis=-2)
                if self.dropout.p > 0:
                    probs, vt = self.dropout.zero_some(probs), vt * self.dropout.scale  # = dropout(probs) @ v
                yt = vt @ probs
            else:  # the softmax's division after the weighted sum: on head_dim x T values, not T x T
                e, total = mlx_cpu.softmax_parts(scores, axis=-2)
                yt = (vt @ e) / total
            return yt.reshape(B, -1, T).transpose(0, 2, 1)
        q, k, v = (proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
                   for proj in (self.query, self.key, self.value))
        if self.training and self.dropout.p > 0:
            # Spelled out: mx.fast's fused attention has no dropout.
            scores = (q * scale) @ k.transpose(0, 1, 3, 2)
            probs = mlx_cpu.softmax(scores if mask is None else scores + mask)
            y = self.dropout.zero_some(probs) @ (v * self.dropout.scale)  # = dropout(probs) @ v
        else:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return y.transpose(0, 2, 1, 3).reshape(B, T, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # post-LN, as in the BERT paper


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def __call__(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def __call__(self, x):
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def __call__(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = [BertLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x, mask, output_hidden_states=False):
        """-> last hidden state (B, T, H), and the list of all L+1 (the embeddings', then each
        layer's) when asked, else None, as HF: an inference pass would otherwise hold L of them
        past their use (56 MB in bench.py's QA inference, B16 T384)"""
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layer:
            x = layer(x, mask)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states


class BertPooler(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x):
        """(B, T, H) -> (B, H): tanh(dense) of the [CLS] position"""
        return mx.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        """(B, T) ids, mask (1 = token, 0 = padding), token types -> (last hidden state (B, T, H),
        pooled (B, H) or None, all hidden states or None)"""
        if token_type_ids is None:
            token_type_ids = mx.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            # Additive mask: 0 where attending, the dtype's minimum on padding, so that after
            # softmax padding gets exactly 0 weight (as HF; -inf would give NaN on empty rows).
            dtype = self.embeddings.word_embeddings.weight.dtype
            mask = (1.0 - attention_mask[:, None, None, :].astype(dtype)) * mx.finfo(dtype).min
        x, hidden_states = self.encoder(self.embeddings(input_ids, token_type_ids), mask, output_hidden_states)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled, hidden_states


# --- heads -------------------------------------------------------------------------------

class BertPreTrainedModel(nn.Module):
    """Weight init, pretrained loading and saving, shared by the three heads."""
    head_prefixes = ()  # state-dict prefixes of head weights, which may be newly initialised

    def __init__(self, config):
        super().__init__()
        self.config = config

    def init_weights(self):
        """HF's init: N(0, initializer_range) weights, zero biases, LayerNorm (1, 0), zero [PAD] row."""
        std = self.config.initializer_range
        new = []
        for name, p in tree_flatten(self.parameters()):
            if name.endswith("LayerNorm.weight"):
                p = mx.ones_like(p)
            elif name.endswith("bias"):
                p = mx.zeros_like(p)
            else:
                p = std * mx.random.normal(p.shape)
            new.append((name, p))
        self.update(tree_unflatten(new))
        self.bert.embeddings.word_embeddings.weight[self.config.pad_token_id] = 0.0
        return self

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """Load an HF-format checkpoint dir (ours, HF's, a train_*.py checkpoint); new heads start at init."""
        config, tensors = weights.read_checkpoint(path)
        model = cls(config.updated(where=path, **config_overrides)).init_weights()
        model.load_numpy(weights.match_state(tensors, model.shapes(), cls.head_prefixes, where=path))
        return model

    def save_pretrained(self, directory):
        """config.json + model.safetensors (fp32, HF names): readable by HF and by the MLX twin."""
        weights.write_checkpoint(directory, self.config, self.state_numpy(), architectures=[type(self).__name__])

    def shapes(self):
        return {k: tuple(v.shape) for k, v in tree_flatten(self.parameters())}

    def state_numpy(self, trainable_only=False):
        """{HF name: numpy array}; trainable_only: just what trains (LoRA adapters + head)."""
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return {k: np.array(v) for k, v in tree_flatten(params)}

    def load_numpy(self, state):
        """Copy numpy arrays into the parameters they name (names and shapes already checked)."""
        self.load_weights([(k, mx.array(v)) for k, v in state.items()], strict=False)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = mx.zeros(config.vocab_size)

    def __call__(self, x, word_embeddings):
        """(..., H) -> (..., V). The decoder is the word embedding matrix itself (tied weights)."""
        return mx.addmm(self.bias, self.transform(x), word_embeddings.T)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(BertPreTrainedModel):
    head_prefixes = ("cls.",)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, masked_positions=None,
            output_hidden_states=False):
        """labels (B, T): target ids, -100 = not predicted. masked_positions (N,): flat indices
        into B*T; when given, only those positions are decoded (the sparse head: logits (N, V)
        instead of (B, T, V), same loss, ~15% of the decoder's compute)."""
        h, _, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        if masked_positions is not None:
            h = h.reshape(-1, h.shape[-1])[masked_positions]
            labels = labels.reshape(-1)[masked_positions] if labels is not None else None
        logits = self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Output(loss=loss, logits=logits, hidden_states=hidden_states)


class BertForSequenceClassification(BertPreTrainedModel):
    head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False):
        """labels (B,): class ids, or float targets when num_labels == 1 (regression, MSE)."""
        _, pooled, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression" or self.config.num_labels == 1:
                loss = nn.losses.mse_loss(logits.squeeze(-1), labels.astype(logits.dtype))
            else:
                loss = cross_entropy(logits, labels)
        return Output(loss=loss, logits=logits, hidden_states=hidden_states, pooler_output=pooled)


class BertForTokenClassification(BertPreTrainedModel):
    head_prefixes = ("classifier.",)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False):
        """-> logits (B, T, num_labels). labels (B, T): a tag id per token, -100 where no tag
        is learned (padding, [CLS]/[SEP], a word's later WordPieces); the loss is their mean."""
        h, _, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.classifier(self.dropout(h))
        loss = None
        if labels is not None:
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return Output(loss=loss, logits=logits, hidden_states=hidden_states)


class BertForQuestionAnswering(BertPreTrainedModel):
    head_prefixes = ("qa_outputs.",)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None,
            output_hidden_states=False):
        """-> start/end logits (B, T). Positions (B,) outside [0, T) are clamped to T and ignored (as HF)."""
        h, _, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.qa_outputs(h)
        start_logits, end_logits = logits[..., 0], logits[..., 1]
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            start_loss = cross_entropy(start_logits, mx.clip(start_positions, 0, T), ignore_index=T)
            end_loss = cross_entropy(end_logits, mx.clip(end_positions, 0, T), ignore_index=T)
            loss = (start_loss + end_loss) / 2
        return Output(loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=hidden_states)


# --- LoRA ----------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + b + (alpha/r) x A^T B^T.

    B starts at zero, so training starts exactly at the pretrained model. Keeps the base's
    `weight`/`bias` names, so base weights still load by their HF names.
    """

    def __init__(self, base, r, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.freeze(keys=["weight", "bias"])
        self.scale = alpha / r
        # A as nn.Linear's own default init (uniform +-1/sqrt(in)); B zero.
        out_features, in_features = base.weight.shape
        bound = 1 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (r, in_features))
        self.lora_B = mx.zeros((out_features, r))

    def __call__(self, x):
        return mx.addmm(self.bias, x, self.weight.T) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self):
        """A plain Linear with W + (alpha/r) B A: the adapter folded in for export."""
        out, inp = self.weight.shape
        linear = nn.Linear(inp, out)
        linear.weight = self.weight + self.scale * self.lora_B @ self.lora_A
        linear.bias = self.bias
        return linear


def apply_lora(model, r, alpha, targets=("query", "value")):
    """Swap the `targets` Linears of every layer for LoRALinear; freeze all but adapters + head.

    targets: paths inside a BertLayer, e.g. "query", "key", "value" (attention.self.*),
    "attention.output.dense", "intermediate.dense", "output.dense".
    """
    model.freeze()
    for layer in model.bert.encoder.layer:
        for target in targets:
            parent, name = _lora_parent(layer, target)
            setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha))
    for prefix in model.head_prefixes:
        if not prefix.startswith("bert."):  # the task head trains fully
            getattr(model, prefix.rstrip(".")).unfreeze()
    return model


def merge_lora(model):
    """Fold every LoRALinear back into a plain Linear (in place); returns the model."""
    for layer in model.bert.encoder.layer:
        for parent in list(layer.modules()):
            for name, child in list(parent.children().items()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    model.unfreeze()
    return model


def _lora_parent(layer, target):
    path = ("attention.self." + target if target in ("query", "key", "value") else target).split(".")
    parent = layer
    for part in path[:-1]:
        parent = getattr(parent, part, None)
    if not isinstance(getattr(parent, path[-1], None), nn.Linear):
        raise ValueError(f"LoRA target {target!r} is not a Linear in a BertLayer")
    return parent, path[-1]
