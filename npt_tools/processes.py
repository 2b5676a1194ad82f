"""This process among the others (accelerate / torchrun: gloo on CPU, nccl on GPU), its device and precision."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings

import torch

from npt_tools.arguments import TrainArgs


@dataclasses.dataclass
class Processes:
    """This process among the others (accelerate / torchrun), and its precision."""
    accelerator: object
    world: int
    rank: int
    main: bool
    device: torch.device
    autocast: object  # a context-manager factory: torch.autocast for --mixed_precision, else nullcontext
    reduce: object  # sums a tensor over processes; None in a single process


def start_processes(args: TrainArgs, log_with: list = ()) -> Processes:
    """This process's place among the others, its device and threads, --mixed_precision's autocast, and the
    accelerator that logs to `log_with` (accelerate trackers)."""
    from accelerate import Accelerator

    mixed = args.mixed_precision
    if args.use_quantization and mixed != "no":
        warnings.warn(f"--mixed_precision {mixed} is turned off with --use_quantization (4-bit computes in FP32)",
                      stacklevel=1)
        mixed = "no"
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=list(log_with) or None)
    world, device = accelerator.num_processes, accelerator.device
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # one thread per physical core (os.cpu_count() counts hyperthreads); oversubscribed OpenMP
        # threads spin against each other and were measured 10x slower on a busy 2-core machine
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2 // world))
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype
                else contextlib.nullcontext)
    reduce = (lambda t: accelerator.reduce(t.to(device), reduction="sum").cpu()) if world > 1 else None
    return Processes(accelerator, world, accelerator.process_index, accelerator.is_main_process, device,
                     autocast, reduce)
