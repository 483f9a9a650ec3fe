"""pytorchexample: A Flower / PyTorch app."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from pytorchexample.task import Net, load_centralized_dataset, test

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_evaluate: float = context.run_config["fraction-evaluate"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]
    out_dir: str = context.run_config["out-dir"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize strategy
    strategy = FedAvg(fraction_evaluate=fraction_evaluate)

    # Start strategy, run it for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
        evaluate_fn=global_evaluate,
    )

    # Save final model and metrics to disk: to `out-dir` if absolute, else under
    # ~/flwr-runs/ (`out-dir`, or the run ID). Not relative to the current directory:
    # the ServerApp runs in the SuperLink's, not in this app's folder.
    print("\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    out_path = Path.home() / "flwr-runs" / Path(out_dir or str(context.run_id)).expanduser()
    out_path.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, out_path / "final_model.pt")
    save_metrics(result, out_path / "result.json")
    print(f"Saved final_model.pt and result.json in {out_path.resolve()}")


def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Evaluate model on central data."""

    # Load the model and initialize it with the received weights
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    model.to(device)

    # Load entire test set
    test_dataloader = load_centralized_dataset()

    # Evaluate the global model on the test set
    test_loss, test_acc = test(model, test_dataloader, device)

    # Return the evaluation metrics
    return MetricRecord({"accuracy": test_acc, "loss": test_loss})


def save_metrics(result, path: Path) -> None:
    """Write the per-round metrics of the strategy's `Result` as JSON."""
    metrics = {
        "train": result.train_metrics_clientapp,
        "evaluate-clientapp": result.evaluate_metrics_clientapp,
        "evaluate-serverapp": result.evaluate_metrics_serverapp,
    }
    rounds = {k: {str(r): dict(m) for r, m in v.items()} for k, v in metrics.items()}
    path.write_text(json.dumps(rounds, indent=2))
