"""Any-modality retrieval matrix on hand-made embeddings whose signal lives in one modality."""
import json

import numpy as np
import pytest

from m5p.evaluation import any_modality


def _fake_embedder(n=40, classes=4, seed=0):
  """Text carries the label; the other modalities are noise; item 0 has no audio."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  centres = np.eye(classes, 16) * 10
  per_modality = [centres[labels] + rng.normal(size=(n, 16))] + [
      rng.normal(size=(n, 16)) for _ in range(4)]
  has = np.ones((n, 5), bool)
  has[0, 4] = False

  def embed(keep):
    present = has if keep is None else has & keep[None]
    fused = sum(per_modality[m] * present[:, m:m + 1] for m in range(5))
    return {"fused": fused, "present": present, "label": labels, "index": np.arange(n)}

  return embed, n


def test_matrix_finds_the_informative_modality(tmp_path):
  embed, n = _fake_embedder()
  rows = np.arange(n)
  result = any_modality.retrieval_matrix(embed, rows, rows)
  names = result["subsets"]
  assert len(names) == 32 and names[0] == "text" and names[-1] == any_modality.FULL
  table = result["map"]
  text, audio = names.index("text"), names.index("audio")
  assert table[text, text] == pytest.approx(100.0)
  assert table[audio, audio] < 60
  assert result["num_queries"][audio] == n - 1  # Item 0 has no audio: not an audio query.
  sections = any_modality.summary(result)
  assert set(sections) == {"any_modality_query", "any_modality_gallery"}
  assert len(sections["any_modality_query"]) == 32
  full = names.index(any_modality.FULL)
  assert result["num_queries"][full] == n  # As they are: nobody left out.
  assert sections["any_modality_query"]["text@1"] > sections["any_modality_query"]["audio@1"]
  json_path, md_path, png_path = any_modality.write(result, str(tmp_path))
  assert len(json.load(open(json_path))["map"]) == 32
  assert "| text |" in open(md_path).read()
  from PIL import Image
  assert Image.open(png_path).size[0] > 500
