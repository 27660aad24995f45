"""A small MobileNetV2 trained with SGD(momentum=0.9, weight_decay=4e-5) and StepLR.

The optimizer line is the one from MobileNetV2-PyTorch's train.py::

    optimizer_ft = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                             weight_decay=0.00004)

with the learning rate multiplied by 0.98 after every epoch. Random 16x16
images with a class-dependent pattern stand in for ImageNet.

The blocks use ReLU6, as MobileNetV2 does. A kinked activation amplifies any
rounding difference between two optimizers into diverging runs; fused_optim's
SGD rounds exactly as torch's does, so tests/test_examples.py can still hold
the two runs to float32 tolerance.

    python examples/mobilenetv2_sgd_steplr.py            # torch.optim
    fused-optim run examples/mobilenetv2_sgd_steplr.py   # fused_optim
"""

import argparse

import torch
import torch.nn as nn
import torch.optim as optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset


class InvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [
            # depthwise
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            # pointwise-linear
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (stride): MobileNetV2's
    # table, cut down to a few blocks
    settings = [(1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 2)]

    def __init__(self, num_classes=10, last_channel=64):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)]
        inp = 8
        for t, c, n, s in self.settings:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers += [nn.Conv2d(inp, last_channel, 1, bias=False), nn.BatchNorm2d(last_channel),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = x.mean([2, 3])
        return self.classifier(x)


def make_data(n, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(num_classes, 3, 16, 16, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = patterns[labels] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(images, labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="write the final model state_dict here")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_set = make_data(256, 10, args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)

    model = MobileNetV2(num_classes=10)
    criterion = nn.CrossEntropyLoss()
    optimizer_ft = optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                             weight_decay=0.00004)
    exp_lr_scheduler = lr_scheduler.StepLR(optimizer_ft, step_size=1, gamma=0.98)

    for epoch in range(args.epochs):
        model.train()
        running_loss, running_corrects = 0.0, 0
        for inputs, labels in train_loader:
            optimizer_ft.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer_ft.step()
            running_loss += loss.item() * inputs.size(0)
            running_corrects += (outputs.argmax(1) == labels).sum().item()
        exp_lr_scheduler.step()
        print(f"epoch {epoch + 1}/{args.epochs} lr {exp_lr_scheduler.get_last_lr()[0]:.5f} "
              f"loss {running_loss / len(train_set):.4f} "
              f"acc {running_corrects / len(train_set):.3f}")

    if args.save:
        torch.save(model.state_dict(), args.save)
    return model.state_dict()


if __name__ == "__main__":
    main()
