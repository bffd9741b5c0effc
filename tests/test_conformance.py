"""Invariances a user can rely on, on the shapes users bring, every strategy, float64.

Two kinds of check, both deterministic (``fisher="empirical"``: no label sampling), so the
tolerance is float64 round-off (``REL``), not a measured spread:

- against brute force (tests/reference.py): per-example gradients from ``torch.func``, covariances
  from hooked rows, dense Kronecker curvature solved densely;
- twins: the same function written another way (in-place ReLU vs ReLU, checkpointed vs plain,
  ``nn.Conv1d`` vs an equivalent ``nn.Conv2d``, transformers' ``Conv1D`` vs ``nn.Linear``, a dict
  output vs a tensor, batch size 1 vs 7) must give the same factors and scores.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    ClassificationTask,
    LayerTracker,
    RegressionTask,
    compute_pairwise_scores,
    compute_self_scores,
    fit_factors,
)

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]
DAMPING = 1e-2
REL = 1e-9  # float64 round-off over a few hundred operations


def loader(*tensors: Tensor, batch_size: int = 7) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def run(model: nn.Module, train: DataLoader, queries: DataLoader, task, strategy: str,
        tracker: LayerTracker | None = None) -> dict[str, Tensor]:
    """Factors, pairwise, per-layer and self scores with a fixed damping."""
    factors = fit_factors(model, train, task, strategy=strategy, damping=DAMPING, progress=False,
                          fisher="empirical", tracker=tracker)
    pair = compute_pairwise_scores(model, factors, queries, train, task, per_layer=True,
                                   progress=False, tracker=tracker)
    self_scores = compute_self_scores(model, factors, train, task, progress=False,
                                      tracker=tracker).scores
    out = {"pairwise": pair.scores, "self": self_scores}
    assert_close(pair.layer_scores.sum(0), pair.scores, rtol=REL,
                 atol=REL * pair.scores.abs().max().item())  # per-layer scores sum to the total
    for name, layer in factors.layers.items():
        if layer.eigenvalues is not None:
            out[f"{name}.eigenvalues"] = layer.eigenvalues
    return out


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """Equal to REL relative to the largest magnitude; returns the max relative difference."""
    assert got.keys() == want.keys()
    worst = 0.0
    for key in want:
        g, w = got[key].double(), want[key].double()
        scale = w.abs().max().item() or 1.0
        worst = max(worst, (g - w).abs().max().item() / scale)
        assert_close(g, w, rtol=REL, atol=REL * scale, msg=key)
    return worst


def explicit(model: nn.Module, names: list[str], loss, x: Tensor, y: Tensor, xq: Tensor,
             yq: Tensor, strategy: str) -> dict[str, Tensor]:
    """Brute-force pairwise and self scores with the true labels (empirical Fisher)."""
    grads = ref.per_example_gradients(model, names, loss, x, y)
    qgrads = ref.per_example_gradients(model, names, loss, xq, yq)
    covs = ref.covariances(ref.capture_rows(model, names, loss, x, y))
    blocks = []
    for name in names:
        a_cov, s_cov, rows = covs[name]
        o, i = grads[name].shape[1:]
        if strategy == "identity":
            blocks.append(torch.eye(o * i, dtype=torch.float64))
            continue
        if strategy == "diagonal":
            lam = grads[name].square().mean(0)
            blocks.append(torch.diag(ref.vec(lam) + DAMPING))
            continue
        l_a, q_a = ref.eigh_sorted(a_cov)
        l_s, q_s = ref.eigh_sorted(s_cov)
        if strategy == "ekfac":
            lam = ref.ekfac_lambda(q_a, q_s, grads[name])
        else:
            lam = torch.outer(l_s.clamp_min(0), l_a.clamp_min(0)) * rows / x.shape[0]
        blocks.append(ref.kron_curvature(q_a, q_s, lam, DAMPING))
    curvature = ref.block_diagonal(blocks)
    train = ref.flat_gradients(grads, names)
    query = ref.flat_gradients(qgrads, names)
    return {"pairwise": ref.influence(curvature, query, train),
            "self": ref.self_influence(curvature, train)}


def check_explicit(model, names, loss, task, x, y, xq, yq, strategy, batch_size=7) -> float:
    got = run(model, loader(x, y, batch_size=batch_size), loader(xq, yq), task, strategy)
    want = explicit(model, names, loss, x, y, xq, yq, strategy)
    return assert_same({k: got[k] for k in want}, want)


def half_squared_error(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1)).pow(2).sum(1)


def data(n: int, d: int, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    return ref.classification_data(n, d_in=d, classes=classes, seed=seed)


# ----------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """``Linear -> ReLU -> Linear -> ReLU -> Linear``; ``inplace`` picks the ReLU flavour,
    ``ckpt`` wraps the middle in gradient checkpointing."""

    def __init__(self, d: int = 5, h: int = 6, out: int = 3, inplace: bool = False,
                 ckpt: str | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, out)
        self.act1, self.act2 = nn.ReLU(inplace=inplace), nn.ReLU(inplace=inplace)
        self.ckpt = ckpt
        self.double().eval()

    def middle(self, h: Tensor) -> Tensor:
        return self.act2(self.fc2(h))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.fc1(x))
        if self.ckpt == "reentrant":
            h = checkpoint(self.middle, h, use_reentrant=True)
        elif self.ckpt == "non_reentrant":
            h = checkpoint(self.middle, h, use_reentrant=False)
        elif self.ckpt == "sequential":
            h = checkpoint_sequential(nn.Sequential(self.fc2, self.act2), 2, h,
                                      use_reentrant=False)
        else:
            h = self.middle(h)
        return self.fc3(h)


class ResBlockNet(nn.Module):
    """A torchvision-style basic block: conv -> BN -> ReLU(inplace) -> conv -> BN, residual add,
    ReLU(inplace); a conv followed directly by an in-place ReLU; a linear head."""

    def __init__(self, inplace: bool = True, seed: int = 0, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4 * 4 * 4, classes)
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.stem(x))  # in-place right after a tracked conv
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + x)
        return self.fc(out.flatten(1))


TRACKED_MLP = ["fc1", "fc2", "fc3"]


# ----------------------------------------------------------------------------------- in place
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inplace_relu_after_linear_equals_explicit_and_its_twin(strategy):
    x, y = data(19, 5, seed=1)
    xq, yq = data(4, 5, seed=2)
    plain, inplace = MLP(inplace=False), MLP(inplace=True)
    check_explicit(plain, TRACKED_MLP, ref.class_nll, "classification", x, y, xq, yq, strategy)
    train, queries = loader(x, y), loader(xq, yq)
    assert_same(run(inplace, train, queries, "classification", strategy),
                run(plain, train, queries, "classification", strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inplace_relu_in_a_resnet_block_equals_its_twin(strategy):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    train, queries = loader(x, y, batch_size=4), loader(x[:3], y[:3])
    assert_same(run(ResBlockNet(inplace=True), train, queries, "classification", strategy),
                run(ResBlockNet(inplace=False), train, queries, "classification", strategy))


def test_resnet_block_identity_scores_equal_gradient_dot_products():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    model = ResBlockNet(inplace=True)
    names = ["stem", "conv1", "conv2", "fc"]
    got = run(model, loader(x, y, batch_size=4), loader(x[:2], y[:2]), "classification",
              "identity")
    grads = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, x, y), names)
    assert_same({"pairwise": got["pairwise"]}, {"pairwise": grads[:2] @ grads.T})


# ----------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("ckpt", ["non_reentrant", "reentrant", "sequential"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gradient_checkpointing_equals_the_plain_model(ckpt, strategy):
    x, y = data(15, 5, seed=3)
    train, queries = loader(x, y, batch_size=4), loader(x[:3], y[:3])
    plain, checkpointed = MLP(inplace=True), MLP(inplace=True, ckpt=ckpt)
    assert_same(run(checkpointed, train, queries, "classification", strategy),
                run(plain, train, queries, "classification", strategy))


def test_reentrant_checkpointing_keeps_parameter_gradients():
    """The full backward that reentrant checkpointing needs leaves ``.grad`` as it was."""
    x, y = data(8, 5, seed=3)
    model = MLP(ckpt="reentrant")
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 7.0)
    fit_factors(model, loader(x, y), "classification", strategy="ekfac", progress=False)
    assert torch.equal(model.fc2.weight.grad, torch.full_like(model.fc2.weight, 7.0))
    assert model.fc1.weight.grad is None


# ----------------------------------------------------------------------------------- scalar heads
class Head(nn.Module):
    def __init__(self, d: int, out: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(d, 4)
        self.head = nn.Linear(4, out)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_output_regression_head_equals_explicit(strategy):
    x, _ = data(13, 3, seed=5)
    y = torch.randn(13, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    xq, yq = x[:3], y[:3] + 0.5
    check_explicit(Head(3, 1), ["body", "head"], half_squared_error, RegressionTask(), x, y, xq,
                   yq, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_input_layer_without_bias_equals_explicit(strategy):
    """``Linear(1, k, bias=False)``: a 1 x 1 activation covariance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4, bias=False), nn.Tanh(), nn.Linear(4, 1, bias=False))
    model.double().eval()
    x, _ = data(11, 1, seed=6)
    y = torch.randn(11, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    check_explicit(model, ["0", "2"], half_squared_error, RegressionTask(), x, y, x[:2], y[:2],
                   strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_logit_binary_classifier_equals_explicit(strategy):
    """One logit per example: a regression-shaped head with a cross-entropy-like task."""

    class Binary(RegressionTask):
        def loss(self, outputs, batch):
            logit = self.logits(outputs).reshape(-1)
            return nn.functional.binary_cross_entropy_with_logits(
                logit, self.targets(batch).to(logit.dtype), reduction="none")

    def bce(out, y):
        return nn.functional.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype),
                                                              reduction="none")

    x, y = data(12, 3, classes=2, seed=7)
    check_explicit(Head(3, 1), ["body", "head"], bce, Binary(), x, y, x[:3], y[:3], strategy)


