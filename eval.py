r"""Evaluates a checkpoint: ``python eval.py --config=configs/X.py --checkpoint=DIR``.

``--checkpoint`` is a training workdir (its latest checkpoint, or ``--step``) or a model-state
directory written by ``python -m dtf_jax.convert ... --output DIR``. Protocols come from
``config.eval.protocols``: '1x1' (the originals' 1 clip x 1 centre crop) and 'multiview'
(``num_clips x num_crops``, e.g. 20 x 3 at 256 px for Kinetics-400; an extension, SPEC.md 7.12).
Per-video predictions go to ``<output_dir>/predictions_<protocol>.csv``, metrics to
``<output_dir>/eval_results.json``.

Examples::

  python eval.py --config=configs/quickstart.py --checkpoint=/tmp/dtf_quickstart
  python eval.py --config=configs/dtf_resnet50_k400.py --checkpoint=converted/dtf_r50_k400 \
      --protocols=1x1,multiview --output_dir=results/dtf_r50_k400 --config.data.root=/data/k400
"""

import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "Training workdir or converted model-state directory.")
flags.DEFINE_integer("step", None, "Training checkpoint step (default: latest).")
flags.DEFINE_list("protocols", None, "Eval protocols to run (default: all in config.eval.protocols).")
flags.DEFINE_string("output_dir", None, "Output directory (default: --checkpoint if it is a "
                    "training workdir, else <checkpoint>_eval).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host runs).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host runs).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed: auto = explicit flags or a detected SLURM/MPI job.")
flags.mark_flags_as_required(["config", "checkpoint"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from dtf_jax import xla_flags  # pylint: disable=import-outside-toplevel
  xla_flags.add_default_flags()  # before jax starts a backend
  from dtf_jax.train import mesh, metrics  # pylint: disable=import-outside-toplevel
  metrics.quiet_library_logs()
  mesh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                              mode=FLAGS.distributed)
  from dtf_jax import host_memory  # pylint: disable=import-outside-toplevel
  host_memory.reuse_step_memory()  # CPU: no fresh page faults for every step's buffers
  from dtf_jax.train import checkpointing, trainer  # pylint: disable=import-outside-toplevel
  output_dir = FLAGS.output_dir
  if output_dir is None:
    output_dir = (FLAGS.checkpoint if checkpointing.is_training_workdir(FLAGS.checkpoint)
                  else os.path.normpath(FLAGS.checkpoint) + "_eval")
  trainer.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint, output_dir,
                              protocols=FLAGS.protocols, step=FLAGS.step)
  logging.info("per-video predictions and eval_results.json written to %s", output_dir)

if __name__ == "__main__":
  app.run(main)
