"""`retrieval train tokenizer`: the small BPE and the conv-VQ image tokenizer that our own models share.

Output folder: tokenizer.json (text), image_tokenizer.json (its config) and image_tokenizer.safetensors
(encoder + codebook; the decoder that trained them is left out).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retrieval.encoders.fuselip.vq import ConvVQConfig, ConvVQDecoder, ConvVQTokenizer
from retrieval.errors import RetrievalError
from retrieval.files import atomic_path, read_json, write_json
from retrieval.images import load_image, squash_to_array
from retrieval.text_tokenizer import OWN_IDS, TextTokenizer, train_bpe
from retrieval.training.pairs import Pair

IMAGE_CONFIG = "image_tokenizer.json"
IMAGE_WEIGHTS = "image_tokenizer.safetensors"


def image_tokenizer_config(model: str) -> ConvVQConfig:
    """The conv-VQ settings that registered model `model` expects of its image tokenizer."""
    from retrieval.encoders.registry import family_class, get_config

    config = get_config(model)
    image = family_class(config.family).image_tokenizer_config(config)
    if not isinstance(image, ConvVQConfig):
        raise RetrievalError(f"{model} has no trainable image tokenizer")
    return image


def train_tokenizers(pairs: list[Pair], out: str | os.PathLike, config: ConvVQConfig, vocab_size: int = 1024,
                     steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train both tokenizers on the texts and images of `pairs`; returns what was measured."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = sorted({t for p in pairs for t in (p.query_text, p.target_text) if t})
    text_tokenizer = train_bpe(texts, vocab_size)
    text_tokenizer.save(out)
    images = sorted({i for p in pairs for i in (p.query_image, p.target_image) if i})
    pixels = np.stack([(squash_to_array(load_image(p), config.image_size) * 255).round().astype(np.uint8)
                       for p in tqdm(images, desc="read images", unit="image", disable=not progress)])
    tokenizer, stats = train_image_tokenizer(torch.from_numpy(pixels), config, steps, batch_size, lr, seed, progress)
    save_image_tokenizer(tokenizer, out)
    stats |= {"texts": len(texts), "text_vocab": text_tokenizer.vocab_size, "images": len(images)}
    write_json(out / "train.json", stats)
    return stats


def train_image_tokenizer(pixels: torch.Tensor, config: ConvVQConfig, steps: int, batch_size: int, lr: float,
                          seed: int, progress: bool = True) -> tuple[ConvVQTokenizer, dict]:
    """pixels uint8 [n, 3, S, S]. MSE reconstruction + VQ losses; unused codes are restarted on live latents."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer, decoder = ConvVQTokenizer(config), ConvVQDecoder(config)
    params = list(tokenizer.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    usage = torch.zeros(config.codebook_size)
    bar = tqdm(range(steps), desc="image tokenizer", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        x = pixels[torch.tensor(rng.sample(range(len(pixels)), min(batch_size, len(pixels))))].float() / 255
        z = tokenizer.latents(x)
        q, idx, vq_loss = tokenizer.quantize(z)
        recon = F.mse_loss(decoder(q), x)
        loss = recon + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage = 0.99 * usage + torch.bincount(idx.flatten(), minlength=config.codebook_size)
        if step % 50 == 0 and step < steps * 0.8:  # step 0 seeds the codebook from live latents
            restart_dead_codes(tokenizer, z.detach(), usage)
        bar.set_postfix(recon=f"{recon.item():.4f}", used=int((usage > 0.01).sum()))
    with torch.no_grad():
        sample = pixels[:2048].float() / 255
        idx = tokenizer(sample)
        recon = F.mse_loss(decoder(tokenizer.quantize.codebook()[idx]), sample).item()
    used = int(torch.bincount(idx.flatten(), minlength=config.codebook_size).gt(0).sum())
    return tokenizer.eval(), {"steps": steps, "recon_mse": round(recon, 5), "codes_used": used,
                              "codebook_size": config.codebook_size}


@torch.no_grad()
def restart_dead_codes(tokenizer: ConvVQTokenizer, latents: torch.Tensor, usage: torch.Tensor) -> None:
    dead = (usage < 0.01).nonzero().squeeze(1)
    if len(dead):
        flat = latents.reshape(-1, latents.shape[-1])
        pick = flat[torch.randint(len(flat), (len(dead),))]
        tokenizer.quantize.embedding.weight[dead] = pick
        usage[dead] = 1.0


def save_image_tokenizer(tokenizer: ConvVQTokenizer, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}
    with atomic_path(out / IMAGE_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out / IMAGE_CONFIG, tokenizer.config.to_dict())


def load_tokenizers(folder: str | os.PathLike, image_config: ConvVQConfig | None
                    ) -> tuple[TextTokenizer, dict | None]:
    """The text tokenizer and the image tokenizer's weights from a `train tokenizer` folder, checked against
    the image tokenizer config of the model they are for (None: a model without one, no weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / IMAGE_CONFIG).is_file():
        raise RetrievalError(f"{folder} is not a tokenizers folder (no {IMAGE_CONFIG}); "
                             "make one with `retrieval train tokenizer`")
    if image_config is None:
        return TextTokenizer.load(folder, OWN_IDS), None
    saved = read_json(folder / IMAGE_CONFIG)
    if saved != image_config.to_dict():
        raise RetrievalError(f"{folder}: the image tokenizer was trained as {saved}, the model wants "
                             f"{image_config.to_dict()}")
    return TextTokenizer.load(folder, OWN_IDS), load_file(str(folder / IMAGE_WEIGHTS))
