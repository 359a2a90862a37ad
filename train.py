r"""Trains a video model: ``python train.py --config=configs/X.py --workdir=DIR``.

Examples::

  # Quickstart on CPU (synthetic data, a few minutes):
  python train.py --config=configs/quickstart.py --workdir=/tmp/dtf_quickstart

  # Kinetics-400, DTF-ResNet-50, all local GPUs, overriding a config field:
  python train.py --config=configs/dtf_resnet50_k400.py --workdir=runs/dtf_r50_k400 \
      --config.data.root=/data/k400 --config.batch_size=96

  # Multi-host: SLURM is detected automatically (one task per host); elsewhere, on each host:
  python train.py --config=... --workdir=... \
      --coordinator_address=host0:12345 --num_processes=4 --process_id=$RANK

The run resumes from the latest checkpoint in ``--workdir``; SIGTERM saves a checkpoint and exits.
"""

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs); resumed if present.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host runs).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed: auto = explicit flags or a detected SLURM/MPI job.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dtf_jax import xla_flags  # pylint: disable=import-outside-toplevel
  xla_flags.add_default_flags()  # before jax starts a backend
  # jax.distributed must start before anything touches the devices.
  from dtf_jax.train import mesh, metrics  # pylint: disable=import-outside-toplevel
  metrics.quiet_library_logs()
  mesh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                              mode=FLAGS.distributed)
  from dtf_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.reuse_step_memory()  # CPU: no fresh page faults for every step's buffers
  from dtf_jax.train import trainer  # pylint: disable=import-outside-toplevel
  try:
    summary = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(2)
  logging.info("finished: %s at step %d", summary["status"], summary["step"])


if __name__ == "__main__":
  app.run(main)
