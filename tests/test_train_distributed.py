"""Multi-device / multi-process / interruption behaviour of the trainer (subprocesses).

Each run is ``python -m dtf_jax.train.testing`` (the stand-in model and in-memory data), so the
same global batches reach the model whatever the topology:
  * 1 CPU device vs 8 fake CPU devices (``--xla_force_host_platform_device_count=8``);
  * 2 processes through ``jax.distributed`` on localhost (gloo collectives);
  * SIGKILL mid-run + automatic resume == an uninterrupted run;
  * SIGTERM saves a checkpoint at the current step and exits cleanly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dtf_jax.train import metrics

TIMEOUT = 240


def env_for(devices=1):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  if devices > 1:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("SLURM_NTASKS", None)
  return env


def command(workdir, *overrides, extra=()):
  cmd = [sys.executable, "-m", "dtf_jax.train.testing", "--workdir", str(workdir)]
  for key, value in overrides:
    cmd += ["--set", f"{key}={json.dumps(value)}"]
  return cmd + list(extra)


def run(workdir, *overrides, devices=1, extra=()):
  proc = subprocess.run(command(workdir, *overrides, extra=extra), env=env_for(devices),
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def losses(workdir):
  return {step: r["loss"] for step, r in metrics.read_metrics(workdir).items()}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


BASE = (("total_steps", 6), ("batch_size", 16), ("checkpoint_every_steps", 2))
STEPS = list(range(1, 7))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  run(workdir, *BASE)
  return losses(workdir)


def test_eight_devices_match_one_device(tmp_path, single_device_run):
  # Data parallel over 8 devices with global-batch BatchNorm statistics and dropout.
  run(tmp_path / "dp", *BASE, devices=8)
  got = losses(tmp_path / "dp")
  assert sorted(got) == STEPS
  np.testing.assert_allclose([got[s] for s in STEPS], [single_device_run[s] for s in STEPS], rtol=2e-5)
  # Per-device BatchNorm groups on 8 devices == groups of 2 on one device; FSDP over 2 of
  # the 8 devices (parameters sharded) changes nothing either.
  group = (("bn_group_size", "device"), ("mesh.fsdp", 2), ("mesh.min_fsdp_size", 1))
  run(tmp_path / "dp_group", *BASE, *group, devices=8)
  run(tmp_path / "one_group", *BASE, ("bn_group_size", 2))
  a, b = losses(tmp_path / "dp_group"), losses(tmp_path / "one_group")
  np.testing.assert_allclose([a[s] for s in STEPS], [b[s] for s in STEPS], rtol=2e-5)
  assert not np.allclose([a[s] for s in STEPS], [got[s] for s in STEPS], rtol=1e-4)


def test_two_processes_match_one_process(tmp_path, single_device_run):
  port = free_port()
  procs = [subprocess.Popen(
      command(tmp_path / "multi", *BASE, extra=["--coordinator_address", f"127.0.0.1:{port}",
                                                 "--num_processes", "2", "--process_id", str(i)]),
      env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "SUMMARY" in outs[0][0]
  got = losses(tmp_path / "multi")
  np.testing.assert_allclose([got[s] for s in STEPS], [single_device_run[s] for s in STEPS], rtol=2e-5)
  # Each process wrote its own data-iterator state.
  data_dir = tmp_path / "multi" / "checkpoints" / "6" / "data"
  assert sorted(os.listdir(data_dir))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]


def wait_for_checkpoint(workdir, step, proc, timeout=TIMEOUT):
  deadline = time.time() + timeout
  ckpt = os.path.join(workdir, "checkpoints")
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
    if os.path.isdir(ckpt) and any(d.isdigit() and int(d) >= step for d in os.listdir(ckpt)):
      return
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, single_device_run):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(command(workdir, *BASE, extra=["--sleep_per_step", "0.4"]),
                          env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    wait_for_checkpoint(workdir, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(losses(workdir))
  assert killed_at < 6
  run(workdir, *BASE)
  got = losses(workdir)
  assert sorted(got) == STEPS
  # Steps after the restored checkpoint are recomputed: same data, same dropout keys.
  np.testing.assert_allclose([got[s] for s in STEPS], [single_device_run[s] for s in STEPS], rtol=1e-6)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(command(workdir, *BASE, ("checkpoint_every_steps", 100),
                                  extra=["--sleep_per_step", "0.4"]),
                          env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (os.path.exists(workdir / "metrics.jsonl")
                                          and len(losses(workdir)) >= 2):
      assert proc.poll() is None, proc.stderr.read()[-3000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.split("SUMMARY ", 1)[1])
  assert summary["status"] == "preempted" and 2 <= summary["step"] < 6
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [summary["step"]]
