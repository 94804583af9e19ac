"""The bench's registry: the two models, the variants (engine, family, options), their learning
rates and the run sizes (full and --quick). Every other file of the bench looks these up here."""
from __future__ import annotations

MODELS = {
    "text": dict(factory="taskedge.tools.demo_models:minilm_sentiment", classes=2,
                 title="all-MiniLM-L6-v2 -> Rotten Tomatoes sentiment"),
    "vision": dict(factory="taskedge.tools.demo_models:mobilenet_v2_digits", classes=10,
                   title="ImageNet MobileNetV2 -> handwritten digits (64x64)"),
}
# Base learning rate per family (TaskEdge: delta and head share it); the new head trains at
# LR["head"] in every variant (ORT baselines: head reparametrised as s * W'; torch: a parameter group).
LR = {"taskedge": 1e-2, "lora": 2e-3, "full": 1e-4, "head": 1e-2}
# Per model and variant, where a variant was tuned (README "Benchmark" says how). Empty: adapt's own trials
# (runtime/lr_range.pick_lr: the planned run squeezed into 30-step trials, cosine) pick the family rate, 1e-2,
# for MobileNetV2 at 0.1 % and 200 x 16 (accuracy 0.970 there; 3e-2 also 0.970, 3e-3 lower); the 3e-2 that
# the old 12-step constant-rate trials picked gave 0.885 under a constant schedule.
TUNED_LR: dict = {}
# Every variant follows adapt's default schedule: linear warm-up, then cosine decay to 0 at the last step.
SCHEDULE = "cosine"
# rounds: the training run + (rounds - 1) timing-only runs of timing_steps per ORT/infer variant,
# interleaved; step time = median over rounds, time ratios = median of the within-round ratios
# of the timing rounds (this host's speed drifts by 10-20 % over minutes)
FULL = dict(steps=200, batch=16, n_train=2000, n_test=1000, warmup=5, skip=3, rounds=4, timing_steps=20)
QUICK = dict(steps=23, batch=16, n_train=400, n_test=200, warmup=5, skip=3, rounds=2, timing_steps=20)
THREADS = 2
PRIMARY = "taskedge-0.1%"
EVAL_BATCH = 50          # held-out accuracy is computed 50 examples at a time

# name -> (engine, family, options). Engines: "infer" (plain onnxruntime forward), "ort"
# (ORT-training artifacts), "step" (the TaskEdge bundle's step graph on plain onnxruntime),
# "torch" (PyTorch); see worker.ENGINES.
VARIANTS = {
    "infer": ("infer", "infer", {}),
    "ort-full": ("ort", "full", {}),
    "ort-lora8": ("ort", "lora", {"rank": 8, "alpha": 16.0}),
    "ort-floor": ("ort", "floor", {}),
    "taskedge-0.1%": ("step", "taskedge", {"budget": 0.001}),
    "taskedge-1%": ("step", "taskedge", {"budget": 0.01}),
    "taskedge-0.1%-2:4": ("step", "taskedge", {"budget": 0.001, "nm": "2:4"}),
    "taskedge-1%-2:4": ("step", "taskedge", {"budget": 0.01, "nm": "2:4"}),
    "taskedge-slora4": ("step", "taskedge", {"budget": 0.001, "lora_rank": 4}),
    "torch-full": ("torch", "full", {}),
    "torch-lora8": ("torch", "lora", {"rank": 8, "alpha": 16.0}),
    "torch-taskedge-0.1%": ("torch", "taskedge", {"bundle_of": "taskedge-0.1%"}),
}
TIMED_ENGINES = ("ort", "step", "infer")      # the engines that get timing-only rounds (not torch)


def base_lr(family: str, model: str = "text", name: str = ""):
    """The body learning rate of a variant (TUNED_LR, else its family's); the floor trains only the
    head (and its probe bias)."""
    tuned = TUNED_LR.get(model, {}).get(name)
    return tuned or {"taskedge": LR["taskedge"], "full": LR["full"], "lora": LR["lora"], "floor": LR["head"]}.get(family)


def slug(name: str) -> str:
    """A variant name as a file/folder name ('taskedge-0.1%' -> 'taskedge-0.1pct')."""
    return name.replace("%", "pct")
