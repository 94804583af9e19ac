"""`taskedge`: one command, one subcommand per step of the data flow.

Host (needs the [host] extra): export, demo, bench, pack, flash.  Board: inspect, adapt, eval,
merge, generate, profiles, profile show, doctor, probe, unpack.  Every command registers here; host tools
import their heavy dependencies only when they run.  Bad input prints one line and exits with
status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import taskflags
from .options import AdaptOptions
from .flags import Parser, add_flags, from_flags, given
from .fsutil import UserError, one_line


def _export_config():
    """ExportConfig (host only: its module imports nothing heavy, so --help works on a board too)."""
    from taskedge.export.config import ExportConfig
    return ExportConfig


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_export(a) -> int:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from .summary import format_inspect, inspect_bundle

    export_bundle(from_flags(ExportConfig, a))
    info = inspect_bundle(a.out, verify=False)
    _print_json(info) if a.json else print(format_inspect(info))
    return 0


def cmd_inspect(a) -> int:
    from .summary import format_inspect, inspect_bundle
    info = inspect_bundle(a.bundle)
    _print_json(info) if a.json else print(format_inspect(info))
    return 0


def cmd_adapt(a) -> int:
    from .adapt import adapt, options
    bundle, _ = taskflags.resolve(a)
    opts = options(bundle, given(AdaptOptions, a))                       # a flag not given is absent from `a`
    init = taskflags.start_state(a, opts)                                # --init: a start from stored tasks
    report = adapt(bundle, opts)
    taskflags.after_adapt(a, report, init)
    if getattr(a, "json", False):
        _print_json(report)
    else:
        acc = report["accuracy"]
        print(f"steps {report['steps']} ({report['stop_reason']})  loss {report['loss']['first']:.4f} -> "
              f"{report['loss']['last']:.4f}  accuracy {acc['before']:.4f} -> {acc['after']:.4f}  "
              f"peak RSS {report['memory']['peak_rss_mb']} MB  energy {report['energy']['joules']} J"
              f"{'' if report['energy']['measured'] else ' (estimated)'}  update {report['update']}")
    if report["stop_reason"] == "diverged":
        print(f"taskedge adapt: diverged: {report.get('stop_message', 'see the report')}", file=sys.stderr)
        return 1
    return 0


def cmd_eval(a) -> int:
    from .evaluate import evaluate
    bundle, update = taskflags.resolve(a)
    res = evaluate(bundle, a.data, model=a.model, update=update, run_dir=a.run_dir)
    taskflags.after_eval(a, res)
    ppl = f", perplexity {res['perplexity']:.3f}" if "perplexity" in res else ""      # a causal LM's answers
    _print_json(res) if a.json else print(f"accuracy {res['accuracy']:.4f}{ppl} on {res['examples']} examples "
                                          f"({res['evaluated']})")
    return 0


def cmd_merge(a) -> int:
    from .merge import merge
    bundle, update = taskflags.resolve(a)
    res = merge(bundle, a.out, update=update, run_dir=a.run_dir)
    _print_json(res) if a.json else print(f"wrote {res['out']} ({res['bytes']} bytes, "
                                          f"{res['layers_merged']} layers merged)")
    return 0


def cmd_profiles(a) -> int:
    from .profiles import list_profiles
    profiles = list_profiles()
    if a.json:
        _print_json([p.to_dict() for p in profiles])
    else:
        for p in profiles:
            print(f"{p.name:24s} {p.memory_mb:6d} MB  budget {p.budget_mb:7.0f} MB  {p.description}")
    return 0


def cmd_profile_show(a) -> int:
    from .profiles import load_profile
    p = load_profile(a.name)
    if a.json:
        _print_json(p.to_dict())
    else:
        for k, v in p.to_dict().items():
            print(f"{k:20s} {v}")
    return 0


# Run by tests/test_readme.py (each `$ ` line, in the README walk-through's folder).
ADAPT_EXAMPLES = """examples (files of the README walk-through):
  $ taskedge adapt bundle/ --data train.npz --profile jetson-orin-nano-8gb --steps 200 --run-dir runs/r1
  $ taskedge adapt bundle/ --run-dir runs/r1 --resume --steps 400
    continues runs/r1 with its recorded data, batch size, seed, profile and schedule; only --steps is new
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="taskedge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("export", help="host: score, allocate, rewrite and write a training bundle",
                       description="Calibrate on task data, score |W|*||X||, give every output neuron the same k "
                                   "trainable inputs, rewrite the ONNX graph, derive the backward graph with ORT's "
                                   "gradient builder and lower it to a standard-ONNX step graph the board runs on "
                                   "plain onnxruntime.")
    add_flags(e, _export_config())
    e.add_argument("--json", action="store_true", help="print the bundle summary as JSON")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", help="per-layer trainable counts of a bundle (verifies hashes)")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    # argument_default=SUPPRESS: a flag not given is absent, so --resume can take the run's recorded value
    # for it; flags and defaults are AdaptOptions' fields (runtime/options.py)
    ad = sub.add_parser("adapt", help="board: sparse adaptation under memory and energy budgets",
                        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train the bundle's sparse update on the board: its step graph on plain\n"
                                    "onnxruntime, AdamW on the trainable state. Stops at --steps/--epochs,\n"
                                    "--max-seconds or the energy budget, whichever comes first, and always\n"
                                    "leaves a checkpoint.",
                        epilog=ADAPT_EXAMPLES)
    ad.add_argument("bundle")
    add_flags(ad, AdaptOptions)
    taskflags.add(ad)
    ad.add_argument("--json", action="store_true", help="print the final report as JSON")
    ad.set_defaults(fn=cmd_adapt)

    ev = sub.add_parser("eval", help="accuracy of the adapted bundle (or a merged .onnx) on labelled data")
    ev.add_argument("bundle")
    ev.add_argument("--data", required=True)
    ev.add_argument("--model", help="a merged .onnx to evaluate with plain onnxruntime instead")
    ev.add_argument("--update", help="update.npz (default: newest checkpoint of the run)")
    ev.add_argument("--run-dir")
    ev.add_argument("--json", action="store_true")
    taskflags.add(ev)
    ev.set_defaults(fn=cmd_eval)

    mg = sub.add_parser("merge", help="fold the update into the weights: a plain inference .onnx")
    mg.add_argument("bundle")
    mg.add_argument("--out", required=True, help="merged model path")
    mg.add_argument("--update", help="update.npz (default: newest checkpoint of the run)")
    mg.add_argument("--run-dir")
    mg.add_argument("--json", action="store_true")
    taskflags.add(mg)
    mg.set_defaults(fn=cmd_merge)

    pl = sub.add_parser("profiles", help="list the device profiles")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_profiles)
    ps = sub.add_parser("profile", help="device profile commands")
    pss = ps.add_subparsers(dest="profile_cmd", metavar="show")
    show = pss.add_parser("show", help="show one device profile")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(fn=cmd_profile_show)

    from . import doctor, generate, probe, serve
    from .fleet import cli as fleet
    from taskedge.tools import bench, demo, pack, taskpack      # host tools: heavy imports only inside commands
    for module in (demo, bench, pack, doctor, probe, generate, fleet, taskpack, serve):
        module.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(a.fn(a) or 0)
    except UserError as e:
        print(f"taskedge {a.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"taskedge {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
