"""Launched by test_pretrain.py under torchrun: a short pretraining run, then each rank
saves its own copy of the weights so the test can compare ranks."""

import sys

import torch
import torch.distributed as dist

import pretrain

if __name__ == "__main__":
    a = pretrain.get_args(sys.argv[1:])
    model = pretrain.train(a)
    torch.save(model.state_dict(), f"{a.out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
