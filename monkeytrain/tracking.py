"""Run logs: the main process prints, appends metrics.jsonl, draws the run's plots
and, with `--report-to wandb`, mirrors all of it to one W&B run; other ranks log nothing.

Every logger shares one interface (info, warn, write_file, start_tracking,
epoch, final, close), so the training loop never asks which rank it is on or
whether a tracker is on. A W&B run starts at start_tracking(), which train.py
calls once the run is viable (data read, model built): bad input creates no
W&B run and leaves no wandb/ folder in the run directory.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import json
import math
import netrc
import os
import secrets
import shutil
import string
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

from monkeytrain.errors import UserError, first_line, to_stderr
from monkeytrain.config import REPORT_TO_CHOICES
from monkeytrain.data.imagefiles import load_rgb
from monkeytrain.plots import CONFUSION_NAME, CURVES_NAME, write_run_plots
from monkeytrain.reachable import why_no_answer
from monkeytrain.storage import (WriteFailed, append_line, is_disk_full, over_quota, why_not_written,
                                 write_atomically)

RUN_ID_NAME = "wandb_run_id.txt"
METRICS_NAME = "metrics.jsonl"
DEFAULT_PROJECT = "monkeytrain"
# WANDB_MODE values with which wandb.init needs no account and never logs in.
NO_ACCOUNT_MODES = ("offline", "dryrun", "disabled")
CLOUD_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
PROBE_SECONDS = 10  # for the W&B server to answer one request; unreachable, wandb.init retries for about 95 s
OFFLINE_FIX = "set WANDB_MODE=offline to log the run offline at once, and upload it later with `wandb sync`"
SUMMARY_KEYS = ("test_accuracy", "test_accuracy_ci95", "test_loss", "best_epoch", "selected_on", "best_val_accuracy",
                "best_val_balanced_accuracy", "best_val_loss")
THUMBNAIL_PIXELS = 128


class RunLog:
    """Console lines, `metrics.jsonl` and the two plots in the run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_NAME
        self.folder = HeldFolder(run_dir)  # the run's folder, not one of its name made later

    def info(self, message: str) -> None:
        print(message, flush=True)

    def warn(self, message: str) -> None:
        to_stderr("warning", message)

    def start_tracking(self) -> None:
        """Once the run is viable: nothing to start for the local logs."""

    def write_file(self, name: str, text: str) -> Path:
        """A file of the run directory (config.yaml, results.json, ...), written once, by one process;
        whole or not at all, as an empty results.json would mark an unfinished run finished."""
        path = self.run_dir / name
        self.check_folder()
        write_atomically(path, text.encode())
        return path

    def epoch(self, metrics: dict) -> None:
        self.check_folder()
        append_line(self.metrics_path, metrics_line(metrics))  # a full disk leaves no half line
        print(format_epoch(metrics), flush=True)

    def check_folder(self) -> None:
        """Stop once the run's folder was deleted or moved away while the run went on. Writing on would
        make a new folder of its name (a saved state does) holding a run with holes: no config.yaml, no
        data record, the metrics of the epochs since; and results.json would mark it finished."""
        if not self.folder.still_there():
            raise run_folder_gone(self.run_dir)

    def final(self, results: dict, misclassified: list[dict], checkpoint_path: Path) -> None:
        """Once, after the test evaluation: curves.png and confusion_matrix.png. They only picture what
        metrics.jsonl and results.json hold: a disk too full for them costs a warning, not the results."""
        try:
            write_run_plots(self.run_dir, results)
        except (OSError, WriteFailed) as error:
            self.warn(f"the plots were not drawn ({why_not_written(error)}); their figures are in "
                      f"{self.metrics_path.name} and results.json.")

    def close(self) -> None:
        self.folder.release()


def metrics_line(metrics: dict) -> str:
    """An epoch's line of metrics.jsonl, strict JSON: a figure that is not a finite number (a diverged epoch's
    NaN or infinite loss) is null there, as JSON has no such numbers (Python would write NaN, which jq and
    other strict readers refuse), and "not_finite" gives its value ({"val_loss": "nan"}; float() reads it
    back): a null alone is a figure the epoch did not measure (the training figures of a resumed epoch)."""
    not_finite = {name: str(value) for name, value in metrics.items()
                  if isinstance(value, float) and not math.isfinite(value)}
    if not_finite:
        metrics = {**{name: None if name in not_finite else value for name, value in metrics.items()},
                   "not_finite": not_finite}
    return json.dumps(metrics) + "\n"


