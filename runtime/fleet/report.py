"""The fleet's per-round report, read from the server's last committed round (runtime/fleet/server.py):
global accuracy on the held-out set, boards accepted / rejected / failed, bytes down and up per board
next to what LoRA r=8 and full fine-tuning would send, wall time, energy per board (estimated unless
the board measured it: the label says which)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..checkpoints import CheckpointStore
from ..fsutil import UserError
from .exchange import LORA_RANK


def load(state_dir) -> dict:
    found = CheckpointStore(Path(state_dir)).latest(warn=lambda m: None)
    if found is None:
        raise UserError(f"{state_dir}: no committed fleet round (is it a fleet --state-dir? has round 0 run?)")
    path, record = found
    rows = [summarise(r) for r in record["rows"]]
    return {"state_dir": str(state_dir), "committed": str(path), "allocation_hash": record["allocation_hash"],
            "rounds_committed": record["round"], "bytes_per_client_per_round": record["bytes_per_client"],
            "rounds": rows}


def _mean(values: List[float]) -> Optional[float]:
    return round(sum(values) / len(values), 3) if values else None


def summarise(row: dict) -> dict:
    """A committed round with the per-board means the table shows."""
    ok = [c for c in row["clients"] if c["status"] != "failed"]
    energy = [c["energy_j"] for c in ok if "energy_j" in c]
    measured = [bool(c.get("energy_measured")) for c in ok if "energy_j" in c]
    return {**row, "bytes_down_per_client": _mean([c["bytes_down"] for c in row["clients"]]),
            "bytes_up_per_client": _mean([c["bytes_up"] for c in ok]),
            "energy_j_per_client": _mean(energy), "energy_estimated": not all(measured) if measured else None}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def format_report(rep: dict) -> str:
    b = rep["bytes_per_client_per_round"]
    lines = [f"fleet {rep['state_dir']}: {rep['rounds_committed']} rounds committed (allocation {rep['allocation_hash']})",
             f"{'round':>5} {'accuracy':>9} {'accepted':>8} {'rejected':>8} {'failed':>6} {'down B/board':>12} "
             f"{'up B/board':>10} {'wall s':>7} {'energy J/board':>15}"]
    for r in rep["rounds"]:
        est = " (est.)" if r["energy_estimated"] else ""
        lines.append(f"{r['round']:>5} {_fmt(r['accuracy'], '.4f'):>9} {r['accepted']:>8} {r['rejected']:>8} "
                     f"{r['failed']:>6} {_fmt(r['bytes_down_per_client'], ',.0f'):>12} "
                     f"{_fmt(r['bytes_up_per_client'], ',.0f'):>10} {_fmt(r.get('wall_s'), '.1f'):>7} "
                     f"{_fmt(r['energy_j_per_client'], '.1f') + est:>15}")
        for c in r["clients"]:
            if c["status"] != "accepted":
                lines.append(f"      board {c['node']}: {c['status']}: {c.get('reason')}")
    lora = f"lora_r{LORA_RANK}"
    lines.append(f"state per board per round (float32): TaskEdge {b['taskedge']:,} B; LoRA r={LORA_RANK} on the "
                 f"same layers would send {b[lora]:,} B, full fine-tuning {b['full_ft']:,} B")
    return "\n".join(lines)
