"""The Lightning layer: training a `LlavaModel` (which is plain PyTorch) with a Trainer.

What lives where:
- `module`: `LlavaLitModule`: builds the parts in `configure_model`, freezes, optimises, scores;
  its `data_spec()` is what it hands the data pipeline (`src.data.spec.DataSpec`).
- `stage`: what trains per part, per-part learning rates, the warm-up + cosine schedule, what a
  checkpoint keeps.
- `sharding`: FSDP2 per block, precision policy, activation checkpointing, compile.
- `accumulation`: every supervised token of a step weighs the same, over micro-batches and ranks.
- `resume`: `--ckpt_path last`, and saving on SIGTERM / Ctrl-C.
- `callbacks`: the callbacks' class paths for YAML (`src.training.callbacks.TrainingTelemetry`, ...),
  re-exported from `telemetry` (throughput, image tokens, data wait, gradient norm, memory, MFU),
  `flops` (the FLOPs model of a step, device peaks) and `sample_generations` (answers to TensorBoard).
- `bench_callback`: benchmarks of the `src.eval` registry scored during fit.

Layering: training imports eval, model, data and core; nothing below imports training.
"""
