"""One W&B run per stage, always closed: online where a W&B login is found (however it was made), offline
without one, and off with `logger=none`."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf


class Tracker:
    """The few things a stage logs. With W&B off, every call is a no-op."""

    def __init__(self, run=None):
        self.run = run

    @property
    def info(self) -> dict[str, Any]:
        if self.run is None:
            return {}
        return {"id": self.run.id, "project": self.run.project, "group": self.run.group,
                "name": self.run.name, "dir": self.run.dir, "mode": os.environ.get("WANDB_MODE", "online")}

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.run.log({key: wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns] for r in rows])})

    def image(self, key: str, path: str) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(path)})

    def artifact(self, path: str, name: str, type: str, metadata: dict | None = None,
                 link_to: str | None = None) -> str | None:
        """Log a folder or file as an artifact; link it into the model registry only when online."""
        if self.run is None:
            return None
        import wandb

        art = wandb.Artifact(name=name, type=type, metadata=metadata or {})
        (art.add_dir if os.path.isdir(path) else art.add_file)(path)
        self.run.log_artifact(art)
        if link_to and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled"):
            with contextlib.suppress(Exception):
                self.run.link_artifact(art, link_to)
        return f"{name}:latest"


def logged_in() -> bool:
    """Whether wandb finds credentials: WANDB_API_KEY or an identity token file in the environment, or
    the ~/.netrc entry (or $NETRC's) that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from wandb.sdk.lib import wbauth

    try:
        return bool(wbauth.read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")))
    except Exception:  # a malformed entry: stay offline rather than fail the job over logging
        return False


def _group() -> str | None:
    """The sweep's folder name in a Hydra multirun, so its jobs are grouped; None in a single run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return os.path.basename(os.path.normpath(hc.sweep.dir))
    except (ValueError, ImportError):
        pass
    return None


@contextlib.contextmanager
def tracked(cfg: DictConfig, job_type: str, run_dir: str | None = None, run_id: str | None = None
            ) -> Iterator[Tracker]:
    """Open one W&B run with the resolved config for a stage, and close it whatever happens, marked failed
    when the stage failed. (Not W&B's own run context: it prints the traceback of every exception, and a
    user's bad input must end in one `error:` line.) With `run_id`, a job that was interrupted and runs
    again continues the same W&B run."""
    logger = cfg.get("logger") or {}
    # under a distributed launch only the first process logs (the others' metrics are the same run's)
    if not logger or logger.get("name", "none") == "none" or int(os.environ.get("RANK", "0") or 0) > 0:
        yield Tracker()
        return
    import wandb

    if os.environ.get("WANDB_MODE") is None and not logged_in():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=logger.get("project", "proxy-tuning"),
        entity=logger.get("entity"),
        group=logger.get("group") or _group(),
        job_type=job_type,
        tags=list(logger.get("tags") or []),
        config=OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True),
        dir=run_dir,
        id=run_id,
        resume="allow" if run_id else None,
        reinit="finish_previous",
    )
    try:
        yield Tracker(run)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
