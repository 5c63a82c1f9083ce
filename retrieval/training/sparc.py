"""SPARC's objective: the late-fusion losses (training/late_fusion.py) with λ_global = 0.5, plus the
fine-grained sequence-wise loss on the image–caption pairs, λ_fine · L_fine: each caption word against
the patches it groups in its own image, the other words of the caption as the only negatives.
"""

from __future__ import annotations

from typing import Any

import torch

from retrieval.training.late_fusion import LateFusionObjective
from retrieval.training.losses import fine_grained_loss


class SPARCObjective(LateFusionObjective):
    loss_defaults = LateFusionObjective.loss_defaults | {"lambda_global": 0.5, "lambda_fine": 1.0,
                                                         "fine_mean": "token"}

    def family_terms(self, batch: dict[str, Any], image_local: torch.Tensor, text_local: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        image, text = batch["caption_pairs"]
        if not len(image):
            return {}, {}
        model = self.model
        words = model.word_mask(batch["text"][text])
        weights, grouped = model.group(text_local[text], image_local[image])
        loss = fine_grained_loss(text_local[text], grouped, words, model.logit_scale, self.weights["fine_mean"])
        kept = float((weights > 0).sum(-1)[words].float().mean()) if words.any() else 0.0
        return {"fine": loss}, {"kept": kept}
