"""Input text and token batches for the experiments.

Text comes from a Hugging Face dataset, a local file or folder, or, when the hub cannot be reached,
a real-English fallback that every Python installation carries: the prose paragraphs of the
standard library's docstrings. Loss and detection statistics only mean something on natural text,
so there is no random-token fallback.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import platform
import re
import socket
import sysconfig
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from fxsdc.errors import UserError

log = logging.getLogger(__name__)

_WIKITEXT_RE = re.compile(r"^wikitext-(2|103)(-raw)?-v1$")
_WIKITEXT_REPO = "Salesforce/wikitext"  # the hub's current home of the "wikitext" dataset
_LOCAL_SUFFIXES = (".txt", ".md", ".rst")
_TRUE = ("1", "ON", "YES", "TRUE")
_PROBE_TIMEOUT_S = 3.0


def load_texts(
    dataset_name: str = "wikitext-2-raw-v1",
    config: str | None = None,
    split: str = "test",
    path: str | os.PathLike[str] | None = None,
    max_texts: int | None = None,
) -> tuple[list[str], str]:
    """Non-empty texts (stripped lines or paragraphs) and a one-line description of their source.

    ``path``, or a ``dataset_name`` naming an existing file or folder, reads local text. Otherwise
    ``dataset_name`` is a Hugging Face dataset id; the WikiText names (``wikitext-2-raw-v1``, ...)
    may be given alone. If the hub is unreachable or offline mode is set, the standard-library
    fallback is used and a warning says so; with ``HF_DATASETS_OFFLINE=1`` set before start-up a
    cached copy of the dataset is tried first. A dataset the reachable hub cannot load is a
    UserError.
    """
    if max_texts is not None and max_texts < 1:
        raise UserError(f"max_texts must be >= 1, not {max_texts}")
    if path is not None:
        return _local_texts(Path(path), max_texts)
    if Path(dataset_name).exists():
        return _local_texts(Path(dataset_name), max_texts)
    repo, config = _hub_id(dataset_name, config)
    name = " ".join(filter(None, (repo, config))) + f" ({split} split)"
    if _offline_env():
        texts = _cached_hub_texts(repo, config, split, max_texts)
        if texts is not None:
            return texts, f"{name}, {len(texts)} texts (local cache)"
        reason = "offline mode is set and the dataset is not in the local cache"
    elif not hub_reachable():
        reason = (
            "the Hugging Face hub is unreachable; set HF_DATASETS_OFFLINE=1 to use a cached copy"
        )
    else:
        texts = _hub_texts(repo, config, split, max_texts)
        return texts, f"{name}, {len(texts)} texts"
    texts = list(_stdlib_paragraphs(max_texts))
    source = (
        f"fallback: {len(texts)} prose paragraphs of the Python {platform.python_version()} "
        f"standard library's docstrings ({dataset_name} not loaded: {reason})"
    )
    log.warning("%s", source)
    return texts, source


def _hub_id(dataset_name: str, config: str | None) -> tuple[str, str | None]:
    if _WIKITEXT_RE.match(dataset_name):
        if config not in (None, dataset_name):
            raise UserError(
                f"dataset {dataset_name} is already a WikiText config; drop config={config!r}"
            )
        return _WIKITEXT_REPO, dataset_name
    if dataset_name == "wikitext":
        return _WIKITEXT_REPO, config
    if not dataset_name.strip():
        raise UserError("dataset name is empty")
    return dataset_name, config


def _offline_env() -> bool:
    return any(
        os.environ.get(v, "").upper() in _TRUE for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def hub_reachable() -> bool:
    """Whether the hub's host accepts a TCP connection within a few seconds.

    ``datasets`` retries an unreachable hub for ~25 s before failing; this answers at once. The
    probe runs in a thread because name resolution ignores socket timeouts.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80))
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=_PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 1)
    return bool(result and result[0])


def _cached_hub_texts(
    repo: str, config: str | None, split: str, max_texts: int | None
) -> list[str] | None:
    """The dataset from the local cache, or None. Only tried when ``datasets`` itself is offline
    (its mode is read at import), since otherwise it would go to the network and retry."""
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        return None
    try:
        return _dataset_texts(datasets.load_dataset(repo, config, split=split), max_texts)
    except Exception as e:  # any failure to load from the cache means "not cached"
        log.debug("no cached %s %s: %s", repo, config, e)
        return None


def _hub_texts(repo: str, config: str | None, split: str, max_texts: int | None) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # the hub answered but could not give this dataset/config/split
        reason = " ".join(str(e).split())
        raise UserError(
            f"cannot load dataset {repo} (config {config}, split {split}): {reason}"
        ) from e
    return _dataset_texts(dataset, max_texts)


