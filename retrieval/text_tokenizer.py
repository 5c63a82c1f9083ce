"""Text → BPE ids: the CLIP BPE (from vocab.json + merges.txt) or a small BPE trained on our corpora.

Both are one `tokenizers.Tokenizer` saved as `tokenizer.json` beside a checkpoint. The special ids
(start, end, pad, mask) are data in the model config, so the same class serves both vocabularies.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from retrieval.errors import RetrievalError
from retrieval.files import atomic_path

# encode jobs fork loader workers after the tokenizer has run; its thread pool must not be forked
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKENIZER_FILE = "tokenizer.json"
# our own BPE puts its special tokens first, so their ids are fixed whatever the corpus
OWN_SPECIALS = ("<pad>", "<|startoftext|>", "<|endoftext|>", "[MASK]")
MASK_TOKEN = "[MASK]"
FDT_MASK_TOKEN = "<|mask|>"


@dataclass(frozen=True)
class SpecialIds:
    sot: int
    eot: int
    pad: int
    mask: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


OWN_IDS = SpecialIds(sot=1, eot=2, pad=0, mask=3)
# OpenAI CLIP: <|startoftext|> 49406, <|endoftext|> 49407, pad 0 (also the BPE piece "!"), [MASK] appended
CLIP_IDS = SpecialIds(sot=49406, eot=49407, pad=0, mask=49408)


class TextTokenizer:
    """Turns text into a fixed-length row [SOT, pieces…, EOT, pad…] (cut to fit, EOT always kept)."""

    def __init__(self, backend, ids: SpecialIds):
        self.backend = backend
        self.ids = ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def pieces(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def row(self, text: str, length: int) -> list[int]:
        ids = [self.ids.sot, *self.pieces(text)[: length - 2], self.ids.eot]
        return ids + [self.ids.pad] * (length - len(ids))

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        with atomic_path(path) as tmp:
            self.backend.save(str(tmp))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, ids: SpecialIds) -> TextTokenizer:
        from tokenizers import Tokenizer

        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise RetrievalError(f"{folder} has no {TOKENIZER_FILE}")
        return cls(Tokenizer.from_file(str(path)), ids)

    @classmethod
    def from_clip_files(cls, folder: str | os.PathLike, mask: bool = True, mask_before: bool = False
                        ) -> TextTokenizer:
        """The OpenAI CLIP BPE from a folder with vocab.json and merges.txt, plus a mask token if `mask`: [MASK]
        appended (id 49408, FuseLIP), or with `mask_before` <|mask|> put before SOT and EOT, which move up one
        (mask 49406, SOT 49407, EOT 49408: FDT's vocabulary)."""
        from transformers import CLIPTokenizer

        folder = Path(folder)
        missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
        if missing:
            raise RetrievalError(f"{folder} is not a CLIP BPE folder: missing {', '.join(missing)}")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        token = MASK_TOKEN
        if mask and mask_before:
            token = FDT_MASK_TOKEN
            vocab[token] = vocab["<|startoftext|>"]
            vocab["<|startoftext|>"] += 1
            vocab["<|endoftext|>"] += 1
        backend = CLIPTokenizer(vocab=vocab, merges=merges).backend_tokenizer
        if mask and backend.token_to_id(token) is None:
            backend.add_special_tokens([token])
        size = backend.get_vocab_size(with_added_tokens=True)
        ids = SpecialIds(sot=backend.token_to_id("<|startoftext|>"), eot=backend.token_to_id("<|endoftext|>"),
                         pad=0, mask=backend.token_to_id(token) if mask else None)
        expected = ((size - 2, size - 1, size - 3) if mask and mask_before
                    else (size - 2 - mask, size - 1 - mask, size - 1 if mask else None))
        if (ids.sot, ids.eot, ids.mask) != expected:
            raise RetrievalError(f"{folder}: CLIP special ids are not the last of the vocabulary: {ids}")
        return cls(backend, ids)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A lower-cased byte-level BPE with at most `vocab_size` entries, special tokens first (OWN_IDS)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(OWN_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return TextTokenizer(backend, OWN_IDS)
