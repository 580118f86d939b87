"""`t2r`: linear attention with a learned ReLU feature map phi(x) = relu(W x + b), one W per head."""

from __future__ import annotations

from functools import partial

import torch

from zoo.mixers.base import register_mixer
from zoo.mixers.feature_map import FeatureMapMixer
from zoo.mixers.features import HeadwiseLinear
from zoo.mixers.options import Option


@register_mixer("t2r")
class T2RMixer(FeatureMapMixer):
    state_size = "4*Hkv*(F*D+F) bytes (fp32), F = feature_dim (default D)"
    description = "causal linear attention, learned feature map relu(Wx+b) per head (W starts as +-identity)"
    source = (
        "Kasai et al. 2021, Finetuning Pretrained Transformers into RNNs (arXiv:2103.13076); LoLCATs baseline"
    )
    options = {
        "feature_dim": Option(None, int, min=1, nullable=True, doc="features per head; null: head_dim"),
        "tie_qk": Option(False, bool, doc="one map for queries and keys (per key/value head) instead of two"),
    }
    test_options = {"feature_dim": 8}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.num_features = self.config["feature_dim"] or head_dim
        # "signed" identity: with F = 2D the map starts as [relu(x), relu(-x)], with F = D as relu(x)
        self.make_maps(
            partial(HeadwiseLinear, in_dim=head_dim, out_dim=self.num_features, bias=True, init="signed")
        )

    def feature_map(self, h, is_query, tokens):
        return torch.relu(self.map_of(h, is_query))
