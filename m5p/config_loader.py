"""Loads a config file (`configs/*.py` exposing `get_config()`) by path, for tools and tests."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(path: str) -> ml_collections.ConfigDict:
  """`path` is a config file or the bare name of one in the repo's configs/ folder,
  optionally followed by `:arg`, passed to `get_config(arg)` (as --config=path:arg)."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO_CONFIGS, path + ".py")):
    path = os.path.join(REPO_CONFIGS, path + ".py")
  spec = importlib.util.spec_from_file_location(f"m5p_config_{os.path.basename(path)[:-3]}", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"No config file at {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config, overrides: Mapping[str, Any] | None):
  """Sets `{'mesh.data': 1}`-style dotted keys, or nested dicts, on a copy of `config`."""
  config = config.copy_and_resolve_references()
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if isinstance(value, Mapping):
      for k, v in value.items():
        node[leaf][k] = v  # One level: e.g. {'mesh': {'data': 1, 'model': 8}}.
    else:
      node[leaf] = value
  return config
