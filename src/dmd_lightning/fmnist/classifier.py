"""A small Fashion-MNIST classifier, trained by this project, whose penultimate features stand in for Inception
in FID when Inception weights are not at hand (features of a domain classifier, as in MNIST-FID practice)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_lightning.loading import load_weights

FEATURE_DIM = 256


class FMNISTClassifier(nn.Module):
    """Input (N, 1, 32, 32) in [-1, 1]. `features` gives the (N, 256) penultimate activations."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))  # 32 -> 4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, FEATURE_DIM), nn.ReLU())
        self.out = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 8, batch_size: int = 256, lr: float = 2e-3,
                     device: str = "cpu", seed: int = 0) -> FMNISTClassifier:
    """AdamW with a one-cycle schedule and random horizontal flips + 2-pixel shifts. images: (N, 1, 32, 32)."""
    torch.manual_seed(seed)
    net = FMNISTClassifier().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images))
        for i in range(len(images) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            x, y = images[idx].to(device), labels[idx].to(device)
            flip = torch.rand(len(x), device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    device = next(net.parameters()).device
    net.eval()
    correct = sum(int((net(images[i:i + batch_size].to(device)).argmax(1).cpu() == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def main(argv: list[str] | None = None) -> None:
    """Train the FID feature classifier and save it as safetensors: python -m dmd_lightning.fmnist.classifier."""
    import argparse
    import time

    from safetensors.torch import save_file

    from dmd_lightning.fmnist.data import DEFAULT_ROOT, load_fashion_mnist, to_model_space

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--out", default="weights/fmnist-classifier.safetensors")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    x, y = load_fashion_mnist(a.data_root, "train")
    xt, yt = load_fashion_mnist(a.data_root, "test")
    start = time.time()
    net = train_classifier(to_model_space(x), y, epochs=a.epochs, device=a.device)
    acc = accuracy(net, to_model_space(xt), yt)
    save_file({k: v.contiguous().cpu() for k, v in net.state_dict().items()}, a.out,
              metadata={"test_accuracy": f"{acc:.4f}", "epochs": str(a.epochs)})
    print(f"test accuracy {acc:.4f} after {a.epochs} epochs in {time.time() - start:.0f} s on {a.device}; wrote {a.out}")


if __name__ == "__main__":
    main()


def load_classifier(path: str | Path) -> FMNISTClassifier:
    """An FMNISTClassifier in eval mode from a local state dict (.safetensors, or a torch .pt/.pth)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier weights {path!r} not found; train one and save its state dict there")
    state = load_weights(path)
    net = FMNISTClassifier()
    net.load_state_dict(state)
    return net.requires_grad_(False).eval()
