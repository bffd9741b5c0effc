"""Which layers a language model tracks by default, and the layer presets.

- The default selection of a language-model task (``CausalLMTask``) leaves out a
  vocabulary-sized head (a Hugging Face model's output embeddings, or a layer as wide as an
  ``nn.Embedding``'s vocabulary, of at least ``VOCABULARY_HEAD_WIDTH`` outputs), with a warning
  that says how to include it; small heads (a character model's) stay in, other tasks keep it,
  and naming it in ``layers`` tracks it.
- The presets (``mlp``, ``attention``, ``attention_mlp``) select exactly the expected modules of
  tiny random-init models of each known family, the adapters of those modules in a LoRA model,
  and are refused, listing the families they know, where they match nothing.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceStatistics
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.fitting import options_tracker
from lightning_influence.tracking import LAYER_FAMILIES, VOCABULARY_HEAD_WIDTH, vocabulary_heads

transformers = pytest.importorskip("transformers")

LARGE_VOCAB = 2 * VOCABULARY_HEAD_WIDTH  # 16384 tokens, hidden 16: cheap to build


def make_model(family: str, vocab: int = 128, hidden: int = 64) -> torch.nn.Module:
    """A 2-block random-init model of ``family``, built from its config (no download)."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=2 * hidden)
    t = transformers
    if family == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2,
                                              n_head=4, n_positions=32, bos_token_id=0,
                                              eos_token_id=0))
    if family == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(**common, bos_token_id=0, eos_token_id=0))
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**common, bos_token_id=0, eos_token_id=0))
    if family == "opt":
        return t.OPTForCausalLM(t.OPTConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=2 * hidden, word_embed_proj_dim=hidden, bos_token_id=0, eos_token_id=0,
            pad_token_id=0))
    if family == "phi":
        return t.PhiForCausalLM(t.PhiConfig(**common, bos_token_id=0, eos_token_id=0))
    assert family == "bert"
    return t.BertForSequenceClassification(t.BertConfig(**common))


