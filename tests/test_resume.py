"""A scoring pass killed with SIGKILL resumes from its last finished chunk and ends with the same
scores as an uninterrupted run; chunks of another pass are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = r'''
import os, sys, time, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning_influence as li

class SlowTask(li.ClassificationTask):
    calls = 0
    def loss(self, outputs, batch):
        SlowTask.calls += 1
        if os.environ.get("SLOW"):
            time.sleep(0.15)
        return super().loss(outputs, batch)

def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 10, generator=g)
    y = torch.randint(0, 3, (160,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=8)          # 20 batches
    queries = DataLoader(TensorDataset(x[:6] + 0.1, y[:6]), batch_size=6)
    factors = li.fit_factors(model, train, "classification", progress=False)
    return model, factors, queries, train

if __name__ == "__main__":
    model, factors, queries, train = setup()
    SlowTask.calls = 0
    result = li.compute_pairwise_scores(model, factors, queries, train, SlowTask(), top_k=5,
                                        scores_dir=sys.argv[1], chunk_batches=2, progress=False)
    torch.save({"scores": result.scores, "top": result.top.proponent_indices,
                "top_scores": result.top.proponent_scores, "opp": result.top.opponent_indices,
                "loss_calls": SlowTask.calls}, sys.argv[2])
'''


def _run(script: Path, scores: Path, out: Path, slow: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if slow:
        env["SLOW"] = "1"
    return subprocess.Popen([sys.executable, str(script), str(scores), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_mid_pass_then_resume_gives_identical_scores(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    scores = tmp_path / "scores"
    out = tmp_path / "result.pt"

    proc = _run(script, scores, out, slow=True)
    deadline = time.time() + 120
    while len(list(scores.glob("pairwise-chunk-*.safetensors"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no chunk was written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    finished = len(list(scores.glob("pairwise-chunk-*.safetensors")))
    assert 3 <= finished < 10  # 20 batches in chunks of 2: interrupted in the middle

    proc = _run(script, scores, out, slow=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    resumed = torch.load(out)
    # only the unfinished training batches ran (+2 calls: the query measurement and gradients)
    assert resumed["loss_calls"] == 20 - 2 * finished + 2

    # The uninterrupted reference, in this process.
    sys.path.insert(0, str(tmp_path))
    try:
        import worker  # noqa: PLC0415

        model, factors, queries, train = worker.setup()
        import lightning_influence as li

        full = li.compute_pairwise_scores(model, factors, queries, train, "classification", top_k=5,
                                          progress=False)
    finally:
        sys.path.remove(str(tmp_path))
    torch.testing.assert_close(resumed["scores"], full.scores, rtol=0, atol=0)
    assert torch.equal(resumed["top"], full.top.proponent_indices)
    assert torch.equal(resumed["opp"], full.top.opponent_indices)
    torch.testing.assert_close(resumed["top_scores"], full.top.proponent_scores, rtol=0, atol=0)


def test_chunks_of_another_pass_are_refused(tmp_path):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_influence as li
    from lightning_influence.score_store import ScoreStoreMismatchError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    train = DataLoader(TensorDataset(x, y), batch_size=4)
    queries = DataLoader(TensorDataset(x[:2], y[:2]), batch_size=2)
    factors = li.fit_factors(model, train, "classification", progress=False)
    li.compute_self_scores(model, factors, train, "classification", scores_dir=tmp_path,
                           progress=False)
    again = li.compute_self_scores(model, factors, train, "classification", scores_dir=tmp_path,
                                   progress=False)
    assert again.scores.shape == (12,)  # read back from the chunk files
    with pytest.raises(ScoreStoreMismatchError, match="another pass"):
        li.compute_self_scores(model, factors.with_damping(1.0), train, "classification", scores_dir=tmp_path,
                               progress=False)
    li.compute_pairwise_scores(model, factors, queries, train, "classification", scores_dir=tmp_path,
                               progress=False)
    other_queries = DataLoader(TensorDataset(x[2:4], y[2:4]), batch_size=2)
    with pytest.raises(ScoreStoreMismatchError, match="pairwise scores of another pass"):
        li.compute_pairwise_scores(model, factors, other_queries, train, "classification",
                                   scores_dir=tmp_path,
                                   progress=False)


def test_fused_pairwise_and_self_pass_resumes_from_its_chunks(tmp_path):
    """self_influence=True writes both scores in the same chunks: a rerun reads them back
    (the self-influence too), and a pass without self-influence does not take them."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_influence as li
    from lightning_influence.score_store import ScoreStoreMismatchError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    train = DataLoader(TensorDataset(x, y), batch_size=4)
    queries = DataLoader(TensorDataset(x[:2], y[:2]), batch_size=2)
    factors = li.fit_factors(model, train, "classification", progress=False)
    first = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                       scores_dir=tmp_path, chunk_batches=1,
                                       self_influence=True, progress=False)
    chunks = sorted(tmp_path.rglob("*.safetensors"))
    assert chunks
    chunks[-1].unlink()  # as if the pass had been killed before its last chunk
    again = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                       scores_dir=tmp_path, chunk_batches=1,
                                       self_influence=True, progress=False)
    assert torch.equal(again.scores, first.scores)
    assert torch.equal(again.self_result.scores, first.self_result.scores)
    alone = li.compute_self_scores(model, factors, train, "classification", progress=False)
    assert torch.equal(first.self_result.scores, alone.scores)
    with pytest.raises(ScoreStoreMismatchError, match="another pass"):
        li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                   scores_dir=tmp_path, chunk_batches=1, progress=False)
