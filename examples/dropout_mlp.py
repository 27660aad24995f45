"""An MLP with dropout, trained with SGD + momentum; seeded so runs repeat.

The MLP of the notes on momentum / early stopping / dropout (784-200-200-10,
``nn.Dropout(0.1)`` after each Linear) on random 28x28 "digits". Dropout
draws from torch's global generator, so ``torch.manual_seed`` at the start
makes two runs draw the same masks; ``model.eval()`` turns dropout off for
evaluation. LeakyReLU as in the original: fused_optim's SGD rounds exactly as
torch's does, so the run matches torch.optim's to float32 tolerance.

    python examples/dropout_mlp.py
    fused-optim run examples/dropout_mlp.py
"""

import argparse

import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset


class MLP(nn.Module):

    def __init__(self):
        super(MLP, self).__init__()

        self.model = nn.Sequential(
            nn.Linear(784, 200),
            nn.Dropout(0.1),  # drop 10%
            nn.LeakyReLU(),

            nn.Linear(200, 200),
            nn.Dropout(0.1),
            nn.LeakyReLU(),

            nn.Linear(200, 10),
        )

    def forward(self, x):
        x = self.model(x)

        return x


def make_data(n, templates, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = templates[labels] + 0.5 * torch.randn(n, 784, generator=g)
    return TensorDataset(images, labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final model state_dict here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)  # weights, shuffling and dropout masks
    templates = (torch.rand(10, 784, generator=torch.Generator().manual_seed(args.seed))
                 > 0.5).float()  # one binary "digit" per class
    train_loader = DataLoader(make_data(384, templates, args.seed + 1), batch_size=64,
                              shuffle=True)
    test_loader = DataLoader(make_data(256, templates, args.seed + 2), batch_size=256)

    net = MLP()
    optimizer = optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    criteon = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        net.train()
        for data, target in train_loader:
            logits = net(data)
            loss = criteon(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        net.eval()  # no dropout at test time
        correct = 0
        with torch.no_grad():
            for data, target in test_loader:
                correct += (net(data).argmax(dim=1) == target).sum().item()
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} "
              f"test acc {correct / len(test_loader.dataset):.3f}")

    if args.save:
        torch.save(net.state_dict(), args.save)
    return net.state_dict()


if __name__ == "__main__":
    main()
