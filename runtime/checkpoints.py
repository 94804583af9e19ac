"""Training checkpoints that survive power loss.

A checkpoint is two files in the run folder:
    ckpt-00000120        ORT checkpoint (parameters + AdamW state), written atomically
    ckpt-00000120.json   commit record: sha256 of the checkpoint + the loop state, written last
A checkpoint without its commit record, or whose hash does not match, is ignored
(the previous one is used). The newest `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .fsutil import UserError, atomic_write_json, sha256_file
from .ort_train import Checkpoint

_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointStore:
    def __init__(self, run_dir, keep: int = 2):
        self.dir = Path(run_dir)
        self.keep = max(1, keep)

    def steps(self) -> List[int]:
        if not self.dir.is_dir():
            return []
        return sorted((int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name))), reverse=True)

    def path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}"

    def save(self, checkpoint: Checkpoint, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        try:
            checkpoint.save(path, include_optimizer_state=True)
            atomic_write_json(path.with_name(path.name + ".json"),
                              {"sha256": sha256_file(path), "step": step, "state": state})
        except OSError as e:
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint "
                            "is intact (free disk space or make the run folder writable, then --resume)") from None
        self._prune()
        return path

    def _prune(self) -> None:
        for step in self.steps()[self.keep:]:
            for p in (self.path(step), self.path(step).with_name(f"ckpt-{step:08d}.json")):
                try:
                    p.unlink()
                except OSError:
                    pass

    def latest(self, warn=lambda m: print(f"[adapt] {m}", file=sys.stderr)) -> Optional[Tuple[Path, dict]]:
        """Newest checkpoint whose commit record exists and whose hash matches."""
        for step in self.steps():
            path = self.path(step)
            record_path = path.with_name(path.name + ".json")
            try:
                record = json.loads(record_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                warn(f"{path}: no commit record (write was interrupted); skipping it")
                continue
            except (OSError, ValueError) as e:
                warn(f"{record_path}: unreadable commit record ({e}); skipping it")
                continue
            if sha256_file(path) != record.get("sha256"):
                warn(f"{path}: sha256 mismatch (torn or corrupted); falling back to an older checkpoint")
                continue
            return path, record["state"]
        return None

    def clear(self) -> None:
        for step in self.steps():
            for p in (self.path(step), self.path(step).with_name(f"ckpt-{step:08d}.json")):
                if p.exists():
                    p.unlink()
