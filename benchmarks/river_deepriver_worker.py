"""Runs deep-river's Classifier on one stream and prints one JSON line (a worker, not a test).

deep-river pins old torch and river, so it cannot share amstream's virtual environment:
``benchmarks/river_benchmark.py`` builds ``benchmarks/.deepriver-venv`` and runs this script
there, one process per stream. This file imports neither amstream nor anything that the
worker venv lacks.

Input (``argv[1]``): a JSON object ``{"stream": PATH, "hidden": 32, "optimizer": "adam",
"lr": 0.001, "seed": 0, "threads": 1, "n_classes": C}``; ``PATH`` is a pickle holding
``{"name": ..., "rows": [(x_dict, label), ...]}`` in stream order.

Output (stdout, one line): ``{"accuracy", "seconds", "samples_per_s", "n", "torch",
"river", "deep_river"}``.
"""
from __future__ import annotations

import json
import pickle
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec["seed"]))
    import deep_river
    import river
    from deep_river.classification import Classifier
    from river import evaluate, metrics, preprocessing
    from torch import nn

    with open(spec["stream"], "rb") as fh:
        stream = pickle.load(fh)
    rows = stream["rows"]
    n_features = len(rows[0][0])
    hidden, n_classes = int(spec["hidden"]), int(spec["n_classes"])

    class MLP(nn.Module):
        def __init__(self, n_features: int):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

        def forward(self, x):
            return self.net(x)  # logits

    model = preprocessing.StandardScaler() | Classifier(
        module=MLP(n_features), loss_fn="cross_entropy", optimizer_fn=spec["optimizer"],
        lr=float(spec["lr"]), is_class_incremental=True, is_feature_incremental=True,
        seed=int(spec["seed"]))
    metric = metrics.Accuracy()
    start = time.perf_counter()
    evaluate.progressive_val_score(rows, model, metric)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "accuracy": metric.get(), "seconds": seconds, "samples_per_s": len(rows) / seconds,
        "n": len(rows), "torch": torch.__version__, "river": river.__version__,
        "deep_river": getattr(deep_river, "__version__", "0.3.4"),
    }))


if __name__ == "__main__":
    main()
