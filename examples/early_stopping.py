"""Early stopping on the validation loss, with ReduceLROnPlateau.

As in the notes on momentum, learning-rate decay and early stopping::

    optimizer = torch.optim.SGD(model.parameters(), args.lr,
                                momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = ReduceLROnPlateau(optimizer, 'min')
    ...
    scheduler.step(loss_val)

plus the usual early stopping: keep the weights of the best validation epoch
and stop once the validation loss has not improved for ``patience`` epochs.
A small, noisy training set makes the model overfit quickly.

    python examples/early_stopping.py
    fused-optim run examples/early_stopping.py
"""

import argparse
import copy

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset


def make_data(n, seed, w):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = x @ w + 0.5 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def train(train_loader, model, criterion, optimizer):
    model.train()
    for x, y in train_loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()


def validate(val_loader, model, criterion):
    model.eval()
    with torch.no_grad():
        return sum(criterion(model(x), y).item() * len(x) for x, y in val_loader) / len(
            val_loader.dataset)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--min-delta", type=float, default=1e-3,
                        help="smaller improvements do not count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the best model state_dict here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    w = torch.randn(16, 1, generator=torch.Generator().manual_seed(args.seed))
    train_loader = DataLoader(make_data(48, args.seed + 1, w), batch_size=16, shuffle=True)
    val_loader = DataLoader(make_data(256, args.seed + 2, w), batch_size=128)

    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 1))
    criterion = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    scheduler = ReduceLROnPlateau(optimizer, "min", patience=2)

    best_loss, best_epoch, best_state, bad_epochs = float("inf"), 0, None, 0
    for epoch in range(args.epochs):
        train(train_loader, model, criterion, optimizer)
        loss_val = validate(val_loader, model, criterion)
        scheduler.step(loss_val)
        if loss_val < best_loss - args.min_delta:
            best_loss, best_epoch, bad_epochs = loss_val, epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        print(f"epoch {epoch + 1} lr {optimizer.param_groups[0]['lr']:.2e} "
              f"val_loss {loss_val:.4f}")
        if bad_epochs >= args.patience:
            print(f"early stop: no improvement for {args.patience} epochs")
            break
    print(f"best epoch {best_epoch} val_loss {best_loss:.4f}")

    model.load_state_dict(best_state)
    if args.save:
        torch.save(model.state_dict(), args.save)
    return model.state_dict()


if __name__ == "__main__":
    main()
