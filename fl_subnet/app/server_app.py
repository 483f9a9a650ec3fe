"""The fl-subnet ServerApp (``flwr run .``): the strategy named in the run config."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import run_server
from fl_subnet.checkpoint import MODEL_FILE, load_checkpoint
from fl_subnet.experiments.results import RunRecorder, server_out_dir
from fl_subnet.logs import use_flower_console

log = logging.getLogger(__name__)
use_flower_console()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config (a bad key stops here, naming it), run, save results and the
    global model after every round (``model.safetensors`` in the results folder:
    :func:`~fl_subnet.experiments.results.server_out_dir`, logged with its absolute path).

    With ``resume-from`` the run continues the one saved in that folder after its last
    checkpointed round (verified first; only the run-config keys in
    :data:`~fl_subnet.experiments.config.RESUMABLE_KEYS` may differ), and writes on there."""
    try:
        cfg = RunConfig.from_mapping(context.run_config)
    except ValueError as err:  # one clear line; the run still fails
        log.error("fl-subnet: invalid run config: %s", err)
        raise ValueError(f"invalid run config: {err}") from None
    resume = bool(cfg.resume_from)
    if resume:  # verified before anything is written there (a refused checkpoint stops the run here)
        folder = server_out_dir(cfg.resume_from, cfg.strategy)
        if not (folder / MODEL_FILE).is_file():
            log.error("fl-subnet: resume-from: %s holds no checkpoint (%s)", folder, MODEL_FILE)
            raise FileNotFoundError(f"resume-from: {folder} holds no checkpoint ({MODEL_FILE})")
        done = int(load_checkpoint(folder)[1]["server-round"])
        RunRecorder.saved_rows(folder, done)
        recorder = RunRecorder(folder, cfg)
        recorder.resume(done)
        log.info("fl-subnet: resuming %s after server round %d", folder, done)
    else:
        recorder = RunRecorder.for_config(cfg)  # absolute: a relative out-dir is under ~/flwr-runs/
    log.info("fl-subnet: %s, %d rounds; results in %s", cfg.strategy, cfg.num_server_rounds, recorder.out_dir)
    try:
        run_server(grid, cfg, on_round=recorder.add_row, checkpoint_dir=recorder.out_dir, resume=resume)
    finally:
        recorder.finish()  # what it has, also when the run failed (the error then ends the ServerApp)
        log.info("fl-subnet: results in %s", recorder.out_dir)
    log.info("fl-subnet: model saved in %s", recorder.out_dir / "model.safetensors")
