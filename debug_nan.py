#!/usr/bin/env python
"""Forward-pass inspection of an NPT model: where do NaN / Inf values first appear?

    python debug_nan.py                              # a fresh NPT copy of smollm2-135m, three sample texts
    python debug_nan.py --checkpoint DIR --text ...  # trained adapters on your text
    python debug_nan.py --inject_nan 3:attn_out      # plant one NaN to show detection works

Per NPT layer and stage: min, max, mean |x|, NaN and Inf counts; the first non-finite layer and stage. Exit code 1
when a non-finite value was found, 0 otherwise, 2 on bad input. The inspection lives in npt_tools.inspection
(its module doc gives the stages and the --json schema); this file only runs its command.
"""
from npt_tools.inspection import main

if __name__ == "__main__":
    main()
