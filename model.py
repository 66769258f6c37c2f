"""The image-text model: a compact ViT, a BERT-style text encoder and a joint embedding space.

Both encoders are stacks of the same pre-norm transformer `Block`. Each encoder's pooled output
goes through a linear projection and is L2-normalised, so image-text similarity is a dot product.
The temperature of the contrastive softmax is learned and stored as a logit scale,
`logit_scale = log(1 / temperature)`, as in CLIP.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    image_size: int = 64        # input images are (channels, image_size, image_size)
    patch_size: int = 8
    channels: int = 1           # 1 for grey radiographs, 3 for RGB
    vision_width: int = 128
    vision_depth: int = 2
    vision_heads: int = 4
    vocab_size: int = 4000
    max_len: int = 64           # text length in tokens, [CLS] and [SEP] included
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 128        # size of the joint image-text space
    dropout: float = 0.0
    temperature: float = 0.07   # initial value of the learned temperature


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.resid_dropout = nn.Dropout(dropout)

    def attention(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, C/H)
        # key_mask (B, T) is True for real tokens; padded keys get no attention weight
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        p = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # Speed only. torch 2.13's CPU attention kernel took 3x longer in bf16 than in fp32 (forward
            # and backward at B=32, T=65, 4 heads, 2-core AMD EPYC), so under bf16 autocast it runs in fp32
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), key_mask)
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    """ViT: patch embedding, a class token, learned position embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, (
            f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}"
        )
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        width = cfg.vision_width
        # A strided convolution is the patch embedding: one linear map per non-overlapping patch.
        self.patch_embed = nn.Conv2d(cfg.channels, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n_patches, width))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(width, cfg.vision_heads, cfg.dropout) for _ in range(cfg.vision_depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)                # (B, C, H/P, W/P)
        x = x.flatten(2).transpose(1, 2)            # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, C)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])                   # (B, C): the class token


class TextTransformer(nn.Module):
    """BERT-style encoder: token and position embeddings, blocks with a padding mask, [CLS] pooling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.text_width
        self.token_embed = nn.Embedding(cfg.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.max_len, width))
        self.embed_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(width, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_depth))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        assert T <= self.pos_embed.shape[1], f"text of {T} tokens is longer than max_len {self.pos_embed.shape[1]}"
        x = self.token_embed(input_ids) + self.pos_embed[:, :T]  # (B, T, C)
        x = self.dropout(self.embed_norm(x))
        for block in self.blocks:
            x = block(x, key_mask=attention_mask)
        return self.norm(x[:, 0])                   # (B, C): the [CLS] token, always first


class ImageTextModel(nn.Module):
    """Two encoders with linear projections into one L2-normalised space, and a learned temperature."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))
        # NOTE: linear layers keep PyTorch's default initialisation (scaled by 1/sqrt(fan_in)). The
        # GPT-style N(0, 0.02) is too small at these widths: every [CLS] output then starts almost
        # identical, and contrastive training from scratch sat at loss log(B) far longer.

    @property
    def temperature(self) -> torch.Tensor:
        return self.logit_scale.exp().reciprocal()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.visual(images)), dim=-1)  # (B, D)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids, attention_mask)), dim=-1)  # (B, D)

    def forward(self, images, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def clamp_temperature(self, min_temperature: float, max_temperature: float) -> None:
        """Keep the temperature in [min, max] (call after each optimizer step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(math.log(1.0 / max_temperature), math.log(1.0 / min_temperature))

    def param_counts(self) -> dict[str, int]:
        count = lambda module: sum(p.numel() for p in module.parameters())
        return {"image": count(self.visual) + count(self.image_proj),
                "text": count(self.text) + count(self.text_proj),
                "total": count(self)}

