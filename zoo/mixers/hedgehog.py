"""`hedgehog`: linear attention with a learned softmax feature map of both signs,
phi(x) = [softmax(W x), softmax(-W x)] over the features, one W per head, W starting as the identity."""

from __future__ import annotations

from functools import partial

from zoo.mixers.base import register_mixer
from zoo.mixers.feature_map import FeatureMapMixer
from zoo.mixers.features import HeadwiseLinear, hedgehog_of
from zoo.mixers.options import Option


@register_mixer("hedgehog")
class HedgehogMixer(FeatureMapMixer):
    state_size = "4*Hkv*(2F*D+2F) bytes (fp32), F = feature_dim (default D)"
    description = (
        "causal linear attention, learned feature map [softmax(Wx), softmax(-Wx)] per head (W starts as I)"
    )
    source = "Zhang et al. 2024, The Hedgehog & the Porcupine (arXiv:2402.04347); LoLCATs (arXiv:2410.10254)"
    options = {
        "feature_dim": Option(
            None, int, min=1, nullable=True, doc="projections per head (2x as many features); null: head_dim"
        ),
        "tie_qk": Option(False, bool, doc="one map for queries and keys (per key/value head) instead of two"),
    }
    test_options = {"feature_dim": 8}

    def __init__(self, num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options):
        super().__init__(num_heads, num_kv_heads, head_dim, hidden_size, layer_idx, **options)
        self.feature_dim = self.config["feature_dim"] or head_dim
        self.num_features = 2 * self.feature_dim
        self.make_maps(partial(HeadwiseLinear, in_dim=head_dim, out_dim=self.feature_dim, init="identity"))

    def feature_map(self, h, is_query, tokens):
        return hedgehog_of(self.map_for(is_query), h)
