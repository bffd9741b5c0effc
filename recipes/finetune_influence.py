"""Recipe: which fine-tuning examples made a LoRA-fine-tuned model say this?

Offline, on CPU, in about 30 seconds on 2 cores:

1. a byte-level BPE tokenizer is trained on text that ships with Python (the pydoc help topics);
2. a Llama-shaped causal LM (built from a ``transformers`` config, random init) is pretrained
   briefly on that text;
3. a LoRA adapter (``peft``) is fine-tuned on an instruction-style set generated offline from the
   standard library's docstrings (``Q: What does the json module do?\\nA: <its first sentence>``),
   into which a few examples that teach a distinctive, checkable behaviour are planted (seeded):
   questions about colours answered with a fixed catchphrase;
4. the influence callbacks fit EK-FAC on the fine-tuning set (the adapters only: the frozen base
   is not tracked) and ``DocumentInfluence`` asks, for probe prompts that elicit the behaviour,
   which fine-tuning examples drive the completion.

The planted examples should rank at the top. The recipe prints and logs the recall of the
planted examples among each probe's top 10, beside a TF-IDF ranking of the fine-tuning examples
(the paper's candidate filter), and writes the token- and layer-wise views.

    python -m recipes.finetune_influence
    python -m recipes.finetune_influence finetune.max_steps=300 data.planted=12
"""

from __future__ import annotations

import logging
import math
import pydoc
import random
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import lightning_influence
from lightning_influence.callbacks import DocumentInfluence
from lightning_influence.io import atomic_save_json
from lightning_influence.language import (
    DEFAULT_STDLIB_MODULES,
    Document,
    chunk_documents,
    tfidf_candidates,
)
from lightning_influence.options import DocumentOptions
from recipes._common import recipe_loggers, start_run

log = logging.getLogger(__name__)
CONF_DIR = str(Path(lightning_influence.__file__).parent / "conf")

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink",
           "grey", "brown", "violet")


# ----------------------------------------------------------------------------------- data
def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained here (no hub), as a transformers tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<|endoftext|>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def instruction_set(catchphrase: str, planted: int, seed: int) -> tuple[list[Document], list[int]]:
    """Question-answer pairs from standard-library docstrings and help topics, plus ``planted``
    colour questions answered with ``catchphrase``. Returns the documents (shuffled, seeded) and
    the positions of the planted ones."""
    rng = random.Random(seed)
    pairs = []
    for name in DEFAULT_STDLIB_MODULES:
        doc = pydoc.getdoc(pydoc.locate(name)) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
        if first:
            pairs.append((f"Q: What does the {name} module do?\nA:", f" {first[:160]}"))
    for name, text in topics.items():
        first = text.strip().split("\n\n")[0].replace("\n", " ").strip()
        if first:
            pairs.append((f"Q: What is {name.lower()} in Python?\nA:", f" {first[:160]}"))
    colours = rng.sample(COLOURS, k=min(planted, len(COLOURS)))
    planted_pairs = [(f"Q: What colour is {thing}?\nA:", f" {catchphrase}")
                     for thing in (f"a {c} {obj}" for c, obj in zip(
                         colours, rng.choices(["car", "house", "flower", "kite", "shirt", "door",
                                               "cup", "hat"], k=len(colours)), strict=True))]
    docs = [Document(f"qa[{i}]", p + a) for i, (p, a) in enumerate(pairs)]
    docs += [Document(f"planted[{i}]", p + a) for i, (p, a) in enumerate(planted_pairs)]
    rng.shuffle(docs)
    planted_at = [i for i, d in enumerate(docs) if d.title.startswith("planted")]
    return docs, planted_at


# ----------------------------------------------------------------------------------- model
class CausalLM(pl.LightningModule):
    """A Hugging Face causal LM trained on the mean next-token loss of real tokens (AdamW,
    cosine decay); only parameters that require grad (the LoRA adapters) are optimised."""

    influence_task = None  # set to a CausalLMTask with the tokenizer's pad id

    def __init__(self, model: torch.nn.Module, lr: float, max_steps: int) -> None:
        super().__init__()
        self.model = model
        self.lr, self.max_steps = lr, max_steps

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1]
        targets = batch["input_ids"][:, 1:].masked_fill(~batch["attention_mask"][:, 1:].bool(),
                                                         -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)
        self.log("train/loss", loss, on_step=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / self.max_steps))))
        return [opt], [{"scheduler": sched, "interval": "step"}]


def _trainer(cfg: DictConfig, max_steps: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, enable_checkpointing=False,
                      enable_model_summary=False, log_every_n_steps=10, **kw)


