"""Build what the workers run: the data, the base ONNX graph, the TaskEdge bundles and the
ORT-training baselines' artifacts, written to the work folder and described by spec.json
(host side: imports torch and onnx)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .variants import LR, MODELS, THREADS, VARIANTS, base_lr, slug


def prepare(model: str, cfg: dict, work: Path, seed: int, variants: list, log) -> dict:
    """Data, the base ONNX, TaskEdge bundles and baseline artifacts; returns the spec."""
    import onnx
    from taskedge.export import baselines as BL
    from taskedge.export.ingest import ingest
    from taskedge.tools import demo_data as D

    m = MODELS[model]
    work.mkdir(parents=True, exist_ok=True)
    if model == "text":
        d = D.text_sentiment(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=seed)
    else:
        d = D.vision_digits("imagenet", seed=seed)
        if cfg.get("n_test"):
            d["test"] = {k: a[: cfg["n_test"]] for k, a in d["test"].items()}
    D.write_npz(work / "train.npz", d["train"])
    D.write_npz(work / "test.npz", d["test"])
    t = time.perf_counter()
    base = ingest(m["factory"]).model
    onnx.save(base, str(work / "base.onnx"))
    input_names = [i.name for i in base.graph.input if i.name not in {x.name for x in base.graph.initializer}]
    log(f"base ONNX exported in {time.perf_counter() - t:.1f}s ({len(base.graph.node)} nodes)")
    np.savez(work / "head.npz", **BL.head_arrays(base, m["classes"], seed))
    spec = {"model": model, "factory": m["factory"], "title": m["title"], "num_classes": m["classes"],
            "train": str(work / "train.npz"), "test": str(work / "test.npz"), "head": str(work / "head.npz"),
            "batch": cfg["batch"], "steps": cfg["steps"], "warmup": cfg["warmup"], "skip": cfg["skip"],
            "threads": THREADS, "seed": seed, "workdir": str(work), "input_names": input_names,
            "n_train": len(d["train"]["labels"]), "n_test": len(d["test"]["labels"]), "variants": {}}
    need = set(variants) | {VARIANTS[v][2]["bundle_of"] for v in variants if "bundle_of" in VARIANTS[v][2]}
    num_weights, skipped = None, {}
    for name in [v for v in VARIANTS if v in need]:
        engine, fam, opt = VARIANTS[name]
        if "bundle_of" in opt and opt["bundle_of"] in skipped:
            skipped[name] = f"needs {opt['bundle_of']}, which was skipped"
            continue
        t = time.perf_counter()
        try:
            entry = _build(name, work, base, m["classes"], seed, model)
        except _Skip as e:
            skipped[name] = str(e)
            log(f"skipping {name}: {e}")
            continue
        if (engine, fam) in (("ort", "full"), ("step", "taskedge")):     # the model's weights, head excluded
            num_weights = entry["num_weights"]
        spec["variants"][name] = entry
        if engine != "torch":
            log(f"prepared {name} in {time.perf_counter() - t:.1f}s")
    spec["num_weights"] = num_weights
    spec["run"] = [v for v in variants if v not in skipped]
    spec["skipped"] = {k: v for k, v in skipped.items() if k in variants}
    return spec


class _Skip(Exception):
    """This variant cannot be built for this model (e.g. a budget below one weight per neuron)."""


def _build(name: str, work: Path, base, classes: int, seed: int, model: str = "text") -> dict:
    """One variant's artifacts under work/<slug>; returns its spec entry."""
    from taskedge.export import baselines as BL

    engine, fam, opt = VARIANTS[name]
    entry = {"engine": engine, "family": fam, "options": opt, "lr": base_lr(fam, model, name)}
    folder = work / slug(name)
    if engine == "step":
        from taskedge.export.config import ExportConfig
        from taskedge.export.exporter import export_bundle
        from taskedge.runtime.fsutil import UserError
        try:
            man = export_bundle(ExportConfig(model=str(work / "base.onnx"), out=str(folder),
                                             calib=str(work / "train.npz"), budget=opt["budget"], nm=opt.get("nm"),
                                             lora_rank=opt.get("lora_rank"), num_classes=classes, seed=seed),
                                log=lambda s: None)
        except UserError as e:          # e.g. 0.1 % is below one weight per conv neuron
            raise _Skip(str(e)) from None
        entry.update(artifacts=str(folder), num_weights=man.num_weights, update_params=man.update_params,
                     head_params=man.head_params, k=man.method["k"])
    elif engine == "ort" and fam == "full":
        i = BL.build_full_ft(base, classes, folder, seed, head_lr_scale=LR["head"] / LR["full"])
        entry.update(artifacts=str(folder), head_lr_scale=i["head_lr_scale"], trainable_rule=i["trainable_rule"],
                     num_weights=i["num_weights"])
    elif engine == "ort" and fam == "lora":
        i = BL.build_lora(base, classes, folder, opt["rank"], opt["alpha"], seed, head_lr_scale=LR["head"] / LR["lora"])
        entry.update(artifacts=str(folder), head_lr_scale=i["head_lr_scale"], lora_layers=len(i["layers"]),
                     num_weights=i["num_weights"])
    elif engine == "ort" and fam == "floor":
        i = BL.build_floor(base, classes, folder, seed)
        entry.update(artifacts=str(folder), num_weights=i["num_weights"])
    elif engine == "infer":
        import onnx
        from taskedge.export.head import add_head
        folder.mkdir(parents=True, exist_ok=True)
        mm = onnx.load(str(work / "base.onnx"))
        add_head(mm, classes, seed)
        onnx.save(mm, str(folder / "model.onnx"))
        entry.update(model=str(folder / "model.onnx"))
    elif engine == "torch" and fam == "taskedge":
        entry.update(bundle=str(work / slug(opt["bundle_of"])))
    return entry
