import torch
from PIL import Image

from dmd_lightning.data.stream import noise_batches
from dmd_lightning.predict import SampleWriter


def test_samples_are_named_by_their_index_also_after_a_short_last_batch(tmp_path):
    batches = noise_batches((1, 4, 4), size=10, batch_size=4, num_classes=3, seed=1)  # batches of 4, 4 and 2
    writer = SampleWriter(str(tmp_path / "one"))
    for k, batch in enumerate(batches):
        writer.write_on_batch_end(None, None, {"x": batch["z"].tanh(), **batch}, None, batch, k)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == [f"{i:06d}_{i % 3}.png" for i in range(10)]
    last = torch.tensor(list(Image.open(tmp_path / "one" / "000009_0.png").getdata()), dtype=torch.float)
    torch.testing.assert_close(last / 127.5 - 1, batches[2]["z"][1].tanh().flatten(), atol=1 / 127.5, rtol=0)
