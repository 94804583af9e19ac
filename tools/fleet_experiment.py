"""Federated vs local-only vs centralised TaskEdge on label-skewed boards (issue 13).

    python -m taskedge.tools.fleet_experiment OUT [--task vision] [--clients 4] [--rounds 10]
           [--local-steps 10] [--json] [--plot OUT/fleet_accuracy.png]

On the demo task (default: ImageNet MobileNetV2 -> 10 digit classes, tools/demo.py) the training
set is split among the clients by a Dirichlet(alpha) label skew; each client keeps 10 % of its
shard as its own held-out set. Then, all scored on the same held-out test set:
  federated    `taskedge fleet` on a real Flower federation over loopback (tools/fleet_local.py):
               a SuperLink and one SuperNode per client, TLS and SuperNode authentication on,
               R rounds of N local steps, FedAvg
  local-only   each client alone: `adapt` for R x N steps on its own shard
  centralised  one `adapt` on all the clients' data for R x N x clients steps (the same total)
Same bundle, batch, learning rate and constant schedule everywhere. Prints a table (or --json)
and plots accuracy against round (local-only and centralised at the same steps per round).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np


def label_skew(labels: np.ndarray, clients: int, seed: int = 0, alpha: float = 0.5) -> List[np.ndarray]:
    """Indices of a non-IID split: each class is shared among the clients in Dirichlet(alpha)
    proportions (small alpha: each client holds few classes). Every client gets at least half
    its even share of records (redrawn until so)."""
    rng = np.random.default_rng(seed)
    floor = len(labels) // (2 * clients)
    while True:
        parts: List[list] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= floor:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _log(msg: str) -> None:
    print(f"[fleet-experiment] {msg}", file=sys.stderr, flush=True)


def prepare(out: Path, task: str, clients: int, alpha: float, seed: int) -> dict:
    """Data, bundle and client shards (each split 90 / 10 into train and its own held-out set)."""
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.tools import demo
    from taskedge.tools.demo_data import write_npz
    cfg = demo.TASKS[task]
    demo.prepare_data(task, cfg, seed, out)
    bundle = out / "bundle"
    if not (bundle / "manifest.json").is_file():
        _log(f"exporting {cfg['factory']} (budget {cfg['budget']})")
        export_bundle(ExportConfig(model=cfg["factory"], out=str(bundle), calib=str(out / "train.npz"),
                                   budget=cfg["budget"], num_classes=cfg["classes"], seed=seed), log=lambda m: None)
    with np.load(out / "train.npz") as z:
        train = {k: z[k] for k in z.files}
    rng = np.random.default_rng(seed)
    parts, union = [], []
    for i, idx in enumerate(label_skew(train["labels"], clients, seed, alpha)):
        idx = rng.permutation(idx)
        held, own = idx[: max(1, len(idx) // 10)], idx[max(1, len(idx) // 10):]
        write_npz(out / f"client{i}.npz", {k: v[own] for k, v in train.items()})
        write_npz(out / f"client{i}-heldout.npz", {k: v[held] for k, v in train.items()})
        parts.append({"train": len(own), "classes": np.bincount(train["labels"][own], minlength=cfg["classes"]).tolist()})
        union.append(own)
    write_npz(out / "clients-all.npz", {k: v[np.concatenate(union)] for k, v in train.items()})
    return {"cfg": cfg, "bundle": bundle, "clients": parts}


def curve_of(report: dict, steps_per_round: int) -> List[Optional[float]]:
    """Accuracy on the test set after each round's worth of steps (round 0: before training)."""
    by_step = {int(s): a for s, a in report["accuracy"]["periodic"]}
    rounds = report["steps"] // steps_per_round
    return [report["accuracy"]["before"]] + [by_step.get(r * steps_per_round) for r in range(1, rounds + 1)]


