"""What the three NPT scripts are made of, one module per concern; each script only runs its command (`main`) from
here. Imports point one way: kernels <- npt <- npt_tools <- the scripts; inside the package each module imports only
those listed above it:

    cli            one-line user errors, click commands and options built from argument dataclasses
    models         loading base models (the embedded one too), their flags, and their user errors
    objective      the per-layer losses and the equivalence objective (layerwise, end_to_end, kl)
    closed_form    the exact target's closed-form start (principal directions of the attention)
    step           one safe optimizer step: skip non-finite micro-batches, undo a step, sum over processes
    arguments      the trainer's flags (a dataclass with cheap checks)
    data           text datasets -> packed token windows, held-out text
    metrics        metrics.jsonl, the log file, TensorBoard / W&B (accelerate's trackers), the loss-curve plot
    checkpoints    checkpoint files without pickle, resume checks
    plan           the checks that read files (model config, checkpoint, adapters) before any work; the run lock
    processes      accelerate processes, precision and the sum over processes
    report         held-out evaluation and the equivalence report
    trainer        the training recipe (Trainer: setup, closed-form start, train, save, cleanup); the trainer's command
    fix_checks     the checks of the NaN fixes; test_fixed_npt's command
    inspection     forward-pass inspection (where NaN / Inf first appear); debug_nan's command
    counterfact    CounterFact records, target scoring, ES/PS/NS and held-out drift of an edit
    plasticity     consolidation: a context written into the MLP weights (key-value edits, forward passes only)
    edit           the edit artifact (edit.safetensors + edit.json): save, load, apply, undo (bitwise), merge
    consolidate_cli  npt-consolidate: a context written into the weights, the artifact saved, what changed shown
"""