def run_folder_gone(run_dir: Path) -> UserError:
    """The line of a run whose folder went away while it trained (a log write or a state save found it)."""
    return UserError(f"the run folder {run_dir} was deleted or moved away while the run trained, and with it the "
                     "run's records; stopped rather than write an incomplete run there: start a new run.")


class HeldFolder:
    """An open descriptor of a folder, to tell it from one made later under its name: while it is held,
    the folder's inode cannot be given to another (a file system reuses a freed inode number at once)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.descriptor: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # no folder to hold: nothing to tell apart later
            self.descriptor = None
        self._closer = weakref.finalize(self, os.close, self.descriptor) if self.descriptor is not None else None

    def still_there(self) -> bool:
        """Whether `path` is still the folder held (True when none is)."""
        if self.descriptor is None:
            return True
        try:
            return os.path.samestat(os.fstat(self.descriptor), os.stat(self.path))
        except OSError:  # the path leads nowhere now
            return False

    def release(self) -> None:
        if self._closer is not None:
            self._closer()
        self.descriptor = None


class SilentLog(RunLog):
    """What every rank but the main one gets: it writes nothing anywhere."""

    def __init__(self) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def write_file(self, name: str, text: str) -> None:
        pass

    def epoch(self, metrics: dict) -> None:
        pass

    def final(self, results: dict, misclassified: list[dict], checkpoint_path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class WandbRunLog(RunLog):
    """Everything RunLog does and, from start_tracking() on, the same figures in one W&B run;
    where W&B cannot start, one warning line and the local logs only."""

    def __init__(self, run_dir: Path, report_to: str, config: dict, log_checkpoint: bool = False):
        super().__init__(run_dir)
        self.report_to, self.config, self.log_checkpoint = report_to, config, log_checkpoint
        self.run: Any = None  # None: not started yet, or W&B could not start
        self.wandb: Any = None
        self.last_epoch: int | None = None

    def start_tracking(self) -> None:
        try:
            self.wandb, self.run = start_wandb_run(self.run_dir, self.report_to, self.config)
        except TrackerUnavailable as problem:
            fix = f"; {problem.fix}" if problem.fix else ""
            self.warn(f"{problem}; logging to {self.run_dir} only{fix}.")

    def epoch(self, metrics: dict) -> None:
        super().epoch(metrics)
        self.last_epoch = metrics["epoch"]
        if self.run is not None:
            # "epochs" is the same every epoch and already in the config: no chart for it.
            # Nor for a figure the epoch did not measure (None): a gap, not a point at 0.
            self.run.log({k: v for k, v in metrics.items() if k != "epochs" and v is not None},
                         step=metrics["epoch"])

    def final(self, results: dict, misclassified: list[dict], checkpoint_path: Path) -> None:
        super().final(results, misclassified, checkpoint_path)
        if self.run is None:
            return
        try:
            self.upload_final(results, misclassified, checkpoint_path)
        except Exception as error:  # W&B copies the plots, tables and checkpoint into its folders first
            if not is_disk_full(error):
                raise
            # W&B's folder may be full alone (WANDB_DIR elsewhere, /tmp, a large checkpoint staged): its copies
            # only mirror the run's own files, so a warning, as for the plots, and results.json is still written
            self.warn(final_files_not_written(error, self.run_dir, self.offline_folder(), self.log_checkpoint))

    def upload_final(self, results: dict, misclassified: list[dict], checkpoint_path: Path) -> None:
        """The test figures in the W&B run's summary, its final media and, with --log-checkpoint, the model."""
        self.run.summary.update({key: results[key] for key in SUMMARY_KEYS if key in results})
        # The last epoch's step: W&B drops data logged to a step below the latest one.
        self.run.log(final_media(self.wandb, self.run_dir, results, misclassified), step=self.last_epoch)
        if self.log_checkpoint:
            self.run.log_artifact(checkpoint_artifact(self.wandb, self.run.id, checkpoint_path, results),
                                  aliases=["best"])

    def offline_folder(self) -> Path | None:
        """The offline run's folder (WANDB_DIR/wandb/offline-run-...), which `wandb sync` uploads; None online."""
        return Path(self.run.dir).parent if self.run.offline else None

    def close(self) -> None:
        super().close()
        run, self.run = self.run, None
        if run is not None:  # a second close finds nothing left to finish
            run.finish()


