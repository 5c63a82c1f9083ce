"""Text → BPE ids: the CLIP BPE (from vocab.json + merges.txt) or a small BPE trained on our corpora.

Both are one `tokenizers.Tokenizer` saved as `tokenizer.json` beside a checkpoint. The special ids
(start, end, pad, mask) are data in the model config, so the same class serves both vocabularies.
Every text is first cleaned as the official CLIP tokenizers clean it (`clean_text`); the CLIP BPE then
splits words and reads literal special tokens exactly as the official tokenizer of its model does.
"""

from __future__ import annotations

import html
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
# the official word split (before byte-level BPE); literal special tokens are matched before it
CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# how open_clip's tokenizer (FuseLIP) names the start and end tokens it reads as special inside a text;
# FDT's, OpenAI's, reads <|startoftext|> and <|endoftext|>; neither reads its mask token
OPEN_CLIP_SPECIALS = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}


def largest_id(backend) -> int:
    """The largest id a `tokenizers.Tokenizer` gives (an added token may reuse a vocabulary id under another name)."""
    return max(backend.get_vocab(with_added_tokens=True).values())


def clean_text(text: str) -> str:
    """What the official CLIP tokenizers do before BPE: ftfy, HTML entities unescaped twice, whitespace
    collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def official_word_split(backend, ids: SpecialIds):
    """For a CLIP BPE (its pre-tokenizer splits by CLIP_WORDS): the official tokenizer's whole split, its start
    and end tokens first, so a literal one is special exactly where that regex finds it (not inside a run of
    punctuation, as in "x.<|endoftext|>"); None for our own BPE."""
    import regex

    state = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    first = (state.get("pretokenizers") or [{}])[0]
    if first.get("type") != "Split" or first.get("pattern", {}).get("Regex") != CLIP_WORDS:
        return None
    specials = [backend.id_to_token(i) for i in (ids.sot, ids.eot)]
    return regex.compile("|".join(map(regex.escape, specials)) + "|" + CLIP_WORDS, regex.IGNORECASE)


class TextTokenizer:
    """Turns text into a fixed-length row [SOT, pieces…, EOT, pad…] (cut to fit, EOT always kept)."""

    def __init__(self, backend, ids: SpecialIds):
        self.backend = backend
        self.ids = ids
        self.vocab_size = largest_id(backend) + 1
        self.words = official_word_split(backend, ids)

    def pieces(self, text: str) -> list[int]:
        text = clean_text(text)
        if self.words is None:
            return self.backend.encode(text, add_special_tokens=False).ids
        words = self.words.findall(text)  # a special token can only be a whole word here
        return self.backend.encode(words, is_pretokenized=True, add_special_tokens=False).ids if words else []

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
        tokenizer = cls(Tokenizer.from_file(str(path)), ids)
        # CLIP's own ids over CLIP's 49k pieces; a small stand-in BPE under CLIP's ids (`bench encode --random-init`)
        # is not such an import
        if tokenizer.words is None and min(ids.sot, ids.eot) >= CLIP_IDS.sot and \
                tokenizer.backend.get_vocab_size() >= CLIP_IDS.sot:
            raise RetrievalError(f"{path} is a CLIP BPE written by an older import, which splits words unlike the "
                                 "official tokenizer; import the checkpoint again (`retrieval models import`, or "
                                 "`retrieval models pull NAME`)")
        return tokenizer

    @classmethod
    def from_clip_files(cls, folder: str | os.PathLike, mask: bool = True, mask_before: bool = False
                        ) -> TextTokenizer:
        """The OpenAI CLIP BPE from a folder with vocab.json and merges.txt, plus a mask token if `mask`: [MASK]
        appended (id 49408, FuseLIP, which reads text as open_clip does), or with `mask_before` <|mask|> put
        before SOT and EOT, which move up one (mask 49406, SOT 49407, EOT 49408: FDT's vocabulary). A mask token
        in a text is plain text, as it is to both official tokenizers."""
        from tokenizers import Regex, Tokenizer, pre_tokenizers
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
        elif mask and token not in vocab:
            vocab[token] = len(vocab)
        backend = CLIPTokenizer(vocab=vocab, merges=merges).backend_tokenizer
        size = largest_id(backend) + 1
        ids = SpecialIds(sot=backend.token_to_id("<|startoftext|>"), eot=backend.token_to_id("<|endoftext|>"),
                         pad=0, mask=backend.token_to_id(token) if mask else None)
        expected = ((size - 2, size - 1, size - 3) if mask and mask_before
                    else (size - 2 - mask, size - 1 - mask, size - 1 if mask else None))
        if (ids.sot, ids.eot, ids.mask) != expected:
            raise RetrievalError(f"{folder}: CLIP special ids are not the last of the vocabulary: {ids}")
        data = json.loads(backend.to_str())
        if not mask_before:  # open_clip's names for the same ids
            for old, new in OPEN_CLIP_SPECIALS.items():
                data["model"]["vocab"][new] = data["model"]["vocab"].pop(old)
            for added in data["added_tokens"]:
                added["content"] = OPEN_CLIP_SPECIALS.get(added["content"], added["content"])
        backend = Tokenizer.from_str(json.dumps(data))
        backend.normalizer = None  # clean_text does it, as the official code does, before the word split
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return cls(backend, ids)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    """A lower-cased byte-level BPE with at most `vocab_size` entries, special tokens first (OWN_IDS), learnt from
    the texts as `pieces` will see them (cleaned)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(OWN_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((clean_text(t) for t in texts), trainer)
    return TextTokenizer(backend, OWN_IDS)
