"""What the three NPT scripts are made of, one module per concern (imports point one way:
kernels <- npt <- npt_tools <- the scripts; inside the package, each module imports only those above it):

    cli          one-line user errors, click commands and options built from argument dataclasses
    models       loading base models (the embedded one too), their flags, and their user errors
    step         one safe optimizer step: skip non-finite micro-batches, undo a step, sum over processes
    arguments    the trainer's flags (a dataclass with cheap checks)
    data         text datasets -> packed token windows, held-out text
    metrics      metrics.jsonl, the log file, TensorBoard / W&B (accelerate's trackers), the loss-curve plot
    checkpoints  checkpoint files without pickle, resume checks, the output dir's lock and ownership
    plan         the checks that read files (model config, checkpoint, adapters) before any work
    report       held-out evaluation and the equivalence report
    processes    accelerate processes, precision and the sum over processes
"""
