"""No stale answer: factors and score chunks are bound to the whole function the model computes.

Before the whole-model fingerprint, only the tracked layers' shapes and weights were checked,
and each case below reused old factors or score chunks without a word: a state dict loaded into
another architecture with the same layer names, recalibrated batch-norm statistics, an LM whose
embedding was trained after its (frozen, tracked) layers, and score chunks of the old model
read back after the factors were refitted for the new one.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.factors import model_fingerprint
from lightning_influence.fingerprint import PARTS, fingerprint_changes


def _loader(n=16, batch_size=4, seed=0):
    x, y = ref.classification_data(n, d_in=5, seed=seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _net(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), act(), nn.Linear(6, 3)).double().eval()


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.double().eval()

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _recalibrate(model: nn.Module) -> None:
    """Batch-norm statistics recomputed on shifted data (e.g. after a domain change)."""
    x, _ = ref.classification_data(64, d_in=5, seed=5)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(3 * x + 1)
    model.eval()


def _fingerprint(model: nn.Module) -> dict:
    return model_fingerprint(li.LayerTracker(model))


# ----------------------------------------------------------------------------------- refusals
def test_a_state_dict_loaded_into_another_architecture_is_refused_naming_the_module(tmp_path):
    relu = _net(nn.ReLU)
    data = _loader()
    li.fit_factors(relu, data, "classification", output_dir=tmp_path, progress=False)
    gelu = _net(nn.GELU)
    gelu.load_state_dict(relu.state_dict())  # same layer names, shapes and weights
    with pytest.raises(li.FactorMismatchError,
                       match=r"another structure: the module structure changed \(module '1' is "
                             r"now GELU, was ReLU\).*overwrite=True"):
        li.fit_factors(gelu, data, "classification", output_dir=tmp_path, progress=False)
    factors = li.Factors.load(tmp_path)
    with pytest.raises(li.FactorMismatchError, match="'1' is now GELU, was ReLU"):
        li.compute_self_scores(gelu, factors, data, "classification", progress=False)
    refit = li.fit_factors(gelu, data, "classification", output_dir=tmp_path, overwrite=True,
                           progress=False)
    li.compute_self_scores(gelu, refit, data, "classification", progress=False)


def test_module_settings_are_part_of_the_structure():
    plain = _net(nn.GELU)
    tanh = _net(nn.GELU)
    tanh[1] = nn.GELU(approximate="tanh")
    changes = fingerprint_changes(_fingerprint(plain), _fingerprint(tanh))
    assert set(changes) == {"structure"}
    assert "module '1' is now GELU(approximate='tanh'), was GELU(approximate='none')" \
        in changes["structure"]


def test_recalibrated_batch_norm_statistics_are_refused_naming_the_buffers(tmp_path):
    model = BatchNormNet()
    data = _loader()
    factors = li.fit_factors(model, data, "classification", output_dir=tmp_path, progress=False)
    _recalibrate(model)
    message = (r"different buffers: buffers changed: bn\.running_mean, bn\.running_var, "
               r"bn\.num_batches_tracked.*overwrite=True")
    with pytest.raises(li.FactorMismatchError, match=message):
        li.compute_pairwise_scores(model, factors, _loader(4, seed=1), data, "classification",
                                   progress=False)
    with pytest.raises(li.FactorMismatchError, match=message):
        li.fit_factors(model, data, "classification", output_dir=tmp_path, progress=False)


def test_an_embedding_trained_after_frozen_tracked_layers_is_refused():
    model = ref.TinyLM()
    for layer in (model.fc1, model.fc2):
        layer.requires_grad_(False)  # tracked (the model's only linear layers), frozen
    ids, mask = ref.token_data(6, seed=1)
    data = DataLoader(TensorDataset(ids, mask), batch_size=3)
    factors = li.fit_factors(model, data, li.CausalLMTask(), progress=False)
    assert set(factors.shapes) == {"fc1", "fc2"}
    with torch.no_grad():
        model.emb.weight.add_(0.05)  # a step of training on the embedding only
    with pytest.raises(li.FactorMismatchError,
                       match=r"different weights: untracked parameters changed: emb\.weight"):
        li.compute_self_scores(model, factors, data, li.CausalLMTask(), progress=False)


def test_self_score_chunks_of_the_old_model_are_not_returned_after_a_refit(tmp_path):
    model = BatchNormNet()
    data = _loader()
    fit = dict(damping=0.1, output_dir=tmp_path / "factors", progress=False)  # a fixed damping
    factors = li.fit_factors(model, data, "classification", **fit)
    chunks = dict(scores_dir=tmp_path / "chunks", chunk_batches=1, progress=False)
    old = li.compute_self_scores(model, factors, data, "classification", **chunks).scores
    _recalibrate(model)
    refit = li.fit_factors(model, data, "classification", overwrite=True, **fit)
    with pytest.raises(li.ScoreStoreMismatchError, match="here the model's buffers differ"):
        li.compute_self_scores(model, refit, data, "classification", **chunks)
    new = li.compute_self_scores(model, refit, data, "classification",
                                 scores_dir=tmp_path / "fresh", progress=False).scores
    assert not torch.allclose(new, old, rtol=0.05)  # the old chunks would have been wrong


def test_unchanged_models_still_reuse_their_factors(tmp_path):
    model = BatchNormNet()
    data = _loader()
    li.fit_factors(model, data, "classification", output_dir=tmp_path, progress=False)
    again = copy.deepcopy(model)  # bit-exact copy: same fingerprint, reused without a pass
    li.fit_factors(again, [], "classification", output_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------------- the hash
class ManyKinds(nn.Module):
    """Tensors of every kind the hash must read: large and odd-sized, 16-bit floats, ints,
    bools, tracked and untracked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big = nn.Linear(1000, 1003)  # 1,004,003 tracked parameters
        self.emb = nn.Embedding(9, 1000)  # untracked
        self.bn = nn.BatchNorm1d(1003)  # running statistics and an int64 count
        self.register_buffer("table", torch.randn(1_000_003))  # not a multiple of a row
        self.register_buffer("fp16", torch.randn(4097).half())  # an odd count of 16-bit words
        self.register_buffer("brain", torch.randn(64, 3).bfloat16())
        self.register_buffer("mask", torch.rand(1001) > 0.5, persistent=False)
        self.register_buffer("steps", torch.arange(7, dtype=torch.int64))

    def forward(self, ids):
        return self.bn(self.big(self.emb(ids).mean(1)))