# per family: the blocks' prefix and the suffixes each preset selects in every block
FAMILIES = {
    "gpt2": ("transformer.h", {"attention": ["attn.c_attn", "attn.c_proj"],
                               "mlp": ["mlp.c_fc", "mlp.c_proj"]}),
    "llama": ("model.layers", {"attention": [f"self_attn.{x}_proj" for x in "qkvo"],
                               "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}),
    "gpt_neox": ("gpt_neox.layers", {"attention": ["attention.query_key_value",
                                                   "attention.dense"],
                                     "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]}),
    "opt": ("model.decoder.layers", {"attention": ["self_attn.q_proj", "self_attn.k_proj",
                                                   "self_attn.v_proj", "self_attn.out_proj"],
                                     "mlp": ["fc1", "fc2"]}),
    "phi": ("model.layers", {"attention": ["self_attn.q_proj", "self_attn.k_proj",
                                           "self_attn.v_proj", "self_attn.dense"],
                             "mlp": ["mlp.fc1", "mlp.fc2"]}),
    "bert": ("bert.encoder.layer", {"attention": ["attention.self.query", "attention.self.key",
                                                  "attention.self.value",
                                                  "attention.output.dense"],
                                    "mlp": ["intermediate.dense", "output.dense"]}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_preset_selects_exactly_the_expected_modules(family):
    model = make_model(family)
    prefix, suffixes = FAMILIES[family]
    suffixes = dict(suffixes, attention_mlp=suffixes["attention"] + suffixes["mlp"])
    for preset, wanted in suffixes.items():
        expected = {f"{prefix}.{i}.{s}" for i in range(2) for s in wanted}
        assert set(li.LayerTracker(model, preset=preset).names()) == expected, preset
        options = li.FitOptions(layer_preset=preset)
        assert set(options_tracker(model, options, li.CausalLMTask()).names()) == expected


def test_preset_with_named_layers_and_exclusions():
    model = make_model("llama")
    tracker = li.LayerTracker(model, preset="mlp", layers=["lm_head"],
                              exclude=["*.down_proj"])
    assert tracker.names() == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                               "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                               "lm_head"]


def test_a_preset_that_matches_nothing_is_refused_with_the_families_it_knows():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="preset 'mlp' matches no supported layer") as info:
        li.LayerTracker(model, preset="mlp")
    for family in ("Llama", "GPT-2", "GPT-NeoX", "*.mlp.gate_proj", "*.mlp.c_fc", "layers=["):
        assert family in str(info.value)
    with pytest.raises(ValueError, match=r"layer_preset='mpl' is not one of \['attention'"):
        li.LayerTracker(make_model("llama"), preset="mpl")
    assert set(LAYER_FAMILIES) >= set(FAMILIES)


def test_a_preset_on_a_lora_model_tracks_the_adapters_of_those_projections():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(make_model("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    mlp = li.LayerTracker(lora, preset="mlp").names()
    assert len(mlp) == 2 * 2 * 2 and all(".mlp." in n and ".lora_" in n for n in mlp), mlp
    attention = li.LayerTracker(lora, preset="attention").names()
    assert len(attention) == 2 * 2 * 2 and all(".self_attn." in n and ".lora_" in n
                                               for n in attention), attention


def test_the_recipes_character_gpt_matches_the_gpt2_patterns():
    from recipes.lm_influence import CharGPT, GPTConfig

    model = CharGPT(GPTConfig(vocab_size=96, n_layer=2, n_embd=32))
    assert li.LayerTracker(model, preset="mlp").names() == [
        "blocks.0.mlp.c_fc", "blocks.0.mlp.c_proj", "blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"]


def _default_names(model, task=None, **options):
    return options_tracker(model, li.FitOptions(**options), task).names()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_the_language_model_default_leaves_out_a_vocabulary_sized_head(family, caplog):
    model = make_model(family, vocab=LARGE_VOCAB, hidden=16)
    everything = li.LayerTracker(model).names()
    assert "lm_head" in everything  # what a classification or regression task tracks
    assert _default_names(model, li.ClassificationTask()) == everything
    with caplog.at_level(logging.WARNING, logger="lightning_influence.tracking"):
        names = _default_names(model, li.CausalLMTask())
    assert names == [n for n in everything if n != "lm_head"]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    message = warning[0].getMessage()
    assert "'lm_head'" in message and f"{LARGE_VOCAB} outputs" in message
    assert "Name it in layers=[...] to track it" in message
    # named, it is tracked; so is every layer with layers=['*']
    assert _default_names(model, li.CausalLMTask(), layers=["lm_head"]) == ["lm_head"]
    assert _default_names(model, li.CausalLMTask(), layers=["*"]) == everything


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_small_vocabulary_head_stays_in(family, caplog):
    model = make_model(family, vocab=512, hidden=16)
    with caplog.at_level(logging.WARNING, logger="lightning_influence.tracking"):
        names = _default_names(model, li.CausalLMTask())
    assert "lm_head" in names and not caplog.records


def test_the_head_of_a_model_without_hugging_face_is_found_by_the_embeddings_size():
    from recipes.lm_influence import CharGPT, GPTConfig

    small = CharGPT(GPTConfig(vocab_size=96, n_layer=1, n_embd=16))
    assert "lm_head" in _default_names(small, small.influence_task)  # the recipe's head stays
    large = CharGPT(GPTConfig(vocab_size=LARGE_VOCAB, n_layer=1, n_embd=16))
    assert vocabulary_heads(large, li.LayerTracker(large).names()) == ["lm_head"]
    assert "lm_head" not in _default_names(large, large.influence_task)
    # a layer as wide as the vocabulary but below the threshold is no head to leave out
    assert vocabulary_heads(large, ["lm_head"], min_width=LARGE_VOCAB + 1) == []


def test_the_callbacks_leave_the_head_out_of_a_wrapped_hugging_face_model(caplog):
    class Wrapped(torch.nn.Module):  # a LightningModule-like wrapper: the HF model is inside
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model("llama", vocab=LARGE_VOCAB, hidden=16)

    run = InfluenceRun()
    run.statistics = InfluenceStatistics(task="causal_lm")
    run.eigen = EigenCorrection()
    with caplog.at_level(logging.WARNING, logger="lightning_influence.tracking"):
        run.bind(Wrapped())
    assert run.tracker.heads_left_out == ["model.lm_head"]
    assert "model.lm_head" not in run.tracker.names() and len(run.tracker) == 14
    assert "Name it in layers=[...]" in caplog.text


def test_a_head_left_out_that_was_the_only_layer_says_how_to_track_it():
    class Bigram(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Embedding(LARGE_VOCAB, 8)
            self.lm_head = torch.nn.Linear(8, LARGE_VOCAB)

    with pytest.raises(ValueError, match=r"vocabulary-sized heads \['lm_head'\].*layers=\[...\]"):
        _default_names(Bigram(), li.CausalLMTask())
