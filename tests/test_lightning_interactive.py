"""A Trainer built on cai_labs ranks from a notebook: Lightning must not refuse it."""

from __future__ import annotations

from cai_labs import launch


def _build_all() -> dict[str, str]:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.trainer.connectors import accelerator_connector

    from cai_labs.lightning import ProcessGroupEnvironment, rank_trainer

    accelerator_connector._IS_INTERACTIVE = True  # what Jupyter's sys.ps1 makes it
    out = {}
    for name in ("ddp", "zero2"):
        strategy = rank_trainer(name, max_steps=1).strategy
        out[name] = f"{type(strategy).__name__} launcher={strategy.launcher}"
    try:  # the check the strategy avoids is real: stock DDPStrategy raises there
        env = ProcessGroupEnvironment()
        Trainer(
            accelerator="cpu",
            devices=1,
            num_nodes=2,
            logger=False,
            strategy=DDPStrategy(cluster_environment=env),
        )
        out["stock"] = "built"
    except Exception as e:  # noqa: BLE001
        out["stock"] = str(e)
    return out


def test_trainer_builds_in_an_interactive_session():
    out = launch(_build_all, 2, timeout=240)
    assert out["ddp"] == "ExistingRanksDDPStrategy launcher=None", out
    assert out["zero2"] == "ZeroStrategy launcher=None", out
    assert "not compatible with an interactive" in out["stock"], out