def final_files_not_written(error: BaseException, run_dir: Path, offline_folder: Path | None,
                            log_checkpoint: bool) -> str:
    """The warning of a full disk (or quota) met by W&B's end-of-run files: the test figures of its summary, its
    copies of the plots and misclassified images, its tables, the checkpoint artifact (which fails may vary)."""
    what = "your disk quota is used up" if over_quota(error) else "no space left"
    files = "the test figures of its summary, the plots and misclassified images" + (
        ", the best checkpoint" if log_checkpoint else "")
    sync = f", then upload the offline run with `wandb sync {offline_folder}`" if offline_folder else ""
    return (f"{what} on the device for the W&B run's final files ({first_line(error)}): it may lack {files}, "
            f"which results.json and {run_dir} hold; free some space{sync}.")


class TrackerUnavailable(Exception):
    """W&B was asked for (or chosen by auto) but cannot be used; the message says why, `fix` what to do."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix


def make_run_log(run_dir: Path, is_main_process: bool, report_to: str = "none", config: dict | None = None,
                 log_checkpoint: bool = False) -> RunLog:
    """The logger for this process; its tracker starts at start_tracking().

    Other ranks get a silent one. The main process gets the local RunLog, or a
    W&B-reporting one when `report_to` ("wandb", "none" or "auto": W&B when
    installed and configured) resolves to W&B, for the run with `config`; a W&B
    problem costs one warning line and training goes on with the local logs.
    """
    if report_to not in REPORT_TO_CHOICES:
        raise ValueError(f"report_to must be one of {REPORT_TO_CHOICES}, got {report_to!r}")
    if not is_main_process:
        return SilentLog()
    if report_to == "none" or (report_to == "auto" and not wandb_set_up(os.environ)):
        return RunLog(run_dir)  # auto means "W&B when it is set up": nothing to warn about
    if wandb_mode(os.environ) == "disabled":  # W&B turned off by its own switch: no run, no id file for none
        return RunLog(run_dir)
    return WandbRunLog(run_dir, report_to, config or {}, log_checkpoint)


def start_wandb_run(run_dir: Path, report_to: str, config: dict) -> tuple[Any, Any]:
    """(the wandb module, a started run) or TrackerUnavailable; never an interactive prompt."""
    try:
        import wandb
    except ImportError:
        raise TrackerUnavailable(f"--report-to {report_to}: the wandb package is not installed "
                                 "(pip install wandb)") from None
    # wandb.init asks for an API key on a terminal when it has none: only start
    # it when it needs no account (offline) or already has credentials.
    if not wandb_configured(os.environ):
        raise TrackerUnavailable(
            f"--report-to {report_to}: W&B is not configured (no WANDB_API_KEY, no ~/.netrc entry for "
            f"{wandb_hosts(os.environ)[0]}, no WANDB_MODE=offline)")
    online = wandb_mode(os.environ) not in NO_ACCOUNT_MODES
    silence = server_silence(wandb_server(wandb, os.environ)) if online else None
    if silence:  # a compute node without internet, say: not the 95 s wandb.init would wait to fail
        raise TrackerUnavailable(f"--report-to {report_to}: the W&B server {silence}", OFFLINE_FIX)
    had_an_id = (run_dir / RUN_ID_NAME).is_file()
    try:
        run_id = persistent_run_id(run_dir, new_run_id)
    except WriteFailed as error:  # a W&B run that a resume could not find again: none, as for other failures
        raise TrackerUnavailable(f"--report-to {report_to}: cannot keep the W&B run id in {RUN_ID_NAME} "
                                 f"({error.reason}) for a resume to continue the run") from error
    files = WandbFiles(Path(os.environ.get("WANDB_DIR") or run_dir) / "wandb")  # the offline run beside the weights
    try:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), id=run_id, resume="allow",
                         name=run_dir.name, job_type="train", config=config, dir=str(files.folder.parent))
        for name in ("val_accuracy", "val_balanced_accuracy"):
            run.define_metric(name, summary="max")  # right even if the job dies before final()
    except Exception as error:  # a tracker failure (network, bad key, server) must never stop training
        files.remove_those_of(run_id)  # a run that never started: no folder, no id for a resume to take up
        if not had_an_id:
            (run_dir / RUN_ID_NAME).unlink(missing_ok=True)
        reason = " ".join(str(error).split())  # wandb's messages span lines; the warning is one
        raise TrackerUnavailable(f"--report-to {report_to}: W&B could not start a run "
                                 f"({type(error).__name__}: {reason})", OFFLINE_FIX if online else "") from error
    return wandb, run


class WandbFiles:
    """W&B's folder (WANDB_DIR/wandb, else RUN/wandb) as it was before wandb.init, to take away what a failed
    start made there and nothing else: the folder may be shared with other runs (WANDB_DIR), and a resumed
    run's holds the offline runs of its earlier jobs."""

    def __init__(self, folder: Path):
        self.folder, self.existed = folder, folder.is_dir()
        self.names = {entry.name for entry in self.entries()}  # a resumed run's earlier jobs have its id too
        self.links = {entry.name: os.readlink(entry) for entry in self.entries() if entry.is_symlink()}

    def entries(self) -> list[Path]:
        return list(self.folder.iterdir()) if self.folder.is_dir() else []

    def remove_those_of(self, run_id: str) -> None:
        """The run's folders (wandb names them run-DATE_TIME-ID, offline-run-...), the links to them that wandb
        makes (latest-run, debug.log) back as they were, and W&B's folder if this start made it."""
        for entry in self.entries():
            if entry.name.endswith(f"-{run_id}") and entry.name not in self.names and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.entries():
            if entry.is_symlink() and not entry.exists():  # led to the run removed, or to nothing
                entry.unlink()
                if entry.name in self.links:
                    os.symlink(self.links[entry.name], entry)
        if not self.existed:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def wandb_mode(environ: Mapping[str, str]) -> str:
    """WANDB_MODE as wandb reads it: offline, disabled, ...; empty for the default (online)."""
    return environ.get("WANDB_MODE", "").strip().lower()


