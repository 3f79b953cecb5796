"""moefy across transformers architectures (tiny random configs): every FFN found, upcycle == dense.

A wider net than ``models.CASES`` (which also trains and re-converts): each family here writes its
FFN, norms and residuals a little differently. The last few are refused on purpose, for the reason given.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf

import moefx

V = 97
DECODER = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
SEQ2SEQ = dict(
    vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False, pad_token_id=1,
    bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
GPT = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, use_cache=False)


def _ids(s: int = 7):
    return torch.randint(3, V, (2, s))


def _text(model: str, config: str, **kw):
    return lambda: (getattr(tf, model)(getattr(tf, config)(**kw)), (_ids(),), {})


def _seq2seq(model: str, config: str, **kw):
    return lambda: (getattr(tf, model)(getattr(tf, config)(**kw)), (), {"input_ids": _ids(), "decoder_input_ids": _ids(5)})


def _image(model: str, config: str, **kw):
    return lambda: (getattr(tf, model)(getattr(tf, config)(**kw)), (torch.randn(2, 3, 32, 32),), {})


# name → (build, FFNs it has). Decoders differ in norms (Gemma's type_as of the residual, Olmo's
# parameter-free fp32 LayerNorm), in parallel attention + MLP (Cohere, Falcon, GPT-J, Phi), fused or
# separate projections, Conv1D weights (GPT-2 style) and gated or plain MLPs; vision models in
# channels-last linears or channels-first 1x1 convolutions (PoolFormer).
FAMILIES = {
    "mistral": (_text("MistralModel", "MistralConfig", **DECODER), 2),
    "qwen3": (_text("Qwen3Model", "Qwen3Config", **DECODER, head_dim=8), 2),
    "gemma": (_text("GemmaModel", "GemmaConfig", **DECODER, head_dim=8), 2),
    "gemma2": (_text("Gemma2Model", "Gemma2Config", **DECODER, head_dim=8), 2),
    "gemma3_text": (_text("Gemma3TextModel", "Gemma3TextConfig", **DECODER, head_dim=8), 2),
    "phi": (_text("PhiModel", "PhiConfig", **DECODER), 2),
    "phi3": (_text("Phi3Model", "Phi3Config", **DECODER), 2),
    "olmo": (_text("OlmoModel", "OlmoConfig", **DECODER), 2),
    "olmo2": (_text("Olmo2Model", "Olmo2Config", **DECODER), 2),
    "cohere": (_text("CohereModel", "CohereConfig", **DECODER), 2),
    "starcoder2": (_text("Starcoder2Model", "Starcoder2Config", **DECODER), 2),
    "granite": (_text("GraniteModel", "GraniteConfig", **DECODER), 2),
    "persimmon": (_text("PersimmonModel", "PersimmonConfig", **DECODER), 2),
    "stablelm": (_text("StableLmModel", "StableLmConfig", **DECODER), 2),
    "falcon": (_text("FalconModel", "FalconConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, use_cache=False), 2),
    "gpt_neox": (_text("GPTNeoXModel", "GPTNeoXConfig", vocab_size=V, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, use_cache=False), 2),
    "gptj": (_text("GPTJModel", "GPTJConfig", **GPT, rotary_dim=4), 2),
    "codegen": (_text("CodeGenModel", "CodeGenConfig", **GPT, rotary_dim=4), 2),
    "gpt_bigcode": (_text("GPTBigCodeModel", "GPTBigCodeConfig", **GPT), 2),
    "opt": (_text("OPTModel", "OPTConfig", vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                  num_attention_heads=2, word_embed_proj_dim=32, use_cache=False), 2),
    "bloom": (_text("BloomModel", "BloomConfig", vocab_size=V, hidden_size=32, n_layer=2, n_head=4, use_cache=False), 2),
    "mpt": (_text("MptModel", "MptConfig", vocab_size=V, d_model=32, n_layers=2, n_heads=4, use_cache=False), 2),
    "distilbert": (_text("DistilBertModel", "DistilBertConfig", vocab_size=V, dim=32, hidden_dim=64, n_layers=2,
                         n_heads=2), 2),
    "roberta": (_text("RobertaModel", "RobertaConfig", **BERT), 2),
    "albert": (_text("AlbertModel", "AlbertConfig", **BERT, embedding_size=16), 1),  # one layer, shared
    "electra": (_text("ElectraModel", "ElectraConfig", **BERT, embedding_size=16), 2),
    "deberta_v2": (_text("DebertaV2Model", "DebertaV2Config", **BERT), 2),
    "mpnet": (_text("MPNetModel", "MPNetConfig", **BERT), 2),
    "modernbert": (_text("ModernBertModel", "ModernBertConfig", **BERT, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         cls_token_id=1, sep_token_id=2), 2),
    "bart": (_seq2seq("BartModel", "BartConfig", **SEQ2SEQ), 4),
    "pegasus": (_seq2seq("PegasusModel", "PegasusConfig", **SEQ2SEQ), 4),
    "marian": (_seq2seq("MarianModel", "MarianConfig", **SEQ2SEQ), 4),
    "mt5": (_seq2seq("MT5Model", "MT5Config", vocab_size=V, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                     use_cache=False), 4),
    "whisper": (lambda: (
        tf.WhisperModel(tf.WhisperConfig(**{**SEQ2SEQ, "max_position_embeddings": None}, num_mel_bins=8,
                                         max_source_positions=16, max_target_positions=32)),
        (), {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": _ids(5)},
    ), 4),
    "wav2vec2": (lambda: (
        tf.Wav2Vec2Model(tf.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        )),
        (torch.randn(2, 400),), {},
    ), 2),
    "deit": (_image("DeiTModel", "DeiTConfig", **VIT), 2),
    "beit": (_image("BeitModel", "BeitConfig", **VIT), 2),
    "dinov2": (_image("Dinov2Model", "Dinov2Config", **{**VIT, "mlp_ratio": 2}), 2),
    "clip_vision": (_image("CLIPVisionModel", "CLIPVisionConfig", **VIT), 2),
    "swin": (_image("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                    num_heads=[2, 2], window_size=4), 2),
    "convnext": (_image("ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                        layer_scale_init_value=1.0), 2),  # 1.0: the default 1e-6 would hide a wrong FFN
    "poolformer": (_image("PoolFormerModel", "PoolFormerConfig", num_encoder_blocks=2, depths=[1, 1],
                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], mlp_ratio=2.0,
                          layer_scale_init_value=1.0), 2),  # 1x1 convolutions over NCHW
}

# Refused, and why: the reason's words.
REFUSED = {
    # Global response norm between the projections sums over the image's positions: token mixing.
    "convnextv2": (_image("ConvNextV2Model", "ConvNextV2Config", hidden_sizes=[16, 32], depths=[1, 1], num_stages=2),
                   "no linear → activation → linear pattern"),
    # Mix-FFN: a depthwise convolution between the projections mixes neighbouring positions.
    "segformer": (_image("SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                         hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                         mlp_ratios=[2, 2]), "no feed-forward block found"),
    # (Qwen2-MoE was refused here as "already routes tokens"; its blocks are adopted now: tests/passes/test_adopt.py.)
}


def _hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _build(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny vocabularies: the configs warn about their default token ids
        model, args, kwargs = build()
    return model.eval(), args, kwargs


@pytest.mark.parametrize("name", FAMILIES)
def test_every_ffn_upcycles_to_the_dense_output(name):
    build, ffns = FAMILIES[name]
    model, args, kwargs = _build(build)
    with torch.no_grad():
        dense = _hidden(model(*args, **kwargs))
    moefx.moefy(model, num_experts=4, top_k=2, example_inputs=args, example_kwargs=kwargs)
    layers = list(moefx.moe_layers(model))
    assert len(layers) == ffns, [path for path, _ in layers]
    with torch.no_grad():
        got = _hidden(model(*args, **kwargs))
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5 * dense.abs().max().item())


@pytest.mark.parametrize("name", REFUSED)
def test_refused_for_the_reason_given(name):
    build, words = REFUSED[name]
    model, args, kwargs = _build(build)
    with pytest.raises(moefx.NoFFNFound, match=words):
        moefx.moefy(model, example_inputs=args, example_kwargs=kwargs)
