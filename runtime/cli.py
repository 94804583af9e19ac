"""`taskedge`: one command, one subcommand per step of the data flow.

Host (needs the [host] extra): export, demo, bench.  Board: inspect, adapt, eval, merge,
profiles, profile show.  Bad input prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .fsutil import UserError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_export(a) -> int:
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from .inspect import format_inspect, inspect_bundle

    forms = {}
    for item in a.formulation or []:
        op, _, form = item.partition("=")
        forms[op] = form
    cfg = ExportConfig(model=a.model, out=a.out, calib=a.calib, calib_batches=a.calib_batches,
                       batch_size=a.batch_size, budget=a.budget, nm=a.nm, lora_rank=a.lora_rank,
                       include=a.include or [], exclude=a.exclude or [], num_classes=a.num_classes,
                       head_only=a.head_only, formulation=forms, sparse_backward=not a.dense_backward,
                       lr=a.lr, seed=a.seed)
    export_bundle(cfg)
    info = inspect_bundle(a.out, verify=False)
    _print_json(info) if a.json else print(format_inspect(info))
    return 0


def cmd_inspect(a) -> int:
    from .inspect import format_inspect, inspect_bundle
    info = inspect_bundle(a.bundle)
    _print_json(info) if a.json else print(format_inspect(info))
    return 0


def cmd_adapt(a) -> int:
    from .adapt import adapt, options
    report = adapt(a.bundle, options(a.bundle, vars(a)))      # a flag not given is absent from `a`
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
    res = evaluate(a.bundle, a.data, model=a.model, update=a.update, run_dir=a.run_dir)
    _print_json(res) if a.json else print(f"accuracy {res['accuracy']:.4f} on {res['examples']} examples "
                                          f"({res['evaluated']})")
    return 0


def cmd_merge(a) -> int:
    from .merge import merge
    res = merge(a.bundle, a.out, update=a.update, run_dir=a.run_dir)
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
    p = argparse.ArgumentParser(prog="taskedge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    e = sub.add_parser("export", help="host: score, allocate, rewrite and write a training bundle",
                       description="Calibrate on task data, score |W|*||X||, give every output neuron the same k "
                                   "trainable inputs, rewrite the ONNX graph, derive the backward graph with ORT's "
                                   "gradient builder and lower it to a standard-ONNX step graph the board runs on "
                                   "plain onnxruntime.")
    e.add_argument("model", help="an .onnx file, or package.module:factory returning (module, example[, meta])")
    e.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    e.add_argument("--calib", help=".npz with arrays named after the model inputs (target-task data)")
    e.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default 8)")
    e.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    e.add_argument("--budget", type=float, default=0.001,
                   help="share of the model's weights to train (default 0.001 = 0.1 %%)")
    e.add_argument("--nm", help="N:M structure for the update, e.g. 2:4")
    e.add_argument("--lora-rank", type=int, help="sparse LoRA: update = (B@A) masked, rank R")
    e.add_argument("--include", action="append", help="glob on layer/weight names to select (repeatable)")
    e.add_argument("--exclude", action="append", help="glob on layer/weight names to skip (repeatable)")
    e.add_argument("--num-classes", type=int, help="replace/add a dense classification head with C classes")
    e.add_argument("--head-only", action="store_true", help="train only the new head (linear-probe baseline)")
    e.add_argument("--formulation", action="append", metavar="OP=FORM",
                   help="update formulation per op type, e.g. MatMul=gather, Conv=scatter")
    e.add_argument("--dense-backward", action="store_true",
                   help="keep ORT's dense weight gradient for scatter layers (slower; for comparison)")
    e.add_argument("--lr", type=float, default=1e-3, help="default learning rate stored in the bundle")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print the bundle summary as JSON")
    e.set_defaults(fn=cmd_export)

    i = sub.add_parser("inspect", help="per-layer trainable counts of a bundle (verifies hashes)")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    # argument_default=SUPPRESS: a flag not given is absent, so --resume can take the run's recorded value
    # for it; the defaults named in the help are AdaptOptions' (runtime/adapt.py)
    ad = sub.add_parser("adapt", help="board: sparse adaptation under memory and energy budgets",
                        argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Train the bundle's sparse update on the board: its step graph on plain\n"
                                    "onnxruntime, AdamW on the trainable state. Stops at --steps/--epochs,\n"
                                    "--max-seconds or the energy budget, whichever comes first, and always\n"
                                    "leaves a checkpoint.",
                        epilog=ADAPT_EXAMPLES)
    ad.add_argument("bundle")
    ad.add_argument("--data", help=".npz (inputs + labels), .jsonl text, or an image folder "
                                   "(required, except with --resume: the run's)")
    ad.add_argument("--eval-data", help="held-out data for accuracy (default: 10%% of --data)")
    ad.add_argument("--profile", help="device profile name or .toml (see `taskedge profiles`; default host-cpu)")
    ad.add_argument("--power-mode", help="nvpmodel mode of the profile (default: its default)")
    ad.add_argument("--memory-budget-mb", type=float, help="peak RSS budget (default: the profile's share)")
    ad.add_argument("--energy-budget-j", type=float, help="stop cleanly at this much energy (joules, cumulative)")
    ad.add_argument("--max-seconds", type=float, help="stop after this many seconds")
    ad.add_argument("--steps", type=int, help="optimizer steps to run in total")
    ad.add_argument("--epochs", type=float, help="epochs over --data (if --steps is not given)")
    ad.add_argument("--batch-size", type=int, help="effective batch size (default 32)")
    ad.add_argument("--micro-batch", type=int, help="force the micro-batch instead of planning it")
    ad.add_argument("--lr", type=float, help="peak learning rate (default: the bundle's)")
    ad.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="lr schedule (default cosine)")
    ad.add_argument("--warmup", type=int, help="warm-up steps (default 10)")
    ad.add_argument("--eval-every", type=int, help="evaluate every N steps (default: start and end)")
    ad.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 50)")
    ad.add_argument("--keep", type=int, help="checkpoints to keep (default 2)")
    ad.add_argument("--run-dir", help="checkpoints and update.npz go here (default BUNDLE/run)")
    ad.add_argument("--resume", action="store_true",
                    help="continue from the newest good checkpoint, with the run's recorded data, eval data, batch "
                         "size, seed, profile and schedule for every flag not given (other data is refused)")
    ad.add_argument("--fresh", action="store_true", help="discard existing checkpoints and start over")
    ad.add_argument("--skip-bad", action="store_true",
                    help="skip (and count) bad records instead of stopping at the first one")
    ad.add_argument("--control-file", help="JSON file re-read every step, e.g. {\"memory_budget_mb\": 900} "
                                          "(default RUN_DIR/control.json)")
    ad.add_argument("--seed", type=int, help="data order seed (default 0)")
    ad.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    ad.add_argument("--device", help="cpu, or cuda[:N] with NVIDIA's onnxruntime-gpu (JetPack) installed (default cpu)")
    ad.add_argument("--quiet", action="store_true", help="no progress output")
    ad.add_argument("--json", action="store_true", help="print the final report as JSON")
    ad.set_defaults(fn=cmd_adapt)

    ev = sub.add_parser("eval", help="accuracy of the adapted bundle (or a merged .onnx) on labelled data")
    ev.add_argument("bundle")
    ev.add_argument("--data", required=True)
    ev.add_argument("--model", help="a merged .onnx to evaluate with plain onnxruntime instead")
    ev.add_argument("--update", help="update.npz (default: newest checkpoint of the run)")
    ev.add_argument("--run-dir")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(fn=cmd_eval)

    mg = sub.add_parser("merge", help="fold the update into the weights: a plain inference .onnx")
    mg.add_argument("bundle")
    mg.add_argument("--out", required=True, help="merged model path")
    mg.add_argument("--update", help="update.npz (default: newest checkpoint of the run)")
    mg.add_argument("--run-dir")
    mg.add_argument("--json", action="store_true")
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

    for name, register in _extra_commands():
        try:
            register(sub)
        except Exception as e:  # a broken host tool must not take the board commands down with it
            print(f"taskedge: warning: {name} unavailable ({type(e).__name__}: {e})", file=sys.stderr)
    return p


def _extra_commands():
    """Commands that live outside the runtime (host tools); each registers itself if importable."""
    import importlib
    for mod in ("taskedge.tools.demo", "taskedge.tools.bench", "taskedge.tools.pack", "taskedge.tools.doctor",
                "taskedge.tools.probe"):
        try:
            yield mod, importlib.import_module(mod).register
        except (ImportError, AttributeError):
            continue


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        return int(a.fn(a) or 0)
    except UserError as e:
        print(f"taskedge {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"taskedge {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