def wandb_server(wandb: Any, environ: Mapping[str, str]) -> str:
    """The W&B server a run logs to: WANDB_BASE_URL, else the one `wandb login --host` saved in W&B's
    settings file, else wandb's default (its cloud)."""
    if environ.get("WANDB_BASE_URL", "").strip():
        return environ["WANDB_BASE_URL"].strip()
    settings = configparser.ConfigParser()
    config_dir = Path(environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    with contextlib.suppress(configparser.Error, OSError, UnicodeDecodeError):
        settings.read(config_dir / "settings")
    try:
        return settings.get("default", "base_url", fallback="") or str(wandb.Settings().base_url)
    except Exception:  # a wandb that names its default elsewhere
        return f"https://{CLOUD_HOSTS[0]}"


def server_silence(url: str) -> str | None:
    """'URL did not answer (ConnectionError)' where the server does not answer one HEAD request within
    PROBE_SECONDS, else None. Through requests (which wandb depends on), so through the proxy the
    environment names (HTTPS_PROXY), as wandb's own requests go; any answer, an error status too, is one,
    and so is a certificate requests refuses (a private CA that wandb-core takes from SSL_CERT_FILE)."""
    try:
        import requests
    except ImportError:  # no probe: wandb.init finds out itself
        return None
    return why_no_answer(url, lambda: requests.head(url, timeout=PROBE_SECONDS, allow_redirects=False),
                         f"{PROBE_SECONDS} s", answers=(requests.exceptions.SSLError,))


def wandb_set_up(environ: Mapping[str, str]) -> bool:
    """The package is installed and can start a run without asking anything."""
    return importlib.util.find_spec("wandb") is not None and wandb_configured(environ)


def wandb_configured(environ: Mapping[str, str], netrc_path: Path | None = None) -> bool:
    """True when wandb.init can start without asking anything: an explicit
    offline/disabled WANDB_MODE, WANDB_API_KEY, or a netrc login for the W&B host."""
    if wandb_mode(environ) in NO_ACCOUNT_MODES:
        return True
    if environ.get("WANDB_API_KEY", "").strip():
        return True
    path = netrc_path or Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        logins = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError, UnicodeDecodeError):  # none, or not one wandb could read either
        return False
    # W&B's API key is the password field; an entry without one makes wandb ask.
    return any((login := logins.authenticators(host)) and login[2] for host in wandb_hosts(environ))


def wandb_hosts(environ: Mapping[str, str]) -> list[str]:
    """The netrc machine names wandb looks up: WANDB_BASE_URL's host[:port], else the
    cloud's (api.wandb.ai; wandb 0.31 defaults to its api.forge.coreweave.com alias)."""
    if environ.get("WANDB_BASE_URL"):
        return [urlparse(environ["WANDB_BASE_URL"]).netloc]
    return list(CLOUD_HOSTS)


