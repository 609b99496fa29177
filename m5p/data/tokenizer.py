"""SentencePiece tokenizer for titles and tables, trained by the converter."""
from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
MASK_PIECE = "[MASK]"


def train_tokenizer(lines: Iterable[str], vocab_size: int, path: str) -> None:
  """Trains a byte-fallback BPE model on `lines` and writes it to `path`.

  BPE (not unigram) because small, repetitive corpora cannot reach the
  requested size with unigram; `hard_vocab_limit=False` lets a small corpus
  give fewer pieces than asked. Ids 0-4 are pad, unk, [CLS], [SEP], [MASK].
  """
  lines = [l for l in lines if l.strip()]
  if not lines:
    raise ValueError("No non-empty titles or table values to train the tokenizer on.")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
      vocab_size=vocab_size, character_coverage=0.9995, byte_fallback=True,
      split_digits=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=CLS_ID,
      eos_id=SEP_ID, user_defined_symbols=[MASK_PIECE], hard_vocab_limit=False,
      input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2,
      num_threads=1)
  with open(path, "wb") as f:
    f.write(buf.getvalue())


class Tokenizer:
  """Encodes strings to ids; ids never exceed `vocab_size - 1`."""

  def __init__(self, path: str):
    with open(path, "rb") as f:
      self._sp = spm.SentencePieceProcessor(model_proto=f.read())
    if self._sp.piece_to_id(MASK_PIECE) != MASK_ID:
      raise ValueError(f"{path}: not an m5p tokenizer ([MASK] is not id {MASK_ID}).")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text) if text else []

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if i not in SPECIAL_IDS])
