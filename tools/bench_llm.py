"""Causal-LM bench rows: TaskEdge's step graph (plain onnxruntime) vs PyTorch full fine-tuning and
PyTorch + peft LoRA r=8 (q/k/v/o, gate/up/down) on the same model and the same batch.

    python -m taskedge.tools.bench_llm BUNDLE DATA.jsonl HF_FOLDER [--batch 4] [--steps 3] [--json]

Each engine runs in its own fresh process (peak RSS is the process's; `ru_maxrss`), `--steps`
optimizer steps after one warm-up step; step time is their median. HF_FOLDER is the float32
checkpoint the bundle was exported from (for a GGUF: export/causal_lm.py `save_folder`).
Budgets: the Orin Nano 8 GB / 4 GB profiles' memory shares."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENGINES = ("taskedge", "torch-lora-r8", "torch-full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(bundle: Path, data: Path, n: int):
    from taskedge.runtime import bundle as B, lm
    man = B.load_bundle(bundle, verify=False)
    ds = lm.load_jsonl(data, lm.Encoder(bundle / B.TOKENIZER, man.preprocessing))
    return ds.batch(np.arange(n))


def _torch_steps(folder: str, batch, steps: int, lora: bool):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    trainable = sum(p.numel() for p in model.parameters())
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids, mask, labels = (torch.from_numpy(a) for a in batch)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return times[1:], trainable


def _taskedge_steps(bundle: str, batch, steps: int):
    from taskedge.runtime import bundle as B
    from taskedge.runtime.trainer import Trainer, TrainState
    man = B.load_bundle(bundle)
    tr = Trainer(bundle, man, TrainState.initial(bundle, man))
    tr.lr = 1e-3
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        tr.train_step(batch)
        tr.optimizer_step()
        times.append(time.perf_counter() - t)
    return times[1:], man.update_params


def worker(a) -> None:
    batch = _batch(Path(a.bundle), Path(a.data), a.batch)
    if a.worker == "taskedge":
        times, trainable = _taskedge_steps(a.bundle, batch, a.steps)
    else:
        times, trainable = _torch_steps(a.folder, batch, a.steps, lora=a.worker == "torch-lora-r8")
    print(json.dumps({"engine": a.worker, "step_ms": round(1e3 * float(np.median(times)), 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "trainable": int(trainable), "tokens": int(batch[1].sum()), "shape": list(batch[0].shape)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("data")
    p.add_argument("folder")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    from taskedge.runtime.profiles import load_profile
    budgets = {n: load_profile(n).budget_mb for n in ("jetson-orin-nano-8gb", "jetson-orin-nano-4gb")}
    rows = []
    for engine in ENGINES:
        cmd = [sys.executable, "-m", "taskedge.tools.bench_llm", a.bundle, a.data, a.folder, "--batch", str(a.batch),
               "--steps", str(a.steps), "--worker", engine]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else
                    {"engine": engine, "error": f"exit {r.returncode}"})
        row = rows[-1]
        row.update({f"fits_{k}": row.get("peak_rss_mb", 1e12) <= v for k, v in budgets.items()})
    if a.json:
        print(json.dumps({"rows": rows, "budgets_mb": budgets}, indent=2))
        return 0
    print(f"{'engine':16s} {'trainable':>12s} {'step ms':>9s} {'peak RSS MB':>12s}  fits Nano 8 GB ({budgets['jetson-orin-nano-8gb']:.0f} MB)"
          f" / 4 GB ({budgets['jetson-orin-nano-4gb']:.0f} MB)")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:16s} {r['error']}")
            continue
        print(f"{r['engine']:16s} {r['trainable']:12,d} {r['step_ms']:9.0f} {r['peak_rss_mb']:12.0f}  "
              f"{'yes' if r['fits_jetson-orin-nano-8gb'] else 'no'} / {'yes' if r['fits_jetson-orin-nano-4gb'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
