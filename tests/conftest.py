"""Test setup: 8 emulated CPU devices, a persistent compile cache outside the repo."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("M5P_TEST_CACHE", os.path.expanduser("~/.cache/m5p_test_jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs (CI runs them in a small form)")


def tiny_config(**overrides):
  """The demo config at test size: every test that trains starts from this."""
  from m5p.config_loader import apply_overrides, load_config
  return apply_overrides(load_config("demo:tiny"), overrides)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A small synthetic M5Product, generated and converted once per test session."""
  from m5p.data import convert, synthetic
  root = tmp_path_factory.mktemp("m5p_data")
  c = tiny_config()
  raw, data = str(root / "raw"), str(root / "data")
  synthetic.generate(raw, c.data.synthetic_products, seed=0)
  d = c.data
  convert.convert(raw, data, image_size=d.image_size, max_frames=d.max_frames, n_mels=d.n_mels,
                  max_audio_seconds=d.max_audio_seconds, num_shards=2, vocab_size=d.vocab_size,
                  log=lambda *a, **k: None)
  return data
