"""CLIP tokenizer and SegVol's prompt templates (docs/official-pipeline.md §4), without `transformers`.

Loads the fast-tokenizer file `tokenizer.json` with the `tokenizers` library, or, when a folder
has only `vocab.json` + `merges.txt`, builds the same byte-level BPE pipeline from them: NFC,
whitespace runs -> one space, lowercase; CLIP's word-splitting regex; byte-level alphabet; BPE with
the `</w>` end-of-word suffix; `<|startoftext|>` ... `<|endoftext|>` around every text.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..errors import ShapeError

CT_TEMPLATE = "A computerized tomography of a {}."  # the official template, character for character
MRI_TEMPLATE = "A magnetic resonance imaging of a {}."  # ours: the same sentence for MRI
TEMPLATES = {"ct": CT_TEMPLATE, "mri": MRI_TEMPLATE}
_MODALITY_ALIASES = {"mr": "mri"}

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
PAD_ID = EOS_ID  # CLIP pads with <|endoftext|>
MAX_POSITIONS = 77
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits,
# runs of other non-space characters.
_SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def normalize_modality(modality: str) -> str:
    """'ct' / 'mri' (case-insensitive, 'mr' accepted) -> 'ct' | 'mri'; ValueError otherwise."""
    key = str(modality).strip().lower()
    key = _MODALITY_ALIASES.get(key, key)
    if key not in TEMPLATES:
        raise ValueError(f"unknown modality {modality!r}: use one of {sorted(TEMPLATES)}")
    return key


def prompt_text(name: str, modality: str = "ct") -> str:
    """The sentence fed to CLIP for a category name, e.g. 'A computerized tomography of a liver.'."""
    return TEMPLATES[normalize_modality(modality)].format(name)


class Tokens(NamedTuple):
    """input_ids (N, L) int64, padded with PAD_ID to the longest row; attention_mask (N, L) int64,
    1 on real tokens (BOS..EOS) and 0 on padding."""

    input_ids: Tensor
    attention_mask: Tensor


class ClipTokenizer:
    """CLIP BPE tokenizer.

    Args:
        path: a folder with `tokenizer.json` (preferred) or `vocab.json` + `merges.txt`, or the
            path of a `tokenizer.json` file.
        max_length: longest tokenised text accepted (BOS and EOS included); CLIP has 77 positions.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = MAX_POSITIONS):
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        self.max_length = int(max_length)
        if path.is_file():
            self._tok = Tokenizer.from_file(str(path))
        elif (path / "tokenizer.json").is_file():
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            self._tok = _build_from_vocab(path / "vocab.json", path / "merges.txt")
        else:
            raise FileNotFoundError(
                f"no CLIP tokenizer at {path}: expected tokenizer.json, or vocab.json and merges.txt "
                "(the HF BAAI/SegVol repository or SegVol's config/clip folder has them)"
            )
        # Special-token ids are fixed by the CLIP vocabulary; a different file is a different model.
        for token, expected in ((BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)):
            got = self._tok.token_to_id(token)
            if got != expected:
                raise ValueError(f"{path}: {token} has id {got}, CLIP expects {expected}")

    def save(self, path: str | os.PathLike) -> None:
        """Write this tokenizer as one `tokenizer.json` (atomically: `io.output.write_file_atomic`)."""
        from ..io.output import write_file_atomic

        write_file_atomic(path, self._tok.save)

    def __call__(self, texts: str | Sequence[str], device: torch.device | str | None = None) -> Tokens:
        """Tokenise texts (already templated) into one padded batch; see `Tokens` for shapes.

        Raises ShapeError (a ValueError) if a text is longer than `max_length` tokens: SegVol never
        truncates, and the text tower has no positions beyond 77.
        """
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise ValueError("no texts to tokenise")
        ids = [enc.ids for enc in self._tok.encode_batch(list(texts))]
        for text, row in zip(texts, ids):
            if len(row) > self.max_length:
                raise ShapeError(
                    f"text {text!r} is {len(row)} tokens long (BOS and EOS included); the CLIP text "
                    f"encoder takes at most {self.max_length}: shorten the category name"
                )
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.int64)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            attention_mask[i, : len(row)] = 1
        return Tokens(input_ids.to(device), attention_mask.to(device))


def _build_from_vocab(vocab_file: pathlib.Path, merges_file: pathlib.Path):
    """The CLIP pipeline of `tokenizer.json`, assembled from the two slow-tokenizer files."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = []
    for line in merges_file.read_text(encoding="utf-8").splitlines():
        # The first line of CLIP's merges.txt is a '#version' header; blank lines carry nothing.
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split()
        merges.append((left, right))
    tok = Tokenizer(
        models.BPE(
            vocab, merges, unk_token=EOS_TOKEN, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True keeps the regex matches as the pieces and drops what lies between them.
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # Arguments are (sep, cls): EOS is appended, BOS prepended.
    tok.post_processor = processors.RobertaProcessing(
        (EOS_TOKEN, EOS_ID), (BOS_TOKEN, BOS_ID), trim_offsets=False, add_prefix_space=False
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BOS_TOKEN, normalized=True), AddedToken(EOS_TOKEN, normalized=False)])
    return tok
