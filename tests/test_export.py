"""Exports of a trained run: params onto any mesh, embeddings, a jax-only serving
function, the raw-product Encoder, and `python -m m5p.evaluate`.

One tiny run (2 steps on a (2, 2, 2) mesh) and its export are made once for
the module; each test checks one artifact against what training computed.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from conftest import tiny_config
from m5p import export, sharding, train
from m5p.data import convert, pipeline, raw_layout

TOL = 1e-5  # Embeddings across meshes / devices: reduction order differs (seen ~1e-6).


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  c = tiny_config(total_steps=2)
  c.mesh.update(dict(data=2, fsdp=2, model=2, num_devices=-1))
  c.data.dir = tiny_dataset
  workdir, export_dir = str(root / "run"), str(root / "export")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(c.to_json_best_effort(indent=2))  # As m5p.main does.
  train.train_and_evaluate(c, workdir, tiny_dataset)
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    train_eval = json.load(f)
  summary = export.export(workdir, export_dir, log=lambda *a: None)
  return types.SimpleNamespace(config=c, workdir=workdir, export_dir=export_dir, data=tiny_dataset,
                               train_eval=train_eval, summary=summary, root=root)


@pytest.fixture(scope="module")
def encoder(run):
  import m5p
  return m5p.Encoder.from_export(run.export_dir)


def _mesh(**axes):
  c = tiny_config()
  c.mesh.update(dict(data=1, fsdp=1, model=1, num_devices=-1))
  c.mesh.update(axes)
  return sharding.make_mesh(c.mesh)


def test_export_layout(run):
  e = run.export_dir
  for name in ("params", "config.json", "tokenizer.model", "manifest.json", "export.json",
               "embeddings/test.npz", "embeddings/train.npz", "serving/model.jax",
               "serving/spec.json"):
    assert os.path.exists(os.path.join(e, name)), name
  assert run.summary["step"] == 2
  with open(os.path.join(e, "manifest.json"), encoding="utf-8") as f:
    conversion = json.load(f)["conversion"]
  assert conversion["image_size"] == run.config.data.image_size


def test_config_round_trips_through_json(run):
  c = run.config
  assert export.config_from_json(c.to_json_best_effort()).to_dict() == c.to_dict()
  assert export.load_config(run.export_dir).to_dict() == c.to_dict()
  # Without W/config.json (runs started from Python) the checkpoint's copy is used.
  bare = str(run.root / "bare")
  shutil.copytree(os.path.join(run.workdir, "checkpoints"), os.path.join(bare, "checkpoints"))
  assert export.load_run_config(bare).to_dict() == c.to_dict()
  assert isinstance(export.load_config(run.export_dir).model.audio_patch, tuple)


def test_params_restore_equal_on_other_meshes(run):
  trained, step = export.restore_params(run.workdir, run.config, sharding.make_mesh(run.config.mesh))
  assert step == 2
  ref = jax.tree.map(np.asarray, jax.device_get(trained))
  for overrides, devices in (({"mesh": dict(data=1, fsdp=1, model=1, num_devices=1)}, 1),
                             ({"mesh.data": 1, "mesh.fsdp": 8, "mesh.model": 1}, 8)):
    params, config = export.load_params(run.export_dir, config_overrides=overrides)
    leaves = jax.tree.leaves(params)
    assert {len(leaf.sharding.device_set) for leaf in leaves} == {devices}
    assert dict(leaves[0].sharding.mesh.shape) == {k: config.mesh[k] for k in ("data", "fsdp", "model")}
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for a, b in zip(leaves, jax.tree.leaves(ref)):
      np.testing.assert_array_equal(np.asarray(a), b)
  one = _mesh(num_devices=1)
  params, _ = export.load_params(run.export_dir, mesh=one)  # An explicit mesh wins.
  assert all(leaf.sharding.mesh == one for leaf in jax.tree.leaves(params))


def test_embeddings_npz_load_without_pickle_and_match_the_split(run, encoder):
  manifest = convert.load_manifest(run.data)
  for split in ("test", "train"):
    emb = export.load_embeddings(os.path.join(run.export_dir, "embeddings", f"{split}.npz"))
    n, d, p = manifest["splits"][split], run.config.model.width, run.config.model.proj_dim
    assert emb["item_id"].dtype.kind == "U" and emb["item_id"].shape == (n,)
    assert emb["fused"].shape == (n, d) and emb["pooled"].shape == (n, 5, d)
    assert emb["z"].shape == (n, 5, p) and emb["present"].shape == (n, 5)
    assert int(emb["step"]) == 2
    if split != "test":
      continue
    rows = {k: [] for k in ("item_id", "label", "fine_group", "index", "fused", "z", "present")}
    for batch in pipeline.eval_batches(run.config, run.data, split):
      keep = batch["index"] >= 0
      out = encoder.embed_batch({k: v for k, v in batch.items() if k != "item_id"})
      for k in ("fused", "z", "present"):
        rows[k].append(out[k][keep])
      rows["item_id"].append([i.decode() for i in batch["item_id"][keep]])
      for k in ("label", "fine_group", "index"):
        rows[k].append(batch[k][keep])
    got = {k: np.concatenate(v) for k, v in rows.items()}
    for k in ("item_id", "label", "fine_group", "index", "present"):
      np.testing.assert_array_equal(emb[k], got[k], err_msg=k)
    np.testing.assert_allclose(emb["fused"], got["fused"], atol=TOL, rtol=0)
    np.testing.assert_allclose(emb["z"], got["z"], atol=TOL, rtol=0)


SERVE = textwrap.dedent("""
    import json, sys
    sys.modules["m5p"] = None  # Importing m5p now fails: the file must need jax alone.
    import jax, numpy as np
    export_dir, batch_path, out_path = sys.argv[1:4]
    with open(export_dir + "/serving/spec.json") as f:
      spec = json.load(f)
    with open(export_dir + "/serving/" + spec["file"], "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(batch_path, allow_pickle=False) as f:
      batch = {k: f[k] for k in spec["inputs"]}
    for k, s in spec["inputs"].items():
      assert batch[k].dtype == np.dtype(s["dtype"]), k
    out = exported.call(batch)
    np.savez(out_path, **{k: np.asarray(v) for k, v in out.items()})
""")


def test_serving_function_runs_without_m5p_and_matches(run, tmp_path):
  with open(os.path.join(run.export_dir, "serving", "spec.json"), encoding="utf-8") as f:
    spec = json.load(f)
  assert spec["polymorphic_batch"] and "cpu" in spec["platforms"]
  batch = next(pipeline.eval_batches(run.config, run.data, "test"))
  n = 5  # Not the export's example batch size: the batch dimension is symbolic.
  np.savez(tmp_path / "batch.npz", **{k: batch[k][:n] for k in spec["inputs"]})
  subprocess.run([sys.executable, "-c", SERVE, run.export_dir, str(tmp_path / "batch.npz"),
                  str(tmp_path / "out.npz")], check=True, cwd=str(tmp_path), env=_env(), timeout=600)
  with np.load(tmp_path / "out.npz", allow_pickle=False) as f:
    out = {k: f[k] for k in f.files}
  emb = export.load_embeddings(os.path.join(run.export_dir, "embeddings", "test.npz"))
  assert out["fused"].shape == (n, run.config.model.width)
  np.testing.assert_allclose(out["fused"], emb["fused"][:n], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["z"], emb["z"][:n], atol=TOL, rtol=0)
  np.testing.assert_array_equal(out["present"], emb["present"][:n])


def _env() -> dict:
  """The test's environment for child processes, with its compilation cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")


def _raw_products(run, split: str) -> tuple[list[str], list[dict]]:
  """The split's items as raw files (the tiny dataset's raw dir is beside its data dir)."""
  raw = os.path.join(os.path.dirname(run.data), "raw")
  entries = {}
  for name in raw_layout.find_splits(raw).values():
    entries.update(raw_layout.iter_entries(name))
  source = convert.open_split(run.data, split)
  ids, products = [], []
  for i in range(len(source)):
    record = source[i]
    if any(b"crashed" in f for f in record["faults"]):
      continue  # A media worker died while converting: the record is not the file's.
    item_id = record["item_id"].decode()
    paths, _ = raw_layout.find_media(raw, item_id)
    product = {"title": entries[item_id].get("title"), "pv": entries[item_id].get("pv")}
    product.update({k: v for k, v in paths.items() if k in ("image", "video", "audio")})
    ids.append(item_id)
    products.append(product)
  return ids, products


def test_encoder_on_raw_files_matches_the_export(run, encoder):
  emb = export.load_embeddings(os.path.join(run.export_dir, "embeddings", "test.npz"))
  ids, products = _raw_products(run, "test")
  assert len(ids) >= len(emb["item_id"]) - 3
  assert {"image", "video", "audio", "title", "pv"} <= set().union(*products)  # Every modality.
  out = encoder.embed(products)
  rows = [list(emb["item_id"]).index(i) for i in ids]
  np.testing.assert_array_equal(out["present"], emb["present"][rows])
  np.testing.assert_allclose(out["fused"], emb["fused"][rows], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["z"], emb["z"][rows], atol=TOL, rtol=0)

  # The same image given as bytes; a product of a title only; an unknown field.
  k = next(j for j, p in enumerate(products) if "image" in p)
  with open(products[k]["image"], "rb") as f:
    as_bytes = dict(products[k], image=f.read())
  title_only = {"title": products[k]["title"] or "a title"}
  out2 = encoder.embed([as_bytes, title_only])
  np.testing.assert_array_equal(out2["fused"][0], out["fused"][k])
  assert out2["present"][1].tolist() == [True, False, False, False, False]
  assert out2["faults"] == [out["faults"][k], []]
  with pytest.raises(ValueError, match="unknown product fields"):
    encoder.embed([{"images": "x.jpg"}])


def test_evaluate_cli_reproduces_the_training_eval(run):
  os.remove(os.path.join(run.workdir, "eval.json"))
  r = subprocess.run([sys.executable, "-m", "m5p.evaluate", f"--workdir={run.workdir}"],
                     capture_output=True, text=True, env=_env(), timeout=600,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "coarse_retrieval" in r.stdout and "mAP@1" in r.stdout
  with open(os.path.join(run.workdir, "eval.json"), encoding="utf-8") as f:
    got = json.load(f)
  assert got["meta"]["step"] == run.train_eval["meta"]["step"] == 2
  assert got["coarse_retrieval"]["mAP@1"] == run.train_eval["coarse_retrieval"]["mAP@1"]
  assert got["coarse_retrieval"] == pytest.approx(run.train_eval["coarse_retrieval"])
  # The any-modality matrix: the full-products row equals plain coarse retrieval.
  full = got["any_modality_query"]["all_present@1"]
  assert full == pytest.approx(got["coarse_retrieval"]["mAP@1"], abs=1e-4)
  for name in ("any_modality.json", "any_modality.md", "any_modality.png"):
    assert os.path.exists(os.path.join(run.workdir, name)), name
  # report.md after eval.json: every section, its PNGs, and the same numbers.
  with open(os.path.join(run.workdir, "report.md"), encoding="utf-8") as f:
    text = f.read()
  for heading in ("### coarse_retrieval", "### fine_retrieval", "### linear_probe", "### clustering",
                  "## Any-modality retrieval", "## Retrieval examples", "## Embedding map",
                  "## Learned modality weights"):
    assert heading in text, heading
  floor = got["coarse_retrieval_random"]["mAP@1"]
  assert f"| mAP@1 | {got['coarse_retrieval']['mAP@1']:.2f} | {floor:.2f} |" in text
  assert text.count("**Query ") == 3 and "No images or titles" not in text
  for name in ("retrieval_examples.png", "embedding_map.png", "modality_weights.png"):
    assert f"(report/{name})" in text
    with open(os.path.join(run.workdir, "report", name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


# ---------------------------------------------------------------------------
# Acceptance 2: eval.json's coarse mAP@1 and NMI, recomputed from the exported
# embeddings by an independent implementation (plain loops, SCALE.md section 6).


def _rows_in_list_order(emb: dict, ids) -> list[int]:
  row_of = {str(i): r for r, i in enumerate(emb["item_id"])}
  return [row_of[i] for i in dict.fromkeys(ids or []) if i in row_of and emb["label"][row_of[i]] >= 0]


def _authors_map_and_prec(fused, labels, queries, gallery, k: int) -> tuple[float, float]:
  """mAP@k and Prec@k x100: rank the gallery by dot product, the query removed from
  its own list; P = the gallery items of the query's label (with the query itself
  when it is in the gallery); K' = min(k, |P|, list length); each hit at rank r
  within K' adds hits-so-far / r; AP = that sum / hits (0 without one); Prec = hits / K'."""
  aps, precs = [], []
  for q in queries:
    ranked = [g for g in gallery if g != q]
    score = {g: sum(float(a) * float(b) for a, b in zip(fused[q], fused[g])) for g in ranked}
    ranked.sort(key=lambda g: -score[g])
    num_relevant = sum(1 for g in gallery if labels[g] == labels[q])
    k_eff = min(k, num_relevant, len(ranked))
    hits, total = 0, 0.0
    for r, g in enumerate(ranked[:k_eff], 1):
      if labels[g] == labels[q]:
        hits += 1
        total += hits / r
    aps.append(total / hits if hits else 0.0)
    precs.append(hits / k_eff if k_eff else 0.0)
  return 100.0 * sum(aps) / len(aps), 100.0 * sum(precs) / len(precs)


def _nmi(truth, pred) -> float:
  """Mutual information over the mean of the two entropies (arithmetic normalisation)."""
  import math
  from collections import Counter
  n = len(truth)
  joint, t_count, p_count = Counter(zip(truth, pred)), Counter(truth), Counter(pred)
  h_t = -sum(c / n * math.log(c / n) for c in t_count.values())
  h_p = -sum(c / n * math.log(c / n) for c in p_count.values())
  if h_t == 0.0 and h_p == 0.0:
    return 1.0  # One class and one cluster: a perfect match.
  mi = sum(c / n * math.log(c * n / (t_count[t] * p_count[p])) for (t, p), c in joint.items())
  return mi / ((h_t + h_p) / 2)


def test_independent_recomputation_matches_eval_json(run):
  from sklearn.cluster import KMeans
  emb = export.load_embeddings(os.path.join(run.export_dir, "embeddings", "test.npz"))
  fused, labels = emb["fused"].astype(np.float64), emb["label"].tolist()
  lists = convert.load_manifest(run.data).get("splits_files", {})
  labelled = [r for r, l in enumerate(labels) if l >= 0]
  queries = _rows_in_list_order(emb, lists.get("coarse_query"))
  gallery = _rows_in_list_order(emb, lists.get("coarse_gallery"))
  if not (queries and gallery):
    queries = gallery = labelled
  assert len(queries) >= 5
  coarse = run.train_eval["coarse_retrieval"]
  assert coarse["num_queries"] == len(queries) and coarse["gallery_size"] == len(gallery)
  for k in run.config.eval.ks:  # mAP@1 is acceptance 2; the other K check K' as well.
    map_k, prec_k = _authors_map_and_prec(fused, labels, queries, gallery, k)
    assert abs(map_k - coarse[f"mAP@{k}"]) < 1e-4, k
    assert abs(prec_k - coarse[f"Prec@{k}"]) < 1e-4, k

  # Clustering: k-means as m5p.evaluation.clustering runs it (k = categories, one init
  # per seed, seeds config.seed + 0..4, L2-normalised float64 features, cls_test items in
  # list order), NMI from the entropies above.
  rows = _rows_in_list_order(emb, lists.get("cls_test")) or labelled
  truth = [labels[r] for r in rows]
  k = len(set(truth))
  x = fused[rows] / np.maximum(np.linalg.norm(fused[rows], axis=1, keepdims=True), 1e-12)
  nmis = [_nmi(truth, KMeans(n_clusters=k, n_init=1, random_state=run.config.seed + s)
               .fit_predict(x).tolist()) for s in range(5)]
  clustering = run.train_eval["clustering"]
  assert clustering["k"] == k and clustering["num_items"] == len(rows)
  assert abs(100.0 * sum(nmis) / len(nmis) - clustering["nmi"]) < 1e-4


# ---------------------------------------------------------------------------
# tools/search.py: the exported gallery's nearest products.


def _search_tool():
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("search", os.path.join(root, "tools", "search.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _printed_results(out: str) -> list[tuple[str, float, int, str]]:
  import re
  rows = re.findall(r"^\s+\d+  (\S+)\s+(-?\d+\.\d+)\s+(-?\d+)  (.*)$", out, re.M)
  return [(i, float(s), int(c), t) for i, s, c, t in rows]


def test_search_tool_prints_the_nearest_products(run, encoder, capsys, monkeypatch):
  import m5p
  search = _search_tool()
  # The module's Encoder (Encoder.from_export is tested above): no second compile.
  monkeypatch.setattr(m5p.Encoder, "from_export", classmethod(lambda cls, *a, **k: encoder))
  emb = export.load_embeddings(os.path.join(run.export_dir, "embeddings", "test.npz"))
  source = convert.open_split(run.data, "test")
  title_of = {source[i]["item_id"].decode(): source[i]["title"].decode().strip()
              for i in range(len(source))}

  # An item id: its stored embedding; the item itself is not a result.
  item = str(emb["item_id"][3])
  assert search.main([f"--export={run.export_dir}", f"--query={item}", "--k=4"]) == 0
  out = capsys.readouterr().out
  scores = emb["fused"] @ emb["fused"][3]
  expected = [i for i in np.argsort(-scores, kind="stable") if i != 3][:4]
  got = _printed_results(out)
  assert [g[0] for g in got] == [str(emb["item_id"][i]) for i in expected]
  for (_, score, category, title), i in zip(got, expected):
    assert score == pytest.approx(scores[i], abs=1e-3) and category == emb["label"][i]
    assert title == title_of[str(emb["item_id"][i])]
  assert f"query: item {item} (category {emb['label'][3]})" in out

  # Free text: embedded with the Encoder as a title-only product.
  text = next(t for t in title_of.values() if t)
  assert search.main([f"--export={run.export_dir}", f"--query={text}", "--k=3"]) == 0
  out = capsys.readouterr().out
  q = encoder.embed([{"title": text}])["fused"][0]
  expected = np.argsort(-(emb["fused"] @ q), kind="stable")[:3]
  assert [g[0] for g in _printed_results(out)] == [str(emb["item_id"][i]) for i in expected]
  assert "query: text" in out

  # Errors: an unknown id, a missing file, a missing export.
  assert search.main([f"--export={run.export_dir}", "--query=000000001"]) == 2
  assert "unknown item id" in capsys.readouterr().err
  assert search.main([f"--export={run.export_dir}", "--query=/nowhere/item.jpg"]) == 2
  assert "no such file" in capsys.readouterr().err
  assert search.main([f"--export={run.root / 'nothing'}", "--query=x"]) == 2
  assert "no such export" in capsys.readouterr().err


def test_serving_export_carries_the_standard_kernels_for_cuda_and_tpu(run):
  """The serving export for ('cpu', 'cuda', 'tpu') holds the CPU kernels
  only behind its platform switch (branch 0 of each platform_dependent);
  the same serving function lowered for cuda or for tpu alone holds none of
  them, and for cpu alone it does (StableHLO text with debug locations)."""
  from m5p.models import kernels
  scope = "m5p_cpu_kernels"
  with open(os.path.join(run.export_dir, "serving", "model.jax"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert tuple(exported.platforms) == ("cpu", "cuda", "tpu")
  assert run.config.model.kernels == "auto" and "auto" in kernels.KERNELS
  text = exported.mlir_module()
  locations = [line for line in text.splitlines() if scope in line and line.startswith("#loc")]
  assert locations, "no CPU kernel in the multi-platform module"
  assert all(f"branch_0_fun/{scope}" in line for line in locations), locations[:3]
  params, config = export.load_params(run.export_dir, config_overrides={
      "mesh": dict(data=1, fsdp=1, model=1, num_devices=1)})
  fn = jax.jit(export.serving_function(config, jax.device_get(params)))
  specs = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in export.serving_input_specs(config, 2).items()}
  for platform in ("cpu", "cuda", "tpu"):
    lowered = jax.export.export(fn, platforms=(platform,))(specs).mlir_module()
    assert (scope in lowered) == (platform == "cpu"), platform
