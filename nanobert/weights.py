"""The one weight format: a directory with config.json + model.safetensors, HF names, fp32.

Framework-free (numpy): both twins convert to and from `{name: np.ndarray}` and call
these functions, so a file written by one twin is read by the other and by HF
`BertFor*.from_pretrained`. Never unpickles: `pytorch_model.bin` is refused.

Reading real HF checkpoints means forgiving their history (see `normalize_keys`) and
matching them against a model's own names (see `match_state`), which is where missing,
unexpected and mis-shaped tensors are reported the way HF users expect.
"""

import json
import os
import shutil
import struct
import sys

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from nanobert import hub
from nanobert.fileio import atomic_path
from nanobert.config import BertConfig

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
ADAPTER_NAME = "adapter.safetensors"  # LoRA: only the adapters + head, next to the base model's config
INDEX_NAME = "model.safetensors.index.json"  # sharded HF checkpoints
# Tensors a BERT checkpoint may hold that no nanobert model has as a parameter:
# HF buffers, the tied decoder (it *is* the word embeddings), the NSP head of BertForPreTraining.
IGNORED = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "cls.predictions.decoder.weight",
           "cls.predictions.decoder.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias")


class WeightsError(ValueError):
    """A checkpoint nanobert cannot load; the message names the file and the tensor."""


# --- safetensors files ---------------------------------------------------------------------

def read_safetensors(path):
    """{name: float32 array} from one .safetensors file; fp16/bf16/fp64 are cast to fp32."""
    header = _safetensors_header(path)
    try:
        tensors = load_file(path) if not any(v["dtype"] == "BF16" for v in header.values()) else _load_bf16(path, header)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: v.astype(np.float32) if v.dtype.kind == "f" and v.dtype != np.float32 else v for k, v in tensors.items()}


def _safetensors_header(path):
    """Parse and check the header ourselves, so a truncated file is named as such."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (struct.error, ValueError, UnicodeDecodeError):
        raise WeightsError(f"{path}: not a safetensors file (bad or truncated header)") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated: the header promises {8 + n + end} bytes, the file has {size}")
    return header


def _load_bf16(path, header):
    """numpy has no bfloat16: read the raw 16 bits and widen them to float32 (exact)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        data = f.read()[n:]
    out = {}
    for name, meta in header.items():
        start, end = meta["data_offsets"]
        if meta["dtype"] != "BF16":
            raise WeightsError(f"{path}: mixed bf16/{meta['dtype']} files are not supported ({name})")
        bits = np.frombuffer(data[start:end], dtype="<u2").astype(np.uint32) << 16
        out[name] = bits.view(np.float32).reshape(meta["shape"])
    return out


def write_safetensors(path, tensors, metadata=None):
    """Atomic write: to a temp file in the same directory, then rename over `path`."""
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)


# --- checkpoints (directories) -----------------------------------------------------------

def read_checkpoint(path):
    """(BertConfig, {name: array}) from a checkpoint directory (or a hub/packaged name)."""
    path = hub.resolve(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config = BertConfig.from_json(os.path.join(directory, CONFIG_NAME))
    if not os.path.isdir(path):
        files = [path]
    elif os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        files = [os.path.join(path, WEIGHTS_NAME)]
    elif os.path.exists(os.path.join(path, INDEX_NAME)):
        with open(os.path.join(path, INDEX_NAME), encoding="utf-8") as f:
            files = [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        raise WeightsError(f"{path}: holds only pytorch_model.bin, a pickle; nanobert never unpickles. "
                           "Convert it once with HF: model.save_pretrained(dir, safe_serialization=True)")
    else:
        raise WeightsError(f"{path}: no {WEIGHTS_NAME} in this directory")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return config, normalize_keys(tensors)


def write_checkpoint(directory, config, tensors, architectures=None, weights_name=WEIGHTS_NAME):
    """config.json + model.safetensors (fp32) into `directory`, each file written atomically."""
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, weights_name), {k: v.astype(np.float32) for k, v in tensors.items()},
                      metadata={"format": "pt"})  # "pt": HF from_pretrained insists on a known format tag
    config.to_json(os.path.join(directory, CONFIG_NAME), architectures)


def copy_tokenizer(src, directory):
    """Copy the tokenizer files of checkpoint `src` (if any) next to a checkpoint we save."""
    src = hub.resolve(src)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isdir(src) and os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(directory, name))


# --- names --------------------------------------------------------------------------------

def normalize_keys(tensors):
    """Undo the ways real checkpoints spell BERT's names.

    `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes are dropped;
    TF-era LayerNorm `gamma`/`beta` become `weight`/`bias`.
    """
    out = {}
    for name, v in tensors.items():
        while name.startswith(("module.", "_orig_mod.")):
            name = name.split(".", 1)[1]
        if ".LayerNorm." in name or name.startswith("LayerNorm."):
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
        out[name] = v
    return out


def match_state(tensors, shapes, head_prefixes=(), where="checkpoint"):
    """Select from `tensors` the model's parameters (`shapes`: name -> shape).

    A BertModel checkpoint (no `bert.` prefix, e.g. all-MiniLM-L6-v2) fits a head model.
    Missing head weights (`head_prefixes`) are fine: they stay at their init and we say so; so
    are head weights of another shape (another task's head: 2 classes, here 7 tags), as
    HF's ignore_mismatched_sizes. Missing encoder weights, an encoder shape mismatch or a
    non-float tensor are errors.
    """
    if not any(k.startswith("bert.") for k in tensors):  # a bare BertModel checkpoint
        tensors = {(k if k.startswith(("cls.", "classifier.", "qa_outputs.")) else "bert." + k): v
                   for k, v in tensors.items()}
    state, missing = {}, []
    for name, shape in shapes.items():
        if name not in tensors:
            missing.append(name)
            continue
        v = tensors[name]
        if tuple(v.shape) != tuple(shape) and name.startswith(head_prefixes):
            missing.append(name)
            continue
        if tuple(v.shape) != tuple(shape):
            raise WeightsError(f"{where}: tensor '{name}' has shape {tuple(v.shape)}, the model expects {tuple(shape)}")
        if v.dtype.kind != "f":
            raise WeightsError(f"{where}: tensor '{name}' has dtype {v.dtype}, expected a float type")
        state[name] = v.astype(np.float32, copy=False)
    fatal = [m for m in missing if not m.startswith(head_prefixes)]
    if fatal:
        raise WeightsError(f"{where}: missing {len(fatal)} encoder tensor(s): {_short(fatal)}")
    unused = [k for k in tensors if k not in shapes and k not in IGNORED]
    if missing:
        print(f"nanobert: newly initialized (train them): {_short(missing)}", file=sys.stderr)
    if unused:
        print(f"nanobert: unused weights in {where}: {_short(unused)}", file=sys.stderr)
    return state


def _short(names, n=6):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
