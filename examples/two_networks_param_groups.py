"""Two networks in one optimizer: one param group each, own lr, under LambdaLR.

From the lr_scheduler notes: to optimize several networks with different
learning rates, pass one dict per network,
``[{'params': net_1.parameters()}, {'params': net_2.parameters(), 'lr': ...}]``,
and give ``LambdaLR`` one lambda per param group. Here ``net_1`` is an
encoder and ``net_2`` a classifier head trained on its features.

    python examples/two_networks_param_groups.py
    fused-optim run examples/two_networks_param_groups.py
"""

import argparse

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(4, 20, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g)
    return TensorDataset(centers[labels] + torch.randn(n, 20, generator=g), labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final state_dicts here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    loader = DataLoader(make_data(384, args.seed), batch_size=32, shuffle=True)

    net_1 = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
    net_2 = nn.Linear(16, 4)
    optimizer = optim.Adam([
        {"params": net_1.parameters()},              # uses the default lr below
        {"params": net_2.parameters(), "lr": 1e-2},  # the head learns faster
    ], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    scheduler = lr_scheduler.LambdaLR(optimizer, lr_lambda=[
        lambda epoch: 0.9 ** epoch,
        lambda epoch: 1.0 / (1.0 + 0.5 * epoch),
    ])
    criterion = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        correct = 0
        for x, y in loader:
            optimizer.zero_grad()
            logits = net_2(net_1(x))
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == y).sum().item()
        scheduler.step()
        lrs = ", ".join(f"{lr:.2e}" for lr in scheduler.get_last_lr())
        print(f"epoch {epoch + 1}/{args.epochs} lrs [{lrs}] loss {loss.item():.4f} "
              f"acc {correct / len(loader.dataset):.3f}")

    state = {**{f"net_1.{k}": v for k, v in net_1.state_dict().items()},
             **{f"net_2.{k}": v for k, v in net_2.state_dict().items()}}
    if args.save:
        torch.save(state, args.save)
    return state


if __name__ == "__main__":
    main()
