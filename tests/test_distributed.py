"""Distributed AM: two gloo ranks (torch.multiprocessing) learn the model of one process that saw
every sample - AM-mem's memories are the single-process sums, AM-Adam's weights the same to
float rounding - and the ranks hold identical weights, including after steps where one rank or
every rank had nothing to learn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from amstream import AMConfig, make_learner

WORLD = 2
# per step, how many samples rank 0 and rank 1 get (rank 1 idle once, both idle once)
SPLITS = [(10, 6), (3, 13), (16, 0), (0, 0), (8, 8), (1, 15)]


def _stream(cfg: AMConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    for a, b in SPLITS:
        x = rng.normal(size=(a + b, cfg.n_inputs)).astype(np.float32)
        y = rng.integers(0, cfg.n_outputs, a + b)
        yield x, y, a


def _rank(rank: int, config: dict, init_file: str, out: str, overlap: bool) -> None:
    import torch.distributed as dist

    from amstream import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = AMConfig.from_dict(config)
        learner = make_learner(cfg)
        distributed.attach(learner, overlap=overlap)
        for x, y, a in _stream(cfg):
            part = slice(0, a) if rank == 0 else slice(a, None)
            learner.learn(x[part], y[part])
        torch.save(learner.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(cfg: AMConfig, tmp_path, overlap: bool):
    mp.start_processes(_rank, args=(cfg.to_dict(), str(tmp_path / "init"), str(tmp_path), overlap),
                       nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("algo, overlap", [("am-mem", True), ("am-adam", True), ("am-adam", False)])
def test_two_ranks_learn_the_single_process_model(tmp_path, algo, overlap):
    cfg = AMConfig(arch=(12, 16, 8, 4), algo=algo, seed=5, mem_decay=0.9, mem_ridge=0.1)
    single = make_learner(cfg)
    for x, y, _ in _stream(cfg):
        single.learn(x, y)
    ranks = _run_ranks(cfg, tmp_path, overlap)
    one = single.state_dict()
    for state in ranks:
        assert state["n_updates"] == one["n_updates"] == 5  # the all-empty step is no update
        assert state["n_samples"] == one["n_samples"] == sum(a + b for a, b in SPLITS)
        for k, v in one["model"].items():
            torch.testing.assert_close(state["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        for (A, B), (A1, B1) in zip(state["memories"], one["memories"]):
            torch.testing.assert_close(A, A1, rtol=1e-4, atol=1e-4)  # sums in another order
            torch.testing.assert_close(B, B1, rtol=1e-4, atol=1e-4)
    for k, v in ranks[0]["model"].items():  # the ranks agree exactly
        assert torch.equal(v, ranks[1]["model"][k]), k
