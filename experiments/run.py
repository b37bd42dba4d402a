"""Run one KV-cache-compression experiment (or a sweep with ``-m``): model x policy x budget x task x seed.

    python experiments/run.py                                   # default: embedded SmolLM2, lfu x4, niah_single
    python experiments/run.py policy=snapkv budget.ratio=8 task=passkey task.mode=query_agnostic
    python experiments/run.py -m policy=full,lfu,snapkv,streaming budget.ratio=2,4,8,16

Outputs go to the Hydra run directory: ``predictions.jsonl``, ``summary.json`` (see docs/EXPERIMENTS.md;
``--help`` summarises). Configuration errors print one ``error: ...`` line and exit with status 2; in a multirun
the failing job writes ``error.txt`` and the sweep continues, then ends with a summary and exit status 1.
Ctrl-C prints what finished and the command that resumes (exit status 130).
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from kvcompress.budget import BudgetError
from kvcompress.experiment import sweep
from kvcompress.experiment.policy_config import check_policy_overrides
from kvcompress.experiment.prompts import ExperimentError
from kvcompress.experiment.records import finished_summary
from kvcompress.experiment.runner import RunContext, fingerprint, run_experiment, summary_line
from kvcompress.model import ModelConfigError, ModelNotFoundError, resolve_device, resolve_dtype
from kvcompress.tasks.base import TaskDataError

log = logging.getLogger("kvcompress.run")

USER_ERRORS = (
    BudgetError,
    TaskDataError,
    ModelNotFoundError,
    ModelConfigError,
    ExperimentError,
    MissingMandatoryValue,
)


def resolve_model(cfg: DictConfig) -> None:
    """Replace ``model.device``/``model.dtype`` ``auto`` by what they mean here, before anything is hashed.

    ``auto`` dtype on CPU becomes ``float32``, so runs (and their config hash) match those made before ``auto``.
    """
    device = resolve_device(str(cfg.model.device))
    cfg.model.device = str(device)
    cfg.model.dtype = str(resolve_dtype(str(cfg.model.dtype), device)).removeprefix("torch.")


def _run(cfg: DictConfig) -> str:
    """Skip a finished run, else instantiate the policy, evaluate, log the summary line and (optionally) wandb.

    Returns the job's status: ``ran`` or ``skipped``.
    """
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    resolve_model(cfg)
    done = finished_summary(run_dir)
    if done is not None and cfg.get("fidelity") and "answer_nll" not in done:
        log.info("complete, but without answer fidelity: computing it (the predictions are kept)")
        done = None
    if done is not None:
        if done.get("config_hash") not in (None, fingerprint(cfg)):
            raise ExperimentError(
                f"{run_dir} holds a finished run of a different config (hash {done.get('config_hash')} != "
                f"{fingerprint(cfg)}); use another directory or delete it"
            )
        log.info("already complete, skipping: %s", summary_line(done))
        if cfg.logger.name == "wandb":  # a sweep first run without wandb can still be sent to it
            from kvcompress.experiment.records import read_records
            from kvcompress.experiment.tracking import already_logged, wandb_run_id

            if not already_logged(run_dir, wandb_run_id(run_dir, done), str(cfg.logger.mode)):
                _log_wandb(cfg, run_dir, done, read_records(run_dir))
        return "skipped"
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
        _log_wandb(cfg, run_dir, summary, records)
    return "ran"


def _log_wandb(cfg: DictConfig, run_dir: Path, summary: dict, records: list[dict]) -> None:
    """Log a finished run to wandb, grouped by the sweep directory's name (a single run: its own directory's)."""
    from kvcompress.experiment.tracking import log_run

    hc = HydraConfig.get()
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else run_dir.name
    log_run(cfg, run_dir, group, summary, records).finish()


def _fail(message: str, detail: str | None = None) -> None:
    """Report a failed job: one ``error:`` line; in a multirun also ``error.txt`` and the job status."""
    print(message, file=sys.stderr, flush=True)
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        sys.exit(2)
    job_dir = Path(hc.runtime.output_dir)
    (job_dir / sweep.ERROR).write_text(message + "\n" + (detail or ""), encoding="utf-8")
    sweep.write_status(job_dir, "failed", message.removeprefix("error: "))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: run, and turn configuration/data errors into one line and exit status 2.

    In a multirun an unexpected exception fails only its job (the traceback goes to the job's ``error.txt``).
    """
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    sweep.clear_stale(job_dir)
    try:
        status = _run(cfg)
    except USER_ERRORS as err:
        if isinstance(err, MissingMandatoryValue):  # OmegaConf's message spans several lines
            _fail(f"error: missing mandatory value {err.full_key}: set it, e.g. {err.full_key}=...")
        else:
            _fail(f"error: {err}")
        return
    except Exception as err:
        if hc.mode != RunMode.MULTIRUN:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _fail(f"error: {type(err).__name__}: {first}", traceback.format_exc())
        return
    if hc.mode == RunMode.MULTIRUN:
        sweep.write_status(job_dir, status)


if __name__ == "__main__":
    problem = check_policy_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except KeyboardInterrupt:
        print(f"\n{sweep.interrupted_message()}", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(sweep.exit_status())
