"""Test-wide settings: one torch thread (tiny tensors on 2 shared cores are much slower with
two threads, see README "Threads") and deterministic seeds."""
import torch

torch.set_num_threads(1)
torch.manual_seed(0)
