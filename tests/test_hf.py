"""Hugging Face causal LMs and LoRA, as people have them: tiny random-init models built from
configs (no hub is reachable), inside an ordinary LightningModule, with the built-in
``causal_lm`` task unchanged.

Checked: the three families run through the plain API and the callbacks; scores equal the
gradient dot products of per-example autograd (identity) on a padded batch; the attention mask
reaches the model; reloaded factors match the model they were fitted on; a peft LoRA model
tracks its adapters only; the training step's own forward is reused during training.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 23, 10


def make_model(family: str) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=48, max_position_embeddings=32)
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(**common, hidden_dropout=0.0, attention_dropout=0.0)
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                         n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    return model.double().eval()


def batches(n: int, seed: int, batch_size: int = 4) -> DataLoader:
    """Right-padded dict batches: input_ids, attention_mask, labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    rows = [{"input_ids": i, "attention_mask": m, "labels": lab}
            for i, m, lab in zip(ids, mask, labels, strict=True)]
    return DataLoader(rows, batch_size=batch_size)


class CausalLM(pl.LightningModule):
    """An ordinary LightningModule around a Hugging Face causal LM."""

    influence_task = "causal_lm"

    def __init__(self, family: str) -> None:
        super().__init__()
        self.model = make_model(family).float()

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch, batch_idx):
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 batch["labels"][:, 1:].reshape(-1))

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_identity_scores_equal_per_example_gradients(family):
    """``causal_lm`` on a padded batch: scores are the dot products of per-example gradients of
    the summed completion loss (HF's label convention: labels aligned with the inputs)."""
    model = make_model(family)
    train, queries = batches(6, 0), batches(2, 1)
    factors = li.fit_factors(model, train, "causal_lm", strategy="identity", progress=False)
    got = li.compute_pairwise_scores(model, factors, queries, train, "causal_lm",
                                     progress=False).scores
    # A tied lm_head (GPT-2) counts its use as the output projection only (the tracker notes
    # the tie): the reference takes that use's gradient from an untied copy.
    reference = copy.deepcopy(model)
    head = reference.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    params = [p for layer in factors.tracker(reference) for p in layer.parameters()]
    model = reference

    def grads(loader):
        out = []
        for batch in loader:
            for n in range(batch["input_ids"].shape[0]):
                one = {k: v[n:n + 1] for k, v in batch.items()}
                logits = model(input_ids=one["input_ids"],
                               attention_mask=one["attention_mask"]).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, VOCAB), one["labels"][:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum")
                out.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        return torch.stack(out)

    want = grads(queries) @ grads(train).T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8 * want.abs().max().item())


def test_the_attention_mask_reaches_the_model():
    """A BERT-shaped classifier attends both ways, so padding changes its outputs unless the
    mask is passed: with it, self-influence of padded examples equals that of the same examples
    unpadded (one per batch). Without passing the mask it does not."""
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, num_labels=3,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    padded = next(iter(batches(4, 2)))
    padded["labels"] = torch.tensor([0, 1, 2, 1])
    task = li.ClassificationTask()
    assert "attention_mask" in task.model_kwargs(model, padded)
    single = [{"input_ids": padded["input_ids"][n:n + 1, :int(padded["attention_mask"][n].sum())],
               "attention_mask": padded["attention_mask"][n:n + 1, :int(
                   padded["attention_mask"][n].sum())],
               "labels": padded["labels"][n:n + 1]} for n in range(4)]
    factors = li.fit_factors(model, [padded], task, strategy="identity", progress=False)
    a = li.compute_self_scores(model, factors, [padded], task, progress=False).scores
    b = li.compute_self_scores(model, factors, single, task, progress=False).scores
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

    class NoMask(li.ClassificationTask):
        def model_kwargs(self, model, batch):
            return {}

    c = li.compute_self_scores(model, factors, [padded], NoMask(), progress=False).scores
    assert not torch.allclose(a, c, rtol=1e-6)  # float64: any real difference shows


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reloaded_factors_match_the_model_they_were_fitted_on(family, tmp_path):
    model = make_model(family)
    train = batches(8, 3)
    li.fit_factors(model, train, "causal_lm", progress=False, output_dir=tmp_path)
    loaded = li.Factors.load(tmp_path)
    # the stored order (lm_head first, alphabetically) is not the model's: no false mismatch
    reordered = li.Factors(loaded.strategy, dict(reversed(list(loaded.layers.items()))),
                           dict(reversed(list(loaded.shapes.items()))), loaded.fingerprint,
                           loaded.num_examples, loaded.extra)
    for factors in (loaded, reordered):
        factors.check_fits(factors.tracker(model))
    result = li.compute_self_scores(model, loaded, train, "causal_lm", progress=False)
    assert torch.isfinite(result.scores).all()
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (family == "gpt2")


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
@pytest.mark.parametrize("mode", ["after_fit", "during_training"])
def test_hf_models_run_through_the_callbacks(family, mode, tmp_path):
    torch.manual_seed(0)
    module = CausalLM(family)
    callbacks = [InfluenceStatistics(mode=mode, every_n_steps=1, progress=False),
                 EigenCorrection(progress=False),
                 InfluenceScores(num_queries=2, top_k=2, progress=False)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, batches(8, 4), batches(4, 5))
    if mode == "during_training":  # the training step's forward was reused, no fallback
        assert callbacks[0].reuse_verified, callbacks[0].fallback_reason
    assert callbacks[2].self_result.scores.shape == (8,)
    assert (tmp_path / "influence" / "top_influential.csv").is_file()