# ----------------------------------------------------------------------------------- shared modules
class Shared(nn.Module):
    """One Linear called three times."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.shared(h))
        return self.out(h)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_module_equals_explicit(strategy):
    x, y = data(14, 5, seed=8)
    check_explicit(Shared(), ["inp", "shared", "out"], ref.class_nll, "classification", x, y,
                   x[:3], y[:3], strategy)


# ----------------------------------------------------------------------------------- reshaped batches
class MultipleChoice(nn.Module):
    """``[N, C, D]`` choices flattened to ``[N*C, D]``, one score per choice -> ``[N, C]``
    logits. ``interleaved`` flattens choice-major instead (``[C*N, D]``)."""

    def __init__(self, interleaved: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Linear(5, 4)
        self.score = nn.Linear(4, 1)
        self.interleaved = interleaved
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        n, c, d = x.shape
        flat = x.transpose(0, 1).reshape(c * n, d) if self.interleaved else x.reshape(n * c, d)
        s = self.score(torch.tanh(self.enc(flat)))  # [N*C, 1]
        return s.reshape(c, n).T if self.interleaved else s.reshape(n, c)


def choice_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=gen))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_multiple_choice_reshaped_batch_equals_explicit(strategy):
    x, y = choice_data(11, 9)
    check_explicit(MultipleChoice(), ["enc", "score"], ref.class_nll, "classification", x, y,
                   x[:3], y[:3], strategy, batch_size=4)


def test_interleaved_rows_are_refused_with_advice_then_declared():
    x, y = choice_data(9, 10)
    train, queries = loader(x, y, batch_size=4), loader(x[:2], y[:2])
    with pytest.raises(ValueError, match="batch_layout='interleaved'"):
        run(MultipleChoice(interleaved=True), train, queries, "classification", "ekfac")
    model = MultipleChoice(interleaved=True)
    tracker = LayerTracker(model, batch_layout="interleaved")
    assert_same(run(model, train, queries, "classification", "ekfac", tracker=tracker),
                run(MultipleChoice(), train, queries, "classification", "ekfac"))


def test_rows_that_are_no_multiple_of_the_batch_are_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.fc(torch.cat([x, x[:1]]))[: x.shape[0]]

    x, y = data(8, 5)
    with pytest.raises(ValueError, match="Layer 'fc' saw 5 rows .* 4 losses"):
        fit_factors(Odd(), loader(x, y, batch_size=4), "classification", progress=False)


# ----------------------------------------------------------------------------------- outputs, calls
class Wrapped(nn.Module):
    """The MLP behind several output conventions, its first layer called by keyword."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.mlp = MLP()
        self.style = style

    def forward(self, x: Tensor):
        m = self.mlp
        logits = m.fc3(m.act2(m.fc2(m.act1(m.fc1(input=x)))))
        if self.style == "dict":
            return {"loss_terms": logits.sum(), "logits": logits}
        if self.style == "tuple":
            return logits, torch.zeros(())
        if self.style == "hf":
            from transformers.modeling_outputs import SequenceClassifierOutput
            return SequenceClassifierOutput(logits=logits)
        return {"scores": logits}


