"""Training: one loop for every stage (docs/training.md).

stages.py (what trains, on what, with which loss) -> engine.py (DeepSpeed config, param groups, init) ->
loop.py (`run(args)`, the loop) with schedule.py (client-side lr), checkpoint.py (atomic, resumable) and
logging.py (tqdm, wandb, MFU, run log). Import the submodules directly; this package imports nothing so
`ghostvis.train.stages` stays cheap to import.
"""
