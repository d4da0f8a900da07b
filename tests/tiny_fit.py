"""`python tiny_fit.py FOLDER STEPS`: train a tiny two-layer task with `fit` (one process, or under `accelerate
launch`), gradient accumulation 2 and a checkpoint every step, then write its weights to FOLDER/final.safetensors."""
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file

from dreamlite.fsdp import end_processes
from dreamlite.train import TrainSettings, fit


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 1)])  # trained: sharded under FSDP
        self.frozen = nn.Linear(4, 1).requires_grad_(False)  # frozen: left whole

    def forward(self, x, y):
        out = self.layers[1](torch.tanh(self.layers[0](x))) + self.frozen(x)
        return (out - y).pow(2).mean(), {}


def batches(step: int) -> dict:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
    return {"x": x, "y": x.sum(1, keepdim=True).sin()}


if __name__ == "__main__":
    folder, steps = sys.argv[1], int(sys.argv[2])
    task = Tiny()
    settings = TrainSettings(steps=steps, batch=8, accumulate=2, lr=1e-2, warmup=0, decay="constant",
                             checkpoint_every=1, log_every=1)  # constant: 2 steps then 4 is a run killed at step 2
    fit(task, batches, settings, folder)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in task.state_dict().items()}, f"{folder}/final.safetensors")
    end_processes()
