"""`taskedge adapt`'s training run, one job per file (the entry point: runtime/adapt.py):

    session.py   the run: setup, the loop, the final checkpoint and update.npz (`adapt`)
    state.py     RunState: what a checkpoint records about the run and --resume restores
    resume.py    where a run starts; the recorded settings --resume may and may not change
    schedule.py  steps planned, each step's examples, the learning rate at each step
    planner.py   the micro-batch under the memory budget: the plan, step-downs, control file, SIGUSR1
    recovery.py  divergence: detect, find the bad records, roll back to the last good checkpoint
    report.py    the meters, the status line, the final report
    faults.py    test-only fault injection (tests/faults)

Nothing here imports onnxruntime except session.py (through runtime/trainer.py).
"""