def persistent_run_id(run_dir: Path, new_id: Callable[[], str]) -> str:
    """The W&B run id kept in RUN/wandb_run_id.txt, made on first use, so a
    requeued or resumed job continues the same W&B run. Main process only."""
    path = run_dir / RUN_ID_NAME
    existing = path.read_text().strip() if path.is_file() else ""
    if existing:
        return existing
    run_id = new_id()
    # Whole or not at all: an empty one would start a second W&B run on resume
    write_atomically(path, f"{run_id}\n".encode())
    return run_id


def new_run_id() -> str:
    """8 random lowercase letters and digits, the form of W&B's own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def final_media(wandb: Any, run_dir: Path, results: dict, misclassified: list[dict]) -> dict:
    """The end-of-run W&B entries: interactive confusion matrix, both PNGs, misclassified images."""
    return {
        "test/confusion_matrix": confusion_chart(wandb, results["confusion_matrix"], results["class_names"]),
        **{key: wandb.Image(str(run_dir / name)) for key, name in
           (("test/confusion_matrix_png", CONFUSION_NAME), ("curves", CURVES_NAME)) if (run_dir / name).is_file()},
        "test/misclassified": misclassified_table(wandb, misclassified),
    }


def confusion_chart(wandb: Any, matrix: list[list[int]], names: list[str]) -> Any:
    """W&B's interactive confusion matrix. wandb.plot.confusion_matrix sends a row for every cell, and W&B
    keeps a table's first 200,000 rows (MAX_ARTIFACT_ROWS): past 447 classes the last classes would vanish
    with no more than a line in W&B's debug log. There only the cells that hold images are sent."""
    title = "test confusion matrix"
    if len(names) ** 2 <= wandb.Table.MAX_ARTIFACT_ROWS:
        true, predicted = expand_confusion(matrix)
        return wandb.plot.confusion_matrix(y_true=true, preds=predicted, class_names=names, title=title)
    cells = [[names[t], names[p], count] for t, row in enumerate(matrix) for p, count in enumerate(row) if count]
    columns = ["Actual", "Predicted", "nPredictions"]  # as wandb.plot.confusion_matrix names them for its chart
    return wandb.plot_table("wandb/confusion_matrix/v1", wandb.Table(columns=columns, data=cells),
                            {name: name for name in columns}, {"title": title})


def expand_confusion(matrix: list[list[int]]) -> tuple[list[int], list[int]]:
    """Per-image (true, predicted) class indices from [true][predicted] counts, which is
    what wandb.plot.confusion_matrix takes."""
    pairs = [(t, p) for t, row in enumerate(matrix) for p, count in enumerate(row) for _ in range(int(count))]
    return [t for t, _ in pairs], [p for _, p in pairs]


def misclassified_table(wandb: Any, misclassified: list[dict]) -> Any:
    """Thumbnail, true and predicted class, confidence and path, in the order given
    (results.misclassified: the most confident mistakes first)."""
    table = wandb.Table(columns=["image", "true", "predicted", "confidence", "path"])
    for item in misclassified:
        table.add_data(thumbnail(wandb, Path(item["path"])), item["true"], item["predicted"],
                       float(item["confidence"]), str(item["path"]))
    return table


def thumbnail(wandb: Any, path: Path) -> Any:
    """A small wandb.Image of the file, or None if it can no longer be read (the row still counts)."""
    try:
        image = load_rgb(path)
    except OSError:
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    return wandb.Image(image)


def checkpoint_artifact(wandb: Any, run_id: str, checkpoint_path: Path, results: dict) -> Any:
    artifact = wandb.Artifact(f"model-{run_id}", type="model",
                              metadata={key: results[key] for key in SUMMARY_KEYS if key in results})
    artifact.add_file(str(checkpoint_path))
    return artifact


def format_epoch(m: dict) -> str:
    trained = (f"train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.2%}" if m["train_loss"] is not None
               else "train n/a (trained before the resume)")
    speed = f"{m['images_per_second']:.0f} img/s" if m["images_per_second"] is not None else "- img/s"
    balanced = m.get("val_balanced_accuracy")  # the mean of the per-class accuracies (--select-on)
    validated = f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.2%}" + (
        f" bal {balanced:.2%}" if balanced is not None else "")
    return (
        f"epoch {m['epoch']:>3}/{m['epochs']}  {trained}  {validated}  "
        f"lr {m['lr']:.2e}  {speed}  {m['epoch_seconds']:.1f}s"
        + ("  *best*" if m.get("is_best") else "")
    )