def adapt_run(bundle: Path, data: Path, test: Path, steps: int, every: int, batch: int, lr: float, run_dir: Path,
              profile: str, seed: int) -> dict:
    from taskedge.runtime.adapt import adapt, options
    given = {"data": str(data), "eval_data": str(test), "steps": steps, "eval_every": every, "batch_size": batch,
             "lr": lr, "schedule": "constant", "warmup": 0, "run_dir": str(run_dir), "fresh": True, "quiet": True,
             "profile": profile, "seed": seed, "checkpoint_every": steps}
    return adapt(bundle, options(bundle, given))


def federated(out: Path, prep: dict, a) -> dict:
    from taskedge.runtime.fleet import report
    from taskedge.runtime.fleet.options import FleetOptions
    from taskedge.tools.fleet_local import LocalFleet
    opts = FleetOptions(bundle=str(prep["bundle"]), state_dir=str(out / "fleet" / "server"), rounds=a.rounds,
                        local_steps=a.local_steps, lr=a.lr, batch_size=a.batch, min_clients=a.clients,
                        eval_data=str(out / "test.npz"), seed=a.seed).resolved()
    with LocalFleet(out / "fleet", secure=not a.insecure) as fleet:
        for i in range(a.clients):
            fleet.add_board(prep["bundle"], out / f"client{i}.npz", profile=a.profile,
                            eval_data=out / f"client{i}-heldout.npz")
        fleet.start()
        done = fleet.serve(opts)
    if done.returncode != 0:
        raise RuntimeError(f"flwr run failed ({done.returncode}): {done.stdout[-2000:]}")
    return report.load(opts.state_dir)


def run(a) -> dict:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prep = prepare(out, a.task, a.clients, a.alpha, a.seed)
    a.lr = a.lr or prep["cfg"]["lr"]
    a.batch = a.batch or prep["cfg"]["batch"]
    test, total = out / "test.npz", a.rounds * a.local_steps * a.clients
    _log(f"federated: {a.clients} boards x {a.rounds} rounds x {a.local_steps} steps on a loopback Flower federation")
    t = time.time()
    fed = federated(out, prep, a)
    fed_s = time.time() - t
    _log(f"centralised: {total} steps on all clients' data")
    central = adapt_run(prep["bundle"], out / "clients-all.npz", test, total, a.local_steps * a.clients, a.batch,
                        a.lr, out / "central", a.profile, a.seed)
    local = []
    for i in range(a.clients):
        _log(f"local-only client {i}: {a.rounds * a.local_steps} steps on its shard")
        local.append(adapt_run(prep["bundle"], out / f"client{i}.npz", test, a.rounds * a.local_steps, a.local_steps,
                               a.batch, a.lr, out / f"local{i}", a.profile, a.seed))
    curves = {"federated": [r["accuracy"] for r in fed["rounds"]],
              "centralised": curve_of(central, a.local_steps * a.clients),
              "local_only_mean": np.mean([curve_of(r, a.local_steps) for r in local], axis=0).round(6).tolist(),
              "local_only": [curve_of(r, a.local_steps) for r in local]}
    last = fed["rounds"][-1]
    return {"task": a.task, "title": prep["cfg"]["title"], "clients": prep["clients"], "alpha": a.alpha,
            "rounds": a.rounds, "local_steps": a.local_steps, "batch": a.batch, "lr": a.lr, "profile": a.profile,
            "total_steps": total, "accuracy": {k: (v[-1] if k != "local_only" else [c[-1] for c in v])
                                               for k, v in curves.items()},
            "curves": curves, "bytes_per_client_per_round": fed["bytes_per_client_per_round"],
            "bytes_measured": {"down": last["bytes_down_per_client"], "up": last["bytes_up_per_client"]},
            "federated_wall_s": round(fed_s, 1), "round_wall_s": [r.get("wall_s") for r in fed["rounds"]],
            "energy_j_per_client_per_round": last["energy_j_per_client"], "energy_estimated": last["energy_estimated"],
            "wall_s": round(time.time() - t0, 1), "fleet_report": fed}


