"""Data-parallel training of a tiny TS-LoRA model: one rank of a gloo run, or the 1-process reference.

    python tests/ddp_worker.py --rank R --world 2 --out DIR

Rank 0 opens the rendezvous store on a free port of 127.0.0.1 chosen by the OS and publishes it in
DIR/port (written atomically), so there is no race for a port. Each rank writes DIR/rank{R}.pt with the
thresholds after every step, the final trainable parameters and the token counts of its gates.

`train(world=1)` (imported by tests/test_ddp.py) is the reference: the same steps on the full global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest, and the tspeft of this checkout
from conftest import tiny_llama, with_adapter  # noqa: E402

import tspeft  # noqa: E402

STEPS = 20
GLOBAL_BATCH = 4
SEQ = 10
LR = 1e-3
CONFIG = {"lam": 2e-2, "s": 2e-2}


def build() -> torch.nn.Module:
    """Return the tiny TS-LoRA model, identical on every rank (fixed seeds, fp32, dropout 0)."""
    model = with_adapter(tiny_llama(seed=0), "llama", "lora", dropout=0.0, random_b=False)
    # LoRA B starts at zero (peft's default); a seeded non-zero B makes ratios differ between tokens from step 0
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return tspeft.enable(model, tspeft.TSConfig(**CONFIG))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Return the global batch of a step: padded on the right, different lengths per sequence."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 64, (GLOBAL_BATCH, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 3, SEQ - 1, SEQ - 5])
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss_sum(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the sum of next-token cross entropies over real label tokens (a sum: shards add up)."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    labels = data["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def label_tokens(data: dict[str, torch.Tensor]) -> int:
    return int((data["labels"][:, 1:] != -100).sum())


def train(rank: int = 0, world: int = 1, wrap=None) -> dict:
    """Train STEPS steps on this rank's shard of each global batch; return what the test compares.

    The loss of a rank is its token-loss sum * world / global label tokens: DDP averages gradients over
    ranks, so the averaged gradient is that of the global mean, the 1-process objective.
    """
    model = build()
    net = wrap(model) if wrap is not None else model
    opt = tspeft.optimizer(model, lr=LR)
    taus = []
    for step in range(STEPS):
        data = global_batch(step)
        n_global = label_tokens(data)
        shard = {k: v[rank::world] for k, v in data.items()}
        loss = token_loss_sum(net, shard) * world / n_global
        loss.backward()
        tspeft.clip_grad_norm_(model, 1e6)  # adapters only; a no-op bound, as in a real loop
        opt.step()
        opt.zero_grad()
        taus.append(tspeft.thresholds(model))
    stats = tspeft.module_stats(model)
    tspeft.all_reduce_stats(model)  # every rank's tokens; a no-op in the 1-process reference
    total = tspeft.module_stats(model)
    return {
        "taus": taus,
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "tokens": {n: v["tokens"] for n, v in stats.items()},
        "active": {n: v["active"] for n, v in stats.items()},
        "tokens_all": {n: v["tokens"] for n, v in total.items()},
        "active_all": {n: v["active"] for n, v in total.items()},
    }


def _store(rank: int, world: int, out: Path) -> torch.distributed.Store:
    import torch.distributed as dist

    port_file = out / "port"
    if rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=_timeout())
        tmp = out / "port.tmp"
        tmp.write_text(str(store.port))
        os.replace(tmp, port_file)
        return store
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 did not publish its port")
        time.sleep(0.05)
    return dist.TCPStore("127.0.0.1", int(port_file.read_text()), world, is_master=False, timeout=_timeout())


def _timeout():
    import datetime

    return datetime.timedelta(seconds=60)


def main() -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = _store(args.rank, args.world, args.out)
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world, timeout=_timeout())
    try:
        result = train(args.rank, args.world, wrap=lambda m: DistributedDataParallel(m))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, args.out / f"rank{args.rank}.pt")


if __name__ == "__main__":
    main()


def fsdp2_save(rank: int, world: int, store: str, out: str) -> None:
    """One rank of an FSDP2 (fully_shard) save: thresholds sharded, the full state dict gathered, rank 0 saves."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = build()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with torch.no_grad():
            for p in tspeft.threshold_parameters(model).values():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.fill_(0.125)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model.save_pretrained(out, state_dict=state, is_main_process=rank == 0)
        dist.barrier()
    finally:
        dist.destroy_process_group()
