"""The bench's command line: `taskedge bench` (register, for runtime/cli.py) and
`python -m taskedge.tools.bench` (main; with --worker NAME --spec FILE it is one variant's worker)."""
from __future__ import annotations

import argparse
import json
import sys

from taskedge.runtime.flags import Check, Parser, arg_type, at_least, out_path

from .report import format_md
from .run import run_bench, stderr_log
from .variants import FULL, MODELS, QUICK, VARIANTS

HELP = sys.modules[__package__].__doc__        # the package docstring: variants and learning rates
KNOWN_VARIANTS = Check(lambda s: all(v in VARIANTS for v in s.split(",")),
                       "names an unknown variant; choose (comma-separated) from " + ", ".join(VARIANTS))


def cmd_bench(a) -> int:
    if a.scenarios:
        from .scenario_cli import cmd_scenarios
        return cmd_scenarios(a)
    if a.selection_ablation:
        from .ablation_cli import cmd_ablation
        return cmd_ablation(a)
    variants = a.variants.split(",") if a.variants else None
    r = run_bench(a.model, a.quick, a.steps, a.seed, a.out, variants, a.workdir, a.keep, not a.no_profile,
                  log=(lambda m: None) if a.quiet else stderr_log, cfg_override={"rounds": a.rounds} if a.rounds else None)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(format_md(r))
    return 0


def _add_args(p) -> None:
    p.add_argument("--model", choices=sorted(MODELS), default="text", help="text (MiniLM, default) or vision")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['steps']} steps, {QUICK['n_test']} test examples")
    p.add_argument("--steps", type=arg_type(int, at_least(1)), help="override the step count")
    p.add_argument("--rounds", type=arg_type(int, at_least(1)),
                   help=f"timing rounds: the training run + N-1 timing-only runs of {FULL['timing_steps']} steps "
                        f"(default {FULL['rounds']}; --quick {QUICK['rounds']})")
    p.add_argument("--seed", type=arg_type(int, at_least(0)), default=0)
    p.add_argument("--variants", type=arg_type(str, KNOWN_VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS).replace("%", "%%"))
    p.add_argument("--out", default="bench", type=arg_type(str, out_path("folder")),
                   help="folder for bench.md / bench.png / bench.json")
    p.add_argument("--workdir", type=arg_type(str, out_path("folder")),
                   help="keep bundles/artifacts here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temp work dir")
    p.add_argument("--no-profile", action="store_true", help="skip ORT profiling of missed time targets")
    p.add_argument("--quiet", action="store_true")
    from .scenario_cli import add_scenario_args
    add_scenario_args(p)
    from .ablation_cli import add_ablation_args
    add_ablation_args(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def register(sub) -> None:
    d = sub.add_parser("bench", help="TaskEdge vs full FT / LoRA / inference (ORT and torch), one subprocess each",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(d)
    d.set_defaults(fn=cmd_bench)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--cnn-worker" in argv:
        from .cnn_worker import cnn_worker_main
        return cnn_worker_main(argv[argv.index("--cnn-worker") + 1])
    if "--worker" in argv:
        from .worker import worker_main
        p = argparse.ArgumentParser()
        p.add_argument("--worker", required=True)
        p.add_argument("--spec", required=True)
        a = p.parse_args(argv)
        return worker_main(a.worker, a.spec)
    p = Parser(prog="taskedge bench", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(p)
    return cmd_bench(p.parse_args(argv))
