"""The real quickstart (tiny DTF-ResNet, synthetic videos, train.py / eval.py) for a few steps.

Subprocesses run ``train.py --config=configs/quickstart.py`` shortened to 2 steps on a
32-video synthetic set, on 1 CPU device and on 8 fake CPU devices: the losses must match (data
parallelism with global-batch BatchNorm statistics is exact up to float reduction order). Then
``eval.py`` evaluates the 1-device checkpoint with both protocols.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dtf_jax.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 420


def env_for(devices):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def overrides(cache):
  return [f"--config.data.synthetic.cache_dir={cache}", "--config.data.synthetic.num_train=32",
          "--config.data.synthetic.num_val=8", "--config.total_steps=2", "--config.log_every_steps=1",
          "--config.checkpoint_every_steps=100", "--config.eval_every_steps=100",
          "--config.eval.batch_size=8", "--config.tensorboard=False"]


def train_losses(workdir):
  return {step: r["loss"] for step, r in metrics.read_metrics(workdir).items()}


@pytest.mark.slow
def test_quickstart_one_vs_eight_devices_and_eval(tmp_path):
  cache = tmp_path / "synthetic"
  for devices in (1, 8):
    # The 8-device run skips the final evaluation (one compilation less).
    extra = [] if devices == 1 else ["--config.eval.in_training="]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/quickstart.py"),
         f"--workdir={tmp_path / f'run{devices}'}"] + overrides(cache) + extra,
        env=env_for(devices), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
  one, eight = train_losses(tmp_path / "run1"), train_losses(tmp_path / "run8")
  assert sorted(one) == sorted(eight) == [1, 2]
  assert all(0.5 < one[s] < 3.0 for s in one)  # ~ln 4 at the start
  np.testing.assert_allclose([eight[1], eight[2]], [one[1], one[2]], rtol=1e-4)
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "eval.py"), "--config", os.path.join(REPO, "configs/quickstart.py"),
       f"--checkpoint={tmp_path / 'run1'}", f"--output_dir={tmp_path / 'eval'}"] + overrides(cache)[:3]
      + ["--config.eval.batch_size=8"],
      env=env_for(1), capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.load(open(tmp_path / "eval" / "eval_results.json"))["results"]
  assert results["1x1"]["num_videos"] == 8 and results["1x1"]["views_per_video"] == 1
  assert results["multiview"]["views_per_video"] == 3
  in_training = [json.loads(l) for l in open(tmp_path / "run1" / "metrics.jsonl")]
  final = [r for r in in_training if r["split"] == "eval_1x1"][-1]
  assert final["top1"] == pytest.approx(results["1x1"]["top1"])
