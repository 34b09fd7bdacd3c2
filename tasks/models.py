"""Where the base model comes from, and cheap repeated loading of it.

`flwr run` executes a copy of the app holding only *.py/*.toml/*.md/*.json files, so the shipped
weights are looked up in several places rather than only next to this file.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # torch and transformers load on first use: a config check needs neither
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = "embedded"
ENV_VAR = "SEEDLORA_BASE_MODEL"
DISTRIBUTION = "seedlora"
_ASSETS = Path("assets")
EMBEDDED_REFERENCE = "tasks/assets/base-model"  # the shipped base, from a checkout's root
_HERE = Path(__file__).resolve().parent
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# A Hugging Face hub id: `name` or `owner/name` (letters, digits, - _ .).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# Adapter target patterns by `config.model_type`; matched against module-name suffixes.
_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
}
_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHTS)


def _editable_source() -> Path | None:
    """Source tree of an editable/local install of the project, from PEP 610 direct_url.json."""
    try:
        raw = metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    url = json.loads(raw or "{}").get("url", "")
    if not url.startswith("file://"):
        return None
    return Path(unquote(urlparse(url).path))


def asset_candidates(name: str) -> list[Path]:
    """Places searched for a shipped asset `tasks/assets/<name>`, in order: next to this
    module, then in the source tree of an editable install (a `flwr run` copy of the app
    holds only its *.py/*.toml/*.md/*.json files)."""
    found = [_HERE / _ASSETS / name]
    src = _editable_source()
    if src is not None:
        found.append(src / "tasks" / _ASSETS / name)
    return found


def embedded_candidates() -> list[Path]:
    """Places searched for the shipped base model, in order."""
    found = asset_candidates("base-model")
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]))
    return found


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a local directory (not a hub id)."""
    return name.startswith(("/", ".", "~")) or _HUB_ID.fullmatch(name) is None


def portable_name(name: str = EMBEDDED) -> str:
    """How exports name their base model: the shipped base as the repository-relative
    `tasks/assets/base-model` (loadable from a checkout, never this machine's absolute
    path); a hub id or the user's own directory as given."""
    return EMBEDDED_REFERENCE if name == EMBEDDED else name


def resolve_model_path(name: str = EMBEDDED) -> str:
    """`"embedded"` -> directory of the shipped model; anything else (hub id, dir) unchanged.

    A name that can only be a path (absolute, ./, ~, or not of the hub's `owner/name`
    form) must be an existing directory: the error names `model-name`."""
    if name != EMBEDDED:
        path = Path(name).expanduser()
        if path.is_dir():
            return str(path)
        if path.exists():
            raise NotADirectoryError(f"model-name {name!r}: {path} is a file, not a model folder")
        if looks_like_path(name):
            raise FileNotFoundError(f"model-name {name!r}: no such directory ({path.absolute()})")
        return name
    tried = embedded_candidates()
    for path in tried:
        if _has_weights(path):
            return str(path)
    listing = ", ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"embedded base model not found (need config.json + weights); tried: {listing}. "
        f"Install the project (pip install -e .), set {ENV_VAR} to the base-model directory, "
        "or rebuild it with `python -m tasks.pretrain`."
    )


def embedded_seen_packages() -> frozenset[str]:
    """Packages the shipped model was pretrained/validated on (from its pretrain_stats.json)."""
    stats = Path(resolve_model_path(EMBEDDED)) / "pretrain_stats.json"
    if not stats.is_file():
        return frozenset()
    data = json.loads(stats.read_text())
    return frozenset(data.get("pretrain_packages", []) + data.get("validation_packages", []))


def target_modules_for(model_type: str) -> tuple[str, ...]:
    """Default adapter target module-name patterns for a Hugging Face `model_type`."""
    return _TARGETS.get(model_type, _LLAMA_STYLE)


def _hub_error(name: str, err: OSError) -> OSError:
    """A load error that says which key to fix (transformers speaks of repo ids)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OSError(
        f"model-name {name!r}: not a local directory, and loading it as a Hugging Face hub "
        f"id failed: {first}"
    )


def model_type_of(name: str) -> str:
    """`config.model_type` of a model name, without loading weights."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        return str(AutoConfig.from_pretrained(path).model_type)
    except OSError as err:
        raise _hub_error(name, err) from None


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """Cached tokenizer with a pad token (eos when the model has none); shared, do not modify."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load(
    name: str, kind: str, num_labels: int, seed: int, meta: bool = False, float32: bool = True
):
    """(model in eval mode, tokenizer): float32, or with `float32=False` in the checkpoint's
    dtype (its weights still mapped from the file); with `meta` every parameter and buffer
    on the meta device (no weights read: `model_skeleton`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    tok = load_tokenizer(name)
    where = {"device_map": "meta"} if meta else {}
    with torch.random.fork_rng():  # a new head must be identical on every client
        torch.manual_seed(seed)
        if kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(path, **where)
        else:  # a classifier checkpoint with another number of labels gets a new head
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, **where
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if kind == "causal" and getattr(model, "loss_type", None) is None:
        # transformers names the loss from the class name; GPT2LMHeadModel & co. match none
        # and log "`loss_type=None` ... unrecognized" once per process (every Ray actor).
        model.loss_type = "ForCausalLM"
    if float32:
        model = model.float()  # hub checkpoints load as bf16/fp16
    return model.eval(), tok


_cached = functools.lru_cache(maxsize=4)(_load)


def _base(name: str, kind: str, num_labels: int, seed: int, cache: bool):
    if not cache:
        return _load(name, kind, num_labels, seed)
    model, tok = _cached(name, kind, num_labels, seed)
    return copy.deepcopy(model), tok


def load_causal_lm(
    name: str = EMBEDDED, cache: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fresh float32 causal LM in eval mode (a deep copy: callers may edit weights in place).

    The tokenizer is shared between calls; do not modify it. `cache=False` loads the model
    afresh and keeps nothing: for a caller that holds the one float32 master of its process
    (the cached model would be a second one: 27 GB at 7B).
    """
    return _base(name, "causal", 0, 0, cache)


def load_seq_cls(
    name: str = EMBEDDED, num_labels: int = 2, seed: int = 0, cache: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Pretrained body + new classification head (seeded init), fresh float32 copy, eval mode
    (`cache` as in `load_causal_lm`)."""
    return _base(name, "seq-cls", num_labels, seed, cache)


def load_stored(name: str, kind: str, num_labels: int = 0, seed: int = 0) -> PreTrainedModel:
    """What `load_causal_lm` (kind "causal") or `load_seq_cls` ("seq-cls") gives, but in the
    checkpoint's dtype and not cached: a bf16 checkpoint's weights stay mapped from its file,
    so a client writes its float32 master file from it tensor by tensor (seedlora.mapped)
    without a private float32 copy of the model (27 GB at 7B)."""
    if kind == "causal":
        num_labels = seed = 0
    return _load(name, kind, num_labels, seed, float32=False)[0]


def model_skeleton(name: str, kind: str, num_labels: int = 0, seed: int = 0) -> PreTrainedModel:
    """What `load_causal_lm` (kind "causal") or `load_seq_cls` ("seq-cls") gives, with every
    parameter and buffer on the meta device: the modules, names, ties and config, no
    weights read (a client maps its float32 master's tensors into it)."""
    if kind == "causal":
        num_labels = seed = 0
    return _load(name, kind, num_labels, seed, meta=True)[0]


def weights_fingerprint(name: str = EMBEDDED) -> str:
    """A hash of the names, sizes and modification times of the files the model loads from
    (its local folder, or for a hub id its cached snapshot): it changes when they do, so a
    float32 master saved from older weights is never taken for the current ones. "" when
    the files cannot be found (a hub id not in the local cache)."""
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        try:
            from transformers.utils import cached_file

            path = Path(cached_file(name, "config.json")).parent
        except (OSError, TypeError, ValueError):
            return ""
    h = hashlib.sha256(str(path.resolve()).encode())
    for item in sorted(path.iterdir()):
        if item.is_file():
            st = item.stat()
            h.update(f"{item.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
