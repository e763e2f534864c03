"""Build a byte-level BPE tokenizer with the special tokens at the ids `tokenizer.py` names.

Used by `make-checkpoint` (random-weight checkpoints need a tokenizer whose size matches the
config's vocab_size exactly) and later by the training recipe.
"""

from __future__ import annotations

import itertools
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from trimode.tokenizer import BOS, CHATML_TEMPLATE, IM_END, MASK, NUM_RESERVED_IDS, PAD, SPECIAL_TOKEN_IDS, UNK

# A BPE learned from a few MB reaches a few thousand useful merges; past that, rows are filled with
# synthetic merges (concatenations of learned tokens) so a 131072-row checkpoint gets a 131072-token
# tokenizer in seconds. They are valid, decodable tokens that ordinary text rarely produces.
MAX_LEARNED_VOCAB = 8192


def stdlib_corpus(max_bytes: int = 1_500_000) -> Iterator[str]:
    """Python standard library source, a corpus every machine has (PSF license), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def special_tokens() -> list[str]:
    by_id = {i: t for t, i in SPECIAL_TOKEN_IDS.items()}
    return [by_id.get(i, f"<SPECIAL_{i}>") for i in range(NUM_RESERVED_IDS)]


def build_tokenizer(vocab_size: int, corpus: Iterator[str] | None = None, split_digits: bool = False) -> HFTokenizer:
    """split_digits: every digit is its own token (arithmetic is learnable digit by digit)."""
    min_size = NUM_RESERVED_IDS + 256 + 1
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} ({NUM_RESERVED_IDS} special ids + 256 bytes + 1); got {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, MAX_LEARNED_VOCAB),
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else stdlib_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, SPECIAL_TOKEN_IDS[BOS])]
    )
    if tok.get_vocab_size() < vocab_size:
        tok = _pad_with_synthetic_merges(tok, vocab_size)
    assert tok.get_vocab_size() == vocab_size
    return tok


def _pad_with_synthetic_merges(tok: HFTokenizer, vocab_size: int) -> HFTokenizer:
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    specials = {t["content"] for t in data["added_tokens"]}
    base = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    next_id = tok.get_vocab_size()
    for a, b in itertools.product(base, base):
        if next_id == vocab_size:
            break
        if a + b in vocab:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if as_pairs else f"{a} {b}")
        next_id += 1
    return HFTokenizer.from_str(json.dumps(data))


def write_tokenizer_files(tok: HFTokenizer, out: str | os.PathLike, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (ChatML template, special tokens) into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": t,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for t, i in SPECIAL_TOKEN_IDS.items()
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
