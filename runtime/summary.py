"""`taskedge inspect`: what a bundle trains, layer by layer."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import bundle as B


def inspect_bundle(folder, verify: bool = True) -> dict:
    folder = Path(folder)
    m = B.load_bundle(folder, verify=verify)
    with np.load(folder / B.ALLOCATION, allow_pickle=False) as z:
        min_k = {k: int(z[k].shape[1]) if z[k].size else 0 for k in z.files}
    layers = [{"layer": l.layer, "op": l.op, "weight": l.weight, "shape": l.weight_shape, "rows": l.rows,
               "cols": l.cols, "k": l.k, "formulation": l.formulation, "live": bool(l.live), "trainable": l.trainable,
               "share_of_layer": l.trainable / max(1, l.rows * l.cols), "min_inputs_per_neuron": min_k.get(l.weight)}
              for l in m.layers]
    return {"bundle": str(folder), "model": m.model_name, "schema_version": m.schema_version,
            "method": m.method, "inputs": [vars(s) for s in m.inputs], "num_classes": m.num_classes,
            "num_weights": m.num_weights, "update_params": m.update_params,
            "update_share_of_weights": m.update_share, "head_params": m.head_params,
            "trainable_params": m.trainable_params, "layers": layers, "versions": m.versions,
            "files": m.files, "verified": verify}


def format_inspect(info: dict) -> str:
    lines = [f"bundle {info['bundle']}  model {info['model']}  schema v{info['schema_version']}",
             f"inputs: " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in info["inputs"]),
             f"{'layer':48s} {'op':6s} {'rows':>6s} {'cols':>6s} {'k':>3s} {'form':7s} {'trainable':>9s}"]
    for l in info["layers"]:
        name = l["layer"] if len(l["layer"]) <= 48 else "..." + l["layer"][-45:]
        lines.append(f"{name:48s} {l['op']:6s} {l['rows']:6d} {l['cols']:6d} {l['k']:3d} {l['formulation']:7s} "
                     f"{l['trainable']:9d}")
    lines.append(f"update: {info['update_params']} trainable of {info['num_weights']} weights "
                 f"({100 * info['update_share_of_weights']:.4f} %) in {len(info['layers'])} layers")
    share = (info.get("method") or {}).get("neuron_share")
    if share:
        lines.append(f"budget below one input per neuron: {100 * share:.1f} % of the neurons of every layer "
                     "(chosen by importance) train one input each")
    live = sum(1 for l in info["layers"] if l.get("live"))
    if live:
        lines.append(f"live weights: {live} layers read W' = W + delta as an input the runtime keeps (export/live.py)")
    lines.append(f"head (new, dense, counted apart): {info['head_params']}")
    lines.append(f"total trainable: {info['trainable_params']}")
    return "\n".join(lines)
