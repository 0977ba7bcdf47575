"""The floor of the Fashion-MNIST FID protocol: FID/KID of 1,000 real train images against the 10,000 test images,
for three disjoint sets, with the evaluator validation uses. python experiments/fid_floor.py"""

from dmd_lightning.fmnist.data import load_fashion_mnist, to_model_space
from dmd_lightning.fmnist.fid import FIDEvaluator

if __name__ == "__main__":
    images, _ = load_fashion_mnist(split="train")
    evaluator = FIDEvaluator("weights/fmnist-classifier.safetensors", reference_split="test")
    for k in range(3):
        evaluator.reset()
        evaluator.update(to_model_space(images[k * 1000:(k + 1) * 1000]))
        print(f"train images {k * 1000}..{(k + 1) * 1000 - 1}:", evaluator.compute())