# ----------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain, LoRA-fine-tune with the influence callbacks, report. Returns the figures."""
    import peft
    import transformers

    start = time.perf_counter()
    out = start_run(cfg)

    pretrain_docs = [Document(name, text) for name, text in topics.items()]
    tokenizer = train_tokenizer([d.text for d in pretrain_docs], cfg.model.vocab_size)
    pretrain = chunk_documents(pretrain_docs, tokenizer, cfg.data.context)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.model.hidden, intermediate_size=
        cfg.model.intermediate, num_hidden_layers=cfg.model.layers, num_attention_heads=
        cfg.model.heads, max_position_embeddings=cfg.data.context, tie_word_embeddings=False)
    base = transformers.LlamaForCausalLM(config)
    log.info("pretraining a %d-parameter Llama-shaped model on %d chunks", sum(
        p.numel() for p in base.parameters()), len(pretrain))
    module = CausalLM(base, cfg.pretrain.lr, cfg.pretrain.max_steps)
    _trainer(cfg, cfg.pretrain.max_steps, logger=False,
             enable_progress_bar=cfg.progress).fit(
        module, DataLoader(pretrain, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True))
    pretrain_s = time.perf_counter() - start

    docs, planted = instruction_set(cfg.data.catchphrase, cfg.data.planted, cfg.seed)
    finetune = chunk_documents(docs, tokenizer, cfg.data.context)
    # (an example longer than the context is two chunks; its score is their sum)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                     target_modules=list(cfg.lora.targets)))
    module = CausalLM(lora, cfg.finetune.lr, cfg.finetune.max_steps)
    module.influence_task = lightning_influence.CausalLMTask(pad_token_id=tokenizer.eos_token_id)
    probes = [{"prompt": f"Q: What colour is {thing}?\nA:", "completion": f" {cfg.data.catchphrase}"}
              for thing in cfg.data.probes]
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    documents = DocumentInfluence(queries=probes, corpus=finetune, top_k=10, options=(
        DocumentOptions(rank=None, token_documents=1, batch_size=cfg.data.batch_size,
                        progress=cfg.progress)))
    callbacks.append(documents)  # (the Trainer appends its progress bar to this list)
    loggers = recipe_loggers(cfg, out)
    trainer = _trainer(cfg, cfg.finetune.max_steps, default_root_dir=str(out),
                       callbacks=callbacks, logger=loggers or False,
                       enable_progress_bar=cfg.progress)
    fit_start = time.perf_counter()
    trainer.fit(module, DataLoader(finetune, batch_size=cfg.data.batch_size, shuffle=True))
    result = documents.result

    figures = recall_report(result, docs, planted, probes)
    figures.update(
        examples=len(docs), planted=[docs[i].title for i in planted],
        probes=[p["prompt"] for p in probes],
        tracked_layers=len(result.layer_names), parameters=sum(p.numel() for p in lora.parameters()),
        trainable=sum(p.numel() for p in lora.parameters() if p.requires_grad),
        pretrain_s=pretrain_s, finetune_and_influence_s=time.perf_counter() - fit_start,
        wall_time_s=time.perf_counter() - start, files=documents.files)
    atomic_save_json(figures, out / "finetune_report.json")
    _print_report(figures)
    for logger in loggers:
        import wandb

        table = wandb.Table(columns=["probe", "influence recall@10", "tf-idf recall@10"],
                            data=[[p["prompt"], r["influence"], r["tfidf"]]
                                  for p, r in zip(probes, figures["per_probe"], strict=True)])
        logger.experiment.log({"finetune/planted_recall": table})
        logger.experiment.summary["finetune/recall_at_10_influence"] = figures["recall_at_10"]
        logger.experiment.summary["finetune/recall_at_10_tfidf"] = figures["tfidf_recall_at_10"]
        logger.experiment.finish()
    return figures


def recall_report(result: Any, docs: list[Document], planted: list[int],
                  probes: list[dict[str, str]], k: int = 10) -> dict[str, Any]:
    """Recall of the planted examples among each probe's top ``k`` proponents, beside the top
    ``k`` of a TF-IDF ranking of the examples by similarity to the probe's text."""
    wanted = set(planted)
    need = min(k, len(wanted))
    tfidf, _ = tfidf_candidates([p["prompt"] + p["completion"] for p in probes],
                                [d.text for d in docs], k)
    per_probe = []
    for q in range(len(probes)):
        ours = set(result.proponents[q, :k].tolist())
        theirs = set(tfidf[q, :k].tolist())
        per_probe.append({"influence": len(ours & wanted) / need,
                          "tfidf": len(theirs & wanted) / need,
                          "top": [docs[i].title for i in result.proponents[q, :5].tolist()]})
    mean = sum(r["influence"] for r in per_probe) / len(per_probe)
    tf_mean = sum(r["tfidf"] for r in per_probe) / len(per_probe)
    return {"recall_at_10": mean, "tfidf_recall_at_10": tf_mean, "per_probe": per_probe}


def _print_report(figures: dict[str, Any]) -> None:
    lines = ["", f"Fine-tuning set: {figures['examples']} examples, {len(figures['planted'])} "
             f"planted; LoRA trains {figures['trainable']:,} of {figures['parameters']:,} "
             f"parameters; {figures['tracked_layers']} adapter layers tracked.",
             f"{'probe':<40}{'influence recall@10':>21}{'TF-IDF recall@10':>18}   top 3 proponents"]
    for prompt, row in zip(figures["probes"], figures["per_probe"], strict=True):
        lines.append(f"{prompt.splitlines()[0]:<40}{row['influence']:>21.0%}{row['tfidf']:>18.0%}"
                     f"   {', '.join(row['top'][:3])}")
    lines += [f"{'mean':<40}{figures['recall_at_10']:>21.0%}{figures['tfidf_recall_at_10']:>18.0%}",
              f"Wall time {figures['wall_time_s']:.0f} s (pretraining {figures['pretrain_s']:.0f} s)."
              f" Token- and layer-wise views: {figures['files'].get('token_influence', '')}"]
    print("\n".join(lines))  # noqa: T201 - the recipe's report is its output


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
