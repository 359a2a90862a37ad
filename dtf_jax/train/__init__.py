"""Training infrastructure: durations, optimiser, losses, mesh/sharding, checkpoints, metrics, loop.

Modules (each does one thing):
  durations      epochs <-> steps <-> data-loader iterations (the one place).
  schedules      the originals' per-iteration warm-up + cosine learning rate.
  optim          SGD (original / modern recipe), AdamW, PyTorch-style gradient clipping.
  losses         cross-entropy, the originals' LSR, standard label smoothing, multi-head sum.
  mesh           jax.distributed start-up, ('data', 'fsdp') mesh, shardings, global batches.
  train_state    train-state pytree from an NNX model, created in its shardings.
  steps          jitted train step (gradient accumulation) and predict.
  checkpointing  orbax training checkpoints (+ data-iterator state) and model-state files.
  metrics        TensorBoard / JSON-lines scalars and the console progress line.
  trainer        train_and_evaluate(config, workdir).
  testing        tiny stand-in model and in-memory data for smoke tests.
"""
