"""The bench's maths over the workers' results: time and memory ratios between variants, which
TaskEdge variant is primary, and the targets (issue 11's step-time targets for the step graph on
plain onnxruntime, plus the memory, update-size and accuracy ones) each met or missed."""
from __future__ import annotations

import statistics

from .variants import PRIMARY

# (key, text, limit) per model
TARGETS = {
    "text": [
        ("time_vs_infer", "TaskEdge step time <= 2.2x inference forward", 2.2),
        ("time_vs_lora", "TaskEdge step time <= 0.8x ORT LoRA r=8", 0.8),
        ("mem_vs_infer", "TaskEdge peak memory <= 1.3x inference", 1.3),
        ("mem_vs_full", "TaskEdge peak memory <= 0.6x ORT full FT", 0.6),
        ("ckpt_share", "TaskEdge checkpoint <= 1 % of the model's bytes", 0.01),
        ("update_share", "TaskEdge update size <= 0.5 % of the model's bytes", 0.005),
        ("acc_vs_full", "TaskEdge accuracy within 1 point of ORT full FT", -0.01),
        ("acc_vs_lora", "TaskEdge accuracy above ORT LoRA r=8 (same steps)", 0.0),
    ],
    "vision": [
        ("time_vs_full", "TaskEdge step time <= 0.35x ORT full FT", 0.35),
        ("time_vs_torch_full", "TaskEdge step time <= 0.6x PyTorch full FT", 0.6),
        ("time_vs_infer", "TaskEdge step time <= 8x inference forward", 8.0),
        ("mem_vs_infer", "TaskEdge peak memory <= 1.5x inference", 1.5),
        ("ckpt_share", "TaskEdge checkpoint <= 1 % of the model's bytes", 0.01),
        ("acc_vs_full", "TaskEdge accuracy within 1 point of ORT full FT", -0.01),
    ],
}


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def primary_variant(res: dict) -> str:
    """taskedge-0.1% when it ran; else the first TaskEdge variant that did (vision: 0.1 % is infeasible)."""
    if PRIMARY in res:
        return PRIMARY
    return next((n for n, v in res.items() if v["family"] == "taskedge" and v["engine"] == "step"), PRIMARY)


def time_ratio(res: dict):
    """a/b step time. With timing rounds: the median over those rounds of the ratio within each
    round (variants of one round ran minutes apart, not a quarter of an hour as in the training
    runs); else the ratio of the medians."""
    def ratio(a: str, b: str):
        ra, rb = res[a].get("step_ms_rounds", [])[1:], res[b].get("step_ms_rounds", [])[1:]
        if ra and len(ra) == len(rb):
            return round(statistics.median(x / y for x, y in zip(ra, rb)), 3)
        return _ratio(res[a]["step_ms_median"], res[b]["step_ms_median"])
    return ratio


def compare(res: dict, model_bytes: int, ratio=None) -> None:
    """Each variant's time and memory relative to ORT full FT and to inference, and its update's
    share of the model's bytes (fields x_* and update_share_of_model_bytes, None when not run)."""
    ratio = ratio or time_ratio(res)
    full, inf = res.get("ort-full"), res.get("infer")
    for name, r in res.items():
        r["x_ort_full_time"] = ratio(name, "ort-full") if full else None
        r["x_infer_time"] = ratio(name, "infer") if inf else None
        r["x_ort_full_mem"] = _ratio(r["peak_rss_mb"], full["peak_rss_mb"]) if full else None
        r["x_infer_mem"] = _ratio(r["peak_rss_mb"], inf["peak_rss_mb"]) if inf else None
        r["update_share_of_model_bytes"] = round(r["update_bytes"] / model_bytes, 6) if model_bytes else None


def evaluate_targets(res: dict, model_bytes: int, primary: str = PRIMARY, ratio=None, model: str = "text") -> list:
    """[{target, text, limit, value, met}] for `model`'s targets (met None: a peer did not run)."""
    te, full, lora, inf = (res.get(k) for k in (primary, "ort-full", "ort-lora8", "infer"))
    ratio = ratio or time_ratio(res)
    out = []
    for key, text, limit in TARGETS[model]:
        val = None
        if te is None:
            pass
        elif key == "time_vs_full" and full:
            val = ratio(primary, "ort-full")
        elif key == "time_vs_lora" and lora:
            val = ratio(primary, "ort-lora8")
        elif key == "time_vs_infer" and inf:
            val = ratio(primary, "infer")
        elif key == "time_vs_torch_full" and res.get("torch-full"):
            val = ratio(primary, "torch-full")
        elif key == "ckpt_share" and model_bytes and te.get("checkpoint_bytes"):
            val = round(te["checkpoint_bytes"] / model_bytes, 6)
        elif key == "mem_vs_full" and full:
            val = _ratio(te["peak_rss_mb"], full["peak_rss_mb"])
        elif key == "mem_vs_infer" and inf:
            val = _ratio(te["peak_rss_mb"], inf["peak_rss_mb"])
        elif key == "update_share" and model_bytes:
            val = round(te["update_bytes"] / model_bytes, 6)
        elif key == "acc_vs_full" and full:
            val = round(te["accuracy"] - full["accuracy"], 4)
        elif key == "acc_vs_lora" and lora:
            val = round(te["accuracy"] - lora["accuracy"], 4)
        if val is None:
            met = None
        elif key.startswith("acc_vs_full"):
            met = val >= limit
        elif key.startswith("acc_vs_lora"):
            met = val > limit
        else:
            met = val <= limit
        out.append({"target": key, "text": text, "limit": limit, "value": val, "met": met})
    return out