@pytest.mark.parametrize("style", ["dict", "tuple", "hf"])
@pytest.mark.parametrize("strategy", ["identity", "ekfac"])
def test_non_tensor_outputs_and_keyword_calls_equal_the_tensor_model(style, strategy):
    if style == "hf":
        pytest.importorskip("transformers")
    x, y = data(10, 5, seed=11)
    train, queries = loader(x, y), loader(x[:3], y[:3])
    assert_same({k.removeprefix("mlp."): v for k, v in
                 run(Wrapped(style), train, queries, "classification", strategy).items()},
                run(MLP(), train, queries, "classification", strategy))


def test_outputs_without_logits_name_what_was_found_and_the_fix():
    x, y = data(6, 5)
    with pytest.raises(TypeError, match=r"dict with keys \['scores'\].*output_key"):
        fit_factors(Wrapped("other"), loader(x, y), "classification", progress=False)
    fit_factors(Wrapped("other"), loader(x, y), ClassificationTask(output_key="scores"),
                progress=False)


# ----------------------------------------------------------------------------------- layer types
class Conv1dNet(nn.Module):
    def __init__(self, two_d: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.two_d = two_d
        self.conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1)
        self.conv_same = nn.Conv1d(3, 3, 2, padding="same", bias=False)
        self.fc = nn.Linear(3 * 4, 3)
        if two_d:  # the same maps as Conv2d of height 1
            c1, c2 = self.conv, self.conv_same
            self.conv = nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1))
            self.conv.weight.data = c1.weight.data.unsqueeze(2)
            self.conv.bias.data = c1.bias.data
            self.conv_same = nn.Conv2d(3, 3, (1, 2), padding="same", bias=False)
            self.conv_same.weight.data = c2.weight.data.unsqueeze(2)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        if self.two_d:
            x = x.unsqueeze(2)
        h = self.conv_same(torch.tanh(self.conv(x)))
        return self.fc(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_conv1d_equals_its_conv2d_twin(strategy):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(10, 2, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    train, queries = loader(x, y, batch_size=4), loader(x[:3], y[:3])
    assert_same(run(Conv1dNet(), train, queries, "classification", strategy),
                run(Conv1dNet(two_d=True), train, queries, "classification", strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformers_conv1d_equals_its_linear_twin(strategy):
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    x, y = data(12, 5, seed=13)
    plain = MLP()
    gpt2_style = MLP()
    for name in TRACKED_MLP:
        linear = getattr(plain, name)
        layer = conv1d(linear.out_features, linear.in_features).double()
        layer.weight.data = linear.weight.data.T.clone()
        layer.bias.data = linear.bias.data.clone()
        setattr(gpt2_style, name, layer)
    train, queries = loader(x, y), loader(x[:3], y[:3])
    assert_same(run(gpt2_style, train, queries, "classification", strategy),
                run(plain, train, queries, "classification", strategy))


# ----------------------------------------------------------------------------------- frozen, tied
def test_only_trainable_layers_are_tracked_by_default():
    model = MLP()
    model.fc1.requires_grad_(False)
    assert LayerTracker(model).names() == ["fc2", "fc3"]
    assert LayerTracker(model, include_frozen=True).names() == TRACKED_MLP
    assert LayerTracker(model, layers=["fc1"]).names() == ["fc1"]  # named exactly: tracked
    model.requires_grad_(False)  # frozen as a whole after training: nothing to choose between
    tracker = LayerTracker(model)
    assert tracker.names() == TRACKED_MLP and "every chosen layer is frozen" in tracker.notes[0]


def test_frozen_layer_scores_equal_explicit_on_the_trainable_layers():
    x, y = data(12, 5, seed=14)
    model = MLP()
    model.fc1.requires_grad_(False)
    got = run(model, loader(x, y), loader(x[:3], y[:3]), "classification", "ekfac")
    want = explicit(model, ["fc2", "fc3"], ref.class_nll, x, y, x[:3], y[:3], "ekfac")
    assert_same({k: got[k] for k in want}, want)
    assert not model.fc1.weight.requires_grad  # restored after the passes


def test_tied_weights_are_noted():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lm_head = nn.Linear(4, 7, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            return self.lm_head(self.emb(ids))

    notes = LayerTracker(Tied()).notes
    assert len(notes) == 1 and "'lm_head' shares its weight with 'emb'" in notes[0]
    assert "not tracked" in notes[0]
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with 'emb' .*not tracked"
                                         r".*its use as 'emb'.* is left out of the factors and "
                                         r"scores \(exclude=\['lm_head'\]"):
        LayerTracker(Tied())  # a warning, not only an INFO line that a default set-up hides


# ----------------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batch_size_does_not_change_anything(strategy):
    x, y = data(13, 5, seed=15)
    queries = loader(x[:3], y[:3])
    assert_same(run(MLP(inplace=True), loader(x, y, batch_size=1), queries, "classification",
                    strategy),
                run(MLP(inplace=True), loader(x, y, batch_size=13), queries, "classification",
                    strategy))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_right_padding_does_not_change_anything(strategy):
    """A causal LM: two pad columns appended to every sequence change no factor or score."""
    model = ref.TinyLM(seed=2)
    ids, mask = ref.token_data(9, seed=3)
    pad = torch.zeros(ids.shape[0], 2, dtype=ids.dtype)

    def lm_loader(i, m):
        return DataLoader([{"input_ids": a, "attention_mask": b} for a, b in zip(i, m, strict=True)],
                          batch_size=4)

    short, long = lm_loader(ids, mask), lm_loader(torch.cat([ids, pad], 1),
                                                  torch.cat([mask, pad], 1))
    assert_same(run(model, long, long, "causal_lm", strategy),
                run(model, short, short, "causal_lm", strategy))


def test_empirical_fisher_is_recorded_with_the_factors():
    x, y = data(8, 5)
    factors = fit_factors(MLP(), loader(x, y), "classification", fisher="empirical",
                          progress=False)
    assert factors.extra["fisher"] == "empirical"
    with pytest.raises(ValueError, match="fisher='nope' is not one of"):
        fit_factors(MLP(), loader(x, y), "classification", fisher="nope", progress=False)


# ----------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hugging_face_gradient_checkpointing_gives_the_same_rows(use_reentrant):
    """A tiny GPT-2 (transformers Conv1D projections, tied lm_head, ModelOutput) in train mode,
    where ``gradient_checkpointing_enable()`` takes effect: the rows of every tracked layer
    equal those of the same model without checkpointing."""
    transformers = pytest.importorskip("transformers")
    from lightning_influence.passes import batch_rows
    from lightning_influence.task import CausalLMTask

    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config).double().train()
    checkpointed = transformers.GPT2LMHeadModel(config).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids}
    task = CausalLMTask()
    tracker = LayerTracker(plain)
    assert any("lm_head" in note for note in tracker.notes)  # tied to the input embedding
    want, _ = batch_rows(plain, batch, task, tracker, "loss")
    got, _ = batch_rows(checkpointed, batch, task, LayerTracker(checkpointed), "loss")
    assert got.keys() == want.keys() and len(want) == 2 * 4 + 1
    for name, (a, g) in want.items():
        assert_close(got[name][0], a, rtol=REL, atol=REL * a.abs().max().item(), msg=name)
        assert_close(got[name][1], g, rtol=1e-7, atol=1e-7 * g.abs().max().item(), msg=name)
