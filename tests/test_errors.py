"""Clear errors for the mistakes users make, and a model left as it was after an error."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    CausalLMTask,
    FactorMismatchError,
    LayerTracker,
    compute_pairwise_scores,
    compute_self_scores,
    fit_factors,
)


def loader(*tensors, batch_size: int = 4, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


@pytest.fixture
def mlp_data():
    model = ref.mlp()
    x, y = ref.classification_data(12)
    return model, x, y


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class Guarded(nn.Module):
    """``fc1 -> nan_to_num -> fc2``: NaN inputs give NaN fc1 activations but a finite loss."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        return self.fc2(torch.nan_to_num(torch.tanh(self.fc1(x)), nan=0.0))


# ------------------------------------------------------------------------------- layers
def test_unsupported_layer_by_name_lists_supported_types():
    ids = torch.randint(0, 7, (8, 3))
    data = loader(ids, torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=r"'emb'.*Embedding.*Supported types: nn\.Linear, "
                                         r"nn\.Conv1d, nn\.Conv2d, transformers Conv1D"):
        fit_factors(Embedder(), data, "classification", layers=["emb"], progress=False)
    # Without a layer list the Embedding is skipped and the Linear head is tracked.
    assert LayerTracker(Embedder()).names() == ["head"]


def test_grouped_convolution_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2))
    with pytest.raises(TypeError, match="grouped convolutions"):
        LayerTracker(model, layers=["0"])


def test_pattern_matching_nothing(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(ValueError, match=r"'decoder\.\*' matches no module.*\['0', '2'\]"):
        fit_factors(model, loader(x, y), "classification", layers=["decoder.*"], progress=False)


def test_no_supported_layer_at_all():
    model = nn.Sequential(nn.Embedding(5, 3))
    with pytest.raises(ValueError, match="at least one of nn.Linear, nn.Conv1d, nn.Conv2d"):
        LayerTracker(model)


# ------------------------------------------------------------------------------- numbers
def test_non_finite_loss_names_the_batch(mlp_data):
    model, x, y = mlp_data
    x = x.clone()
    x[6, 0] = float("nan")  # batch 1 (batch size 4), example 2 of that batch
    with pytest.raises(FloatingPointError, match=r"Non-finite loss in batch 1.*examples \[2\]"):
        fit_factors(model, loader(x, y), "classification", progress=False)
    with pytest.raises(FloatingPointError, match=r"non-finite activations enter layer '0'"):
        fit_factors(model, loader(x, y), "classification", progress=False)
    factors = fit_factors(model, loader(x[:4], y[:4]), "classification", strategy="identity",
                          progress=False)
    with pytest.raises(FloatingPointError, match=r"batch 1"):
        compute_self_scores(model, factors, loader(x, y), "classification", progress=False)


def test_non_finite_logits_of_a_sequence_model_name_the_batch():
    model = ref.TinyLM()
    with torch.no_grad():
        model.emb.weight[6] = float("nan")
    ids, mask = ref.token_data(8, length=4)
    ids[ids == 6] = 5
    ids[5, 0] = 6  # batch 1, example 1
    with pytest.raises(FloatingPointError, match=r"Non-finite loss in batch 1.*examples \[1\]"):
        fit_factors(model, loader(ids, mask), CausalLMTask(), progress=False)


def test_nan_activations_name_the_layer():
    model = Guarded()
    x, y = ref.classification_data(8)
    x = x.clone()
    x[5, 1] = float("nan")  # batch 1: fc1 sees NaN, the loss stays finite thanks to nan_to_num
    with pytest.raises(FloatingPointError, match=r"activations for layer 'fc1' in batch 1"):
        fit_factors(model, loader(x, y), "classification", progress=False)


def test_errors_leave_the_model_as_it_was(mlp_data):
    model, x, y = mlp_data
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.clone()
    x[0, 0] = float("inf")
    with pytest.raises(FloatingPointError):
        fit_factors(model, loader(x, y), "classification", progress=False)
    assert model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------- factors
def test_factors_of_another_model(mlp_data):
    model, x, y = mlp_data
    factors = fit_factors(model, loader(x, y), "classification", progress=False)
    other = ref.mlp(hidden=7)
    with pytest.raises(FactorMismatchError, match="another model or layer set"):
        compute_pairwise_scores(other, factors, loader(x[:2], y[:2]), loader(x, y),
                                "classification", progress=False)
    with pytest.raises(FactorMismatchError, match="another model or layer set"):
        compute_self_scores(other, factors, loader(x, y), "classification", progress=False)


# ------------------------------------------------------------------------------- loaders
def test_empty_dataloader(mlp_data):
    model, x, y = mlp_data
    empty = loader(x[:0], y[:0])
    with pytest.raises(ValueError, match="dataloader is empty"):
        fit_factors(model, empty, "classification", progress=False)
    factors = fit_factors(model, loader(x, y), "classification", progress=False)
    with pytest.raises(ValueError, match="dataloader is empty"):
        compute_self_scores(model, factors, empty, "classification", progress=False)
    with pytest.raises(ValueError, match="(empty|no batch)"):
        compute_pairwise_scores(model, factors, empty, loader(x, y), "classification",
                                progress=False)
    # A re-iterable loader without len() that yields nothing.
    class NoBatches:
        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="yielded no batch"):
        fit_factors(model, NoBatches(), "classification", progress=False)


