"""Where does a GPU training step spend its time? (torch.profiler, top ops by self CPU time).

    python bench/gpu_profile.py [finetune|pretrain] [batch] [--compile]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from aemt.config import load_config
from aemt.evaluation.bench import SIMS2_DIMS, _batch, _training_step
from aemt.training.finetune import FinetuneModule
from aemt.training.pretrain import PretrainModule

stage = sys.argv[1] if len(sys.argv) > 1 else "finetune"
batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 32
compiled = "--compile" in sys.argv
device = torch.device("cuda")
cfg = load_config("sims2", {"trainer.compile": compiled})
module = (FinetuneModule if stage == "finetune" else PretrainModule)(SIMS2_DIMS, cfg).to(device)
module.log_epoch_means = lambda *a, **k: None
batch = _batch(batch_size, 50, device)
step = _training_step(module, batch, torch.optim.Adam(module.parameters(), lr=1e-4, fused=True), True)
start = time.perf_counter()
for _ in range(3):
    step()
torch.cuda.synchronize()
print(f"{stage} b{batch_size} compile={compiled}: warm-up {time.perf_counter() - start:.1f} s")
start = time.perf_counter()
for _ in range(10):
    step()
torch.cuda.synchronize()
print(f"{stage} b{batch_size} compile={compiled}: {(time.perf_counter() - start) * 100:.1f} ms/step")
if not compiled:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=45))
