"""evaluate.py: chunked predictions and the metrics row against direct computation."""

import torch

from icl_lab.baselines import dmmse_predict, ridge_predict
from icl_lab.config import build_run_config
from icl_lab.evaluate import evaluate, predict, prepare_eval_sets
from icl_lab.model import build_model
from icl_lab.tasks import task_pool


def _setup(M=2, size=300):
    cfg = build_run_config(overrides=dict(preset="seed", M=M, D=4, K=6, noise_var=0.1, family="gaussian"))
    model = build_model(cfg.task, cfg.model, seed=0)
    pool = task_pool(cfg.task.family, M, cfg.task.D, seed=0)
    return cfg, model, pool, prepare_eval_sets(cfg.task, pool, size, seed=0)


def test_predict_chunks_agree_with_one_pass_and_record_no_graph():
    _, model, _, sets = _setup()
    x, y = sets["id"].batch.x, sets["id"].batch.y
    with torch.no_grad():
        whole = model(x, y)
    for chunk in (None, 7, 128, 10_000):  # None: the device's default; 7 leaves a ragged last chunk
        pred = predict(model, x, y, chunk)
        assert pred.shape == y.shape and not pred.requires_grad
        torch.testing.assert_close(pred, whole, rtol=0, atol=1e-6)


def test_evaluate_row_matches_direct_computation():
    cfg, model, pool, sets = _setup()
    model.train()
    row = evaluate(model, sets)
    assert model.training  # the mode is restored
    K = cfg.task.K
    for name, s in sets.items():
        x, y = s.batch.x, s.batch.y
        with torch.no_grad():
            pred = model(x, y)
        dmmse = dmmse_predict(x, y, pool, cfg.task.noise_var)
        ridge = ridge_predict(x, y, cfg.task.noise_var)
        for key, ref in (("loss", y), ("delta_dmmse", dmmse), ("delta_ridge", ridge)):
            per_k = ((pred - ref) ** 2).mean(0)
            assert abs(row[f"{name}_{key}"] - per_k.mean().item()) < 1e-5
            for k in (1, K):
                assert abs(row[f"{name}_{key}_k{k}"] - per_k[k - 1].item()) < 1e-5
    # the pool's dMMSE predictor differs from ridge in distribution, so the two distances are not the same number
    assert abs(row["id_delta_dmmse"] - row["id_delta_ridge"]) > 1e-4