def _dataset_texts(dataset: Any, max_texts: int | None) -> list[str]:
    """The non-empty, stripped values of the ``text`` column (or the first string column)."""
    columns = [
        c
        for c, f in dataset.features.items()
        if getattr(f, "dtype", None) in ("string", "large_string")
    ]
    if not columns:
        raise UserError(f"dataset has no text column (columns: {', '.join(dataset.column_names)})")
    column = "text" if "text" in columns else columns[0]
    texts: list[str] = []
    for value in dataset[column]:
        if value and value.strip():
            texts.append(value.strip())
            if max_texts is not None and len(texts) >= max_texts:
                break
    if not texts:
        raise UserError(f"dataset column {column!r} holds no text")
    return texts


def _local_texts(path: Path, max_texts: int | None) -> tuple[list[str], str]:
    """Stripped non-empty lines of a file, or of a folder's .txt/.md/.rst files in sorted order."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_SUFFIXES
        )
        if not files:
            raise UserError(f"{path}: folder has no {', '.join(_LOCAL_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"{path}: no such file or folder")
    texts: list[str] = []
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{file}: cannot read text: {e}") from e
        texts.extend(line.strip() for line in lines if line.strip())
        if max_texts is not None and len(texts) >= max_texts:
            texts = texts[:max_texts]
            break
    if not texts:
        raise UserError(f"{path}: no text")
    kind = f"folder ({len(files)} files)" if path.is_dir() else "file"
    return texts, f"local {kind} {path}, {len(texts)} lines"


@functools.lru_cache(maxsize=4)
def _stdlib_paragraphs(max_texts: int | None) -> tuple[str, ...]:
    """Prose paragraphs of docstrings in the standard library's top-level modules, in file order.

    Every Python installation ships these, so the fallback needs nothing downloaded; they are
    deterministic for a given Python version. Paragraphs that look like code, tables or doctests
    are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: dict[str, None] = {}  # ordered set: some docstrings repeat across modules
    for file in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(file.read_bytes())
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                continue
            for block in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                text = " ".join(block.split())
                if _is_prose(text):
                    paragraphs[text] = None
                    if max_texts is not None and len(paragraphs) >= max_texts:
                        return tuple(paragraphs)
    if not paragraphs:
        raise UserError(f"no dataset could be loaded and no fallback text was found under {root}")
    return tuple(paragraphs)


def _is_prose(text: str) -> bool:
    """A sentence-like paragraph: starts with a capital, ends with a period, mostly letters."""
    return (
        len(text) >= 80
        and ">>>" not in text
        and text[0].isupper()
        and text.endswith(".")
        and sum(c.isalpha() or c == " " for c in text) >= 0.9 * len(text)
    )


class ByteTokenizer:
    """Byte-level tokenizer for models that come without one (random or tiny weights).

    Ids: 0 = pad, 1 = bos, 2 = eos, and ``3 + b`` for each UTF-8 byte ``b`` of the text, so the
    vocabulary has 259 entries and any text round-trips exactly. A model with ``vocab_size >= 259``
    (the tiny variants have 512) takes the ids unchanged; :func:`make_batches` folds them into a
    smaller vocabulary with ``vocab_size=``.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str, add_special_tokens: bool = False, **_hf_options: Any) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` wraps them in bos/eos. Other Hugging Face
        options (``verbose``...) are accepted and ignored so callers can treat both kinds alike."""
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids``; special ids and ids beyond the byte range are skipped."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        data = bytes(i - self.offset for i in values if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def make_batches(
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int,
    seq_length: int,
    num_samples: int,
    vocab_size: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``num_samples`` sequences of ``seq_length`` tokens in batches of ``batch_size`` (the last
    batch may be smaller): ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (=
    ``input_ids``, for the LM loss).

    The texts are tokenised in order and concatenated, separated by the tokenizer's eos (or sep)
    token, and cut into consecutive windows, the usual way to evaluate a language model: every
    position is a real token and no padding is needed. A corpus too short for ``num_samples``
    windows is repeated. ``tokenizer`` is a Hugging Face tokenizer or a :class:`ByteTokenizer`.
    ``vocab_size``, when smaller than the tokenizer's ids, folds ids modulo it (for tiny models
    fed by a full tokenizer): the token identities blur, but the text stays real.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("seq_length", seq_length),
        ("num_samples", num_samples),
    ):
        if value < 1:
            raise UserError(f"{name} must be >= 1, not {value}")
    if vocab_size is not None and vocab_size < 1:
        raise UserError(f"vocab_size must be >= 1, not {vocab_size}")
    needed = num_samples * seq_length
    separator = getattr(tokenizer, "eos_token_id", None)
    if separator is None:
        separator = getattr(tokenizer, "sep_token_id", None)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        if separator is not None:
            stream.append(separator)
        if len(stream) >= needed:
            break
    if not stream:
        raise UserError("the texts produce no tokens")
    if len(stream) < needed:
        log.info(
            "corpus has %d tokens; repeating it to fill %d x %d",
            len(stream),
            num_samples,
            seq_length,
        )
        stream = stream * -(-needed // len(stream))
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(num_samples, seq_length)
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        log.info("folding token ids modulo vocab_size=%d", vocab_size)
        ids = ids % vocab_size
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()}
        for chunk in ids.split(batch_size)
    ]
