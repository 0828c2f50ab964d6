"""A byte-level BPE tokenizer trained locally with Hugging Face `tokenizers` (GPT-2 style).

Byte-level means every string is encodable (no <unk>) and decode(encode(x)) == x.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from haipai_lightning.config import ConfigError

EOS = "<|endoftext|>"  # document separator; first special token, so id 0
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]
# Other tokenizers a user may point data.tokenizer_path at call their end token differently.
_EOS_CANDIDATES = [EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]"]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet + specials, before any merge


def train_tokenizer(texts: Iterable[str], vocab_size: int, extra_special: Iterable[str] = ()) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (fewer if the corpus runs out of merges).

    ``extra_special``: more special tokens (e.g. the LMLM lookup markers), each one id, never merged."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"data.vocab_size={vocab_size} is too small; it must be >= {MIN_VOCAB} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the round trip exact (no space invented at the start).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [t for t in extra_special if t not in SPECIAL_TOKENS],
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Any ``tokenizer.json`` written by the `tokenizers` library."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.tokenizer_path={str(path)!r} does not exist; point it at a tokenizer.json "
            f"or leave it unset to train one on the data"
        )
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token (``<|endoftext|>`` for tokenizers trained here)."""
    for token in _EOS_CANDIDATES:
        idx = tok.token_to_id(token)
        if idx is not None:
            return idx
    raise ConfigError(
        f"the tokenizer has none of the end-of-document tokens {_EOS_CANDIDATES}; "
        f"use a tokenizer.json that defines one in data.tokenizer_path"
    )


def id_space(tok: Tokenizer) -> int:
    """1 + the largest id: the embedding size a model needs (ids may have gaps in user files)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_json(tok) -> str:
    """A data module's tokenizer serialized as JSON (stored next to a checkpoint); setup() loads it."""
    if tok is None:
        raise RuntimeError("call setup() first: the tokenizer is loaded there")
    return tok.to_str()

