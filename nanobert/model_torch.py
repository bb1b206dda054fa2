"""BERT in raw PyTorch: the torch twin of model_mlx.py.

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

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanobert import torch_cpu, weights

ACT2FN = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class Output(NamedTuple):
    """What a head returns; fields it does not compute are None (HF's ModelOutput names)."""
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: list | None = None  # output_hidden_states=True: L+1 (B, T, H), embeddings then each layer
    pooler_output: torch.Tensor | None = None


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper mask on a CPU. Drawing random numbers is most of dropout's
    cost there (bernoulli_, as nn.Dropout draws them, takes twice as long as rand_like), so one
    64-bit draw here makes four 16-bit uniform integers. A unit is dropped when its integer
    is among the lowest `cut` of the 65536, with probability cut / 65536, within 2^-17 of p
    (p < 0.99999), and the kept ones are scaled by `scale`, so that the expected output is
    exactly x, as nn.Dropout's. On a GPU, nn.Dropout's fused kernel is one pass over memory,
    where the ops here are four (draw, compare, multiply, scale)."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.is_cuda:
            return super().forward(x)
        return self.zero_some(x) * self.scale

    @property
    def cut(self):
        return min(round(self.p * 65536), 65535)

    @property
    def scale(self):
        return 65536 / (65536 - self.cut)

    def zero_some(self, x):
        """x with units dropped but the kept ones not yet scaled (CPU, training): attention
        scales v instead, a T/head_dim times smaller tensor than the probabilities."""
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        bits.random_(torch.iinfo(torch.int64).min, None)  # all 64 bits (random_() leaves the top one 0)
        u16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform on -32768 .. 32767
        # Kept units times 1, dropped times 0: multiplying by the mask as bytes is the fastest
        # way on a CPU (6.3M values: 2.4 ms; torch.where 3.9, times the bool mask 3.0, masked_fill 5.3).
        return x * (u16 >= self.cut - 32768).view(torch.uint8)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        # padding_idx: the [PAD] row gets no gradient from the lookup (HF does the same)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        """(B, T) ids -> (B, T, H)"""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = torch_cpu.Linear(config.hidden_size, config.hidden_size)
        self.key = torch_cpu.Linear(config.hidden_size, config.hidden_size)
        self.value = torch_cpu.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(config.attention_probs_dropout_prob)

    def forward(self, x, mask):
        """x (B, T, H), mask (B, 1, 1, T) additive or None -> (B, T, H)"""
        B, T, _ = x.shape
        if torch_cpu.on_fused_attention(x):  # inference on an x86 CPU: softmax(q k^T + mask) v in one kernel
            return torch_cpu.attention(self.query(x), self.key(x), self.value(x), mask, self.num_heads)
        q, k, v = (proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        scale = self.head_dim ** -0.5
        if self.training and self.dropout.p > 0 and not x.is_cuda:
            # Spelled out when training on a CPU: SDPA's attention dropout there is the slow
            # bernoulli_ one. Otherwise SDPA: softmax(q k^T / sqrt(d) + mask) v as one fused
            # kernel, on a GPU with the dropout inside it too (flash / memory-efficient attention).
            scores = (q * scale) @ k.transpose(-2, -1)
            probs = F.softmax(scores if mask is None else scores + mask, dim=-1)
            y = self.dropout.zero_some(probs) @ (v * self.dropout.scale)  # = dropout(probs) @ v
        else:
            p = self.dropout.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return y.transpose(1, 2).reshape(B, T, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = torch_cpu.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)  # post-LN, as in the BERT paper


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = torch_cpu.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = torch_cpu.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask, output_hidden_states=False):
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
        self.dense = torch_cpu.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        """(B, T, H) -> (B, H): tanh(dense) of the [CLS] position"""
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config, add_pooling_layer=True):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        """(B, T) ids, mask (1 = token, 0 = padding), token types -> (last hidden state (B, T, H),
        pooled (B, H) or None, all hidden states or None)"""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None:
            # Additive mask: 0 where attending, the dtype's minimum on padding, so that after
            # softmax padding gets exactly 0 weight (as HF; -inf would give NaN on empty rows).
            dtype = self.embeddings.word_embeddings.weight.dtype
            mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
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
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("LayerNorm.weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
            self.bert.embeddings.word_embeddings.weight[self.config.pad_token_id].zero_()
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
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def state_numpy(self, trainable_only=False):
        """{HF name: numpy array}; trainable_only: just what trains (LoRA adapters + head)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.named_parameters()
                if v.requires_grad or not trainable_only}

    def load_numpy(self, state):
        """Copy numpy arrays into the parameters they name (names and shapes already checked)."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(torch.from_numpy(v))


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = torch_cpu.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x, word_embeddings):
        """(..., H) -> (..., V). The decoder is the word embedding matrix itself (tied weights)."""
        return torch_cpu.linear(self.transform(x), word_embeddings, self.bias)


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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, masked_positions=None,
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
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
        return Output(loss=loss, logits=logits, hidden_states=hidden_states)


