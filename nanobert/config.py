"""BertConfig: the hyper-parameters of a BERT, read from and written to HF `config.json`.

One dataclass serves both twins. Field names are HF's, so a `config.json` written by
`transformers` loads here unchanged and ours loads in `BertConfig.from_pretrained` of HF.
Keys we do not model (`architectures`, `transformers_version`, ...) are kept in `extra`
and written back, so a round trip loses nothing.
"""

import json
from dataclasses import asdict, dataclass, field, fields

from nanobert.fileio import atomic_path

ACTIVATIONS = ("gelu", "gelu_new", "relu")  # gelu = exact erf GELU, gelu_new = tanh approx
PROBLEM_TYPES = (None, "regression", "single_label_classification")


class ConfigError(ValueError):
    """A config value that nanobert cannot build a model from; the message names the field."""


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob (as HF)
    num_labels: int = 2
    problem_type: str | None = None  # None: regression if num_labels == 1 (as HF)
    id2label: dict | None = None  # {id: name} of the labels (None: HF's LABEL_0, LABEL_1, ...)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in (int, "int") and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"field '{f.name}' must be an integer, got {v!r}")
            if f.type in (float, "float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"field '{f.name}' must be a number, got {v!r}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"field 'hidden_size' ({self.hidden_size}) is not divisible by "
                              f"'num_attention_heads' ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"field 'hidden_act' is {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not (isinstance(p, (int, float)) and 0 <= p < 1):
                raise ConfigError(f"field '{name}' must be in [0, 1), got {p!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"field 'layer_norm_eps' must be > 0, got {self.layer_norm_eps}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"field 'pad_token_id' ({self.pad_token_id}) is outside the vocabulary "
                              f"(vocab_size {self.vocab_size})")
        if self.id2label is not None and sorted(self.id2label) != list(range(self.num_labels)):
            raise ConfigError(f"field 'id2label' must name labels 0..{self.num_labels - 1}, got ids "
                              f"{sorted(self.id2label)}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"field 'problem_type' is {self.problem_type!r}; supported: "
                              "regression, single_label_classification")

    # --- HF config.json ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d, where="config"):
        """Build from an HF-style dict; `where` names the source in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        # Architectural switches HF BERT has and nanobert does not: refuse rather than
        # silently compute something else.
        checks = {"model_type": ("bert", None), "position_embedding_type": ("absolute", None),
                  "is_decoder": (False, None), "add_cross_attention": (False, None)}
        for key, allowed in checks.items():
            if d.get(key) not in allowed:
                raise ConfigError(f"{where}: field '{key}' is {d[key]!r}; nanobert supports only {allowed[0]!r}")
            d.pop(key, None)  # checked; to_dict writes the supported value back
        if d.get("id2label") is not None:
            try:
                d["id2label"] = {int(i): str(name) for i, name in d["id2label"].items()}
            except (AttributeError, ValueError):
                raise ConfigError(f"{where}: field 'id2label' must map integer ids to names") from None
            d.setdefault("num_labels", len(d["id2label"]))
            if all(name == f"LABEL_{i}" for i, name in d["id2label"].items()):
                d["id2label"] = None  # HF's placeholder names: nothing to keep
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        d.pop("label2id", None)  # id2label's inverse, written back by to_dict
        try:
            return cls(**known, extra=d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, where=str(path))

    def updated(self, where="config", **changes):
        """A copy with `changes` (HF names). A new num_labels without id2label is a new head:
        the old label names go (else HF's placeholders are written)."""
        d = self.to_dict()
        if "num_labels" in changes and "id2label" not in changes:
            del d["id2label"], d["label2id"]
        return BertConfig.from_dict({**d, **changes}, where=where)

    def to_dict(self, architectures=None):
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d.pop("num_labels")  # HF derives num_labels from id2label
        names = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d["id2label"] = {str(i): names[i] for i in range(self.num_labels)}
        d["label2id"] = {names[i]: i for i in range(self.num_labels)}
        d = {**self.extra, **d, "model_type": "bert", "position_embedding_type": "absolute"}
        if architectures:
            d["architectures"] = list(architectures)
        return dict(sorted(d.items()))

    def to_json(self, path, architectures=None):
        """Write atomically: a crash never leaves a half-written config.json."""
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(architectures), f, indent=2)
            f.write("\n")

