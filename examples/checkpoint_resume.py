"""Checkpoint and resume: model, optimizer and scheduler state.

Train for a few epochs, save ``{'epoch', 'model', 'optimizer', 'scheduler'}``,
throw everything away as if the job had been killed, rebuild the model,
optimizer and scheduler from scratch, load the checkpoint and continue. The
optimizer's state (Adam's moments and step counts) and the scheduler's
position must come back, or the resumed run would not match an
uninterrupted one.

    python examples/checkpoint_resume.py
    fused-optim run examples/checkpoint_resume.py

Checkpoints are interchangeable: one written under ``fused-optim run`` loads
into plain torch.optim and vice versa.
"""

import argparse
import os
import tempfile

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    return TensorDataset(x, y)


def build():
    model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 2))
    optimizer = optim.Adam(model.parameters(), lr=5e-3, weight_decay=1e-4)
    scheduler = lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5], gamma=0.3)
    return model, optimizer, scheduler


def train_one_epoch(model, optimizer, dataset, epoch, seed):
    # reshuffle from (seed, epoch) so a resumed run sees the same batches
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    criterion = nn.CrossEntropyLoss()
    total = 0.0
    for x, y in DataLoader(dataset, batch_size=32, shuffle=True, generator=g):
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * x.size(0)
    return total / len(dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--stop-after", type=int, default=3,
                        help="epochs to train before checkpointing and restarting")
    parser.add_argument("--checkpoint", help="checkpoint file (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final model state_dict here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or os.path.join(tmp, "checkpoint.pt")
        dataset = make_data(256, args.seed)

        # --- first run: train, then checkpoint
        torch.manual_seed(args.seed)
        model, optimizer, scheduler = build()
        for epoch in range(args.stop_after):
            loss = train_one_epoch(model, optimizer, dataset, epoch, args.seed)
            scheduler.step()
            print(f"epoch {epoch + 1} lr {scheduler.get_last_lr()[0]:.2e} loss {loss:.4f}")
        torch.save({
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }, path)
        print(f"saved checkpoint after epoch {epoch + 1}")
        del model, optimizer, scheduler

        # --- second run: rebuild from scratch and resume
        torch.manual_seed(args.seed + 1)  # a different init, overwritten below
        model, optimizer, scheduler = build()
        checkpoint = torch.load(path)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        print(f"resumed at epoch {start_epoch + 1}")
        for epoch in range(start_epoch, args.epochs):
            loss = train_one_epoch(model, optimizer, dataset, epoch, args.seed)
            scheduler.step()
            print(f"epoch {epoch + 1} lr {scheduler.get_last_lr()[0]:.2e} loss {loss:.4f}")

    if args.save:
        torch.save(model.state_dict(), args.save)
    return model.state_dict()


if __name__ == "__main__":
    main()
