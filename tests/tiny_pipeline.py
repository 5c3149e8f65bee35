"""Tiny random FLUX and Qwen-Image pipeline folders built offline: transformer, VAE, text
encoders (CLIP and T5; Qwen2.5-VL) with tokenizers made here from a small vocabulary, and the
scheduler, saved by diffusers itself."""

import dataclasses
import json
import string
from pathlib import Path

import torch

from edit_jax.sampling.schedules import SCHEDULERS
from reference import make_diffusers_flux, make_diffusers_qwen, randomize_

CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
QWEN_VAE_TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(CHARS)}
    vocab.update({c + "</w>": len(CHARS) + i for i, c in enumerate(CHARS)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = ["<pad>", "</s>", "<unk>", "\u2581"] + CHARS
    tokenizer = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", extra_ids=0)


def make_tiny_flux_pipeline(folder: Path, guidance_embeds: bool = True):
    """Saves the pipeline to `folder`; returns the diffusers FluxPipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    scratch = folder.parent / (folder.name + "-tokenizer-sources")
    tokenizer, tokenizer_2 = clip_tokenizer(scratch / "clip"), t5_tokenizer(scratch / "t5")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAE_TINY).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    transformer = make_diffusers_flux(guidance_embeds=guidance_embeds, in_channels=16)
    scheduler = FlowMatchEulerDiscreteScheduler(
        **dataclasses.asdict(SCHEDULERS["flux-dev" if guidance_embeds else "flux-schnell"]))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    return pipe


def qwen_tokenizer(folder: Path):
    """A byte-level BPE without merges (one token per byte) and Qwen's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    fast = Qwen2TokenizerFast(tokenizer_object=tokenizer, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return Qwen2TokenizerFast.from_pretrained(folder)


def make_tiny_qwen_pipeline(folder: Path):
    """Saves the pipeline to `folder`; returns the diffusers QwenImagePipeline."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(folder.parent / (folder.name + "-tokenizer-source"))
    pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=pad, eos_token_id=end,
                         pad_token_id=pad, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                            "rope_theta": 10000.0}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                           patch_size=2, spatial_merge_size=1, temporal_patch_size=1, window_size=4,
                           fullatt_block_indexes=[0]))).eval()
    torch.manual_seed(1)
    vae = randomize_(AutoencoderKLQwenImage(**QWEN_VAE_TINY).eval(), scale=0.05)
    scheduler = FlowMatchEulerDiscreteScheduler(**dataclasses.asdict(SCHEDULERS["qwen-image"]))
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=make_diffusers_qwen())
    pipe.save_pretrained(folder)
    # as Qwen/Qwen-Image's own transformer/config.json: a key today's diffusers writes no more and drops
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pooled_projection_dim": 768}, indent=2))
    return pipe
