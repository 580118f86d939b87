"""`linear-elu`: linear attention with the fixed feature map phi(x) = elu(x) + 1 (no parameters)."""

from __future__ import annotations

import torch.nn.functional as F

from zoo.mixers.base import register_mixer
from zoo.mixers.feature_map import FeatureMapMixer


@register_mixer("linear-elu")
class LinearEluMixer(FeatureMapMixer):
    state_size = "4*Hkv*(D*D+D) bytes (fp32 S and normalizer)"
    description = "causal linear attention, fixed feature map elu(x)+1; no trainable parameters"
    source = "Katharopoulos et al. 2020, Transformers are RNNs (arXiv:2006.16236)"
    options = {}

    def feature_map(self, h, is_query, tokens):
        return F.elu(h.float()) + 1.0