def test_shuffled_training_loader_is_refused_for_scores(mlp_data):
    model, x, y = mlp_data
    shuffled = loader(x, y, shuffle=True)
    # Fitting factors does not depend on the order: a shuffled loader is fine there.
    factors = fit_factors(model, shuffled, "classification", progress=False)
    with pytest.raises(ValueError, match=r"shuffles.*shuffle=False"):
        compute_pairwise_scores(model, factors, loader(x[:2], y[:2]), shuffled,
                                "classification", progress=False)
    with pytest.raises(ValueError, match="shuffles"):
        compute_self_scores(model, factors, shuffled, "classification", progress=False)


# ------------------------------------------------------------------------------- arguments
def test_bad_strategy_name(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(ValueError, match=r"Unknown strategy 'kfc'.*'identity', 'diagonal', "
                                         r"'kfac', 'ekfac'"):
        fit_factors(model, loader(x, y), "classification", strategy="kfc", progress=False)


def test_bad_damping(mlp_data):
    model, x, y = mlp_data
    data = loader(x, y)
    with pytest.raises(ValueError, match=r"damping must be >= 0, got -0.1"):
        fit_factors(model, data, "classification", damping=-0.1, progress=False)
    with pytest.raises(ValueError, match="needs a positive weight decay"):
        fit_factors(model, data, "classification", damping="weight_decay", progress=False)
    with pytest.raises(ValueError, match="'tiny' is not a number"):
        fit_factors(model, data, "classification", damping="tiny", progress=False)
    factors = fit_factors(model, data, "classification", damping="weight_decay",
                          weight_decay=0.01, progress=False)
    assert set(factors.damping.values()) == {0.01}


def test_bad_task_name(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(ValueError, match=r"Unknown task 'clasification'.*causal_lm"):
        fit_factors(model, loader(x, y), "clasification", progress=False)


def test_strategy_and_damping_choices_are_named():
    from lightning_influence.callbacks import EigenCorrection
    from lightning_influence.factors import Damping
    from lightning_influence.strategies import strategy

    with pytest.raises(ValueError, match=r"'ekfak'; choose one of \['identity', 'diagonal', "
                                         r"'kfac', 'ekfac', 'explicit', 'cg', 'lissa', 'arnoldi'\]"):
        strategy("ekfak")
    with pytest.raises(ValueError, match="choose one of .*'ekfac'\\]"):
        strategy("cg", fitted_only=True)
    with pytest.raises(ValueError, match="EigenCorrection: damping='bogus' is not a number"):
        EigenCorrection(damping="bogus")
    with pytest.raises(ValueError, match="damping_factor must be > 0"):
        EigenCorrection(damping_factor=0)
    assert Damping("weight_decay", weight_decay=0.01).resolve(None) == 0.01
    assert Damping(factor=0.5).resolve(torch.tensor([[2.0, 4.0]])) == 1.5
