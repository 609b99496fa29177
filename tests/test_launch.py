"""launch/: scripts pass shellcheck (or bash -n), the JobSet parses, clusters are recognised."""
import glob
import os
import shutil
import subprocess

import pytest
import yaml

from m5p import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) +
                 glob.glob(os.path.join(ROOT, "launch", "*.sbatch")) +
                 glob.glob(os.path.join(ROOT, "tools", "*.sh")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_scripts_pass_their_checks(script):
  subprocess.run(["bash", "-n", script], check=True)
  if shutil.which("shellcheck"):  # .ci/run installs it.
    r = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
  assert os.access(script, os.X_OK), f"{script} is not executable"


def test_jobset_manifest():
  with open(os.path.join(ROOT, "launch", "gke_jobset.yaml")) as f:
    doc = yaml.safe_load(f)
  assert doc["kind"] == "JobSet"
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  container = job["template"]["spec"]["containers"][0]
  env = {e["name"]: e["value"] for e in container["env"]}
  assert int(env["M5P_NUM_PROCESSES"]) == job["parallelism"] == job["completions"]
  assert env["M5P_COORDINATOR_ADDRESS"].endswith(":1234")
  assert "M5P_PROCESS_ID=$JOB_COMPLETION_INDEX" in container["args"][0]
  assert "python -m m5p.main --config=configs/" in container["args"][0]


@pytest.mark.parametrize("env, kind", [
    ({}, None),
    ({"M5P_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "explicit"),
    ({"M5P_DISTRIBUTED": "auto"}, "auto"),
    ({"SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}, "slurm"),
    ({"SLURM_NTASKS": "8"}, None),  # sbatch's batch script itself, outside srun.
    ({"SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),
])
def test_cluster_is_recognised_from_the_environment(env, kind):
  assert distributed._cluster_kind(env) == kind  # pylint: disable=protected-access


def test_explicit_cluster_needs_its_numbers():
  with pytest.raises(ValueError, match="M5P_NUM_PROCESSES"):
    distributed.initialize({"M5P_COORDINATOR_ADDRESS": "127.0.0.1:1"})
