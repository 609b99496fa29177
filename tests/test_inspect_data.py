"""tools/inspect_data.py on the session's tiny dataset: printout, contact sheet, errors."""
import importlib.util
import json
import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from m5p.data import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location(
      "inspect_data", os.path.join(ROOT, "tools", "inspect_data.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


inspect_data = _tool()


def test_prints_manifest_and_records_and_writes_sheet(tiny_dataset, tmp_path, capsys):
  png = str(tmp_path / "sheet.png")
  assert inspect_data.main([tiny_dataset, f"--contact_sheet={png}", "--num=2",
                            "--num_sheet=4"]) == 0
  out = capsys.readouterr().out
  with open(os.path.join(tiny_dataset, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  for split, n in manifest["splits"].items():
    assert any(l.split()[:2] == [split, str(n)] for l in out.splitlines()), (split, n)
  assert f"items in {manifest['items_in']}" in out
  printed = re.findall(r"^\[(\d+)\] item (\S+)", out, re.M)
  assert len(printed) == 2, out
  src = convert.open_split(tiny_dataset, "train")
  for index, item_id in printed:
    assert src[int(index)]["item_id"].decode() == item_id
  assert "title tokens" in out
  assert f"wrote {png}" in out

  with Image.open(png) as im:
    assert im.format == "PNG"
    w, h = im.size
    pixels = np.asarray(im.convert("L"), np.float32)
  assert 800 <= w <= 4000 and 4 * 100 <= h <= 4000, (w, h)
  assert pixels.std() > 10  # Not blank: images, frames and spectrograms are drawn.


def test_sheet_without_cjk_font_is_quiet(tiny_dataset, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(inspect_data, "find_cjk_font", lambda: None)
  png = str(tmp_path / "plain.png")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert inspect_data.main([tiny_dataset, f"--contact_sheet={png}", "--num=0",
                              "--num_sheet=2", "--seed=1"]) == 0
  assert not [w for w in caught if "missing from" in str(w.message)]
  assert "no CJK font" in capsys.readouterr().out
  assert os.path.getsize(png) > 0


def test_not_a_dataset(tmp_path, capsys):
  assert inspect_data.main([str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert str(tmp_path) in err and "no converted dataset" in err
  assert "Traceback" not in err


def test_unknown_split(tiny_dataset, capsys):
  assert inspect_data.main([tiny_dataset, "--split=nope", "--num_sheet=0"]) == 2
  err = capsys.readouterr().err
  assert "'nope'" in err and "train" in err


@pytest.mark.parametrize("text,width",
                         [("a b c", 3), ("防滑垫加厚防滑垫加厚 mat", 8), ("x" * 30, 7), ("防 a", 1)])
def test_wrap_respects_display_width(text, width):
  """CJK characters count double; a character wider than the line gets a line of its own."""
  lines = inspect_data._wrap(text, width, 50)  # pylint: disable=protected-access
  assert "".join(lines).replace(" ", "") == text.replace(" ", "")
  for line in lines:
    assert inspect_data._width(line) <= max(width, 2), line  # pylint: disable=protected-access
