"""The models of ``scripts/bench_e2e.py``: randomly initialised diffusers models with the
geometry of Wan2.1-1.3B, FLUX.1-dev and SDXL's UNet (or tiny ones with ``--small``), each with a
function returning its forward's inputs."""

from __future__ import annotations

import math
import platform

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def factor2(n: int):
    """a, b with a * b == n, a <= b, a as close to sqrt(n) as divisors allow."""
    a = int(math.isqrt(n))
    while n % a:
        a -= 1
    return a, n // a


def build_wan(args, tokens, device, dtype, model=None):
    from diffusers import WanTransformer3DModel

    if args.small:
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
                   text_dim=64, freq_dim=32, ffn_dim=128, num_layers=args.blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 16
    else:  # Wan2.1 T2V 1.3B
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=args.blocks, cross_attn_norm=True, eps=1e-6)
        text_len = 512
    if tokens % 1560 == 0 and not args.small:
        frames, h, w = tokens // 1560, 60, 104  # 480x832 px, VAE /8 spatial, patch 2x2
    else:
        a, b = factor2(tokens)
        frames, h, w = 1, 2 * a, 2 * b
    if model is None:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg)
        model = model.to(dtype=dtype).eval()
    x = torch.randn(1, cfg["in_channels"], frames, h, w, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    text = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=dtype)

    def inputs():
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)

    desc = {"class": "WanTransformer3DModel", "config": cfg, "latent": [frames, h, w], "tokens": tokens, "text_tokens": text_len}
    return f"wan-{tokens}", model, inputs, desc


def build_flux(args, device, dtype):
    from diffusers import FluxTransformer2DModel

    double, single = args.flux_blocks
    if args.small:
        cfg = dict(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(8, 12, 12))
        text_len = 16
    else:  # FLUX.1-dev
        cfg = dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        text_len = 512
    n = args.flux_tokens
    gh, gw = factor2(n)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    model = model.to(dtype=dtype).eval()
    x = torch.randn(1, n, cfg["in_channels"], device=device, dtype=dtype)
    text = torch.randn(1, text_len, cfg["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype)
    img_ids = torch.zeros(gh, gw, 3, device=device)
    img_ids[..., 1] = torch.arange(gh, device=device)[:, None]
    img_ids[..., 2] = torch.arange(gw, device=device)[None, :]
    img_ids = img_ids.reshape(n, 3).to(dtype)
    txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    g = torch.tensor([3.5], device=device, dtype=dtype)

    def inputs():
        return dict(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, img_ids=img_ids,
                    txt_ids=txt_ids, guidance=g, return_dict=False)

    cfg_out = dict(cfg, axes_dims_rope=list(cfg["axes_dims_rope"]))
    desc = {"class": "FluxTransformer2DModel", "config": cfg_out, "image_tokens": n, "grid": [gh, gw], "text_tokens": text_len}
    return f"flux-{n}", model, inputs, desc


def build_unet(args, device, dtype):
    from diffusers import UNet2DConditionModel

    layers = args.unet_transformer_layers
    if args.small:  # as many levels as --unet-transformer-layers has entries (default 2: quicker to compile)
        levels = len(layers)
        cfg = dict(sample_size=args.unet_latent, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                   up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                   block_out_channels=(32,) + (64,) * (levels - 1), layers_per_block=args.unet_layers_per_block,
                   transformer_layers_per_block=layers, attention_head_dim=(1,) + (2,) * (levels - 1), cross_attention_dim=64,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8)
        pooled_dim = 32
    else:  # SDXL base 1.0 (only the transformer layers per block may be reduced)
        cfg = dict(sample_size=args.unet_latent, in_channels=4, out_channels=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   block_out_channels=(320, 640, 1280), layers_per_block=args.unet_layers_per_block,
                   transformer_layers_per_block=layers, attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=2816, norm_num_groups=32, upcast_attention=False)
        pooled_dim = 1280
    b, side = args.batch_unet, args.unet_latent
    with torch.device(device):
        model = UNet2DConditionModel(**cfg)
    model = model.to(dtype=dtype).eval()
    x = torch.randn(b, 4, side, side, device=device, dtype=dtype)
    t = torch.tensor([500] * b, device=device)
    text = torch.randn(b, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)
    added = {"text_embeds": torch.randn(b, pooled_dim, device=device, dtype=dtype),
             "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b, device=device, dtype=dtype)}

    def inputs():
        return dict(sample=x, timestep=t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)

    cfg_out = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    desc = {"class": "UNet2DConditionModel", "config": cfg_out, "latent": [b, 4, side, side], "text_tokens": 77}
    return f"unet-{side}", model, inputs, desc
