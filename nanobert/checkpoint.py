"""Training checkpoints: one directory per checkpoint, written atomically, verified on load.

    out_dir/ckpt-000400/
        config.json, model.safetensors   the shared weight format (HF from_pretrained opens it)
        optimizer.safetensors            AdamW moments by parameter name (fp32)
        state.json                       step, data position, RNG states, metrics, settings
        manifest.json                    size + sha256 of each file above; written last

Atomic: everything goes into a temp directory that is renamed to ckpt-NNNNNN only when
complete (rename is atomic on POSIX), so a crash or SIGKILL mid-write leaves the previous
checkpoints intact and only a `.tmp-*` directory behind (removed by the next save).
Verified: `load` checks the manifest, so a truncated or corrupted checkpoint is named as
such, and `latest` skips it with a warning. Framework-free: arrays are numpy, both twins
read and write the same checkpoints (optimizer state included).
"""

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace

from nanobert.config import BertConfig, ConfigError
from nanobert.weights import (ADAPTER_NAME, WEIGHTS_NAME, WeightsError, copy_tokenizer, normalize_keys,
                              read_safetensors, write_checkpoint, write_safetensors)

PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, corrupt, or not there; the message names it."""


def save(out_dir, step, config, model_state, optim_state, state, max_checkpoints=None, name=None, tokenizer=None,
         adapter=False):
    """Write ckpt-{step:06d} (or `name`) atomically; keep the newest `max_checkpoints` ckpt-*.

    model_state, optim_state: {name: np.ndarray} (optim_state None: a model-only checkpoint,
    e.g. `best`); state: JSON-able dict; tokenizer: a directory whose tokenizer files are
    copied in, so the checkpoint is self-contained for --init; adapter: model_state holds only
    LoRA adapters + head, written as adapter.safetensors (not a loadable model). Returns the path.
    """
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, ".tmp-*")):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    final = os.path.join(out_dir, name or f"{PREFIX}{step:06d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=out_dir)
    write_checkpoint(tmp, config, model_state, state.get("architectures"), ADAPTER_NAME if adapter else WEIGHTS_NAME)
    if optim_state is not None:
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"), optim_state)
    if tokenizer:
        copy_tokenizer(tokenizer, tmp)
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
        json.dump({**state, "step": step}, f, indent=1)
    files = sorted(os.listdir(tmp))
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
                for f in files}
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    for f in files + ["manifest.json", ""]:  # the files, then the directory entries: durable before the rename
        _fsync(os.path.join(tmp, f))
    if os.path.exists(final):  # e.g. `best` being replaced: swap, then delete the old one
        old = tempfile.mkdtemp(prefix=".tmp-old-", dir=out_dir)
        os.rename(final, os.path.join(old, "x"))
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(out_dir)
    if max_checkpoints:
        for stale in sorted(glob.glob(os.path.join(out_dir, PREFIX + "*")))[:-max_checkpoints]:
            shutil.rmtree(stale)
    return final


def load(path):
    """SimpleNamespace(path, config, model, optimizer, state) of a verified checkpoint dir
    (model: the weights, or the LoRA adapters + head of an adapter checkpoint)."""
    verify(path)
    try:
        config = BertConfig.from_json(os.path.join(path, "config.json"))
        weights = os.path.join(path, ADAPTER_NAME if os.path.exists(os.path.join(path, ADAPTER_NAME)) else WEIGHTS_NAME)
        model = normalize_keys(read_safetensors(weights))
        optim_file = os.path.join(path, "optimizer.safetensors")
        optimizer = read_safetensors(optim_file) if os.path.exists(optim_file) else None
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (WeightsError, ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    return SimpleNamespace(path=path, config=config, model=model, optimizer=optimizer, state=state)


def verify(path):
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: incomplete checkpoint (no readable manifest.json)") from None
    for name, meta in manifest.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: corrupt checkpoint ({name} is missing)")
        if os.path.getsize(file) != meta["bytes"]:
            raise CheckpointError(f"{path}: corrupt checkpoint ({name} has {os.path.getsize(file)} bytes, "
                                  f"expected {meta['bytes']})")
        if _sha256(file) != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupt checkpoint ({name} fails its sha256 check)")


def latest(out_dir):
    """Path of the newest complete ckpt-* in out_dir (corrupt ones skipped, with a warning), or None."""
    for path in sorted(glob.glob(os.path.join(out_dir, PREFIX + "*")), reverse=True):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            print(f"nanobert: warning: skipping {e}", file=sys.stderr)
    return None


def resolve_resume(resume, out_dir):
    """--resume: "" = start fresh; bare --resume (or "auto") = the latest in out_dir, if any;
    else a checkpoint directory, or a run directory whose latest checkpoint is taken."""
    if not resume:
        return None
    if resume in ("auto", "true"):
        return latest(out_dir)
    if os.path.isdir(resume) and not os.path.exists(os.path.join(resume, "manifest.json")):
        found = latest(resume)  # a run directory: take its newest checkpoint
        if found is None:
            raise CheckpointError(f"{resume}: no complete checkpoint in this directory")
        return found
    verify(resume)
    return resume


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path):
    """Flush a file or a directory's entries to disk, so a power loss cannot undo a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

