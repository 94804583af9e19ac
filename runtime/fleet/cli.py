"""`taskedge fleet serve|report`: run federated rounds on a Flower SuperLink, and read their report."""
from __future__ import annotations

import argparse
import json

from ..flags import add_flags, from_flags

SERVE_HELP = """Start the fleet's ServerApp on a running Flower SuperLink (`flwr run`) and stream its log;
when it ends, print the per-round report. The boards are Flower SuperNodes started on each board:

  flower-supernode --superlink SERVER:8000 --root-certificates ca.pem \\
      --auth-supernode-private-key board.key \\
      --node-config 'bundle="/data/bundle" data="/data/train.npz" profile="jetson-orin-nano-8gb"'

Each round every connected board runs `adapt` for --local-steps from the global state under its own
device profile and sends back only its trained state; the server rejects (and logs) states that do
not fit, aggregates the rest and commits the new global state in --state-dir. Run it again after a
restart: it resumes after the last committed round (raise --rounds to go on).
"""


def cmd_serve(a) -> int:
    from pathlib import Path

    from .. import bundle as B
    from ..fsutil import UserError
    from . import launch, report
    from .options import FleetOptions
    opts = from_flags(FleetOptions, a).resolved()
    B.load_bundle(opts.bundle)                 # a bad bundle or eval set: one line here, not in the ServerApp's log
    if opts.eval_data and not Path(opts.eval_data).is_file():
        raise UserError(f"--eval-data {opts.eval_data}: no such file (the held-out set the server scores on)")
    done = launch.run(opts, a.superlink, insecure=a.insecure, root_certificates=a.root_certificates, echo=not a.json)
    try:
        rep = report.load(opts.state_dir)
    except UserError:
        raise UserError(f"flwr run ended (exit {done.returncode}) with no round committed in {opts.state_dir}: is a "
                        f"SuperLink running at {a.superlink}? ("
                        + ("run without --json to see Flower's log)" if a.json else "Flower's log is above)")) from None
    print(json.dumps(rep, indent=2) if a.json else report.format_report(rep))
    return 0 if done.returncode == 0 and rep["rounds_committed"] >= opts.rounds else 1


def cmd_report(a) -> int:
    from . import report
    rep = report.load(a.state_dir)
    print(json.dumps(rep, indent=2) if a.json else report.format_report(rep))
    return 0


def register(sub) -> None:
    from .options import FleetOptions
    f = sub.add_parser("fleet", help="federated rounds of sparse updates over a fleet of boards (Flower)",
                       description="A fleet of boards learns together on Flower: `serve` runs the rounds on a "
                                   "SuperLink, `report` reads them back. Needs the [fleet] extra (flwr).")
    fs = f.add_subparsers(dest="fleet_cmd", metavar="serve|report")
    s = fs.add_parser("serve", help="run the fleet's rounds on a Flower SuperLink", description=SERVE_HELP,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(s, FleetOptions)
    s.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's address for `flwr run` "
                                                                 "(default 127.0.0.1:8000)")
    tls = s.add_mutually_exclusive_group()
    tls.add_argument("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's TLS certificate")
    tls.add_argument("--insecure", action="store_true", help="no TLS (a test network only)")
    s.add_argument("--json", action="store_true", help="print the report as JSON (the Flower log is not shown)")
    s.set_defaults(fn=cmd_serve)
    r = fs.add_parser("report", help="the per-round report of a fleet's --state-dir")
    r.add_argument("state_dir")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_report)