def _flip_lowest_bit(tensor: torch.Tensor, index: int) -> None:
    """Flip the lowest bit of element ``index`` (the smallest possible change)."""
    raw = tensor.data.reshape(-1).view(torch.uint8)
    raw[index * tensor.element_size()] ^= 1


@pytest.mark.parametrize("name, part", [
    ("big.weight", "tracked"), ("big.bias", "tracked"), ("emb.weight", "untracked"),
    ("table", "buffers"), ("fp16", "buffers"), ("brain", "buffers"), ("mask", "buffers"),
    ("steps", "buffers"), ("bn.num_batches_tracked", "buffers"), ("bn.running_var", "buffers"),
])
def test_any_single_element_change_is_detected_and_named(name, part):
    model = ManyKinds()
    before = _fingerprint(model)
    assert before == _fingerprint(copy.deepcopy(model))  # bit-exact equal: equal digests
    tensor = model.get_parameter(name) if part != "buffers" else model.get_buffer(name)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    for index in torch.randint(0, tensor.numel(), (3,), generator=generator).tolist():
        _flip_lowest_bit(tensor, index)
        after = _fingerprint(model)
        changes = fingerprint_changes(before, after)
        assert set(changes) == {part}, (name, index)
        assert changes[part].endswith(f"changed: {name}")
        _flip_lowest_bit(tensor, index)  # back: the same digest again
        assert _fingerprint(model) == before


def _negate_two(t):  # two sign flips in one row of the hash: only the top bit of each word
    t[[3, 400]] = -t[[3, 400]]


def _double_two(t):  # two exponents one up
    t[[5, 9]] = 2 * t[[5, 9]]


def _swap_two(t):
    t[[0, 1]] = t[[1, 0]].clone()


def _negate_all(t):
    t.neg_()


@pytest.mark.parametrize("change", [_negate_two, _double_two, _swap_two, _negate_all])
def test_structured_changes_of_several_elements_are_detected(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 600))  # a bias of 600 words: one row of the hash
    before = _fingerprint(model)
    with torch.no_grad():
        change(model[0].bias)
    assert fingerprint_changes(before, _fingerprint(model)) == {
        "tracked": "tracked weights changed: 0.bias"}


def test_the_fingerprint_is_small_and_reads_every_part():
    model = ManyKinds()
    fingerprint = _fingerprint(model)
    assert all(isinstance(fingerprint[part], str) for part in PARTS)
    assert set(fingerprint["tensors"]["buffers"]) == {
        "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "table", "fp16", "brain",
        "mask", "steps"}
    assert [row[0] for row in fingerprint["modules"]] == ["", "big", "emb", "bn"]
    assert len(str(fingerprint)) < 4000  # digests, not tensors
