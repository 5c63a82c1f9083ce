"""Text reaches the CLIP BPE exactly as the official tokenizers give it: ftfy, HTML entities unescaped twice,
whitespace collapsed, lower case, the official word split, and literal special tokens read as each official
tokenizer reads them (open_clip's for FuseLIP, FDT's OpenAI-style one). The expected ids are computed here from
those definitions, by a byte-level BPE written for this test, on the tiny CLIP-form vocabulary of
test_fuselip_import."""

from __future__ import annotations

import html

import ftfy
import pytest
import regex
from test_fuselip_import import CLIP_MERGES, _bytes_to_unicode, write_clip_bpe

from retrieval.text_tokenizer import OWN_IDS, TextTokenizer, clean_text

WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
TEXTS = [
    "A red cat &amp;amp; the dog",  # an entity escaped twice
    "&lt;b&gt;red&lt;/b&gt; cat",
    "“curly” ‘quotes’ don’t",
    "ﬁne ﬂat cat",  # ligatures
    "ＲＥＤ ｃａｔ",  # full-width letters
    "cafÃ© au lait",  # mojibake
    "  many   spaces\tand\nnew\u00a0lines  ",
    "a <|endoftext|> b <|startoftext|> c",
    "a [MASK] b <|mask|> c",
    "a <start_of_text> b <END_OF_TEXT> c",
    "x.<|endoftext|> y!<end_of_text> z",  # after punctuation a special is part of the punctuation run: plain text
    "a<|endoftext|>b c<end_of_text>d",  # after a letter it is matched
    "it's 2 o'clock, isn't it?!",
]


def official_clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def official_ids(text: str, vocab: dict[str, int], specials: dict[str, int]) -> list[int]:
    """The official SimpleTokenizer.encode: clean, split by (specials | words), byte-encode, BPE each word."""
    ranks = {pair: i for i, pair in enumerate(CLIP_MERGES)}
    byte_chars = dict(zip(_byte_order(), _bytes_to_unicode()))
    pattern = regex.compile("|".join(map(regex.escape, specials)) + "|" + WORDS, regex.IGNORECASE)
    ids = []
    for word in pattern.findall(official_clean(text)):
        if word in specials:
            ids.append(specials[word])
            continue
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[s] for s in symbols]
    return ids


def _byte_order() -> list[int]:
    """The bytes in the order _bytes_to_unicode gives their characters (printable first, then the rest)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


@pytest.fixture(scope="module")
def clip_bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip-bpe")
    return folder, write_clip_bpe(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_fuselip_reads_text_as_open_clip_does(clip_bpe, text):
    folder, vocab = clip_bpe
    tokenizer = TextTokenizer.from_clip_files(folder, mask=True)
    specials = {"<start_of_text>": vocab["<|startoftext|>"], "<end_of_text>": vocab["<|endoftext|>"]}
    assert tokenizer.pieces(text) == official_ids(text, vocab, specials)


@pytest.mark.parametrize("text", TEXTS)
def test_fdt_reads_text_as_its_official_tokenizer_does(clip_bpe, text):
    folder, vocab = clip_bpe
    tokenizer = TextTokenizer.from_clip_files(folder, mask_before=True)
    shifted = {"<|startoftext|>": vocab["<|startoftext|>"] + 1, "<|endoftext|>": vocab["<|endoftext|>"] + 1}
    assert tokenizer.pieces(text) == official_ids(text, vocab, shifted)


def test_a_literal_mask_or_end_token_in_a_caption_does_not_end_it(clip_bpe):
    """The row ends where the text ends: one EOT, after every piece, and no mask id (FuseLIP pools there)."""
    folder, _ = clip_bpe
    tokenizer = TextTokenizer.from_clip_files(folder, mask=True)
    row = tokenizer.row("a [MASK] b <|endoftext|> c", 40)
    assert row.count(tokenizer.ids.eot) == 1 and tokenizer.ids.mask not in row
    assert row.index(tokenizer.ids.eot) == 1 + len(tokenizer.pieces("a [MASK] b <|endoftext|> c"))


def test_cleaning_changes_what_it_must_and_survives_a_save(clip_bpe, tmp_path):
    folder, _ = clip_bpe
    assert clean_text("Tom &amp;amp; Jerry’s  ﬁsh") == "tom & jerry's fish"
    tokenizer = TextTokenizer.from_clip_files(folder, mask=True)
    tokenizer.save(tmp_path)
    again = TextTokenizer.load(tmp_path, tokenizer.ids)
    assert [again.pieces(t) for t in TEXTS] == [tokenizer.pieces(t) for t in TEXTS]
    assert again.vocab_size == tokenizer.vocab_size == 49409


def test_our_own_bpe_gets_the_same_cleaning():
    own = TextTokenizer.load("retrieval/checkpoints/tokenizers", OWN_IDS)
    assert own.pieces("A RED&amp;amp;blue  ＣＩＲＣＬＥ") == own.pieces("a red&blue circle")


def test_a_clip_bpe_saved_without_the_official_split_is_refused(clip_bpe, tmp_path):
    """A tokenizer.json written by an import before the official word split (a plain byte-level pre-tokenizer)
    would give other ids: loading it says to import again instead."""
    from tokenizers import pre_tokenizers

    from retrieval import RetrievalError

    folder, _ = clip_bpe
    tokenizer = TextTokenizer.from_clip_files(folder, mask=True)
    tokenizer.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.save(tmp_path)
    with pytest.raises(RetrievalError, match="written by an older import.*import the checkpoint again"):
        TextTokenizer.load(tmp_path, tokenizer.ids)


def test_our_own_bpe_learns_from_cleaned_texts():
    """Trained on what `pieces` will see: an escaped entity never becomes a learnt piece, the word it hides does."""
    from retrieval.text_tokenizer import train_bpe

    own = train_bpe(["Tom &amp;amp; Jerry&#39;s  ＦＩＳＨ"] * 50, vocab_size=400)
    vocab = own.backend.get_vocab()
    assert not any("amp" in piece or "#39" in piece for piece in vocab)
    assert own.pieces("tom & jerry's fish") == own.pieces("Tom &amp;amp; Jerry&#39;s  ＦＩＳＨ")
    assert len(own.pieces("tom & jerry's fish")) <= 6  # each word learnt whole: tom, &, jerry, ', s, fish