def format_table(r: dict) -> str:
    acc, b = r["accuracy"], r["bytes_per_client_per_round"]
    est = " (estimated)" if r["energy_estimated"] else ""
    lines = [f"TaskEdge fleet: {r['title']}",
             f"{len(r['clients'])} label-skewed clients (Dirichlet alpha {r['alpha']}; train records "
             f"{[c['train'] for c in r['clients']]}), {r['rounds']} rounds x {r['local_steps']} local steps, "
             f"batch {r['batch']}, lr {r['lr']}, profile {r['profile']}",
             f"{'accuracy on the held-out test set':40s} {'round 0':>8} {'final':>8}"]
    for k, label in (("federated", "federated (FedAvg, Flower)"), ("local_only_mean", "local-only, mean of clients"),
                     ("centralised", f"centralised ({r['total_steps']} steps)")):
        lines.append(f"{label:40s} {r['curves'][k][0]:>8.4f} {acc[k]:>8.4f}")
    lines.append(f"{'local-only, each client':40s} {'':>8} {' '.join(f'{a:.4f}' for a in acc['local_only'])}")
    lines.append(f"federated - local-only mean: {100 * (acc['federated'] - acc['local_only_mean']):+.2f} points; "
                 f"federated - centralised: {100 * (acc['federated'] - acc['centralised']):+.2f} points")
    lines.append(f"bytes per client per round: down {r['bytes_measured']['down']:,.0f} B, up "
                 f"{r['bytes_measured']['up']:,.0f} B (measured Flower records); as float32 state: TaskEdge "
                 f"{b['taskedge']:,} B, LoRA r=8 {b['lora_r8']:,} B, full fine-tuning {b['full_ft']:,} B")
    lines.append(f"energy per client per round: {r['energy_j_per_client_per_round']} J{est}; federated wall time "
                 f"{r['federated_wall_s']:.0f} s ({np.mean([w for w in r['round_wall_s'][1:] if w]):.1f} s per round); "
                 f"total {r['wall_s']:.0f} s")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, label in (("federated", "federated (4 boards, FedAvg)"), ("centralised", "centralised, same total steps"),
                     ("local_only_mean", "local-only (mean of boards)")):
        ax.plot(range(len(r["curves"][k])), r["curves"][k], marker="o", label=label)
    ax.set_xlabel(f"round ({r['local_steps']} local steps per board)")
    ax.set_ylabel("accuracy on the held-out test set")
    ax.set_title(r["title"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from taskedge.runtime.flags import POSITIVE, arg_type, at_least
    p = argparse.ArgumentParser(prog="python -m taskedge.tools.fleet_experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="working folder (data, bundle, shards, runs, report)")
    p.add_argument("--task", default="vision", choices=["vision", "text"])
    p.add_argument("--clients", type=arg_type(int, at_least(2)), default=4)
    p.add_argument("--rounds", type=arg_type(int, at_least(1)), default=10)
    p.add_argument("--local-steps", type=arg_type(int, at_least(1)), default=10)
    p.add_argument("--alpha", type=arg_type(float, POSITIVE), default=0.5, help="label skew (smaller: more skew)")
    p.add_argument("--lr", type=arg_type(float, POSITIVE), help="default: the demo task's")
    p.add_argument("--batch", type=arg_type(int, at_least(1)), help="default: the demo task's")
    p.add_argument("--profile", default="jetson-orin-nano-8gb")
    p.add_argument("--seed", type=arg_type(int, at_least(0)), default=0)
    p.add_argument("--plot", help="accuracy vs round PNG (default OUT/fleet_accuracy.png)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a)
    from taskedge.runtime.fsutil import atomic_write_json
    atomic_write_json(Path(a.out) / "fleet_experiment.json", r)
    plot(r, Path(a.plot or Path(a.out) / "fleet_accuracy.png"))
    print(json.dumps({k: v for k, v in r.items() if k != "fleet_report"}, indent=2) if a.json else format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
