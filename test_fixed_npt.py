#!/usr/bin/env python
"""Verification of the NaN fixes of docs/NPT_FIX_SUMMARY.md on the embedded smollm2-135m (or --model_name), on the
seed's gate form and on the default exact target (its closed-form start, a kl step, a NaN batch).

    python test_fixed_npt.py                     PASS / FAIL per check, a summary; exit 0 only if all pass
    python test_fixed_npt.py --check init_scales one check (repeatable); --help lists them
    python -m pytest --full tests/test_fixed_checks.py   the same checks (test_check, one per check)

The checks live in npt_tools.fix_checks; this file only runs its command.
"""
from npt_tools.fix_checks import main

if __name__ == "__main__":
    main()
