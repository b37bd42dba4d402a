"""Run one KV-cache-compression experiment (or a sweep with ``-m``): model x policy x budget x task x seed.

    python experiments/run.py                                   # default: embedded SmolLM2, lfu x4, niah_single
    python experiments/run.py policy=snapkv budget.ratio=8 task=passkey task.mode=query_agnostic
    python experiments/run.py -m policy=full,lfu,snapkv,streaming budget.ratio=2,4,8,16

Outputs go to the Hydra run directory: ``predictions.jsonl``, ``summary.json`` (see docs/EXPERIMENTS.md).
Configuration errors print one ``error: ...`` line and exit with status 2 (in a multirun the failing job writes
``error.txt`` and the sweep continues).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from kvcompress.budget import BudgetError
from kvcompress.experiment.prompts import ExperimentError
from kvcompress.experiment.records import finished_summary
from kvcompress.experiment.runner import RunContext, run_experiment, summary_line
from kvcompress.model import ModelNotFoundError
from kvcompress.tasks.base import TaskDataError

log = logging.getLogger("kvcompress.run")

USER_ERRORS = (BudgetError, TaskDataError, ModelNotFoundError, ExperimentError, MissingMandatoryValue)


def _run(cfg: DictConfig) -> None:
    """Skip a finished run, else instantiate the policy, evaluate, log the summary line and (optionally) wandb."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    done = finished_summary(run_dir)
    if done is not None:
        log.info("already complete, skipping: %s", summary_line(done))
        return
    try:
        policy = instantiate(cfg.policy)
    except InstantiationException as err:
        raise ExperimentError(f"policy={hc.runtime.choices.get('policy')}: {err.__cause__ or err}") from err
    ctx = RunContext(
        run_dir=run_dir,
        policy_name=str(hc.runtime.choices.get("policy")),
        baselines_dir=Path(to_absolute_path(cfg.baselines_dir)) if cfg.baselines_dir else None,
        progress=bool(cfg.progress),
    )
    summary, records = run_experiment(cfg, ctx, policy)
    log.info(summary_line(summary))
    if cfg.logger.name == "wandb":
        from kvcompress.experiment.tracking import log_run

        multirun = hc.mode == RunMode.MULTIRUN
        group = Path(hc.sweep.dir).name if multirun else run_dir.name
        log_run(cfg, run_dir, group, summary, records).finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run, and turn configuration/data errors into one line and exit status 2."""
    try:
        _run(cfg)
    except USER_ERRORS as err:
        if isinstance(err, MissingMandatoryValue):  # OmegaConf's message spans several lines
            message = f"error: missing mandatory value {err.full_key}: set it, e.g. {err.full_key}=..."
        else:
            message = f"error: {err}"
        print(message, file=sys.stderr, flush=True)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            (Path(hc.runtime.output_dir) / "error.txt").write_text(message + "\n", encoding="utf-8")
            return
        sys.exit(2)


if __name__ == "__main__":
    main()
