"""Bad input, everywhere: each case gets an error (or warning) that names the problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.factors import eigendecompose


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Net(nn.Module):
    def __init__(self, nan_grad: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.nan_grad = nan_grad
        if unused:
            self.spare = nn.Linear(5, 5)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.nan_grad:
            h = NanGradient.apply(h)
        return self.fc2(h)


def _data(n=12, d=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(*tensors, bs=4):
    return DataLoader(TensorDataset(*tensors), batch_size=bs)


def test_nan_output_gradients_name_the_layer_and_batch():
    x, y = _data()
    with pytest.raises(FloatingPointError, match=r"output gradients for layer 'fc1' in batch 0"):
        li.fit_factors(Net(nan_grad=True), _loader(x, y), "classification", progress=False)


def test_overflowing_covariance_names_the_layer():
    model = Net().double()
    x, y = _data()
    x = x.double() * 1e200  # finite activations whose squares overflow float64
    with pytest.raises(FloatingPointError, match=r"activation covariance of layer 'fc1'"):
        li.fit_factors(model, _loader(x, y), "classification", progress=False)
    with pytest.raises(FloatingPointError, match="layer 'blk'"):
        eigendecompose(torch.full((2, 2), float("nan")), "activation", "blk")


def test_layers_that_never_run_are_named():
    x, y = _data()
    with pytest.warns(UserWarning, match=r"\['spare'\] never ran"), pytest.raises(
            FloatingPointError, match="'spare' has no curvature at all .*never ran.*Exclude"):
        li.fit_factors(Net(unused=True), _loader(x, y), "classification", strategy="diagonal",
                       progress=False)  # zero eigenvalues, zero damping: refused, not NaN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="'spare' has no covariance rows.*Exclude it"):
            li.fit_factors(Net(unused=True), _loader(x, y), "classification", progress=False)
    # excluding it is the fix
    li.fit_factors(Net(unused=True), _loader(x, y), "classification", exclude=["spare"],
                   progress=False)


def _identity(model):
    x, y = _data()
    return li.fit_factors(model, _loader(x, y), "classification", strategy="identity",
                          progress=False)


def test_batches_missing_labels():
    # The Fisher passes sample their labels; the scoring passes need the true ones.
    x, _ = _data()
    model = Net()
    factors = _identity(model)
    with pytest.raises(ValueError, match="needs labels.*without a second element"):
        li.compute_self_scores(model, factors, _loader(x), "classification", progress=False)
    dict_batches = DataLoader([{"x": row} for row in x], batch_size=4)
    with pytest.raises(ValueError, match=r"dict batch has keys \['x'\].*'labels'"):
        li.compute_self_scores(model, factors, dict_batches, "classification", progress=False)


def test_task_that_does_not_fit_the_model_output():
    x, y = _data()
    model = Net()
    with pytest.raises(ValueError, match="expected model outputs of 3 dimensions"):
        li.fit_factors(model, _loader(x, y), "causal_lm", progress=False)
    factors = _identity(model)
    with pytest.raises(ValueError, match=r"targets of shape \(4,\) do not fit outputs"):
        li.compute_self_scores(model, factors, _loader(x, y.float()), "regression",
                               progress=False)
    with pytest.raises(ValueError, match=r"label is outside \[0, 3\)"):
        li.compute_self_scores(model, factors, _loader(x, y + 5), "classification",
                               progress=False)
