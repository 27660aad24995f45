"""Gradient accumulation, a manual linear warmup, then ReduceLROnPlateau.

The pattern from the notes on gradient_accumulate_steps / warmup / lr_decay:
accumulate ``accumulation_steps`` micro-batches per ``optimizer.step()`` (a
batch that does not fit in memory), raise the learning rate by hand through
``optimizer.param_groups[i]['lr']`` for the first steps, and afterwards let
``ReduceLROnPlateau`` halve it whenever the validation loss stalls.

    python examples/grad_accumulation_warmup.py
    fused-optim run examples/grad_accumulation_warmup.py
"""

import argparse

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset


def make_data(n, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def evaluate(model, loader, criterion):
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in loader:
            total += criterion(model(x), y).item() * x.size(0)
    return total / len(loader.dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulation-steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final model state_dict here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    w = 0.3 * torch.randn(12, 1, generator=torch.Generator().manual_seed(args.seed))
    train_loader = DataLoader(make_data(512, w, args.seed + 1), batch_size=args.micro_batch,
                              shuffle=True)
    val_loader = DataLoader(make_data(128, w, args.seed + 2), batch_size=64)

    model = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    criterion = nn.MSELoss()
    optimizer = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=0)

    global_step = 0
    for epoch in range(args.epochs):
        model.train()
        optimizer.zero_grad()
        for i, (x, y) in enumerate(train_loader):
            loss = criterion(model(x), y)
            # the mean over the big batch, not the sum of micro-batch means
            (loss / args.accumulation_steps).backward()
            if (i + 1) % args.accumulation_steps == 0:
                if global_step < args.warmup_steps:
                    warmup_lr = args.lr * (global_step + 1) / args.warmup_steps
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = warmup_lr
                optimizer.step()
                optimizer.zero_grad()
                global_step += 1
        val_loss = evaluate(model, val_loader, criterion)
        if global_step >= args.warmup_steps:
            scheduler.step(val_loss)
        print(f"epoch {epoch + 1}/{args.epochs} steps {global_step} "
              f"lr {optimizer.param_groups[0]['lr']:.2e} val_loss {val_loss:.5f}")

    if args.save:
        torch.save(model.state_dict(), args.save)
    return model.state_dict()


if __name__ == "__main__":
    main()
