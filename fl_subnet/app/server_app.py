"""The fl-subnet ServerApp (``flwr run .``): the strategy named in the run config."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_subnet.experiments.config import RunConfig
from fl_subnet.experiments.experiment import run_server
from fl_subnet.experiments.results import RunRecorder
from fl_subnet.logs import use_flower_console

log = logging.getLogger(__name__)
use_flower_console()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config (a bad key stops here, naming it), run, save results and the
    global model after every round (``model.safetensors`` in the results folder:
    :func:`~fl_subnet.experiments.results.server_out_dir`, logged with its absolute path)."""
    try:
        cfg = RunConfig.from_mapping(context.run_config)
    except ValueError as err:  # one clear line; the run still fails
        log.error("fl-subnet: invalid run config: %s", err)
        raise ValueError(f"invalid run config: {err}") from None
    recorder = RunRecorder.for_config(cfg)  # absolute: a relative out-dir is under ~/flwr-runs/
    log.info("fl-subnet: %s, %d rounds; results in %s", cfg.strategy, cfg.num_server_rounds, recorder.out_dir)
    try:
        run_server(grid, cfg, on_round=recorder.add_row, checkpoint_dir=recorder.out_dir)
    finally:
        recorder.finish()  # what it has, also when the run failed (the error then ends the ServerApp)
        log.info("fl-subnet: results in %s", recorder.out_dir)
    log.info("fl-subnet: model saved in %s", recorder.out_dir / "model.safetensors")
