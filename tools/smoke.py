"""End-to-end smoke test of the board runtime (run by ctest; also handy on a freshly flashed board).

    python tools/smoke.py [--bundle DIR] [--steps N] [--keep DIR]

Two ways to get a bundle, because exporting one runs ONNX Runtime's gradient builder on the host
(`onnxruntime.training`, which imports torch) while the board runtime needs neither:

1. `--bundle DIR` or the environment variable TASKEDGE_SMOKE_BUNDLE: use an existing bundle
   (on a board: the one `taskedge flash` installed, PREFIX/release/bundle). Data are random
   inputs of the bundle's input spec with random labels; the test checks mechanics, not accuracy.
2. Otherwise, if the host tools are importable (onnx, torch, onnxruntime.training): build a tiny
   MLP with `onnx.helper` (no torch in the model itself), a learnable 3-class task, and export a
   bundle with `taskedge export`.

Then `taskedge adapt` runs a few steps on the bundle's step graph in a child process in which
importing torch and onnxruntime.training is made impossible (as on a board with a plain
onnxruntime), and the report is checked: steps done, finite loss, update written, the last
checkpoint's sha256 matches its record and its trainable state loads and is finite. With neither
a bundle nor the host tools, exits 77 (ctest SKIP_RETURN_CODE): there is nothing to train.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SKIP = 77
IN, HIDDEN, CLASSES = 16, 32, 3

# A child process that cannot import torch or onnxruntime.training, like a board with a plain
# onnxruntime (sys.modules[name] = None makes `import` raise; onnxruntime handles the missing package).
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['onnxruntime.training'] = None; "
            "from taskedge.runtime.cli import main; sys.exit(main(sys.argv[1:]))")
HOST_MODULES = ("onnx", "torch", "onnxruntime.training")


def tiny_mlp(path: Path, seed: int = 0) -> None:
    """x[N,16] -> MatMul+Add -> Relu -> MatMul+Add -> logits[N,3], opset 17, IR version 8."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((IN, HIDDEN)) / math.sqrt(IN)).astype(np.float32), "fc1.weight"),
             numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "fc1.bias"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, CLASSES)) / math.sqrt(HIDDEN)).astype(np.float32),
                                     "fc2.weight"),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc2.bias")]
    nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1_add"),
             helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
             helper.make_node("MatMul", ["h2", "fc2.weight"], ["l0"], name="fc2"),
             helper.make_node("Add", ["l0", "fc2.bias"], ["logits"], name="fc2_add")]
    graph = helper.make_graph(nodes, "smoke_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="taskedge-smoke")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def task(n: int = 256, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, IN)).astype(np.float32)
    w = rng.standard_normal((IN, CLASSES)).astype(np.float32)
    return x, (x @ w).argmax(1).astype(np.int64)


def random_data(manifest, n: int = 64, seed: int = 0) -> dict:
    """Inputs matching the bundle's input spec (symbolic dims -> n or 8), random labels."""
    import numpy as np
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in manifest.inputs:
        shape = [n] + [d if isinstance(d, int) and d > 0 else 8 for d in spec.shape[1:]]
        if spec.dtype.startswith("int"):
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    arrays["labels"] = rng.integers(0, manifest.num_classes, size=n).astype(np.int64)
    return arrays


def missing_host_modules() -> list:
    """The modules `taskedge export` needs that this Python lacks (found without importing them)."""
    import importlib.util
    import taskedge.runtime.ort  # noqa: F401  (imports onnxruntime without its torch probe)
    missing = []
    for name in HOST_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def export_smoke_bundle(work: Path):
    """Export the onnx.helper MLP with `taskedge export`; returns (bundle, manifest, arrays)."""
    import numpy as np
    from taskedge.export.config import ExportConfig
    from taskedge.export.exporter import export_bundle
    from taskedge.runtime.bundle import load_bundle
    from taskedge.runtime.fsutil import atomic_path
    model = work / "smoke_mlp.onnx"
    tiny_mlp(model)
    x, y = task()
    with atomic_path(work / "calib.npz") as t, open(t, "wb") as f:
        np.savez(f, x=x, labels=y)
    bundle = work / "bundle"
    export_bundle(ExportConfig(model=str(model), out=str(bundle), calib=str(work / "calib.npz"),
                               budget=0.1, lr=0.05), log=lambda m: None)
    return bundle, load_bundle(bundle), {"x": x, "labels": y}


def check_run(rep: dict, run_dir: Path, manifest, steps: int) -> list:
    """Problems with an adapt run: step count, loss, update.npz, the last checkpoint."""
    from taskedge.runtime.checkpoints import CheckpointStore
    from taskedge.runtime.fsutil import UserError
    from taskedge.runtime.trainer import TrainState
    problems = []
    if rep.get("steps") != steps:
        problems.append(f"ran {rep.get('steps')} steps, wanted {steps}")
    last = rep.get("loss", {}).get("last")
    if not isinstance(last, (int, float)) or not math.isfinite(last):
        problems.append(f"loss is not finite: {last!r}")
    if not any(run_dir.rglob("update.npz")):
        problems.append(f"no update.npz under {run_dir}")
    good = CheckpointStore(run_dir).latest(warn=problems.append)
    if good is None:
        problems.append(f"no checkpoint under {run_dir} passes its sha256 check")
        return problems
    try:
        if not TrainState.from_file(good[0], manifest.trainable_names).finite():
            problems.append(f"{good[0]}: trainable state is not finite")
    except UserError as e:
        problems.append(str(e))
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=os.environ.get("TASKEDGE_SMOKE_BUNDLE") or None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--profile", default=os.environ.get("TASKEDGE_SMOKE_PROFILE", "host-cpu"))
    ap.add_argument("--keep", help="keep the work folder here instead of a temp dir")
    a = ap.parse_args(argv)

    import numpy as np
    from taskedge.runtime.bundle import load_bundle
    from taskedge.runtime.fsutil import atomic_path

    work = Path(a.keep or tempfile.mkdtemp(prefix="taskedge-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = work / "train.npz"
        if a.bundle:
            bundle = Path(a.bundle)
            manifest = load_bundle(bundle)
            arrays = random_data(manifest)
            print(f"smoke: using bundle {bundle} ({manifest.model_name}), random data")
        else:
            missing = missing_host_modules()
            if missing:
                print(f"smoke: SKIP - no bundle given (--bundle / TASKEDGE_SMOKE_BUNDLE) and {', '.join(missing)} "
                      "not importable, so no bundle can be exported here")
                return SKIP
            bundle, manifest, arrays = export_smoke_bundle(work)
            print(f"smoke: exported {bundle} from an onnx.helper MLP: {manifest.update_params} trainable "
                  f"of {manifest.num_weights} weights")
        with atomic_path(data) as t, open(t, "wb") as f:
            np.savez(f, **arrays)
        run_dir = work / "run"
        cmd = [sys.executable, "-c", NO_TORCH, "adapt", str(bundle), "--data", str(data), "--steps", str(a.steps),
               "--batch-size", "16", "--warmup", "1", "--checkpoint-every", "3", "--run-dir", str(run_dir),
               "--profile", a.profile, "--quiet", "--json", "--fresh"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"smoke: FAIL - adapt exited {r.returncode}:\n{r.stderr[-2000:]}")
            return 1
        rep = json.loads(r.stdout)
        problems = check_run(rep, run_dir, manifest, a.steps)
        if problems:
            print("smoke: FAIL - " + "; ".join(problems))
            return 1
        print(f"smoke: OK - {rep['steps']} steps without torch or onnxruntime.training, loss "
              f"{rep['loss']['first']:.4f} -> {rep['loss']['last']:.4f}, "
              f"accuracy {rep['accuracy']['before']:.3f} -> {rep['accuracy']['after']:.3f}")
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