class BertForSequenceClassification(BertPreTrainedModel):
    head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = torch_cpu.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False):
        """labels (B,): class ids, or float targets when num_labels == 1 (regression, MSE)."""
        _, pooled, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression" or self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels.long())
        return Output(loss=loss, logits=logits, hidden_states=hidden_states, pooler_output=pooled)


class BertForTokenClassification(BertPreTrainedModel):
    head_prefixes = ("classifier.",)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = torch_cpu.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, output_hidden_states=False):
        """-> logits (B, T, num_labels). labels (B, T): a tag id per token, -100 where no tag
        is learned (padding, [CLS]/[SEP], a word's later WordPieces); the loss is their mean."""
        h, _, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.classifier(self.dropout(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
        return Output(loss=loss, logits=logits, hidden_states=hidden_states)


class BertForQuestionAnswering(BertPreTrainedModel):
    head_prefixes = ("qa_outputs.",)

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = torch_cpu.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None, end_positions=None,
            output_hidden_states=False):
        """-> start/end logits (B, T). Positions (B,) outside [0, T) are clamped to T and ignored (as HF)."""
        h, _, hidden_states = self.bert(input_ids, attention_mask, token_type_ids, output_hidden_states)
        start_logits, end_logits = self.qa_outputs(h).unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            T = start_logits.shape[1]
            start_loss = F.cross_entropy(start_logits, start_positions.long().clamp(0, T), ignore_index=T)
            end_loss = F.cross_entropy(end_logits, end_positions.long().clamp(0, T), ignore_index=T)
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
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.scale = alpha / r
        # A as nn.Linear's own default init (Kaiming-uniform); B zero.
        bound = 1 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x):
        return torch_cpu.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self):
        """A plain Linear with W + (alpha/r) B A: the adapter folded in for export."""
        out, inp = self.weight.shape
        linear = torch_cpu.Linear(inp, out)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * self.lora_B @ self.lora_A)
            linear.bias.copy_(self.bias)
        return linear


def apply_lora(model, r, alpha, targets=("query", "value")):
    """Swap the `targets` Linears of every layer for LoRALinear; freeze all but adapters + head.

    targets: paths inside a BertLayer, e.g. "query", "key", "value" (attention.self.*),
    "attention.output.dense", "intermediate.dense", "output.dense".
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.bert.encoder.layer:
        for target in targets:
            parent, name = _lora_parent(layer, target)
            setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha))
    for prefix in model.head_prefixes:
        if not prefix.startswith("bert."):  # the task head trains fully
            getattr(model, prefix.rstrip(".")).requires_grad_(True)
    return model


def merge_lora(model):
    """Fold every LoRALinear back into a plain Linear (in place); returns the model."""
    for layer in model.bert.encoder.layer:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora_parent(layer, target):
    path = ("attention.self." + target if target in ("query", "key", "value") else target).split(".")
    parent = layer
    for part in path[:-1]:
        parent = getattr(parent, part, None)
    if not isinstance(getattr(parent, path[-1], None), nn.Linear):
        raise ValueError(f"LoRA target {target!r} is not a Linear in a BertLayer")
    return parent, path[-1]
