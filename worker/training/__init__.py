"""The training child process: SFT then DPO with LoRA, published as one adapter.

Run it as `python -m worker.training JOB_JSON`, or under `accelerate launch` for several
processes (see `worker.training.launch`). It appends progress events to the job's
`progress_path` and exits 1 after an error event.
"""
