"""The flags of `taskedge bench --selection-ablation` (ablation.py), checked where parsed."""
from __future__ import annotations

import json

from taskedge.runtime.flags import POSITIVE, arg_type, at_least

from .ablation import PROBE, QUICK_TASKS, RULES, SELECTIONS, TASKS, task_table
from .scenario_cli import _names


def add_ablation_args(p) -> None:
    g = p.add_argument_group("selection ablation (issue 19): which entries to train, at the same budget")
    g.add_argument("--selection-ablation", action="store_true",
                   help="run every --selection rule (" + ", ".join(SELECTIONS) + ") on each task for --seeds seeds "
                        f"(export + adapt, same budget, steps and lr trials), and {PROBE} (the new head alone) as "
                        "the reference, instead; writes ablation.md / .png / "
                        f".json in --out. Tasks: {', '.join(TASKS)}; --quick: {', '.join(QUICK_TASKS)} "
                        "(the small digits models at 40 steps: a few minutes)")
    g.add_argument("--tasks", type=_names(sorted(set(TASKS) | set(QUICK_TASKS)), "task"),
                   help="with --selection-ablation: a comma-separated subset of the tasks (default all)")
    g.add_argument("--seeds", type=arg_type(int, at_least(2)), default=3,
                   help="with --selection-ablation: seeds 0..N-1 per task and rule (default 3; >= 2 for a spread)")
    g.add_argument("--selections", type=_names(list(RULES), "rule"),
                   help="with --selection-ablation: a comma-separated subset of the rules (default all). With "
                        "--workdir each finished run is recorded there and reused: an interrupted ablation "
                        "resumes, and several processes can share one work folder, each running some rules")
    g.add_argument("--lr", type=arg_type(float, POSITIVE),
                   help="with --selection-ablation: every run at this learning rate instead of adapt's trials "
                        "(to check whether a rule lost to its trial's rate)")


def cmd_ablation(a) -> int:
    from taskedge.runtime.fsutil import UserError
    from .ablation import run_ablation
    from .ablation_report import format_md
    from .run import stderr_log
    table = task_table(a.quick)
    bad = [t for t in a.tasks or [] if t not in table]
    if bad:
        raise UserError(f"--tasks {','.join(bad)}: not a {'--quick ' if a.quick else ''}task; choose from "
                        f"{', '.join(table)}" + ("" if a.quick else " (or add --quick for the small ones)"))
    r = run_ablation(a.tasks, a.seeds, a.quick, a.out, a.workdir, a.keep, steps=a.steps, selections=a.selections, lr=a.lr,
                     log=(lambda m: None) if a.quiet else stderr_log)
    print(json.dumps(r, indent=2) if a.json else format_md(r))
    return 0
