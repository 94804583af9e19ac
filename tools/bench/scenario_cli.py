"""The flags of `taskedge bench --scenarios ...` (the CNN study, scenario_run.py), checked where parsed."""
from __future__ import annotations

import argparse
import json

from .scenario_run import CNN_VARIANTS, DEFAULT_VARIANTS, EXTRA_VARIANTS, FULL, QUICK, QUICK_VARIANTS, _log
from .scenarios import CNNS, SCENARIOS


def _names(allowed, what: str):
    """argparse type: a comma-separated subset of `allowed` (one-line error naming the bad ones)."""
    def convert(text: str) -> list:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{what} {bad or text!r} unknown; choose (comma-separated) from "
                                             + ", ".join(allowed))
        return names
    return convert


def add_scenario_args(p) -> None:
    g = p.add_argument_group("CNN scenarios (LoRA / DoRA / GaLore / full / probe vs TaskEdge, on step graphs)")
    g.add_argument("--scenarios", type=_names(SCENARIOS, "scenario"),
                   help="run the CNN study instead: shift, new-classes or both (comma-separated); writes "
                        "bench-cnn.md / .png / .json in --out. --quick: O-Net only, "
                        f"{QUICK['steps']} steps, one learning rate, {len(QUICK_VARIANTS)} variants")
    g.add_argument("--cnn-models", type=_names(list(CNNS), "model"),
                   help=f"with --scenarios: models (default {','.join(FULL['models'])}; --quick "
                        f"{','.join(QUICK['models'])})")
    g.add_argument("--cnn-variants", type=_names(list(CNN_VARIANTS), "variant"),
                   help="with --scenarios: variants (default " + ", ".join(DEFAULT_VARIANTS).replace("%", "%%")
                        + "; also " + ", ".join(EXTRA_VARIANTS) + ": TaskEdge with its head at the peers' head rate)")


def cmd_scenarios(a) -> int:
    from .scenario_report import format_md
    from .scenario_run import run_scenarios
    rep = run_scenarios(a.scenarios, a.quick, a.steps, a.seed, a.out, a.cnn_variants, a.cnn_models, a.workdir,
                        log=(lambda m: None) if a.quiet else _log)
    print(json.dumps(rep, indent=1) if a.json else format_md(rep))
    return 0
