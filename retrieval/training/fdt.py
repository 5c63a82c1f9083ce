"""FDT's objective: CLIP's symmetric InfoNCE on the FDT embeddings of image–caption pairs, plus the
late-fusion losses of composed pairs (training/late_fusion.py). The official recipe clamps the log
logit scale to [3, 6] and caps the scale at 100, so σ = e^θ stays in [e³ ≈ 20, 100]. Logs the mean
number of active tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from retrieval.training.late_fusion import LateFusionObjective
from retrieval.training.losses import MAX_LOGIT_SCALE


class FDTObjective(LateFusionObjective):
    logit_scale_bounds = (3.0, MAX_LOGIT_SCALE)

    def family_terms(self, batch: dict[str, Any], image_local: torch.Tensor, text_local: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        sides = (("active_image", image_local), ("active_text", text_local))
        return {}, {name: float((codes > 0).sum(1).float().mean()) for name, codes in sides if codes is not None}
