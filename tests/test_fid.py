import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from dmd_lightning.fmnist.classifier import FMNISTClassifier
from dmd_lightning.fmnist.data import load_fashion_mnist, to_model_space
from dmd_lightning.fmnist.fid import FMNIST_EXTRACTOR, FIDEvaluator, FMNISTFeatureExtractor, uint8_to_classifier_input
from dmd_lightning.images import to_uint8
from dmd_lightning.metrics.fid import (
    INCEPTION_EXTRACTOR,
    ImageDataset,
    compute_metrics,
    fidelity_kwargs,
    reference_cache_name,
)

N = 400
FAST = dict(kid_subsets=5, cuda=False)  # CPU; a few KID subsets (each is all N images anyway)


def _save_classifier(path, seed):
    """Random weights, He-initialised so that features are O(1) as a trained classifier's (PyTorch's default
    init shrinks them to ~1e-3, where float32 KID is rounding noise)."""
    torch.manual_seed(seed)
    net = FMNISTClassifier()
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    save_file(net.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _save_classifier(tmp_path_factory.mktemp("fid") / "classifier.safetensors", seed=0)


@pytest.fixture(scope="module")
def real():
    """Two disjoint sets of Fashion-MNIST test images, uint8 (N, 28, 28)."""
    images, _ = load_fashion_mnist(split="test")
    return images[:N], images[N:2 * N]


def _features(weights, images):
    extractor = FMNISTFeatureExtractor(FMNIST_EXTRACTOR, ["256"], feature_extractor_weights_path=weights)
    with torch.no_grad():
        return extractor(images[:, None].expand(-1, 3, -1, -1))[0].double().numpy()


def _frechet(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_classifier_input_matches_model_space():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x = uint8_to_classifier_input(images[:, None].expand(-1, 3, -1, -1))
    assert torch.allclose(x, to_model_space(images))
    assert torch.allclose(uint8_to_classifier_input(to_uint8(x)), x)  # 32x32 passes through
    assert uint8_to_classifier_input(torch.zeros(2, 3, 64, 64, dtype=torch.uint8)).shape == (2, 1, 32, 32)


def test_image_dataset_shapes():
    assert ImageDataset(torch.zeros(5, 28, 28, dtype=torch.uint8))[0].shape == (3, 28, 28)
    assert ImageDataset(torch.zeros(5, 1, 32, 32, dtype=torch.uint8))[0].shape == (3, 32, 32)
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(5, 28, 28))


def test_fid_small_for_real_large_for_noise(weights, real):
    a, b = real
    noise = torch.randint(0, 256, (N, 28, 28), dtype=torch.uint8)
    same = compute_metrics(a, b, FMNIST_EXTRACTOR, weights_path=weights, **FAST)
    other = compute_metrics(noise, b, FMNIST_EXTRACTOR, weights_path=weights, **FAST)
    assert set(same) == {"fid", "kid_mean", "kid_std"}
    assert 0 <= same["fid"] < 0.1 * other["fid"]
    assert same["kid_mean"] < 0.1 * other["kid_mean"]


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: singular covariances
def test_fid_equals_direct_frechet_distance(weights, real):
    a, b = real
    fid = compute_metrics(a[:, None], b, FMNIST_EXTRACTOR, weights_path=weights, kid=False, cuda=False)["fid"]
    assert fid == pytest.approx(_frechet(_features(weights, a), _features(weights, b)), rel=1e-3)


def test_reference_statistics_are_cached(weights, real, tmp_path):
    a, b = real
    kw = dict(extractor=FMNIST_EXTRACTOR, weights_path=weights, cache_dir=str(tmp_path), reference_name="fmnist-test-demo", **FAST)
    first = compute_metrics(a, b, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    name = reference_cache_name("fmnist-test-demo", weights)
    assert f"{name}-{FMNIST_EXTRACTOR}-features-256.pt" in files
    assert f"{name}-{FMNIST_EXTRACTOR}-stat-fid-256.pt" in files
    dummy = torch.zeros_like(b)  # same cache name: the cached features are used, the images are never read
    assert compute_metrics(a, dummy, **kw) == pytest.approx(first)
    assert compute_metrics(a, dummy, **{**kw, "kid": False})["fid"] == pytest.approx(first["fid"])
    assert compute_metrics(a, dummy, **{**kw, "reference_name": None})["fid"] != pytest.approx(first["fid"])


def test_cache_name_depends_on_weights(tmp_path):
    w0 = _save_classifier(tmp_path / "a.safetensors", seed=0)
    w1 = _save_classifier(tmp_path / "b.safetensors", seed=1)
    assert reference_cache_name("ref", w0) != reference_cache_name("ref", w1)
    assert reference_cache_name("ref", w0) == reference_cache_name("ref", str(tmp_path / "a.safetensors"))


def test_inception_kwargs_pass_local_weights(tmp_path):
    path = tmp_path / "inception.pth"
    path.write_bytes(b"not real weights")
    samples, ref = ImageDataset(torch.zeros(10, 28, 28, dtype=torch.uint8)), ImageDataset(
        torch.zeros(20, 28, 28, dtype=torch.uint8))
    kw = fidelity_kwargs(samples, ref, INCEPTION_EXTRACTOR, weights_path=str(path), cache_dir=str(tmp_path),
                         reference_name="ref", cuda=False)
    assert kw["feature_extractor"] == INCEPTION_EXTRACTOR
    assert kw["feature_extractor_weights_path"] == str(path)
    assert kw["input2_cache_name"].startswith("ref-") and kw["cache"] and kw["kid_subset_size"] == 10
    assert not fidelity_kwargs(samples, ref, FMNIST_EXTRACTOR, weights_path=str(path), cuda=False)["cache"]
    with pytest.raises(FileNotFoundError):
        fidelity_kwargs(samples, ref, INCEPTION_EXTRACTOR, weights_path=str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError):
        fidelity_kwargs(samples, ref, "no-such-extractor", weights_path=str(path))


def test_fid_evaluator(weights, tmp_path):
    images, _ = load_fashion_mnist(split="test")
    ev = FIDEvaluator(weights, reference_split="test", cache_dir=str(tmp_path), max_reference=400, kid_subsets=5)
    assert ev.state_dict() == {}
    ev.reset()
    assert ev.compute() == {}
    x = to_model_space(images[1000:1400])  # disjoint from the reference's first 400
    for chunk in x.split(100):
        ev.update(chunk, {})
    good = ev.compute()
    assert set(good) == {"fid", "kid"} and np.isfinite(good["fid"])
    assert any(tmp_path.iterdir())  # reference features cached
    ev.reset()
    ev.update(torch.rand(400, 1, 32, 32) * 2 - 1, {})
    assert ev.compute()["fid"] > 10 * good["fid"]
    other = FIDEvaluator(weights, reference_split="test", cache_dir=str(tmp_path), max_reference=400, kid_subsets=5)
    inverted = 255 - other.reference()
    other.reference = lambda: inverted  # e.g. another data root under the same split name and size
    for chunk in x.split(100):
        other.update(chunk, {})
    assert other.compute()["fid"] > 10 * good["fid"]  # its own features, not the cached ones of the first
