"""Tiny diffusers models with random weights, and their inputs (tests and scripts/bench_cp.py)."""
import torch


def tiny_wan(layers=2, heads=2, head_dim=12):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                  num_layers=layers, rope_max_seq_len=32).eval()
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 6, 16), "return_dict": False}
    return model, inputs


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=(4, 4, 8)).eval()
    seq, txt = 16, 5
    inputs = {"hidden_states": torch.randn(1, seq, 8), "encoder_hidden_states": torch.randn(1, txt, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "img_ids": torch.randn(seq, 3), "txt_ids": torch.zeros(txt, 3), "return_dict": False}
    return model, inputs


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                 cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).eval()
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
              "encoder_hidden_states": torch.randn(1, 5, 16), "return_dict": False}
    return model, inputs