def test_lora_tracks_the_adapters_only():
    peft = pytest.importorskip("peft")
    model = make_model("llama").float()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]))
    for name, param in lora.named_parameters():  # as after fine-tuning: B is no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    tracker = li.LayerTracker(lora)
    assert tracker.names() and all("lora_" in n for n in tracker.names()), tracker.names()
    assert len(tracker.names()) == 2 * 2 * 2  # layers x {q, v} x {A, B}
    train = batches(6, 6)
    factors = li.fit_factors(lora, train, "causal_lm", progress=False)
    scores = li.compute_self_scores(lora, factors, train, "causal_lm", progress=False).scores
    assert torch.isfinite(scores).all() and (scores > 0).all()
    fresh = peft.get_peft_model(make_model("llama").float(), peft.LoraConfig(
        r=4, target_modules=["q_proj"]))  # never trained: its A matrices have no gradient
    with pytest.raises(FloatingPointError, match="LoRA A matrix whose B is still zero"):
        li.fit_factors(fresh, train, "causal_lm", progress=False)


def test_document_influence_takes_a_hugging_face_tokenizer_and_rows():
    from pydoc_data.topics import topics

    from lightning_influence.language import Query, chunk_documents, document_influence

    rows = [{"text": text, "name": name} for name, text in list(topics.items())[:12]]
    from recipes.finetune_influence import train_tokenizer  # byte-level BPE, trained here

    hf_tok = train_tokenizer([r["text"] for r in rows], vocab_size=300)
    assert hf_tok.pad_token_id is None  # like most causal LMs: the EOS id pads
    corpus = chunk_documents(rows, hf_tok, 48)
    assert corpus.tokenizer.pad_id == hf_tok.eos_token_id and corpus.num_documents == 12
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=48,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    factors = li.fit_factors(model, DataLoader(corpus, batch_size=16), "causal_lm",
                             progress=False)
    queries = [Query("Q: What is a lambda?\nA:", " an anonymous function."),
               Query("Q: How do loops end?\nA:", " with break.")]
    result = document_influence(model, factors, corpus, queries, rank=4, top_k=2,
                                token_documents=1, batch_size=16, progress=False)
    assert result.document_scores.shape == (2, 12)
    assert torch.isfinite(result.document_scores).all()
    (q, d), scores = next(iter(result.token_scores.items()))
    ids = corpus.tokenizer.encode(corpus.documents[d].text)
    assert len(scores) == len(ids)  # one score per real token of the document
    assert "".join(corpus.tokenizer.token_strings(ids)) == corpus.documents[d].text
    with pytest.raises(KeyError, match="Row 0 has no field 'text'.*'name'"):
        chunk_documents([{"name": "x"}], hf_tok, 48)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_mixed_and_gradient_checkpointing_through_the_callbacks(checkpointing, tmp_path):
    """A Llama-shaped model trained under bf16-mixed (and with Hugging Face gradient
    checkpointing, active in training mode): the callbacks fit, reuse their factors from disk
    when reloaded (no false mismatch) and score under autocast."""
    torch.manual_seed(0)
    module = CausalLM("llama")
    if checkpointing:
        module.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    def run():  # noqa: D103
        callbacks = [InfluenceStatistics(mode="during_training", every_n_steps=1, progress=False),
                     EigenCorrection(progress=False),
                     InfluenceScores(num_queries=2, top_k=2, progress=False)]
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed",
                             logger=False, callbacks=callbacks, default_root_dir=str(tmp_path),
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, batches(8, 7), batches(4, 8))
        return callbacks

    first = run()
    assert torch.isfinite(first[2].self_result.scores).all()
    assert all(torch.isfinite(layer.eigenvalues).all() for layer in first[1].factors.layers.values())
    # the saved factors belong to the trained weights: reloaded, they match (no false mismatch)
    loaded = li.Factors.load(tmp_path / "influence")
    again = li.compute_self_scores(module, loaded, batches(8, 7), "causal_lm", progress=False,
                                   autocast=torch.bfloat16)
    assert torch.isfinite(again.scores).all()
